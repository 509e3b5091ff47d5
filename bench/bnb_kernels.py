"""Benchmark of qaas.kernels.bnb4 / int8 against bitsandbytes on one GPU, plus a whole-model conversion.

Run on the GPU machine:  python -P bench/bnb_kernels.py --out bench/results/bnb_kernels   (writes .json and .md)
Under Nsight Compute (`--ncu-target PLAN.json`: only the NF4 and NF4 + double-quant quantize calls, once per shape,
so that `ncu --launch-count` covers exactly them; bench/gpu_session_profile.sh runs it, bench/ncu_summary.py reads
the report):

    ncu --clock-control none --set full -k regex:'quantize|reduce_kernel' --launch-count 12 -o nf4 \
        python -P bench/bnb_kernels.py --ncu-target nf4-plan.json

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


def bench_graph(fn, inputs, rep=200):
    """Device time without the host: one CUDA graph per rotated input, replayed in turn (the host-side cost of a
    call on this machine is reported separately)."""
    graphs = []
    for x in inputs:
        fn(x)  # compile / warm up outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(x)
        graphs.append(g)
    it = iter(range(10**9))
    return triton.testing.do_bench(lambda: graphs[next(it) % len(graphs)].replay(), warmup=25, rep=rep,
                                   return_mode="median")  # fmt: skip


def host_us(fn, x, n=300):
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


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


#: the kernels one quantize call launches, in order, that `ncu -k regex:'quantize|reduce_kernel'` selects
NCU_LAUNCHES = {"nf4": ["quantize"], "nf4+dq": ["quantize", "absmax mean (torch reduce)", "double quant"]}


def ncu_target(plan_path: str) -> int:
    """One NF4 and one NF4 + double-quant quantize per shape on random data, and the plan of the launches in order
    (shape, call, kernel) for ncu_summary.py to label the report's rows (Triton's compilation launches nothing)."""
    if not torch.cuda.is_available():
        print("SUMMARY ncu target: skipped, it needs CUDA")
        return 0
    calls = {"nf4": {}, "nf4+dq": {"compress_statistics": True}}
    plan = []
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        for call, kw in calls.items():
            bnb4.quantize_4bit(x, blocksize=64, quant_type="nf4", **kw)
            plan += [{"shape": f"{shape[0]}x{shape[1]}", "call": call, "kernel": k} for k in NCU_LAUNCHES[call]]
        torch.cuda.synchronize()
        del x
    with open(plan_path, "w") as f:
        json.dump({"launches": plan, "bytes": {f"{a}x{b}": a * b for a, b in SHAPES}}, f, indent=1)
    print(f"SUMMARY ncu target: {len(plan)} launches planned over {len(SHAPES)} shapes")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/bnb_kernels")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--ncu-target", metavar="PLAN.json", default=None,
                    help="only the quantize calls to profile under Nsight Compute; writes the launch plan")
    args = ap.parse_args()
    if args.ncu_target:
        return ncu_target(args.ncu_target)
    if not torch.cuda.is_available():
        print("SUMMARY bnb kernels: skipped, they need CUDA")
        return 0
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
        if ms is None:
            return
        gbps = nbytes / ms / 1e6
        rows.append({"op": op, "shape": list(shape), "impl": impl, "ms": ms, "GBps": gbps, "frac_copy": gbps / bw})
        print(f"{op:14s} {str(shape):14s} {impl:6s} {ms * 1e3:9.1f} us {gbps:8.0f} GB/s {gbps / bw:6.1%}", flush=True)

    for shape in SHAPES:
        n = shape[0] * shape[1]
        xs = make_inputs(shape)
        src, dst = xs[0], torch.empty_like(xs[0])
        ms_copy = bench_graph(lambda t: dst.copy_(t), xs)
        info.setdefault("copy_same_size_GBps", {})[f"{shape[0]}x{shape[1]}"] = 4 * n / ms_copy / 1e6
        print(f"copy of the same fp16 tensor (graph): {ms_copy * 1e3:.1f} us {4 * n / ms_copy / 1e6:.0f} GB/s", flush=True)
        del src, dst
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
            if impl == "qaas":  # the same calls captured in CUDA graphs: device time, no host overhead
                add("quant_nf4", shape, "qaas-graph", bench_graph(f_nf4, xs), q_bytes)
                add("quant_nf4_dq", shape, "qaas-graph", bench_graph(f_dq, xs), dq_bytes)
                add("quant_int8", shape, "qaas-graph", bench_graph(f_i8, xs), 2 * n + n + 4 * shape[0])
        # dequantize: packed inputs rotated too
        ours = [bnb4.quantize_4bit(x, blocksize=64, quant_type="nf4") for x in xs]
        theirs = [F.quantize_4bit(x, blocksize=64, quant_type="nf4") for x in xs]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(ours, theirs)), "packed bytes differ from bitsandbytes"
        d_bytes = n // 2 + 4 * (n // 64) + 2 * n
        add("dequant_nf4", shape, "qaas", bench(lambda t: bnb4.dequantize_4bit(*t), ours), d_bytes)
        add("dequant_nf4", shape, "qaas-graph", bench_graph(lambda t: bnb4.dequantize_4bit(*t), ours), d_bytes)
        add("dequant_nf4", shape, "bnb", bench(lambda t: F.dequantize_4bit(*t), theirs), d_bytes)
        i8s = [int8.quantize_int8_rowwise(x) for x in xs]
        i8_bytes = n + 4 * shape[0] + 2 * n
        add("dequant_int8", shape, "qaas", bench(lambda t: int8.dequantize_int8_rowwise(*t), i8s), i8_bytes)
        add("dequant_int8", shape, "qaas-graph", bench_graph(lambda t: int8.dequantize_int8_rowwise(*t), i8s),
            i8_bytes)  # fmt: skip
        add("dequant_int8", shape, "bnb",
            bench(lambda t: F.int8_vectorwise_dequant(*t).to(torch.float16), i8s), i8_bytes)  # fmt: skip
        del xs, ours, theirs, i8s
        torch.cuda.empty_cache()

    # sweep of the fast quantize kernel on the largest shape (graph-timed; the default is what the table used)
    xs = make_inputs(SHAPES[-1])
    n = xs[0].numel()
    sweep = []
    default = dict(bnb4.FAST_TILE)
    tiles = [(1, 32, 4, 0), (3, 32, 4, 0), (1, 64, 8, 0), (4, 32, 4, 0), (5, 32, 4, 0), (5, 64, 8, 0),
             (6, 32, 4, 0), (6, 64, 8, 0), (6, 16, 4, 0), (7, 32, 4, 0), (0, 32, 4, 0)]
    for mode, bpp, warps, per_sm in tiles:
        bnb4.FAST_TILE.update(mode=mode, bpp=bpp, warps=warps, per_sm=per_sm)
        ms = bench_graph(lambda x: bnb4.quantize_4bit(x, blocksize=64), xs)
        gbps = (2 * n + n // 2 + 4 * (n // 64)) / ms / 1e6
        sweep.append({"mode": bnb4.FAST_MODES[mode], "bpp": bpp, "warps": warps, "per_sm": per_sm, "ms": ms,
                      "GBps": gbps, "frac_copy": gbps / bw})  # fmt: skip
        print(f"sweep {sweep[-1]}", flush=True)
    bnb4.FAST_TILE.update(default)
    x = xs[0][:64, :64].contiguous()
    info["host_us_per_call"] = {
        "qaas quantize_4bit nf4": host_us(lambda t: bnb4.quantize_4bit(t), x),
        "qaas quantize_4bit nf4+dq": host_us(lambda t: bnb4.quantize_4bit(t, compress_statistics=True), x),
        "bnb quantize_4bit nf4": host_us(lambda t: F.quantize_4bit(t, blocksize=64, quant_type="nf4"), x),
        "bnb quantize_4bit nf4+dq": host_us(
            lambda t: F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True), x),
    }  # fmt: skip
    print("# host overhead:", info["host_us_per_call"], flush=True)
    del xs
    torch.cuda.empty_cache()
    model = None if args.skip_model else whole_model()
    if model is not None:
        model["overlapped"] = whole_model_overlapped()
    result = {"info": info, "rows": rows, "model": model, "fast_tile_sweep": sweep}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_md(result, args.out + ".md")
    print(open(args.out + ".md").read())
    nf4 = [f"{r['op']} {r['shape'][0]}x{r['shape'][1]} {r['frac_copy']:.0%}" for r in rows
           if r["impl"] == "qaas-graph" and r["op"] in ("quant_nf4", "quant_nf4_dq")]
    print(f"SUMMARY bnb kernels (of copy, {bw:.0f} GB/s): " + ", ".join(nf4))


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


def whole_model_overlapped(n_blocks=32, hidden=4096, mlp=14336, kv=1024):
    """The same conversion pipelined over three streams: H2D of block i+1 (copy stream, double-buffered device
    weights) and D2H of block i-1's results (second copy stream) run while the kernels of block i run."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
              (hidden, mlp)]  # fmt: skip
    per_block = sum(a * b for a, b in shapes)
    host = [torch.randn(per_block, dtype=torch.float16).pin_memory() for _ in range(2)]
    bufs = [torch.empty(per_block, dtype=torch.float16, device="cuda") for _ in range(2)]
    out_bytes = per_block // 2 + per_block // 64 + 4 * (per_block // 64 // 256 + 16) + 64
    out_host = [torch.empty(out_bytes, dtype=torch.uint8).pin_memory() for _ in range(2)]
    comp = torch.cuda.current_stream()
    h2d_s, d2h_s = torch.cuda.Stream(), torch.cuda.Stream()

    def run(n):
        h2d_done = [torch.cuda.Event() for _ in range(2)]
        comp_done = [torch.cuda.Event() for _ in range(2)]
        d2h_done = [torch.cuda.Event() for _ in range(2)]
        keep = []
        with torch.cuda.stream(h2d_s):
            bufs[0].copy_(host[0], non_blocking=True)
            h2d_done[0].record()
        for i in range(n):
            j = i % 2
            if i + 1 < n:  # prefetch the next block once the kernels that read its buffer (block i-1) are done
                with torch.cuda.stream(h2d_s):
                    if i >= 1:
                        h2d_s.wait_event(comp_done[1 - j])
                    bufs[1 - j].copy_(host[(i + 1) % 2], non_blocking=True)
                    h2d_done[1 - j].record()
            comp.wait_event(h2d_done[j])
            if i >= 2:
                comp.wait_event(d2h_done[j])  # out_host[j] is free again (not strictly needed for the device)
            outs, off = [], 0
            for a, b in shapes:
                w = bufs[j][off : off + a * b].view(a, b)
                off += a * b
                outs.append(bnb4.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
            comp_done[j].record()
            with torch.cuda.stream(d2h_s):
                d2h_s.wait_event(comp_done[j])
                o = 0
                for p, st in outs:
                    for t in (p.view(-1), st.absmax, st.nested_absmax.view(torch.uint8),
                              st._offset_tensor("cuda").view(torch.uint8)):  # fmt: skip
                        out_host[j][o : o + t.numel()].copy_(t.view(-1), non_blocking=True)
                        o += t.numel()
                d2h_done[j].record()
            keep.append(outs)  # results stay referenced until the end (the allocator must not reuse them early)
        torch.cuda.synchronize()
        return keep

    run(2)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(n_blocks)
    wall = time.perf_counter() - t0
    gb = n_blocks * per_block * 2 / 1e9
    res = {"blocks": n_blocks, "wall_s": wall, "GBps_fp16_in": gb / wall}
    print("# whole model, overlapped:", res, flush=True)
    return res


def write_md(r, path):
    info = r["info"]
    L = ["# bitsandbytes-compatible kernels: qaas vs bitsandbytes", ""]
    L.append(f"Measured {info['date']} on {info['gpu']} ({info['sms']} SMs), torch {info['torch']} (CUDA "
             f"{info['cuda']}), Triton {info['triton']}, bitsandbytes {info['bitsandbytes']}, Python {info['python']}.")  # fmt: skip
    L.append(f"Device-to-device copy (read + write) in the same run: **{info['copy_GBps']:.0f} GB/s**.")
    L.append("Command: `python -P bench/bnb_kernels.py --out bench/results/bnb_kernels` (medians of "
             "triton.testing.do_bench, fp16 random normal weights rotated over >= 256 MB, blocksize 64).")  # fmt: skip
    L += ["", "qaas device = the same public call captured in CUDA graphs (device time; rotated inputs); qaas API = "
          "plain calls, which on this host are bound by Python/launch time at the small shapes (see host time below).",
          "", "| op | shape | qaas device µs | GB/s | of copy | qaas API µs | of copy | bnb µs | GB/s | of copy "
          "| speed-up device | speed-up API |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = r["rows"]
    keys = []
    for x in rows:
        k = (x["op"], tuple(x["shape"]))
        if k not in keys:
            keys.append(k)

    def get(op, shape, impl):
        return next((x for x in rows if x["op"] == op and tuple(x["shape"]) == shape and x["impl"] == impl), None)

    for op, shape in keys:
        a, g, b = get(op, shape, "qaas"), get(op, shape, "qaas-graph") or get(op, shape, "qaas"), get(op, shape, "bnb")
        L.append(f"| {op} | {shape[0]}×{shape[1]} | {g['ms'] * 1e3:.1f} | {g['GBps']:.0f} | {g['frac_copy']:.0%} | "
                 f"{a['ms'] * 1e3:.1f} | {a['frac_copy']:.0%} | "
                 f"{b['ms'] * 1e3:.1f} | {b['GBps']:.0f} | {b['frac_copy']:.0%} | {b['ms'] / g['ms']:.2f}× | "
                 f"{b['ms'] / a['ms']:.2f}× |")  # fmt: skip
    if r.get("fast_tile_sweep"):
        L += ["", "Fast quantize kernel sweep (NF4, 28672×8192, CUDA-graph timed; mode/blocks per program/warps/"
              "programs per SM for a persistent grid, 0 = one program per tile): " + ", ".join(
            f"{s['mode']}/{s['bpp']}/{s['warps']}w/{s['per_sm']} {s['ms'] * 1e3:.0f} µs ({s['frac_copy']:.0%})"
            for s in r["fast_tile_sweep"])]  # fmt: skip
    if info.get("copy_same_size_GBps"):
        L += ["", "Device-to-device copy of one weight-sized fp16 tensor (graph-timed, read + write): " + ", ".join(
            f"{k} {v:.0f} GB/s" for k, v in info["copy_same_size_GBps"].items())]  # fmt: skip
    if info.get("host_us_per_call"):
        L += ["", "Host time per call on this machine (tiny 64×64 weight, 300 calls, one sync): " + ", ".join(
            f"{k} {v:.0f} µs" for k, v in info["host_us_per_call"].items())]  # fmt: skip
    m = r.get("model")
    if m:
        L += ["", f"## Whole-model conversion (Llama-shaped, {m['blocks']} blocks, 7 linears each, NF4 + double quant)", ""]
        L.append(f"{m['weights_GB_fp16']:.2f} GB of fp16 weights from pinned host memory: **{m['wall_s']:.2f} s** end to end; "
                 f"H2D {m['h2d_s']:.2f} s ({m['h2d_GBps']:.1f} GB/s), kernels {m['kernels_s']:.3f} s, D2H {m['d2h_s']:.2f} s "
                 "(serialized in one stream so each phase is timed with events).")  # fmt: skip
        if m.get("overlapped"):
            o = m["overlapped"]
            L.append(f"Pipelined (H2D of block i+1 and D2H of block i-1 on two copy streams while block i's kernels "
                     f"run, pinned host memory): **{o['wall_s']:.2f} s** ({o['GBps_fp16_in']:.1f} GB/s of fp16 in).")  # fmt: skip
    open(path, "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
