"""Kernel-variant timing for the NF4 quantize fast path (one GPU call), plus an FP4/NF4 byte check against
bitsandbytes' CUDA kernels that dumps differing elements. Run on the GPU machine:
    python -P bench/bnb_variants.py
Prints: copy ceiling, compile report (registers/spills) and time of every variant on the three shapes, host
overhead per call, and the FP4 check."""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.testing

from qaas.kernels import bnb4, bnb4_triton

SHAPES = [(28672, 8192), (14336, 4096), (4096, 4096)]


def bench(fn, xs, rep=150):
    it = iter(range(10**9))
    return triton.testing.do_bench(lambda: fn(xs[next(it) % len(xs)]), warmup=25, rep=rep, return_mode="median")


def main():
    if not torch.cuda.is_available():
        print("SUMMARY bnb-variants: skipped, it needs CUDA (the Triton fast path and bitsandbytes' CUDA kernels)")
        return
    import bitsandbytes.functional as F

    dev = torch.cuda.get_device_properties(0)
    print(f"# {dev.name} {dev.multi_processor_count} SMs torch {torch.__version__} triton {triton.__version__}")
    a = torch.randn(2**29, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    bw = 4 * a.numel() / ms / 1e6
    print(f"copy {bw:.0f} GB/s")
    del a, b

    # -- FP4 / NF4 byte check with dumps
    g = torch.Generator(device="cpu").manual_seed(1)
    for qt in ("fp4", "nf4"):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for bs in (64, 128, 32, 4096):
                x = (torch.randn(3000, 130, generator=g) * 0.02).to(dt).cuda()
                x.view(-1)[::7] = (torch.randint(-64, 64, (x.numel() // 7 + 1,), generator=g)[: x.view(-1)[::7].numel()]
                                   .to(dt).cuda() / 64)  # exact ratios (ties at the FP4 literals)
                ref, qs = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
                out = []
                for backend in ("triton", "torch"):
                    p, st = bnb4.quantize_4bit(x, blocksize=bs, quant_type=qt, backend=backend)
                    d = (p != ref).view(-1)
                    out.append(int(d.sum()))
                    if d.any() and backend == "triton":
                        idx = d.nonzero().view(-1)[:6]
                        xf = x.reshape(-1).float()
                        for j in idx.tolist():
                            for e in (2 * j, 2 * j + 1):
                                am = qs.absmax[e // bs].item()
                                print(f"  DIFF {qt} {dt} bs={bs} byte {j} elem {e} x={xf[e].item()!r} absmax={am!r} "
                                      f"x/am={xf[e].item() / am!r} ours={p.view(-1)[j].item():02x} "
                                      f"bnb={ref.view(-1)[j].item():02x}")
                print(f"check {qt} {dt} bs={bs}: differing bytes triton={out[0]} torch={out[1]}", flush=True)

    # -- variants
    rows = []
    configs = [dict(fast=False)]
    # NF4 code modes (bnb4.FAST_MODES): tiles (blocks per program, warps), one program per tile; the table modes
    # at their best tiles of earlier sweeps, the half2 modes at all
    for mode in (1, 3, 4, 5, 6, 7, 0):
        for bpp, warps in ((32, 4), (64, 8), (16, 4), (64, 4), (128, 8), (16, 2)):
            if mode in (1, 3, 4) and (bpp, warps) not in ((32, 4), (64, 8)) or mode == 0 and (bpp, warps) != (32, 4):
                continue
            configs.append(dict(fast=True, mode=mode, per_sm=0, bpp=bpp, warps=warps))
    if os.environ.get("BNB_VARIANTS"):  # e.g. "1:32:4,3:32:4": mode:bpp:warps, for a short run
        configs = [dict(fast=False)] + [dict(fast=True, mode=int(m), per_sm=0, bpp=int(b), warps=int(w))
                                        for m, b, w in (v.split(":") for v in os.environ["BNB_VARIANTS"].split(","))]
    saved = dict(bnb4.FAST_TILE)
    bnb_by_shape: dict = {}
    for shape in SHAPES:
        n = shape[0] * shape[1]
        k = min(8, max(2, -(-256 * 2**20 // (2 * n))))
        xs = [torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(k)]
        nbytes = 2 * n + n // 2 + 4 * (n // 64)
        ref, ref_state = F.quantize_4bit(xs[0], blocksize=64, quant_type="nf4")
        for cfg in configs:
            bnb4.FAST_TILE.update(saved)
            bnb4.FAST_TILE.update({k2: v for k2, v in cfg.items() if k2 != "fast"})
            fast = cfg["fast"]
            f = lambda x: bnb4.quantize_4bit_triton(x, 64, "nf4", False, "cuda", fast=fast)  # noqa: E731
            try:
                p, am = f(xs[0])[:2]
                ok = torch.equal(p, ref) and torch.equal(am, ref_state.absmax)  # bitsandbytes' bytes and absmax
                ms = bench(f, xs)
            except Exception as e:  # noqa: BLE001 - one variant that fails to compile must not end the sweep
                print(f"{str(shape):14s} {str(cfg):70s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            kern = bnb4_triton.quantize4_pairs_kernel if fast else bnb4_triton.quantize4_kernel
            regs = spills = "?"
            try:
                for c in kern.device_caches[0][0].values():
                    regs, spills = c.n_regs, c.n_spills
            except Exception as e:  # noqa: BLE001
                regs = f"err {e}"
            gbps = nbytes / ms / 1e6
            rows.append((shape, cfg, ms, gbps / bw, ok))
            print(f"{str(shape):14s} {str(cfg):70s} {ms * 1e3:8.1f} us {gbps:6.0f} GB/s {gbps / bw:6.1%} exact={ok} "
                  f"regs={regs} spills={spills}", flush=True)
        bnb_ms = bench(lambda x: F.quantize_4bit(x, blocksize=64, quant_type="nf4"), xs)
        print(f"{str(shape):14s} bitsandbytes {bnb_ms * 1e3:8.1f} us", flush=True)
        bnb_by_shape[shape] = bnb_ms
        bnb4.FAST_TILE.update(saved)
        # public API with/without DQ (host overhead + DQ)
        for dq in (False, True):
            ms = bench(lambda x: bnb4.quantize_4bit(x, blocksize=64, compress_statistics=dq), xs)
            print(f"{str(shape):14s} public quantize_4bit dq={dq} {ms * 1e3:8.1f} us", flush=True)
        del xs
        torch.cuda.empty_cache()
    parts = []
    for shape in SHAPES:
        mine = [r for r in rows if r[0] == shape and r[1].get("fast") and r[4]]
        if not mine:
            continue
        best = min(mine, key=lambda r: r[2])
        dflt = [r for r in mine if all(r[1].get(k) == saved[k] for k in ("mode", "bpp", "warps"))]
        c = best[1]
        parts.append(f"{shape[0]}x{shape[1]} best mode {bnb4.FAST_MODES[c['mode']]}/{c['bpp']}/{c['warps']}w {best[2] * 1e3:.1f} us "
                     f"({best[3]:.0%} of copy)" + (f", default {dflt[0][2] * 1e3:.1f} us ({dflt[0][3]:.0%})" if dflt else "")
                     + (f", bitsandbytes {bnb_by_shape[shape] * 1e3:.1f} us" if shape in bnb_by_shape else ""))
    bad = sorted({f"{bnb4.FAST_MODES[r[1]['mode']]}/{r[1]['bpp']}/{r[1]['warps']}w" for r in rows
                  if r[1].get("fast") and not r[4]})
    if bad:
        parts.append("NOT bitsandbytes' bytes: " + ", ".join(bad))
    print("SUMMARY bnb-variants: " + "; ".join(parts), flush=True)
    # dump the compile report of the default variant: registers per kernel from the last compiled entries
    for kern in (bnb4_triton.quantize4_pairs_kernel,):
        try:
            for key, c in kern.device_caches[0][0].items():
                ptx = c.asm.get("ptx") or ""
                print("compiled:", c.n_regs, "regs", c.n_spills, "spills", "v4 loads:", ptx.count("ld.global.v4"),
                      "rcp.approx:", ptx.count("rcp.approx"), "shared:", c.metadata.shared)
        except Exception as e:  # noqa: BLE001
            print("compile report unavailable:", e)
    # host overhead per call (tiny tensor, many calls, one sync)
    x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    for name, fn in (("qaas", lambda: bnb4.quantize_4bit(x)), ("qaas dq", lambda: bnb4.quantize_4bit(x, compress_statistics=True)),
                     ("bnb", lambda: F.quantize_4bit(x, blocksize=64, quant_type="nf4"))):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        print(f"host overhead {name}: {(time.perf_counter() - t0) / 500 * 1e6:.1f} us/call")


if __name__ == "__main__":
    main()
