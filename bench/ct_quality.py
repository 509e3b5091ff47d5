"""compressed-tensors quality on a real model, every scheme side by side with fp16 in one run: WikiText-2 test
perplexity of SmolLM2-135M-Instruct as transformers + compressed-tensors load each checkpoint (CPU).

    python bench/ct_quality.py --model /tmp/smol/fp16 --out bench/results/ct_quality.md

The model is SmolLM2-135M-Instruct converted to fp16 (../shared/assets/README.md; bench/gptq_quality.py).
Every row is a job through the engine's own pipeline (`pipeline.quantize`, CPU), loaded back with
`AutoModelForCausalLM.from_pretrained(out, dtype=float32)` (compressed-tensors decompresses the weights and
applies the scheme's activation quantization in every forward, as the serving engines do), evaluated with
`evaluate.perplexity` on the first `--windows` x `--seqlen` tokens of WikiText-2 raw test. Calibrated rows
(FP8 static, SmoothQuant, GPTQ) use tinyshakespeare, other text than the evaluation's.

Rows are written as they finish (`--out` and its .json), so an interrupted run keeps what it measured;
`--rows` picks the rows, `--budget` (seconds) skips the rows that would start after it is spent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
#: row -> (label, quantization_config without quant_method, calibrated)
ROWS: dict[str, tuple[str, dict, bool]] = {
    "fp16": ("fp16 (original)", {}, False),
    "fp8-dynamic": ("FP8_DYNAMIC (per-channel e4m3, dynamic per-token activations)", {"scheme": "FP8_DYNAMIC"}, False),
    "fp8-static": ("FP8 (per-tensor e4m3, static input scales)", {"scheme": "FP8"}, True),
    "w8a8": ("W8A8 int8 RTN, dynamic per-token int8 activations", {"scheme": "W8A8"}, False),
    "w8a8-sq": ("W8A8 + SmoothQuant 0.8, RTN", {"scheme": "W8A8", "smoothing_strength": 0.8}, True),
    "w8a8-sq-gptq": ("W8A8 + SmoothQuant 0.8, GPTQ", {"scheme": "W8A8", "smoothing_strength": 0.8,
                                                      "weights": "gptq"}, True),
    "w8a16": ("W8A16 RTN", {"scheme": "W8A16"}, False),
    "w4a16": ("W4A16 RTN", {"scheme": "W4A16"}, False),
    "w4a16-gptq": ("W4A16 GPTQ", {"scheme": "W4A16", "weights": "gptq"}, True),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/smol/fp16")
    ap.add_argument("--eval-text", default=str(ASSETS / "text/wikitext-2-raw-v1/test.joined.txt"))
    ap.add_argument("--calib-text", default=str(ASSETS / "text/tinyshakespeare/input.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds; rows starting later are skipped")
    ap.add_argument("--workdir", default="/tmp/ct-quality")
    ap.add_argument("--out", default="bench/results/ct_quality.md")
    a = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from qaas.worker.engine.evaluate import load_eval_data, load_original_model, perplexity
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    t_start = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(a.model, a.eval_text, seqlen=a.seqlen, max_windows=a.windows)
    calib_text = str(Path(a.calib_text).resolve())
    options = EngineOptions(device="cpu", evaluate=False, allowed_roots=("/",))
    rows: list[dict] = []
    meta: dict = {}
    for row in a.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r} (rows: {', '.join(ROWS)})")
        if time.time() - t_start > a.budget:
            print(f"budget spent: {row} skipped", flush=True)
            continue
        label, qc, calibrated = ROWS[row]
        if row == "fp16":
            t = time.time()
            ppl = perplexity(load_original_model(a.model, device="cpu").float(), data, device="cpu")
            rows.append({"row": row, "model": label, "ppl": ppl, "quantize_s": 0.0, "eval_s": time.time() - t})
        else:
            qc = {"quant_method": "compressed-tensors", **qc}
            if qc["scheme"] in ("W4A16", "W8A16"):
                qc["group_size"] = a.group_size
            if calibrated:
                qc.update(dataset=calib_text, nsamples=a.nsamples, model_seqlen=a.calib_seqlen)
            out = work / row
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            res = quantize({"path": a.model}, qc, out, options=options)
            t_q = time.time() - t
            if res.get("calibration"):
                meta["calibration"] = res["calibration"]
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            t = time.time()
            ppl = perplexity(model, data, device="cpu")
            del model
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            rows.append({"row": row, "model": label, "ppl": ppl, "quantize_s": t_q, "eval_s": time.time() - t,
                         "quantized_layers": res["quantized_modules"], "kept_float": res["skipped_modules"],
                         "weights_bytes": size, "config": qc | ({"dataset": "tinyshakespeare"} if calibrated else {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "kept_float"}), flush=True)
        write(a, rows, data, meta)
    return 0


def write(a: argparse.Namespace, rows: list[dict], data, meta: dict) -> None:
    calib = meta.get("calibration")
    base = next((r["ppl"] for r in rows if r["row"] == "fp16"), None)
    lines = [
        "# compressed-tensors quality: SmolLM2-135M-Instruct, WikiText-2 test perplexity, every scheme beside fp16",
        "",
        f"Date {time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}. Command: `python bench/ct_quality.py "
        f"--model {a.model} --windows {a.windows} --seqlen {a.seqlen} --nsamples {a.nsamples} "
        f"--calib-seqlen {a.calib_seqlen} --group-size {a.group_size} --rows {a.rows}`.",
        "",
        f"Evaluation: first {data.windows} x {data.seqlen} tokens of WikiText-2 raw test (text sha256 "
        f"`{data.text_sha256[:16]}…`). Each checkpoint loaded by transformers + compressed-tensors in float32 on the "
        "CPU (weights decompressed, activations quantized in every forward as the scheme says); fp16 is the source "
        "model in float32. "
        + (f"Calibration (FP8 static, SmoothQuant, GPTQ): tinyshakespeare, {calib['samples']} windows x "
           f"{calib['seqlen']} tokens, seed {calib['seed']}. " if calib else ""),
        "",
        "| scheme | WikiText-2 ppl | vs fp16 | layers quantized | weights MB | quantize s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{100 * (r['ppl'] / base - 1):+.2f} %" if base and r["row"] != "fp16" else "-"
        size = f"{r['weights_bytes'] / 1e6:.0f}" if r.get("weights_bytes") else "-"
        lines.append(f"| {r['model']} | {r['ppl']:.3f} | {delta} | {r.get('quantized_layers', '-')} | {size} | "
                     f"{r['quantize_s']:.0f} | {r['eval_s']:.0f} |")
    lines += ["", f"W4A16 / W8A16 at group size {a.group_size}: SmolLM2's hidden size 576 is not a multiple of 128, "
              "so at the preset's 128 no layer reading the hidden state could be quantized (refused at submission); "
              "FP8_BLOCK is refused for the same reason (576 does not tile 128 x 128 blocks). The output head is tied "
              "to the embeddings and stays in fp16 (ignore: lm_head), as llm-compressor leaves it. The source weights "
              "were already on a Q4_1 grid (blocks of 32, asymmetric; assets README), which symmetric int4 in groups "
              "of 64 does not land on."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "eval": data.describe(), "calibration": calib,
                                                            "args": vars(a)}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
