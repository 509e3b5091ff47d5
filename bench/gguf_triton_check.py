"""GGUF quantizers on a GPU: the bytes `quantize_tensor(backend="triton")` writes on CUDA against the torch reference on
the CPU (which tests/kernels/test_gguf_quants.py holds byte-exact with ggml's ggml_quantize_chunk), for every
quant type, with and without an importance matrix, and the time of one 4096 x 4096 tensor on each path.

CI has no GPU: the kernel tests there run Triton's interpreter, which computes in numpy and cannot show what
only the compiled kernels do (a unary minus compiled as 0 - x, say). This is the check that can.
Types without a Triton kernel (or, for the legacy types, with an imatrix) run the torch reference on CUDA, so
their rows check the reference's own device independence.

Run on the GPU machine (see bench/gpu_env.sh):  python -P bench/gguf_triton_check.py [--types Q6_K IQ4_XS]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qaas.kernels.gguf import FLOAT_TYPES, TYPES, quantize_tensor


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
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


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=[t for t in TYPES if t not in FLOAT_TYPES])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    results = []
    for type_name in args.types:
        for with_imatrix in (False, True):
            differing = total = 0
            for seed in range(args.seeds):
                x = weights(args.rows, args.cols, seed)
                imatrix = importance(args.cols, 100 + seed) if with_imatrix else None
                ref = quantize_tensor(x, type_name, imatrix=imatrix, backend="torch")
                ours = quantize_tensor(x.cuda(), type_name, imatrix=imatrix, backend="triton").cpu()
                differing += int((ours != ref).sum())
                total += ref.numel()
            big = torch.randn(4096, 4096, device="cuda").half().float()
            big_imatrix = importance(4096, 7).cuda() if with_imatrix else None
            t_triton = timed(lambda: quantize_tensor(big, type_name, imatrix=big_imatrix, backend="triton"))
            t_torch = timed(lambda: quantize_tensor(big, type_name, imatrix=big_imatrix, backend="torch"))
            row = dict(type=type_name, imatrix=with_imatrix, differing_bytes=differing, bytes=total,
                       ms_4096x4096_triton=round(t_triton * 1e3, 2), ms_4096x4096_torch_cuda=round(t_torch * 1e3, 2))
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"all_byte_exact": all(r["differing_bytes"] == 0 for r in results)}))


if __name__ == "__main__":
    main()
