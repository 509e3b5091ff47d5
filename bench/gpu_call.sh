# One lent-GPU call of named steps, each under its own time limit, within BUDGET seconds in all; every log and
# result goes into $OUT/all.tgz (a call brings back at most 8 files). From the repository root, carrying
# `shared` (stories260K and the texts, copied from ../shared/assets) and `.whl` (bitsandbytes etc., see
# gpu_session_2026-12-02c.md):  STEPS=gptq-8b-pre,gguf-8b BUDGET=300 bash bench/gpu_call.sh
source bench/gpu_env.sh
O=$OUT; OUT=$O/r; mkdir -p $OUT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QAAS_TEST_ASSETS=$(pwd)/shared/assets
T0=$(date +%s)
st() { local n=$1 m=$2; shift 2; local left=$((${BUDGET:-570} - ($(date +%s) - T0))); [ $left -lt 30 ] && { echo "$n skipped" >> $OUT/steps.txt; return; }; [ $m -gt $left ] && m=$left; local t=$(date +%s); timeout -k 5 $m "$@" > $OUT/$n.log 2>&1; echo "$n rc=$? $(( $(date +%s) - t ))s" >> $OUT/steps.txt; tail -2 $OUT/$n.log; }
for s in ${STEPS//,/ }; do
  case $s in
    gguf-kernels) st $s 150 python3 -P bench/gguf_kernels.py --budget 120 --out $OUT/gguf_kernels.json ;;
    gguf-unroll) for u in ${UNROLLS:-4 8 32}; do export QAAS_GGUF_ELEMENT_UNROLL=$u; st $s-$u 90 python3 -P bench/gguf_kernels.py --types Q2_K,Q4_K,Q5_K,Q4_1,Q5_1 --budget 80 --out $OUT/gguf_kernels-unroll$u.json; done; unset QAAS_GGUF_ELEMENT_UNROLL ;;
    gptq-8b-pre) st $s 90 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-8b-fastest-preloaded --shape 8b --blocks 4 --preloaded ;;
    factor) st $s 120 python3 -P bench/gptq_factor.py --out $OUT --sizes 8192,14336,28672 --tokens 32768 ;;
    gptq-70b-pre) st $s 120 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-70b-defaults-preloaded --shape 70b --blocks 3 --defaults --preloaded ;;
    engine-check) st $s 150 python3 -P bench/gpu_engine_check.py --stories shared/assets/models/stories260K --text shared/assets/text/wikitext-2-raw-v1/test.joined.txt --out $OUT/gpu_engine_check.json ;;
    profile-8b-first) st $s 100 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag profile-8b-first-block --mode profile --shape 8b --profile-block 0 --preloaded ;;
    gguf-8b) st $s 200 python3 -P bench/gguf_speed.py --workdir /tmp/g --budget 180 --imatrix 64 --out $OUT/gguf_speed.json ;;
    gptq-cprofile) st $s 100 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-8b-cprofile --shape 8b --blocks 2 --cprofile ;;
    gptq-8b) st $s 90 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-8b-fastest --shape 8b --blocks 4 ;;
    gptq-70b) st $s 120 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-70b-defaults --shape 70b --blocks 3 --defaults ;;
    profile-8b) st $s 100 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag profile-8b-fastest --mode profile --shape 8b ;;
    profile-70b) st $s 120 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag profile-70b-defaults --mode profile --shape 70b --defaults ;;
    bnb) st $s 120 python3 -P bench/bnb_kernels.py --out $OUT/bnb_kernels ;;
    gptq-8b-defaults-pre) st $s 90 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-8b-defaults-preloaded --shape 8b --blocks 4 --defaults --preloaded ;;
    gptq-70b-fastest-pre) st $s 120 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --tag gptq-70b-fastest-preloaded --shape 70b --blocks 3 --preloaded ;;
    eval-8b-pre) st $s 120 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --eval-windows 16 --tag eval-8b-preloaded --shape 8b --blocks 4 --evaluate --preloaded ;;
    eval-70b-pre) st $s 150 python3 -P bench/gptq_speed.py --out $OUT --workdir /tmp/m --nsamples 128 --seqlen 2048 --eval-windows 16 --tag eval-70b-preloaded --shape 70b --blocks 3 --defaults --evaluate --preloaded ;;
    rms-norm) st $s 60 python3 -P bench/rms_norm.py --out $OUT/rms_norm ;;
  esac
done
cat $OUT/steps.txt
tar czf $O/all.tgz -C $OUT . && rm -rf $OUT
