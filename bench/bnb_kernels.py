"""Benchmark of qaas.kernels.bnb4 / int8 against bitsandbytes on one GPU, plus a whole-model conversion.

Run on the GPU machine:  python -P bench/bnb_kernels.py --out bench/results/bnb_kernels   (writes .json and .md)

* fp16 weights 4096x4096, 14336x4096, 28672x8192; quantize NF4, NF4+double quant, int8; dequantize NF4 and int8;
  ours vs bitsandbytes in the same run; medians of triton.testing.do_bench; inputs rotated over > L2 bytes;
  random normal data (never zeros).
* Bandwidth counts the bytes that must move: quantize reads 2n and writes n/2 + 4n/bs (+ double quant stats);
  dequantize reads n/2 + 4n/bs and writes 2n; int8 reads 2n and writes n + 4*rows.
* Copy ceiling: a device-to-device copy of 1 GiB, read + written, measured in the same run.
* Whole model: Llama-shaped (32 blocks, hidden 4096, MLP 14336, 7 linears), fp16 weights in pinned host memory;
  per block H2D, quantize all 7 (NF4+DQ), D2H of packed + stats; timed end to end, H2D / kernels / D2H apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import triton
import triton.testing

from qaas.kernels import bnb4, int8

SHAPES = [(4096, 4096), (14336, 4096), (28672, 8192)]
L2_ROTATE_BYTES = 256 * 2**20


def bench(fn, inputs, rep=200):
    it = iter(range(10**9))

    def run():
        fn(inputs[next(it) % len(inputs)])

    return triton.testing.do_bench(run, warmup=25, rep=rep, return_mode="median")  # ms


def make_inputs(shape, dtype=torch.float16):
    nbytes = shape[0] * shape[1] * 2
    k = max(2, -(-L2_ROTATE_BYTES // nbytes))
    k = min(k, 8)
    return [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(k)]


def copy_bw():
    n = 2**29  # 1 GiB of fp16
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=300, return_mode="median")
    return 2 * a.numel() * 2 / ms / 1e6  # GB/s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/bnb_kernels")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    import bitsandbytes as bnb_pkg
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": dev.name,
        "sms": dev.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bnb_pkg.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    bw = copy_bw()
    info["copy_GBps"] = bw
    print(f"# {info}", flush=True)
    rows = []

    def add(op, shape, impl, ms, nbytes):
        gbps = nbytes / ms / 1e6
        rows.append({"op": op, "shape": list(shape), "impl": impl, "ms": ms, "GBps": gbps, "frac_copy": gbps / bw})
        print(f"{op:14s} {str(shape):14s} {impl:6s} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s {gbps / bw:6.1%}", flush=True)

    for shape in SHAPES:
        n = shape[0] * shape[1]
        xs = make_inputs(shape)
        q_bytes = 2 * n + n // 2 + 4 * (n // 64)
        dq_bytes = q_bytes - 4 * (n // 64) + (n // 64) + 4 * (n // 64 // 256)
        for impl in ("qaas", "bnb"):
            if impl == "qaas":
                f_nf4 = lambda x: bnb4.quantize_4bit(x, blocksize=64, quant_type="nf4")  # noqa: E731
                f_dq = lambda x: bnb4.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
                f_i8 = lambda x: int8.quantize_int8_rowwise(x)  # noqa: E731
            else:
                f_nf4 = lambda x: F.quantize_4bit(x, blocksize=64, quant_type="nf4")  # noqa: E731
                f_dq = lambda x: F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)  # noqa: E731
                f_i8 = lambda x: F.int8_vectorwise_quant(x)  # noqa: E731
            add("quant_nf4", shape, impl, bench(f_nf4, xs), q_bytes)
            add("quant_nf4_dq", shape, impl, bench(f_dq, xs), dq_bytes)
            add("quant_int8", shape, impl, bench(f_i8, xs), 2 * n + n + 4 * shape[0])
        # dequantize: packed inputs rotated too
        ours = [bnb4.quantize_4bit(x, blocksize=64, quant_type="nf4") for x in xs]
        theirs = [F.quantize_4bit(x, blocksize=64, quant_type="nf4") for x in xs]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(ours, theirs)), "packed bytes differ from bitsandbytes"
        d_bytes = n // 2 + 4 * (n // 64) + 2 * n
        add("dequant_nf4", shape, "qaas", bench(lambda t: bnb4.dequantize_4bit(*t), ours), d_bytes)
        add("dequant_nf4", shape, "bnb", bench(lambda t: F.dequantize_4bit(*t), theirs), d_bytes)
        i8s = [int8.quantize_int8_rowwise(x) for x in xs]
        i8_bytes = n + 4 * shape[0] + 2 * n
        add("dequant_int8", shape, "qaas", bench(lambda t: int8.dequantize_int8_rowwise(*t), i8s), i8_bytes)
        add("dequant_int8", shape, "bnb",
            bench(lambda t: F.int8_vectorwise_dequant(*t).to(torch.float16), i8s), i8_bytes)  # fmt: skip
        del xs, ours, theirs, i8s
        torch.cuda.empty_cache()

    # tile sweep of the quantize kernel on the largest shape (the default is what the table above used)
    from qaas.kernels import bnb4_triton

    xs = make_inputs(SHAPES[-1])
    n = xs[0].numel()
    sweep = []
    default = dict(bnb4_triton.QUANT_TILE)
    for elems, warps in [(2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16), (2048, 2)]:
        bnb4_triton.QUANT_TILE.update(elems=elems, warps=warps)
        ms = bench(lambda x: bnb4.quantize_4bit(x, blocksize=64), xs)
        gbps = (2 * n + n // 2 + 4 * (n // 64)) / ms / 1e6
        sweep.append({"elems": elems, "warps": warps, "ms": ms, "GBps": gbps, "frac_copy": gbps / bw})
        print(f"sweep quant_nf4 tile={elems} warps={warps}: {ms * 1e3:.1f} us {gbps:.0f} GB/s {gbps / bw:.1%}", flush=True)
    bnb4_triton.QUANT_TILE.update(default)
    del xs
    torch.cuda.empty_cache()
    model = None if args.skip_model else whole_model()
    result = {"info": info, "rows": rows, "model": model, "quant_tile_sweep": sweep}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_md(result, args.out + ".md")
    print(open(args.out + ".md").read())


def whole_model(n_blocks=32, hidden=4096, mlp=14336, kv=1024):
    """Streamed conversion: each block's fp16 weights go host->GPU, are quantized (NF4 + double quant, blocksize
    64), and the packed weights and stats come back. Copies and kernels are serialized in one stream so that each
    phase can be timed with events; an overlapped pipeline is reported too."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
              (hidden, mlp)]  # fmt: skip
    per_block = sum(a * b for a, b in shapes)
    host = [torch.randn(per_block, dtype=torch.float16).pin_memory() for _ in range(2)]  # 2 distinct blocks, rotated
    gpu_buf = torch.empty(per_block, dtype=torch.float16, device="cuda")
    out_host = torch.empty(per_block // 2 + per_block // 64 + 4 * (per_block // 64 // 256 + 16), dtype=torch.uint8).pin_memory()
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    t_h2d = t_k = t_d2h = 0.0

    def one_block(src, timing):
        nonlocal t_h2d, t_k, t_d2h
        e0, e1, e2, e3 = ev(), ev(), ev(), ev()
        e0.record()
        gpu_buf.copy_(src, non_blocking=True)
        e1.record()
        outs = []
        off = 0
        for a, b in shapes:
            w = gpu_buf[off : off + a * b].view(a, b)
            off += a * b
            outs.append(bnb4.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
        e2.record()
        o = 0
        for p, st in outs:
            for t in (p.view(-1), st.absmax, st.nested_absmax.view(torch.uint8)):
                out_host[o : o + t.numel()].copy_(t.view(-1), non_blocking=True)
                o += t.numel()
        e3.record()
        if timing:
            e3.synchronize()
            t_h2d += e0.elapsed_time(e1)
            t_k += e1.elapsed_time(e2)
            t_d2h += e2.elapsed_time(e3)

    one_block(host[0], False)  # warm-up (compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n_blocks):
        one_block(host[i % 2], True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gb = n_blocks * per_block * 2 / 1e9
    res = {
        "blocks": n_blocks,
        "weights_GB_fp16": gb,
        "wall_s": wall,
        "h2d_s": t_h2d / 1e3,
        "kernels_s": t_k / 1e3,
        "d2h_s": t_d2h / 1e3,
        "h2d_GBps": gb / (t_h2d / 1e3),
    }
    print("# whole model:", res, flush=True)
    return res


def write_md(r, path):
    info = r["info"]
    L = ["# bitsandbytes-compatible kernels: qaas vs bitsandbytes", ""]
    L.append(f"Measured {info['date']} on {info['gpu']} ({info['sms']} SMs), torch {info['torch']} (CUDA "
             f"{info['cuda']}), Triton {info['triton']}, bitsandbytes {info['bitsandbytes']}, Python {info['python']}.")  # fmt: skip
    L.append(f"Device-to-device copy (read + write) in the same run: **{info['copy_GBps']:.0f} GB/s**.")
    L.append("Command: `python -P bench/bnb_kernels.py --out bench/results/bnb_kernels` (medians of "
             "triton.testing.do_bench, fp16 random normal weights rotated over >= 256 MB, blocksize 64).")  # fmt: skip
    L += ["", "| op | shape | qaas µs | GB/s | of copy | bnb µs | GB/s | of copy | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    rows = r["rows"]
    keys = []
    for x in rows:
        k = (x["op"], tuple(x["shape"]))
        if k not in keys:
            keys.append(k)
    for op, shape in keys:
        a = next(x for x in rows if x["op"] == op and tuple(x["shape"]) == shape and x["impl"] == "qaas")
        b = next(x for x in rows if x["op"] == op and tuple(x["shape"]) == shape and x["impl"] == "bnb")
        L.append(f"| {op} | {shape[0]}×{shape[1]} | {a['ms'] * 1e3:.1f} | {a['GBps']:.0f} | {a['frac_copy']:.0%} | "
                 f"{b['ms'] * 1e3:.1f} | {b['GBps']:.0f} | {b['frac_copy']:.0%} | {b['ms'] / a['ms']:.2f}× |")  # fmt: skip
    if r.get("quant_tile_sweep"):
        L += ["", "Quantize-kernel tile sweep (NF4, 28672×8192): " + ", ".join(
            f"{s['elems']}/{s['warps']}w {s['ms'] * 1e3:.0f} µs ({s['frac_copy']:.0%})" for s in r["quant_tile_sweep"])]
    m = r.get("model")
    if m:
        L += ["", f"## Whole-model conversion (Llama-shaped, {m['blocks']} blocks, 7 linears each, NF4 + double quant)", ""]
        L.append(f"{m['weights_GB_fp16']:.2f} GB of fp16 weights from pinned host memory: **{m['wall_s']:.2f} s** end to end; "
                 f"H2D {m['h2d_s']:.2f} s ({m['h2d_GBps']:.1f} GB/s), kernels {m['kernels_s']:.3f} s, D2H {m['d2h_s']:.2f} s "
                 "(serialized in one stream so each phase is timed with events).")  # fmt: skip
    open(path, "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
