"""Compile every Triton kernel for the H200 (sm_90) on a machine without a GPU, through the project's own launch
code: what the CPU tests (Triton's interpreter) cannot see.

The interpreter runs a kernel as Python, so it accepts code that Triton's compiler refuses (a plain Python global
read inside a kernel, say) and never runs the GPU-only branches (inline PTX, persistent grids, the GPU's tile
shapes). Here `JITFunction.run` is replaced by a compile-only stand-in: each launch the wrappers in `kernels/`
make on CPU tensors (with the interpreter off, they choose the GPU's configuration) is specialized exactly as a
launch on the GPU would be (argument types, 16-byte alignment, constexprs, options) and compiled by Triton's NVIDIA
backend for `TARGET` down to a cubin (ptxas runs on the CPU). Nothing is launched, so outputs are left unwritten:
only kernels whose host code does not read a kernel's result are driven.

    python -m tests.support.gpu_compile [--json OUT]     # run with TRITON_INTERPRET unset; exit 1 on any error

Prints one line per compiled kernel variant (name, seconds): also the cold-start compile cost a GPU worker pays
once per kernel variant before its disk cache (TRITON_CACHE_DIR) holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

TARGET_ARCH = 90  # the H200 (Hopper)


def install_compile_only(compiled: list[dict]) -> None:
    """Make every @triton.jit launch compile for sm_90 instead of running (see the module docstring)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", TARGET_ARCH, 32)
    backend = make_backend(target)
    seen: dict[tuple, dict] = {}

    def run(self, *args, grid, warmup, **kwargs):  # JITFunction.run's binding and packing, then compile only
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        key = (self.fn.__qualname__, str(specialization), str(options))
        if key in seen:
            return None
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        t0 = time.perf_counter()
        triton_compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        entry = {"kernel": f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}",
                 "constexprs": {str(k): str(v) for k, v in constexprs.items()},
                 "seconds": round(time.perf_counter() - t0, 2)}
        seen[key] = entry
        compiled.append(entry)
        return None

    JITFunction.run = run


def launches() -> list[tuple[str, Callable[[], object]]]:
    """(what, call) for every kernel family, on small CPU tensors shaped like the real ones."""
    import torch

    from qaas.kernels import bnb4, fp8, gguf, gptq, int8, rms_norm

    bnb4._sms = lambda device: 132  # the persistent NF4 grid asks the device for its SM count
    torch.manual_seed(0)
    calls: list[tuple[str, Callable[[], object]]] = []
    rows = torch.randn(32, 512)
    importance = torch.rand(512) + 0.1
    for t in gguf.TYPES:
        if t in gguf.FLOAT_TYPES:
            continue
        calls.append((f"gguf {t}", lambda t=t: gguf.quantize_tensor(rows, t, backend="triton")))
        calls.append((f"gguf {t} imatrix",
                      lambda t=t: gguf.quantize_tensor(rows, t, imatrix=importance, backend="triton")))
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(64, 256, dtype=dtype)
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                calls.append((f"bnb4 {qt} {dtype} dq={dq}", lambda x=x, qt=qt, dq=dq: bnb4.quantize_4bit_triton(
                    x, 64, qt, dq, "cuda")))
            calls.append((f"bnb4 {qt} {dtype} general path", lambda x=x, qt=qt: bnb4.quantize_4bit_triton(
                x, 64, qt, False, "cuda", fast=False)))
        for qt in ("nf4", "fp4"):  # dequantize: inputs from the torch reference (only shapes and dtypes matter)
            packed, state = bnb4.quantize_4bit(x, quant_type=qt, backend="torch")
            calls.append((f"bnb4 dequantize {qt} {dtype}", lambda p=packed, s=state: bnb4.dequantize_4bit(
                p, s, backend="triton")))
    w = torch.randn(64, 256)
    calls.append(("gptq group_params", lambda: gptq.group_params(w, 4, True, 128, backend="triton")))
    calls.append(("gptq group_params asym", lambda: gptq.group_params(w, 4, False, 128, backend="triton")))
    hinv = torch.eye(128)
    scale, zero = torch.ones(64, 2), torch.zeros(64, 2)
    col_group = torch.zeros(128, dtype=torch.int32)
    calls.append(("gptq block", lambda: gptq.gptq_block(w[:, :128].clone(), hinv, scale, zero, col_group, 15,
                                                        backend="triton")))
    codes = torch.randint(0, 16, (256, 64), dtype=torch.int32)
    for bits in (2, 3, 4, 8):
        calls.append((f"gptq pack {bits}-bit", lambda bits=bits: gptq.pack_rows(codes % (1 << bits), bits,
                                                                                 backend="triton")))
    for bits in (2, 3, 4, 8):
        qweight = torch.zeros(256 * bits // 32, 64, dtype=torch.int32)
        qzeros = torch.zeros(2, 64 * bits // 32, dtype=torch.int32)
        g_idx = torch.arange(256, dtype=torch.int32) // 128
        for dtype in (torch.float16, torch.float32):
            calls.append((f"gptq dequantize {bits}-bit {dtype}", lambda q=qweight, z=qzeros, g=g_idx, bits=bits,
                          dtype=dtype: gptq.dequantize(q, z, torch.ones(2, 64, dtype=torch.float16), g, bits,
                                                       dtype=dtype, backend="triton")))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        wd = torch.randn(64, 256, dtype=dtype)
        for tile in (None, (128, 128)):
            s = fp8.tile_scales(wd.float(), tile).to(dtype)
            calls.append((f"fp8 {dtype} tile={tile}", lambda wd=wd, s=s, tile=tile: fp8.quantize_fp8(
                wd, s, tile, backend="triton")))
            q = fp8.quantize_fp8(wd, s, tile, backend="torch")
            calls.append((f"fp8 dequantize {dtype} tile={tile}", lambda q=q, s=s, tile=tile, dtype=dtype:
                          fp8.dequantize_fp8(q, s, tile, dtype, backend="triton")))
        calls.append((f"int8 {dtype}", lambda wd=wd: int8.quantize_int8_rowwise(wd, backend="triton")))
        q8, scb = int8.quantize_int8_rowwise(wd, backend="torch")
        calls.append((f"int8 dequantize {dtype}", lambda q8=q8, scb=scb, dtype=dtype: int8.dequantize_int8_rowwise(
            q8, scb, dtype if dtype != torch.float32 else torch.float16, backend="triton")))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for width in (4096, 8192):  # several rows per program, and one
            xn, wn = torch.randn(8, width, dtype=dtype), torch.ones(width, dtype=dtype)
            calls.append((f"rms_norm {dtype} {width}", lambda xn=xn, wn=wn: rms_norm.rms_norm(
                xn, wn, 1e-5, backend="triton")))
    return calls


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the compiled variants and errors here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET unset: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    compiled: list[dict] = []
    errors: list[dict] = []
    install_compile_only(compiled)
    t0 = time.perf_counter()
    for what, call in launches():
        before = len(compiled)
        try:
            call()
        except Exception as exc:  # a compile error names the kernel's line; keep going to list them all
            errors.append({"launch": what, "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "where": traceback.format_exc(limit=-3)[-1500:]})
            print(f"ERROR {what}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        for e in compiled[before:]:
            print(f"{e['seconds']:7.2f} s  {e['kernel']}  ({what})", flush=True)
    total = round(time.perf_counter() - t0, 1)
    print(f"{len(compiled)} kernel variants compiled for sm_{TARGET_ARCH} in {total} s; {len(errors)} errors")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"target": f"sm_{TARGET_ARCH}", "compiled": compiled, "errors": errors, "seconds": total}, fh,
                      indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
