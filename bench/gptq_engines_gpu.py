"""A qaas GPTQ checkpoint under GPTQModel's fast CUDA kernels: Marlin and ExLlama v2, against the fp16 model.

One run: a Llama-shaped model with random fp16 weights (`random_llama`, real tokenizer and calibration text)
is quantized by qaas' engine on the GPU (4-bit, group size 128, symmetric, v1: what vLLM and both kernels
take), then loaded three ways in the same process: the fp16 source (transformers), `GPTQModel.load(...,
backend=GPTQ_MARLIN)` and `GPTQModel.load(..., backend=GPTQ_EXLLAMA_V2)`. For each kernel:
  * logits on fixed prompts against a reference: the source architecture holding the checkpoint's weights
    dequantized by this script from the file (fp16 compute); max |diff| relative to max |logit|, argmax agreement;
  * decode speed: greedy `generate` of `--new-tokens` tokens after a 32-token prompt at batch 1 and 16
    (one warm-up, then timed; tokens/s = batch x new tokens / seconds), and the fp16 model's, same settings.

GPTQModel installed without CUDA extensions (BUILD_CUDA_EXT=0) JIT-compiles each kernel with nvcc on first use;
that time is reported apart (`load_s` of the first load of each kernel). `--budget` bounds the whole run: a
measurement that would start after it is skipped and reported as such.

GPU machine (see bench/gpu_env.sh; GPTQModel and its dependencies as wheels in .whl/):
    python3 -P bench/gptq_engines_gpu.py --shape 8b --blocks 4 --budget 240 --out bench/results/gptq_engines_gpu.json
CPU smoke test (tiny shape, no CUDA kernels: checks the pipeline, the reference and the report):
    python -P bench/gptq_engines_gpu.py --smoke --out /tmp/gptq_engines_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_llama beside this file

from random_llama import random_model, random_text  # noqa: E402

QCONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
KERNELS = {"marlin": "GPTQ_MARLIN", "exllamav2": "GPTQ_EXLLAMA_V2"}


def dequantized_reference(source: Path, ckpt: Path, device: torch.device) -> torch.nn.Module:
    """The source model with every quantized weight replaced by its dequantization from the file (v1: zero - 1,
    4-bit fields packed lowest bits first), written here independently of qaas' reader."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float16).to(device).eval()
    state = model.state_dict()
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=device)
    files = sorted(ckpt.glob("*.safetensors"))
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), "pt", device=str(device)) as fh:
                names = list(fh.keys())
                for n in names:
                    if not n.endswith(".qweight"):
                        if n in state:
                            state[n].copy_(fh.get_tensor(n).to(state[n].dtype))
                        continue
                    m = n[: -len(".qweight")]
                    qw, qz = fh.get_tensor(n), fh.get_tensor(m + ".qzeros")
                    scales, g = fh.get_tensor(m + ".scales").float(), fh.get_tensor(m + ".g_idx").long()
                    q = ((qw.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF).reshape(-1, qw.shape[1])[: g.numel()]
                    z = ((qz.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF).reshape(qz.shape[0], -1)[:, : scales.shape[1]]
                    w = (q.float() - (z.float() + 1)[g]) * scales[g]
                    state[m + ".weight"].copy_(w.t().to(torch.float16))
    return model


def decode_speed(model, batch: int, new_tokens: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, 32), generator=gen).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up (kernels, caches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    made = out.shape[1] - ids.shape[1]
    return {"batch": batch, "new_tokens": made, "seconds": round(dt, 4), "tokens_per_s": round(batch * made / dt, 1)}


def compare_logits(model, reference, prompts: torch.Tensor) -> dict:
    with torch.no_grad():
        got = model(prompts).logits.float()
        want = reference(prompts).logits.float()
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    return {"max_abs_diff": err, "max_abs_logit": scale, "relative": err / scale if scale else None,
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="gptq_engines_gpu.json")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shape, GPTQModel's torch kernel only")
    a = ap.parse_args()
    t_start = time.monotonic()
    over = lambda: time.monotonic() - t_start > a.budget  # noqa: E731
    if a.smoke:
        a.shape, a.blocks, a.new_tokens, a.batches, a.nsamples, a.seqlen = "tiny", 2, 4, "1,2", 4, 64
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gptq_engines_"))
    work.mkdir(parents=True, exist_ok=True)

    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    src = random_model(work, a.shape, a.blocks)
    calib = random_text(work / f"calibration-{src.shape.vocab}.txt", src.shape.vocab, a.nsamples * a.seqlen * 2, 10)
    ckpt = work / "gptq"
    t0 = time.perf_counter()
    result = quantize({"path": str(src.path)}, {**QCONFIG, "dataset": str(calib), "nsamples": a.nsamples,
                                                "model_seqlen": a.seqlen}, ckpt,
                      options=EngineOptions(device=str(device), allowed_roots=(str(work),), evaluate=False))
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": src.describe(), "config": QCONFIG,
        "quantize_s": round(time.perf_counter() - t0, 2), "quantized_modules": result["quantized_modules"],
        "engines": {e["engine"]: e["loads"] for e in result["gptq"]["engines"]}, "runs": {},
    }
    try:
        import gptqmodel
        from gptqmodel import BACKEND, GPTQModel

        report["gptqmodel"] = gptqmodel.__version__
    except ImportError as exc:
        report["error"] = f"gptqmodel not importable: {exc}"
        Path(a.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 1
    from transformers import AutoModelForCausalLM

    batches = [int(b) for b in a.batches.split(",")]
    prompts = torch.randint(3, src.shape.vocab, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    reference = dequantized_reference(src.path, ckpt, device)

    fp16 = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float16).to(device).eval()
    report["runs"]["fp16"] = {"decode": [decode_speed(fp16, b, a.new_tokens, src.shape.vocab, device)
                                         for b in batches if not over()]}
    del fp16
    kernels = {"torch": "GPTQ_TORCH"} if a.smoke else KERNELS
    for name, backend in kernels.items():
        run: dict = {"backend": backend}
        report["runs"][name] = run
        if over():
            run["skipped"] = "budget spent"
            continue
        try:
            t0 = time.perf_counter()
            model = GPTQModel.load(str(ckpt), backend=getattr(BACKEND, backend), device=str(device)).model.eval()
            run["load_s"] = round(time.perf_counter() - t0, 2)  # includes the kernel's JIT build on first use
            run["kernel"] = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
            run["logits"] = compare_logits(model, reference, prompts)
            run["decode"] = [decode_speed(model, b, a.new_tokens, src.shape.vocab, device)
                             for b in batches if not over()]
            del model
        except Exception as exc:  # a kernel that does not build or load here is a result, not a crash
            run["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = round(time.monotonic() - t_start, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    raise SystemExit(main())
