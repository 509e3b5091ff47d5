"""FP8 conversion of a Llama-3-8B-shaped checkpoint end to end on a GPU: time, peak memory, and the checkpoint
loaded back by transformers + compressed-tensors on CUDA with its logits against our reference.

    # GPU machine, from the repository root (bench/gpu_env.sh first):
    python -P bench/fp8_gpu.py --workdir /tmp/fp8 --out $OUT/fp8_gpu.json
    # CPU smoke test (tiny shape), what tests/bench runs:
    python -P bench/fp8_gpu.py --smoke --workdir /tmp/fp8-smoke --out /tmp/fp8-smoke/fp8_gpu.json

Steps, each timed: (1) `random_llama.random_model` writes the random fp16 checkpoint (its blocks are shards of
their own; the store is reused across runs); (2) the engine's `pipeline.quantize` converts it (streamed one
unit at a time, Triton e4m3 kernels), reporting its GPU peak and the process's peak RSS; (3) the e4m3 bytes of
block 0's layers from the Triton kernel equal the torch reference's on the same GPU; (4) transformers loads the
FP8 checkpoint on CUDA (compressed-tensors decompresses it; and, with `use_optimized_inference`, keeps it FP8 on
`scaled_mm` kernels where the GPU has them) and its logits on a random prompt are compared with our reference:
the source model with our dequantized weights and the scheme's activation quantization (`format`'s hooks).
vLLM itself is not installed on the GPU machine, so it is not measured here.

`--budget` (seconds) stops before a step that would start after it is spent; everything measured so far is
written to `--out` after every step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_llama beside this file

SCHEMES = ("FP8_DYNAMIC", "FP8_BLOCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fp8-bench")
    ap.add_argument("--out", default="fp8_gpu.json")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--blocks", type=int, default=32, help="decoder blocks (32 = the whole 8B model)")
    ap.add_argument("--scheme", default="FP8_DYNAMIC", choices=SCHEMES)
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; later steps are skipped")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 blocks, CPU allowed")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shape, a.blocks = "tiny", 2
    elif not torch.cuda.is_available():
        raise SystemExit("needs a GPU (or --smoke)")

    from random_llama import random_model

    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    t0 = time.time()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"args": vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "steps": {}}

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))

    def over_budget(step: str) -> bool:
        if time.time() - t0 > a.budget:
            report["steps"][step] = {"skipped": f"budget of {a.budget:.0f} s spent"}
            save()
            return True
        return False

    # 1. the source checkpoint
    t = time.time()
    model = random_model(work, a.shape, a.blocks)
    report["source"] = {**model.describe(), "bytes": _dir_bytes(model.path)}
    report["steps"]["build_source_s"] = round(time.time() - t, 2)
    save()

    # 2. the conversion, streamed
    if over_budget("convert"):
        return 0
    out = work / f"{a.shape}-{a.blocks}b-{a.scheme.lower()}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    result = quantize({"path": str(model.path)}, {"quant_method": "compressed-tensors", "scheme": a.scheme}, out,
                      options=EngineOptions(device=device, evaluate=False, allowed_roots=(str(work),)))
    convert_s = time.time() - t
    report["convert"] = {
        "seconds": round(convert_s, 2), "gpu_peak_memory_bytes": result["gpu_peak_memory_bytes"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "size_before_bytes": result["size_before_bytes"], "size_after_bytes": result["size_after_bytes"],
        "quantized_layers": result["quantized_modules"], "kept": result["skipped_modules"],
        "timings": result["timings"], "source_GB_per_s": round(result["size_before_bytes"] / convert_s / 1e9, 2),
        "mean_rel_error": result["layer_errors"]["mean"],
    }
    save()

    # 3. Triton bytes == torch reference bytes, block 0, on this device
    if not over_budget("kernel_bytes"):
        report["kernel_bytes"] = kernel_bytes(model.path, a.scheme, device)
        save()

    # 4. transformers + compressed-tensors on the device, logits against our reference
    if not over_budget("transformers"):
        report["transformers"] = compare_logits(model.path, out, a.scheme, device, a.prompt_tokens,
                                                vocab=model.shape.vocab)
    report["total_s"] = round(time.time() - t0, 2)
    save()
    print(json.dumps(report, indent=1, default=str))
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(p.resolve().stat().st_size for p in path.iterdir() if p.name.endswith(".safetensors"))


def kernel_bytes(source: Path, scheme_name: str, device: str) -> dict:
    """Every quantized layer of block 0: the Triton kernel's e4m3 bytes against the torch reference's."""
    from safetensors import safe_open

    from qaas.kernels.fp8 import quantize_fp8, tile_scales
    from qaas.worker.engine.methods.compressed_tensors.format import fp8_tile
    from qaas.worker.engine.methods.compressed_tensors.schemes import scheme_for

    scheme = scheme_for({"scheme": scheme_name})
    shard = source / "block-000.safetensors"
    differ, elements = 0, 0
    with safe_open(str(shard), framework="pt") as f:
        for name in f.keys():
            if not name.endswith("proj.weight"):
                continue
            w = f.get_tensor(name).to(device).contiguous()
            tile = fp8_tile(scheme, tuple(w.shape))
            s = tile_scales(w, tile)
            a = quantize_fp8(w, s, tile, backend="triton").view(torch.uint8)
            b = quantize_fp8(w, s, tile, backend="torch").view(torch.uint8)
            differ += int((a != b).sum())
            elements += a.numel()
    return {"elements": elements, "differing_bytes": differ}


@torch.no_grad()
def compare_logits(source: Path, out: Path, scheme_name: str, device: str, n_tokens: int, *, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    from qaas.worker.engine.methods.compressed_tensors.format import (
        attach_activation_quantization,
        load_saved_weights,
        saved_layers,
    )
    from qaas.worker.engine.checkpoint import CheckpointReader
    from qaas.worker.engine.methods.compressed_tensors.schemes import scheme_for

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, n_tokens), generator=gen).to(device)
    scheme = scheme_for({"scheme": scheme_name})
    dtype = torch.float16  # the checkpoint's: both sides dequantize and quantize activations in it
    res: dict = {}
    # our reference: the source architecture, our dequantized weights, the scheme's activation quantization
    t = time.time()
    ref_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    scales = load_saved_weights(ref_model, out, scheme)
    reader = CheckpointReader(out)
    attach_activation_quantization(ref_model, saved_layers(reader), scheme, scales)
    reader.close()
    ref = ref_model(ids).logits.float()
    res["reference_s"] = round(time.time() - t, 2)
    del ref_model
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        res["error"] = f"compressed-tensors is not installed here ({exc}); transformers cannot load the checkpoint"
        return res
    from transformers import CompressedTensorsConfig

    for label, kwargs in (("decompressed", {}),
                          ("fp8_kernels", {"quantization_config": CompressedTensorsConfig(use_optimized_inference=True)})):
        t = time.time()
        try:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=device, **kwargs).eval()
            load_s = time.time() - t
            logits = model(ids).logits.float()
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            diff = (logits - ref).abs()
            res[label] = {
                "load_s": round(load_s, 2), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "logit_abs_mean": float(ref.abs().mean()),
                "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                "gpu_peak_memory_bytes": peak,
            }
            if label == "fp8_kernels":
                try:
                    res[label]["per_layer"] = kernel_layer_check(model, out, scheme, device)
                except Exception as exc:  # the whole-model figures above stand on their own
                    res[label]["per_layer"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            del model
        except Exception as exc:  # report and go on: the other path may still load
            res[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def kernel_layer_check(model, out: Path, scheme, device: str) -> dict:
    """One layer at a time, no 32-block amplification: transformers' FP8 kernel module (CompressedTensorsFP8Linear)
    on a random fp16 input, against (a) an fp32 emulation of the same math from the module's own tensors
    (activations to e4m3 per row with amax / 448, both operands dequantized, fp32 matmul) and (b) the same
    emulation with *our* dequantized weight of that layer (our format reader). (a) shows the kernel computes what
    it says; (b) that it reads our checkpoint's weights and scales as we wrote them. A layer whose kernel output
    agrees with both to ~1e-3 is read right: a whole-model logit difference then comes from the activation
    quantization's rounding compounding over the blocks of a random model, not from the checkpoint."""
    from qaas.worker.engine.checkpoint import CheckpointReader
    from qaas.worker.engine.methods.compressed_tensors.format import LAYER_SUFFIXES, dequantize_layer

    reader = CheckpointReader(out)
    checked: dict = {}
    try:
        for name, mod in model.named_modules():
            if type(mod).__name__ != "CompressedTensorsFP8Linear" or not name.endswith(("q_proj", "down_proj")):
                continue
            if len(checked) >= 4:
                break
            gen = torch.Generator(device=device).manual_seed(len(checked))
            x = torch.randn(64, mod.in_features, generator=gen, device=device, dtype=torch.float16)
            with torch.no_grad():
                y = mod(x).float()
                xf = x.float()
                sx = torch.where(xf.abs().amax(-1) > 0, xf.abs().amax(-1), 1.0) / 448.0
                xq = (xf / sx[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx[:, None]
                w_kernel = mod.weight.float() * mod.weight_scale.float().reshape(-1, 1)
                tensors = {s: reader.load(f"{name}.{s}") for s in LAYER_SUFFIXES if f"{name}.{s}" in reader}
                w_ours = dequantize_layer(tensors, scheme).float().to(device)
                emu = xq @ w_kernel.t()
                emu_ours = xq @ w_ours.t()

            def rel(a, b):
                return float((a - b).norm() / b.norm())
            checked[name] = {"kernel_vs_emulation": rel(y, emu), "kernel_vs_our_weights": rel(y, emu_ours),
                             "kernel_weight_equals_ours": bool(torch.equal(w_kernel, w_ours))}
    finally:
        reader.close()
    return checked


if __name__ == "__main__":
    sys.exit(main())
