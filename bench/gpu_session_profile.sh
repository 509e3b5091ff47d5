#!/usr/bin/env bash
# Issue 17's measurements in one GPU call of about 9 minutes: the GPTQ jobs at the Llama-3-8B and -70B shapes
# (whole job, per phase, per block, peak memory, today's evaluation stage), one block of each under the torch
# profiler, Nsight Compute on the NF4 quantize and double-quant kernels, and the NF4 kernel benchmark.
#
#   bash bench/gpu_session_profile.sh            on the GPU machine, from the repository root (carry .whl:
#                                                bitsandbytes for bnb_kernels.py); results under $OUT
#   SMOKE=1 bash bench/gpu_session_profile.sh    the same steps on the CPU at tiny shapes (CUDA-only steps say so
#                                                and exit cleanly)
#   ONLY=bnb-kernels,profile-8b-defaults bash ... only the steps named (e.g. those a first call had no time for)
#   (steps, in this order: env gptq-8b-fastest-full-eval gptq-8b-fastest gptq-70b-defaults bnb-variants
#    gptq-8b-defaults gptq-factor profile-8b-fastest profile-70b-defaults ncu-nf4 gptq-70b-fastest bnb-kernels
#    profile-8b-defaults gptq-8b-cprofile; BNB_VARIANTS=mode:bpp:warps,... limits the NF4 kernel sweep, FACTOR_SIZES and
#    FACTOR_TOKENS the factorization step; eval-8b eval-70b, last: the streamed evaluation of
#    16 x 2048 tokens beside a 4- / 3-block job, extrapolated to 32 / 80 blocks; eval-8b-read-back: the same
#    evaluation streamed after the job from the exported files read back (the path before); then the format benchmarks:
#    fp8-8b qlora-8b gguf-kernels gguf-8b gptq-engines awq-8b)
#
# Fail-soft: each step runs under its own time limit (and within BUDGET_S for the whole script, default 540 s);
# a step that fails or times out is logged and the next one runs. Steps are ordered by what they are worth, so a
# short budget drops the last ones. Back come (at most 8 files): summary.md (the table printed last),
# results.tar.gz (every results .json/.md, the profile tables, the ncu summary) and logs.tar.gz.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu-session-out}
BUDGET_S=${BUDGET_S:-540}
SMOKE=${SMOKE:-0}
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  G8=(--shape tiny); G70=(--shape tiny); TOKENS=(--nsamples 4 --seqlen 64 --eval-windows 2); B8=4; B70=3
  FACTOR=(--sizes 256,512 --tokens 2048 --rows 64)
  FMT=(--smoke); AWQ=(--shape tiny --blocks 2 --nsamples 2 --seqlen 64); GGUF_IMATRIX=${GGUF_IMATRIX:-2}
else
  # shellcheck source=bench/gpu_env.sh disable=SC1091
  source bench/gpu_env.sh
  PY=${PY:-python3}
  G8=(--shape 8b); G70=(--shape 70b); TOKENS=(--nsamples 128 --seqlen 2048 --eval-windows 16); B8=4; B70=3
  FACTOR=(--sizes "${FACTOR_SIZES:-4096,14336,28672}" --tokens "${FACTOR_TOKENS:-32768}")
  FMT=(); AWQ=(--shape 8b --blocks 4); GGUF_IMATRIX=${GGUF_IMATRIX:-64}
fi
W=${WORKDIR:-/tmp/qaas-gpu-session}
R=$W/results; L=$W/logs; D=$W/models
rm -rf "$R" "$L"
mkdir -p "$OUT" "$R" "$L" "$D"
STEPS=$W/steps.tsv
: > "$STEPS"
export PY R W

step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    return
  fi
  local left=$((BUDGET_S - ($(date +%s) - START) - 20))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped: budget spent\t0\t\n' "$name" >>"$STEPS"
    echo "== $name: skipped, budget spent"
    return
  fi
  local limit=$((max < left ? max : left))
  echo "== $name (at most ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$L/$name.log" 2>&1
  rc=$?
  status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timed out at ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="failed (rc $rc)"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" \
    "$(grep '^SUMMARY ' "$L/$name.log" | tail -1 | cut -c9- | tr '\t|' '  ')" >>"$STEPS"
  tail -n 3 "$L/$name.log"
}

ncu_nf4() {  # Nsight Compute on the NF4 and NF4 + double-quant quantize kernels at the three shapes
  local ncu
  ncu=$(command -v ncu || find /opt/nvidia /usr/local/cuda/bin -maxdepth 3 -name ncu -type f 2>/dev/null | head -n 1)
  if [ -z "$ncu" ] || ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "SUMMARY ncu: skipped, it needs CUDA and Nsight Compute (ncu)"
    return 0
  fi
  "$ncu" --version | tail -n 1
  "$ncu" --clock-control none --set full -k 'regex:quantize|reduce_kernel' --launch-count 12 -f -o "$W/nf4" \
    "$PY" -P bench/bnb_kernels.py --ncu-target "$W/nf4-plan.json" || return $?
  "$PY" -P bench/ncu_summary.py "$W/nf4.ncu-rep" "$W/nf4-plan.json" "$R/ncu_nf4.txt" --ncu "$ncu"
}
export -f ncu_nf4

step env 40 bash -c "nvidia-smi || true; $PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'; df -h /tmp; free -g"
gs() {  # gs STEP MAX_SECONDS OPTIONS...: a gptq_speed.py step whose results files are named after the step
  local name=$1 max=$2
  shift 2
  step "$name" "$max" "$PY" -P bench/gptq_speed.py --out "$R" --workdir "$D" "${TOKENS[@]}" --tag "$name" "$@"
}
gs gptq-8b-fastest-full-eval 270 "${G8[@]}" --evaluate
gs gptq-8b-fastest 75 "${G8[@]}" --blocks "$B8"
gs gptq-70b-defaults 110 "${G70[@]}" --blocks "$B70" --defaults
# the fixed costs of a job (load, calibration data, the first block) by host function, under cProfile
gs gptq-8b-cprofile 75 "${G8[@]}" --blocks 2 --cprofile
step bnb-variants 90 bash -c "$PY -P bench/bnb_variants.py > \"\$R/bnb_variants.txt\" 2>&1; rc=\$?; tail -n 40 \"\$R/bnb_variants.txt\"; exit \$rc"
gs gptq-8b-defaults 60 "${G8[@]}" --blocks "$B8" --defaults
step gptq-factor 60 "$PY" -P bench/gptq_factor.py --out "$R" "${FACTOR[@]}"
gs profile-8b-fastest 90 --mode profile "${G8[@]}"
gs profile-70b-defaults 120 --mode profile "${G70[@]}" --defaults
step ncu-nf4 150 bash -c ncu_nf4
gs gptq-70b-fastest 80 "${G70[@]}" --blocks "$B70"
step bnb-kernels 120 "$PY" -P bench/bnb_kernels.py --out "$R/bnb_kernels"
gs profile-8b-defaults 90 --mode profile "${G8[@]}" --defaults
gs eval-8b 150 "${G8[@]}" --blocks "$B8" --evaluate
gs eval-70b 180 "${G70[@]}" --blocks "$B70" --defaults --evaluate
gs eval-8b-read-back 150 "${G8[@]}" --blocks "$B8" --evaluate --eval-read-back
# The format benchmarks of issues 12, 14, 15 and 16 (one shard store in $D shared with the steps above).
step fp8-8b 200 "$PY" -P bench/fp8_gpu.py "${FMT[@]}" --workdir "$D" --budget 170 --out "$R/fp8_gpu.json"
step qlora-8b 230 "$PY" -P bench/qlora_speed.py "${FMT[@]}" --workdir "$D" --budget 200 --out "$R/qlora_speed.json"
step gguf-kernels 150 "$PY" -P bench/gguf_kernels.py "${FMT[@]}" --budget 120 --out "$R/gguf_kernels.json"
step gguf-8b 300 "$PY" -P bench/gguf_speed.py "${FMT[@]}" --workdir "$D" --budget 270 --imatrix "$GGUF_IMATRIX" --out "$R/gguf_speed.json"
step gptq-engines 330 "$PY" -P bench/gptq_engines_gpu.py "${FMT[@]}" --workdir "$D" --budget 300 \
  --out "$R/gptq_engines_gpu.json"
step awq-8b 150 "$PY" -P bench/awq_speed.py "${AWQ[@]}" --workdir "$D" --budget 130 --out "$R/awq_speed"

{
  echo "# GPU session: issue 17 measurements ($(date -u +%FT%TZ), $(($(date +%s) - START))s of ${BUDGET_S}s)"
  echo
  echo "| step | status | s | summary |"
  echo "|---|---|---:|---|"
  while IFS=$'\t' read -r name status secs summary; do
    echo "| $name | $status | $secs | $summary |"
  done <"$STEPS"
  echo
  echo "Results (results.tar.gz): $(find "$R" -maxdepth 1 -type f -printf "%f ")"
} >"$OUT/summary.md"
tar czf "$OUT/results.tar.gz" -C "$W" results
tar czf "$OUT/logs.tar.gz" -C "$W" logs steps.tsv
cat "$OUT/summary.md"
