"""GGUF quantizers on the GPU: every type's Triton kernel against the torch reference — the bytes, the first call's
time (Triton's compile) and the steady time per call — with and without an importance matrix.

CI has no GPU: the kernel tests there run Triton's interpreter, which computes in numpy and cannot show what only
compiled kernels do (a unary minus compiled as 0 - x, say). This is the check that can: (1) rows with the blocks
where ggml's rules bite (zeros, constants, negative-only, huge, subnormal, an outlier, -0.0), quantized by the
compiled kernel on the GPU, against the torch reference on the CPU (which tests/kernels/test_gguf_quants.py holds
byte-exact with ggml_quantize_chunk); (2) one weight-sized tensor through both backends on the GPU, bytes compared
and timed. Every type has a Triton kernel, with and without an imatrix (Q8_0 ignores one, as ggml does).

    # GPU machine, from the repository root (bench/gpu_env.sh first):
    python -P bench/gguf_kernels.py --out $OUT/gguf_kernels.json
    # CPU smoke (Triton interpreter, tiny rows):
    TRITON_INTERPRET=1 python -P bench/gguf_kernels.py --smoke --out /tmp/gguf_kernels.json

The timed tensor is 4096 x 4096 by default, random normal rounded to F16 as llama-quantize sees weights; the
importance matrix is a random positive vector with a zero (ggml's quant_weights: a mean square per column).
Throughput is in weights per second and as GB/s of float32 input read (the engine hands the kernels float32 rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

def edge_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random rows with the blocks where the rules bite, rounded to F16 as llama-quantize sees them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[0, :256] = 0                                  # all zeros
    x[1, :256] = 0.25                               # constant
    x[2, :256] = -x[2, :256].abs()                  # negative only
    x[3, :256] *= 2e5                               # huge
    x[4, :256] *= 1e-3                              # tiny (F16 subnormals)
    x[5, 40] = 3.0                                  # one outlier
    x[6] *= 1e-6                                    # a whole row of tiny scales
    x[7, :256] = -0.0                               # negative zeros
    x[8, :512] = 0.0
    x[8, 300] = -1e-7                               # one tiny weight in a zero super-block
    return x.half().float()


def importance(cols: int, seed: int) -> torch.Tensor:
    imatrix = torch.rand(cols, generator=torch.Generator().manual_seed(seed)) ** 3 * 5
    imatrix[7] = 0
    return imatrix


def _timed(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(first call s, steady s per call): the first includes Triton's compile for this type."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return first, (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny rows (CPU, Triton interpreter)")
    ap.add_argument("--rows", type=int, default=None, help="rows (default 4096; 4 with --smoke)")
    ap.add_argument("--cols", type=int, default=None, help="columns (default 4096; 512 with --smoke)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls after the first (default 3; 1 with --smoke)")
    ap.add_argument("--types", default="", help="comma-separated subset of the quantized types")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds: types not started by then are skipped")
    ap.add_argument("--out", default="gguf_kernels.json")
    args = ap.parse_args()

    from qaas.kernels import gguf as G

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    rows, cols = args.rows or (4 if args.smoke else 4096), args.cols or (512 if args.smoke else 4096)
    reps = args.reps or (1 if args.smoke else 3)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, cols, generator=gen).half().float().to(device)
    imatrix = importance(cols, 7).to(device)
    edge_shape = (16, 512) if args.smoke else (256, 4096)
    types = [t for t in (args.types.split(",") if args.types else G.TYPES) if t not in G.FLOAT_TYPES]
    report: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "rows": rows, "cols": cols, "reps": reps, "types": {}}
    start = time.perf_counter()
    for t in types:
        for label, im in (("plain", None), ("imatrix", imatrix)):
            if time.perf_counter() - start > args.budget:
                report["types"].setdefault(t, {})[label] = {"skipped": "budget spent"}
                continue
            entry: dict = {}
            try:
                differing = 0
                for seed in range(1 if args.smoke else 3):
                    rows_x = edge_rows(*edge_shape, seed)
                    im_x = importance(edge_shape[1], 100 + seed) if im is not None else None
                    ref = G.quantize_tensor(rows_x, t, imatrix=im_x, backend="torch")
                    got = G.quantize_tensor(rows_x.to(device), t, imatrix=None if im_x is None else im_x.to(device),
                                            backend="triton").cpu()
                    differing += int((got != ref).sum())
                entry["edge_rows_differing_bytes_vs_cpu_reference"] = differing
                outs = {}
                for backend in ("triton", "torch"):
                    holder: dict = {}

                    def run(backend=backend, holder=holder) -> None:
                        holder["q"] = G.quantize_tensor(x, t, imatrix=im, backend=backend)
                    first, steady = _timed(run, device, reps)
                    outs[backend] = holder["q"]
                    entry[backend] = {"first_s": round(first, 4), "steady_s": round(steady, 5),
                                      "gweights_per_s": round(rows * cols / steady / 1e9, 3),
                                      "input_gb_per_s": round(rows * cols * 4 / steady / 1e9, 2)}
                equal = torch.equal(outs["triton"], outs["torch"])
                entry["bytes_equal"] = equal and differing == 0
                if not equal:
                    diff = (outs["triton"] != outs["torch"]).any(dim=1).nonzero()
                    entry["rows_differing"] = int(diff.numel())
                entry["speedup"] = round(entry["torch"]["steady_s"] / entry["triton"]["steady_s"], 2)
            except Exception as exc:  # report and go on with the next type
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            report["types"].setdefault(t, {})[label] = entry
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    report["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    bad = [f"{t}/{k}" for t, v in report["types"].items() for k, e in v.items()
           if "error" in e or e.get("bytes_equal") is False]
    parts = [f"{t} {v['plain']['triton']['gweights_per_s']} Gw/s x{v['plain']['speedup']}"
             for t, v in report["types"].items() if "triton" in v.get("plain", {})]
    print("SUMMARY gguf-kernels: " + ("DIFFER/ERROR " + ",".join(bad) + "; " if bad else "all bytes equal; ")
          + "; ".join(parts), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
