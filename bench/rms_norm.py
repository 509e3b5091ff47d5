"""RMSNorm: qaas.kernels.rms_norm against transformers' LlamaRMSNorm (the module it replaces in the engine's
blocks) on one GPU, at the calibration passes' shapes.

Run on the GPU machine:  python -P bench/rms_norm.py --out bench/results/rms_norm   (writes .json and .md)

* x: one forward pass's chunk of calibration tokens (16,384 and 32,768 rows) by the 8B and 70B hidden sizes,
  float16 and bfloat16, random normal; medians of triton.testing.do_bench.
* Bandwidth counts the bytes that must move: x read and the output written (2 x 2 bytes per element), against
  a device-to-device copy of the same bytes measured in the same run.
* Agreement: the fraction of outputs equal to HF's bit for bit, and the largest difference in units of the
  output's last place.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import triton
import triton.testing
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qaas.kernels.rms_norm import rms_norm

SHAPES = [(16384, 4096), (32768, 4096), (16384, 8192), (32768, 8192)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/rms_norm")
    a = ap.parse_args()
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for n, h in SHAPES:
            norm = LlamaRMSNorm(h, eps=1e-5).to("cuda", dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.3 * torch.randn(h, device="cuda"))
                x = torch.randn(n, h, device="cuda", dtype=dtype)
                ref, got = norm(x), rms_norm(x, norm.weight, 1e-5)
                hf_ms = triton.testing.do_bench(lambda: norm(x), warmup=25, rep=200, return_mode="median")
                k_ms = triton.testing.do_bench(lambda: rms_norm(x, norm.weight, 1e-5), warmup=25, rep=200,
                                               return_mode="median")
                y = torch.empty_like(x)
                copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
            ulp = torch.finfo(dtype).eps
            diff = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3) / ulp).max().item()
            moved = 2 * x.numel() * x.element_size()
            rows.append({"dtype": str(dtype).replace("torch.", ""), "rows": n, "hidden": h,
                         "hf_us": hf_ms * 1e3, "qaas_us": k_ms * 1e3, "copy_us": copy_ms * 1e3,
                         "qaas_gbps": moved / k_ms / 1e6, "of_copy": copy_ms / k_ms, "speedup": hf_ms / k_ms,
                         "equal": float((got == ref).float().mean()), "max_diff_ulp": diff})
            print(rows[-1], flush=True)
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": f"python -P bench/rms_norm.py --out {a.out}"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    L = [f"# RMSNorm: qaas kernel vs transformers' LlamaRMSNorm", "",
         f"Measured {meta['when']} on {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}. "
         f"Command: `{meta['command']}`.", "",
         "| dtype | tokens x hidden | HF µs | qaas µs | speed-up | qaas GB/s | of a copy of the same bytes | "
         "equal to HF | max diff (ulp) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['dtype']} | {r['rows']}x{r['hidden']} | {r['hf_us']:.0f} | {r['qaas_us']:.0f} | "
                 f"{r['speedup']:.1f}x | {r['qaas_gbps']:.0f} | {r['of_copy']:.0%} | {r['equal']:.2%} | "
                 f"{r['max_diff_ulp']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
