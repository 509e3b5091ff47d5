"""Compile the GGUF affine k-quant kernel (gguf_triton_affine.affine_k_quant_kernel) for sm_90 without a GPU and
report, per type and with or without an importance matrix: Triton's compile time, ptxas' registers and spills,
and the global loads in the PTX (the fit's per-element loads of x are loop-invariant: LLVM keeps them in
registers, so a count near the sub-block's width says the candidate loop reads nothing from memory). Triton
ships ptxas, so this runs on the CPU machine:
    .venv/bin/python bench/gguf_affine_sass.py [--types Q2_K,Q4_K,Q5_K] [--subblocks 128] [--warps 4]
The arguments are specialised as a 4096-column launch specialises them (pointers and lengths divisible by 16)."""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qaas.kernels import gguf_triton_affine as TA

SIGNATURE = {"x_ptr": "*fp32", "qw_ptr": "*fp32", "q_ptr": "*i32", "d_ptr": "*fp32", "dmin_ptr": "*fp32",
             "ls_ptr": "*i32", "lm_ptr": "*i32", "n_sb": "i32", "sb_per_row": "i32"}


def compile_kernel(type_name: str, with_imatrix: bool, subblocks: int, warps: int):
    kind, subs, width, nmax = TA.SHAPES[type_name]
    rmin, rdelta, nstep, use_mad = TA.SEARCH_QW if with_imatrix else TA.SEARCH[type_name]
    const = dict(KIND=kind, HAS_QW=with_imatrix, SB=subblocks // subs, S=subs, N=width, NMAX=nmax, RMIN=rmin,
                 RDELTA=rdelta, NSTEP=nstep, USE_MAD=use_mad, SIGMA_FACTOR=TA.SIGMA_FACTOR[type_name])
    sig = dict(SIGNATURE, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
    src = ASTSource(TA.affine_k_quant_kernel, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "enable_fp_fusion": False})


def ptxas_info(ptx: str) -> str:
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))[0]
    arch = re.search(r"\.target (\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spill = re.search(r"(\d+) bytes spill stores", out).group(1)
    return f"registers {regs}, spill stores {spill} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q2_K,Q4_K,Q5_K")
    ap.add_argument("--subblocks", type=int, default=TA.GPU_SUBBLOCKS)
    ap.add_argument("--warps", type=int, default=TA.GPU_WARPS)
    args = ap.parse_args()
    for type_name in args.types.split(","):
        for with_imatrix in (False, True):
            t = time.perf_counter()
            k = compile_kernel(type_name, with_imatrix, args.subblocks, args.warps)
            dt = time.perf_counter() - t
            ptx = k.asm["ptx"]
            loads = len(re.findall(r"ld\.global", ptx))
            print(f"{type_name} {'imatrix' if with_imatrix else 'plain  '}: compile {dt:.1f} s, {ptxas_info(ptx)}, "
                  f"global loads {loads}, PTX lines {ptx.count(chr(10))}")


if __name__ == "__main__":
    main()
