"""Where FP8's perplexity loss on a small model comes from: weights alone, activations alone, per-tensor vs
per-channel weight scales, one layer type at a time, the dtype the reference runs in, and the checkpoint as
compressed-tensors + transformers load it (the consumer's number), all on the same WikiText-2 windows (CPU).

    python bench/fp8_breakdown.py --model /tmp/ctq/fp16 --windows 2 --out bench/results/fp8_breakdown.md

Simulated rows put the engine's own arithmetic into the float model: each Linear's stored (checkpoint-dtype)
weight goes through `format.quantize_weight` (compressed-tensors' e4m3 rounding, scale = absmax / 448 in the
weight's dtype, per row or per tensor) and comes back dequantized, and a forward pre-hook quantizes the
Linear's input as the serving engine does (`format.fake_quantize_input`: e4m3 per token, scale = amax / 448).
"consumer" rows are the checkpoint the pipeline writes (`pipeline.quantize`), loaded by
`AutoModelForCausalLM.from_pretrained` with compressed-tensors installed, which decompresses the weights and
quantizes the activations itself. The output head (tied to the embeddings) is left in floating point as
llm-compressor's recipes leave it (ignore: lm_head) except in the row that says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYER_TYPES = {
    "attn-in": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "mlp-in": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
ALL_BLOCK = tuple(n for names in LAYER_TYPES.values() for n in names)
#: row -> (label, compute dtype, weights: None | "channel" | "tensor", activations per token?, layer names,
#:         output head quantized too?)
SIMULATED: dict[str, tuple[str, str, str | None, bool, tuple[str, ...], bool]] = {
    "ref-fp32": ("reference, float32", "fp32", None, False, (), False),
    "ref-bf16": ("reference, bfloat16", "bf16", None, False, (), False),
    "ref-fp16": ("reference, float16 (the checkpoint's dtype)", "fp16", None, False, (), False),
    "w-channel": ("FP8 weights per channel, activations float (W8A16)", "fp32", "channel", False, ALL_BLOCK, False),
    "w-tensor": ("FP8 weights per tensor, activations float", "fp32", "tensor", False, ALL_BLOCK, False),
    "a-token": ("FP8 activations per token, weights float", "fp32", None, True, ALL_BLOCK, False),
    "dyn": ("FP8_DYNAMIC (weights per channel + activations per token)", "fp32", "channel", True, ALL_BLOCK, False),
    "dyn-tensor": ("weights per tensor + activations per token", "fp32", "tensor", True, ALL_BLOCK, False),
    "dyn-bf16": ("FP8_DYNAMIC, run in bfloat16", "bf16", "channel", True, ALL_BLOCK, False),
    "dyn-fp16": ("FP8_DYNAMIC, run in float16", "fp16", "channel", True, ALL_BLOCK, False),
    "dyn-head": ("FP8_DYNAMIC with lm_head quantized too", "fp32", "channel", True, ALL_BLOCK, True),
    **{f"only-{t}": (f"FP8_DYNAMIC on {'/'.join(names)} only", "fp32", "channel", True, names, False)
       for t, names in LAYER_TYPES.items()},
}
#: row -> (label, dtype the checkpoint is loaded in)
CONSUMER = {
    "consumer-fp32": ("FP8_DYNAMIC checkpoint, transformers + compressed-tensors, float32", "fp32"),
    "consumer-fp16": ("FP8_DYNAMIC checkpoint, transformers + compressed-tensors, float16 (dtype auto)", "fp16"),
}
DEFAULT_ROWS = ("ref-fp32,ref-bf16,w-channel,w-tensor,a-token,dyn,dyn-tensor,dyn-bf16,dyn-head,"
                "only-attn-in,only-o,only-mlp-in,only-down,consumer-fp32")


def window_nlls(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each window (evaluate.perplexity's arithmetic, kept per window)."""
    out = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            x = ids[i : i + 1]
            logits = model(x, use_cache=False).logits.float()
            out.append(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="mean").item())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/ctq/fp16")
    ap.add_argument("--eval-text", default=str(ASSETS / "text/wikitext-2-raw-v1/test.joined.txt"))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--workdir", default="/tmp/fp8-breakdown")
    ap.add_argument("--out", default="bench/results/fp8_breakdown.md")
    a = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from qaas.worker.engine.evaluate import load_eval_data, relative_error
    from qaas.worker.engine.methods.compressed_tensors.format import fake_quantize_input, quantize_weight
    from qaas.worker.engine.methods.compressed_tensors.schemes import scheme_for
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    schemes = {"channel": scheme_for({"scheme": "FP8_DYNAMIC"}), "tensor": scheme_for({"scheme": "FP8"})}
    dynamic = schemes["channel"]
    data = load_eval_data(a.model, a.eval_text, seqlen=a.seqlen, max_windows=a.windows)
    source = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto").eval()
    stored = {k: v.clone() for k, v in source.state_dict().items()}  # the checkpoint's tensors, its dtype
    rows: list[dict] = []

    def record(row: str, label: str, nlls: list[float], seconds: float, **extra) -> None:
        rows.append({"row": row, "label": label, "ppl": math.exp(sum(nlls) / len(nlls)), "window_nll": nlls,
                     "eval_s": seconds, **extra})
        print(json.dumps(rows[-1]), flush=True)
        write(a, rows, data)

    for row in a.rows.split(","):
        t = time.time()
        if row in CONSUMER:
            label, dt = CONSUMER[row]
            out = Path(a.workdir) / "fp8-dynamic"
            if not (out / "config.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                quantize({"path": a.model}, {"quant_method": "compressed-tensors", "scheme": "FP8_DYNAMIC"}, out,
                         options=EngineOptions(device="cpu", evaluate=False, allowed_roots=("/",)))
            model = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dt]).eval()
            t = time.time()
            record(row, label, window_nlls(model, data.input_ids), time.time() - t, dtype=dt)
            del model
            continue
        if row not in SIMULATED:
            raise SystemExit(f"unknown row {row!r} (rows: {', '.join([*SIMULATED, *CONSUMER])})")
        label, dt, weights, acts, names, head = SIMULATED[row]
        source.load_state_dict(stored)
        errors: dict[str, float] = {}
        hooks = []
        with torch.no_grad():
            for name, mod in source.named_modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                if not ((".layers." in name and name.rpartition(".")[2] in names) or (head and name == "lm_head")):
                    continue
                if weights is not None:
                    w = stored[name + ".weight"].contiguous()
                    _, deq = quantize_weight(w, schemes[weights])
                    errors[name] = relative_error(w, deq)
                    if name == "lm_head":  # tied: quantizing the head quantizes the embedding table too, so untie
                        mod.weight = torch.nn.Parameter(deq.clone())
                    else:
                        mod.weight.copy_(deq)
                if acts:
                    hooks.append(mod.register_forward_pre_hook(
                        lambda m, args: (fake_quantize_input(args[0], dynamic), *args[1:])))
        source.to(DTYPES[dt])
        record(row, label, window_nlls(source, data.input_ids), time.time() - t, dtype=dt, layers=len(hooks) or
               len(errors), weight_rel_error=(sum(errors.values()) / len(errors)) if errors else None)
        for h in hooks:
            h.remove()
        if head:  # retie
            source.lm_head.weight = source.model.embed_tokens.weight
        source.to(torch.float32)
    return 0


def write(a: argparse.Namespace, rows: list[dict], data) -> None:
    base = {r["dtype"]: r["ppl"] for r in rows if r["row"].startswith("ref-")}
    lines = [
        "# FP8 on SmolLM2-135M-Instruct: where the perplexity goes (WikiText-2 test, same windows for every row)",
        "",
        f"Date {time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}. Command: `python bench/fp8_breakdown.py "
        f"--model {a.model} --windows {a.windows} --seqlen {a.seqlen} --rows {a.rows}`.",
        "",
        f"Evaluation: first {data.windows} x {data.seqlen} tokens of WikiText-2 raw test (text sha256 "
        f"`{data.text_sha256[:16]}…`). \"vs ref\" compares with the reference run in the same dtype "
        "(float32 when that reference is not in the table). Weight error: mean over the quantized layers of "
        "||W - W_fp8|| / ||W||.",
        "",
        "| row | dtype | WikiText-2 ppl | vs ref | NLL per window | layers | weight rel. error | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get(r["dtype"], base.get("fp32"))
        delta = "-" if r["row"].startswith("ref-") or ref is None else f"{100 * (r['ppl'] / ref - 1):+.2f} %"
        err = f"{r['weight_rel_error']:.4f}" if r.get("weight_rel_error") is not None else "-"
        nll = " / ".join(f"{x:.4f}" for x in r["window_nll"])
        lines.append(f"| {r['label']} | {r['dtype']} | {r['ppl']:.3f} | {delta} | {nll} | {r.get('layers', 210)} | "
                     f"{err} | {r['eval_s']:.0f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "eval": data.describe(), "args": vars(a)},
                                                           indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
