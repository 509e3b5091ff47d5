"""GPTQ speed on one GPU: per-linear time against the paper's per-column loop, and a streamed end-to-end run.

Run on the GPU machine from the repository root (after `pip install --no-deps -e .`):

    python bench/gptq_speed.py --out DIR [--blocks 32] [--skip-linear] [--skip-e2e]

Part 1, per linear (4096->4096, 4096->14336, 14336->4096; Hessian of 128 x 2048 tokens; 4-bit, group 128,
sym, no act-order, blocksize 128): Hessian accumulation and quantization time of
`qaas.kernels.gptq_reference.fasterquant_reference` (the published loop: several launches per column) and of
`qaas.worker.engine.gptq_algorithm.gptq_quantize` (Triton fused column loop) on the same W and H, with the
output error tr(dW H dW^T) of each (equal error is part of the claim).

Part 2, end to end: a Llama-3-8B-shaped checkpoint with random fp16 weights is written to local disk, then
`qaas.worker.engine.pipeline.quantize` runs GPTQ 4-bit g128 on it from the checkpoint, one block at a time
(128 x 2048 random calibration tokens, evaluation off). Reports wall time, where the time went, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch


def _import_root() -> None:
    """Make `qaas.*` importable from this checkout when the editable install is not there."""
    try:
        import qaas.kernels  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import types

    root = Path(__file__).resolve().parents[1]
    pkg = types.ModuleType("qaas")
    pkg.__path__ = [str(root / "qaas")]
    sys.modules["qaas"] = pkg
    for sub in ("kernels", "worker"):
        spec = importlib.util.spec_from_file_location(
            f"qaas.{sub}", root / sub / "__init__.py", submodule_search_locations=[str(root / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"qaas.{sub}"] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, sub, mod)


_import_root()


def sync():
    torch.cuda.synchronize()


def reference_hessian(X: torch.Tensor, chunk: int) -> torch.Tensor:
    """The paper's add_batch: running average, float32 matmul (TF32 off), one call per sample."""
    n_in = X.shape[1]
    H = torch.zeros((n_in, n_in), device=X.device, dtype=torch.float32)
    nsamples = 0
    for i in range(0, X.shape[0], chunk):
        inp = X[i : i + chunk].float().t()
        tmp = 1
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = (2 / nsamples) ** 0.5 * inp
        H += inp.matmul(inp.t())
    return H


def bench_linear(results: dict, tokens: int, chunk: int) -> None:
    from qaas.kernels.gptq_reference import fasterquant_reference, layer_error
    from qaas.worker.engine.gptq_algorithm import gptq_quantize
    from qaas.worker.engine.gptq_hessian import HessianAccumulator

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    # warm up: Triton compile, cuSOLVER handles
    W0 = torch.randn(256, 512, device=dev)
    X0 = torch.randn(4096, 512, device=dev)
    gptq_quantize(W0, X0.t() @ X0, bits=4, group_size=128)
    fasterquant_reference(W0, X0.t() @ X0, bits=4, group_size=128)
    rows = []
    for n_in, n_out in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        g = torch.Generator(device=dev).manual_seed(n_in * 7 + n_out)
        scale = torch.exp(torch.randn(n_in, device=dev, generator=g) * 0.7).half()
        X = (torch.randn(tokens, n_in, device=dev, generator=g, dtype=torch.float16) * scale)
        W = (torch.randn(n_out, n_in, device=dev, generator=g) * 0.02).half()
        sync(); t = time.perf_counter()
        Href = reference_hessian(X, chunk)
        sync(); t_h_ref = time.perf_counter() - t
        acc = HessianAccumulator(n_in, dev)
        sync(); t = time.perf_counter()
        for i in range(0, tokens, chunk):
            acc.add(X[i : i + chunk])
        H = acc.finalize()
        sync(); t_h_fast = time.perf_counter() - t
        # the paper averages over samples, we over tokens: same H up to the factor (GPTQ is scale-invariant)
        h_rel = float((H * chunk - Href).norm() / Href.norm())
        del X
        row = {"shape": f"{n_in}->{n_out}", "hessian_ref_s": t_h_ref, "hessian_fast_s": t_h_fast,
               "hessian_rel_diff": h_rel}
        gptq_quantize(W, Href, bits=4, group_size=128, damp_percent=0.01, act_group_aware=False)  # warm-up
        for act in (False, True):
            sync(); t = time.perf_counter()
            ref = fasterquant_reference(W, Href, bits=4, group_size=128, sym=True, damp_percent=0.01, desc_act=act)
            sync(); t_ref = time.perf_counter() - t
            e_ref = layer_error(W, ref["Q"], Href)
            del ref
            # same H for both: the comparison is of the quantization step
            sync(); t = time.perf_counter()
            res = gptq_quantize(W, Href, bits=4, group_size=128, sym=True, damp_percent=0.01, desc_act=act,
                                act_group_aware=False)
            sync(); t_fast = time.perf_counter() - t
            e_fast = layer_error(W, res.Q, Href)
            del res
            tag = "actorder" if act else "plain"
            row.update({f"quant_ref_s_{tag}": t_ref, f"quant_fast_s_{tag}": t_fast,
                        f"speedup_{tag}": t_ref / t_fast, f"err_ref_{tag}": e_ref, f"err_fast_{tag}": e_fast,
                        f"err_ratio_{tag}": e_fast / e_ref})
        rows.append(row)
        print(json.dumps(row), flush=True)
        del W, H, Href, acc
        torch.cuda.empty_cache()
    results["linear"] = rows


def llama3_8b_config(blocks: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": blocks, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16", "dtype": "float16",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }


def write_random_checkpoint(path: Path, blocks: int) -> float:
    from safetensors.torch import save_file

    t = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    cfg = llama3_8b_config(blocks)
    (path / "config.json").write_text(json.dumps(cfg))
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h, f, kv = 4096, 14336, 1024
    weight_map = {}

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, device=dev, generator=g) * std).half().cpu()

    def save(tensors, name):
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rnd(128256, h)}, "pre.safetensors")
    for i in range(blocks):
        p = f"model.layers.{i}."
        save({
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
        }, f"block-{i:03d}.safetensors")
    save({"model.norm.weight": torch.ones(h, dtype=torch.float16), "lm_head.weight": rnd(128256, h)},
         "post.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return time.perf_counter() - t


def bench_e2e(results: dict, blocks: int, nsamples: int, seqlen: int, workdir: Path) -> None:
    from qaas.worker.engine.calibration import CalibrationSet
    from qaas.worker.engine.methods import gptq as gptq_method
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize
    from qaas.worker.engine.progress import NullReporter

    src = workdir / "llama3-8b-random"
    out = workdir / "llama3-8b-random-gptq"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t_write = write_random_checkpoint(src, blocks)
    print(f"random checkpoint of {blocks} blocks written in {t_write:.1f}s", flush=True)

    state = {}

    def random_calibration(self, ctx, seqlen_):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 128256, (nsamples, seqlen), generator=g)
        state["ctx"] = ctx
        return CalibrationSet(ids, "random token ids (benchmark)", 0)

    gptq_method.GPTQMethod.calibration = random_calibration

    class Rep(NullReporter):
        def progress(self, done, total, *, message="", metrics=None):
            if done in (1, total) or done % 8 == 0:
                print(f"  {message}  t={time.perf_counter() - t0:.1f}s  "
                      f"peak={torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = quantize({"path": str(src)},
                   {"quant_method": "gptq", "bits": 4, "group_size": 128, "dataset": ["unused"], "sym": True,
                    "desc_act": False, "act_group_aware": False, "damp_percent": 0.01, "model_seqlen": seqlen,
                    "nsamples": nsamples},
                   out, options=EngineOptions(device="cuda", evaluate=False, allowed_roots=(str(workdir),)),
                   reporter=Rep())
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    timings = state["ctx"].state["gptq"]["timings"]
    results["e2e"] = {
        "blocks": blocks, "nsamples": nsamples, "seqlen": seqlen, "wall_s": wall,
        "per_block_s": wall / blocks, "extrapolated_32_blocks_s": wall / blocks * 32 if blocks != 32 else wall,
        "peak_gpu_bytes": peak, "peak_gpu_gib": peak / 2**30, "phases_s": timings,
        "pipeline_timings": res["timings"], "quantized_modules": res["quantized_modules"],
        "layer_rel_error_mean": res["layer_errors"]["mean"], "size_after_bytes": res["size_after_bytes"],
    }
    print(json.dumps(results["e2e"], indent=1), flush=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--workdir", default="/tmp/gptq-bench")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args()
    import triton
    import transformers

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(results), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not a.skip_linear:
            bench_linear(results, a.nsamples * a.seqlen, a.seqlen)
            (out / "gptq_speed.json").write_text(json.dumps(results, indent=1))
        if not a.skip_e2e:
            bench_e2e(results, a.blocks, a.nsamples, a.seqlen, Path(a.workdir))
    finally:
        (out / "gptq_speed.json").write_text(json.dumps(results, indent=1))
    print("\nshape            ref quant   fast quant  speedup  err ratio | act-order: ref   fast  speedup err ratio")
    for r in results.get("linear", []):
        print(f"{r['shape']:14s} {r['quant_ref_s_plain']:9.3f}s {r['quant_fast_s_plain']:9.3f}s "
              f"{r['speedup_plain']:7.1f}x {r['err_ratio_plain']:8.4f} | {r['quant_ref_s_actorder']:7.3f}s "
              f"{r['quant_fast_s_actorder']:6.3f}s {r['speedup_actorder']:6.1f}x {r['err_ratio_actorder']:8.4f}"
              f"   H: ref {r['hessian_ref_s']:.3f}s fast {r['hessian_fast_s']:.3f}s")
    if "e2e" in results:
        e = results["e2e"]
        print(f"e2e {e['blocks']} blocks: {e['wall_s']:.1f}s ({e['per_block_s']:.2f}s/block, 32-block "
              f"{e['extrapolated_32_blocks_s']:.1f}s), peak {e['peak_gpu_gib']:.2f} GiB; phases "
              + ", ".join(f"{k} {v:.1f}s" for k, v in e["phases_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
