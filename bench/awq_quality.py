"""AWQ quality on a real model, side by side with its peers in one run: WikiText-2 test perplexity of fp16,
round-to-nearest on AWQ's grid, GPTQ and AWQ at the same bits and group size (CPU).

    python bench/awq_quality.py --model /tmp/smol/fp16 --out bench/results/awq_quality.md

The model is SmolLM2-135M-Instruct converted to fp16 (see ../shared/assets/README.md and bench/gptq_quality.py).
Calibration: tinyshakespeare (other text than the evaluation), the same `--nsamples` windows of
`--calib-seqlen` tokens for GPTQ and AWQ, both through the engine's own pipeline (`pipeline.quantize`, CPU).
Evaluation: the first `--windows` x `--seqlen` tokens of WikiText-2 test (`evaluate.perplexity`); GPTQ and AWQ
are evaluated from their saved checkpoints, dequantized into the original architecture; RTN rounds the same
layers on AWQ's grid (asymmetric, float16 scales) with neither scaling nor clipping, and on GPTQ's
(symmetric).

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
ROWS = ("fp16", "rtn-asym", "rtn-sym", "gptq", "awq-noclip", "awq", "awq-noduo")


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
    ap.add_argument("--workdir", default="/tmp/awq-quality")
    ap.add_argument("--out", default="bench/results/awq_quality.md")
    a = ap.parse_args(argv)

    from qaas.worker.engine.evaluate import load_eval_data, load_original_model, perplexity
    from qaas.worker.engine.gptq_algorithm import rtn_quantize
    from qaas.worker.engine.methods.awq import format as awq_format
    from qaas.worker.engine.methods.awq.search import group_quantize
    from qaas.worker.engine.methods.gptq.format import load_saved_weights as load_gptq
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    t_start = time.time()
    torch.manual_seed(0)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gs = a.group_size
    data = load_eval_data(a.model, a.eval_text, seqlen=a.seqlen, max_windows=a.windows)
    calib_text = str(Path(a.calib_text).resolve())
    options = EngineOptions(device="cpu", evaluate=False, allowed_roots=("/",))
    rows: list[dict] = []
    meta: dict = {}

    def load():
        return load_original_model(a.model, device="cpu").float()

    def block_linears(m):
        """The block linears AWQ's layout can hold (all 210 of SmolLM2's at group size 64)."""
        return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n
                and awq_format.unsupported_reason(mod.in_features, mod.out_features, gs) is None]

    def record(name: str, ppl: float, t_quant: float, t_eval: float, **extra) -> None:
        rows.append({"model": name, "bits": 4 if name != "fp16 (original)" else None,
                     "group": gs if name != "fp16 (original)" else None, "ppl": ppl, "quantize_s": t_quant,
                     "eval_s": t_eval, **extra})
        print(json.dumps(rows[-1]), flush=True)
        write(a, rows, data, meta, gs)

    def calibrated(method: str, qc: dict, label: str) -> None:
        out = work / label
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        res = quantize({"path": a.model}, {"dataset": calib_text, "nsamples": a.nsamples,
                                           "model_seqlen": a.calib_seqlen, **qc}, out, options=options)
        t_q = time.time() - t
        m = load()
        if method == "awq":
            awq_format.load_saved_weights(m, out, group_size=gs)
        else:
            load_gptq(m, out, bits=4, fmt="gptq")
        t = time.time()
        ppl = perplexity(m, data, device="cpu")
        meta["calibration"] = res["calibration"] or (res["quantization_config"].get("meta") or {}).get("calibration")
        record(label, ppl, t_q, time.time() - t, quantized_layers=res["quantized_modules"],
               kept_float=len([s for s in res["skipped_modules"] if ".layers." in s]))

    for row in a.rows.split(","):
        if time.time() - t_start > a.budget:
            print(f"budget spent: {row} skipped", flush=True)
            continue
        if row == "fp16":
            t = time.time()
            record("fp16 (original)", perplexity(load(), data, device="cpu"), 0.0, time.time() - t)
        elif row in ("rtn-asym", "rtn-sym"):
            t = time.time()
            m = load()
            with torch.no_grad():
                for _, mod in block_linears(m):
                    w = mod.weight.data
                    mod.weight.copy_(group_quantize(w, gs).w_hat if row == "rtn-asym"
                                     else rtn_quantize(w, bits=4, group_size=gs, sym=True))
            t_q = time.time() - t
            t = time.time()
            label = "RTN asym (AWQ's grid)" if row == "rtn-asym" else "RTN sym (GPTQ's grid)"
            record(label, perplexity(m, data, device="cpu"), t_q, time.time() - t, quantized_layers=len(block_linears(m)))
        elif row == "gptq":
            calibrated("gptq", {"quant_method": "gptq", "bits": 4, "group_size": gs, "sym": True, "desc_act": False,
                                "damp_percent": 0.01}, "GPTQ (sym, damp 0.01)")
        elif row == "awq":  # the service's defaults, AutoAWQ's: duo scaling and the clipping search
            calibrated("awq", {"quant_method": "awq", "group_size": gs}, "AWQ (duo scaling, clip: the defaults)")
        elif row == "awq-noduo":
            calibrated("awq", {"quant_method": "awq", "group_size": gs, "duo_scaling": False},
                       "AWQ (s = s_x^a as in the paper, clip)")
        elif row == "awq-noclip":
            calibrated("awq", {"quant_method": "awq", "group_size": gs, "apply_clip": False},
                       "AWQ (duo scaling), no clip")
        else:
            raise SystemExit(f"unknown row {row!r} (rows: {', '.join(ROWS)})")
    return 0


def write(a: argparse.Namespace, rows: list[dict], data, meta: dict, gs: int) -> None:
    calib = meta.get("calibration")
    lines = [
        "# AWQ quality: SmolLM2-135M-Instruct, WikiText-2 test perplexity, beside RTN and GPTQ",
        "",
        f"Date {time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}. Command: `python bench/awq_quality.py "
        f"--model {a.model} --windows {a.windows} --seqlen {a.seqlen} --nsamples {a.nsamples} "
        f"--calib-seqlen {a.calib_seqlen} --group-size {gs} --rows {a.rows}`.",
        "",
        f"Evaluation: first {data.windows} x {data.seqlen} tokens of WikiText-2 raw test (text sha256 "
        f"`{data.text_sha256[:16]}…`), model run in float32 on the CPU. "
        + (f"Calibration (GPTQ and AWQ alike): tinyshakespeare, {calib['samples']} windows x {calib['seqlen']} "
           f"tokens, seed {calib['seed']} (token sha256 `{calib['sha256'][:16]}…`). " if calib else "")
        + "GPTQ and AWQ are measured on their saved checkpoints, dequantized into the original architecture; "
          "RTN rounds the same block linears without calibration.",
        "",
        "| model | bits | group | WikiText-2 ppl | quantize s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits'] or '-'} | {r['group'] or '-'} | {r['ppl']:.3f} | "
                     f"{r['quantize_s']:.0f} | {r['eval_s']:.0f} |")
    layers = next((r["quantized_layers"] for r in rows if r.get("quantized_layers")), None)
    lines += ["", f"Group size {gs}, {layers} block layers quantized in every 4-bit row. SmolLM2's hidden size 576 "
              "is not a multiple of 128, and AWQ's GEMM layout and GPTQ's (like every loader of them) hold whole "
              "groups only, so at group size 128 the 180 layers reading the hidden state (q/k/v/o/gate/up) stay "
              "float16 in every row and only the 30 down_proj (1536 wide) are quantized; 64 divides both 576 and "
              "1536. The source weights were already on a Q4_1 grid (blocks of 32; assets README), which flatters "
              "plain rounding."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "eval": data.describe(), "calibration": calib,
                                                            "args": vars(a)}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
