"""Compile the NF4 fast quantize kernel for sm_90 without a GPU and report, per NF4 code mode (bnb4.FAST_MODES),
what the SASS holds for one tile: registers, shared memory, barriers, shared loads/stores, global loads, and the
instruction count. Triton ships ptxas and cuobjdump, so this runs on the CPU machine:
    .venv/bin/python bench/bnb_sass.py [--bpp 32] [--warps 4] [--modes 1,3,4,5] [--dump DIR]
The arguments are specialised as a real launch specialises them (pointers and lengths divisible by 16): without
that, Triton cannot prove the 16-byte alignment and the loads and layouts differ from the GPU's."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qaas.kernels import bnb4
from qaas.kernels import bnb4_triton as T

SIGNATURE = {
    "w_ptr": "*i32", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "tab_ptr": "*i64", "thr16_ptr": "*fp32",
    "n_words": "i32", "n_blocks": "i32", "n_tiles": "i32", "WPB": "constexpr", "BPP": "constexpr",
    "IS_BF16": "constexpr", "QT": "constexpr", "MODE": "constexpr", "MASK": "constexpr", "USE_ASM": "constexpr",
    "PERSIST": "constexpr",
}  # fmt: skip


def compile_mode(mode: int, bpp: int, warps: int):
    mask, _ = bnb4.nf4_popc_tables()
    const = {"WPB": 32, "BPP": bpp, "IS_BF16": False, "QT": 0, "MODE": mode, "MASK": mask, "USE_ASM": True,
             "PERSIST": False}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}  # the 5 pointers, n_words, n_blocks
    src = ASTSource(T.quantize4_pairs_kernel, SIGNATURE, const, attrs)
    opts = {"num_warps": warps, "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def sass_report(kernel) -> tuple[dict, str]:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    regs = re.search(r"REG:(\d+)", res)
    out = {
        "regs": int(regs.group(1)) if regs else None,
        "shared_bytes": kernel.metadata.shared,
        "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
        "instructions": sum(ops.values()),
        **{k: ops.get(k, 0) for k in ("BAR", "STS", "LDS", "LDG", "STG", "LOP3", "HSET2", "FSETP", "SHFL")},
    }
    return out, sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpp", type=int, default=32)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--modes", default=",".join(str(m) for m in bnb4.FAST_MODES))
    ap.add_argument("--dump", help="write each mode's SASS and TTGIR here")
    args = ap.parse_args()
    elems = args.bpp * 64 // (32 * args.warps)
    print(f"# sm_90, [{args.bpp} blocks x 32 words] tile, {args.warps} warps: {elems} elements per thread")
    for mode in (int(m) for m in args.modes.split(",")):
        k = compile_mode(mode, args.bpp, args.warps)
        rep, sass = sass_report(k)
        print(f"mode {mode} {bnb4.FAST_MODES[mode]:10s} " + " ".join(f"{a}={b}" for a, b in rep.items()), flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"mode{mode}.sass"), "w") as f:
                f.write(sass)
            with open(os.path.join(args.dump, f"mode{mode}.ttgir"), "w") as f:
                f.write(k.asm["ttgir"])


if __name__ == "__main__":
    main()
