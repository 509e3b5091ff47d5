"""GGUF Triton kernels on the GPU against their torch reference on the CPU (itself byte-exact with ggml: see
tests/kernels/test_gguf_quants.py, where the kernels run in the interpreter): the bytes of each type with and
without an importance matrix on random and edge-case rows, and the kernel's time for one 4096 x 4096 tensor.

    python -P bench/gguf_kernels_gpu.py [TYPE ...]      # default: the affine k-quants Q2_K Q4_K Q5_K
"""

from __future__ import annotations

import sys
import time

import torch

from qaas.kernels.gguf import quantize_tensor


def edge_rows() -> torch.Tensor:
    """All-zero, constant, huge, tiny and negative-only super-blocks beside random ones (F16-rounded)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 512, generator=g) * 0.02
    x[0, :256] = 0
    x[0, 40:48] = -0.0
    x[1, :256] = 0.01
    x[1, 256:320] = -0.03
    x[1, 320:336] = 0.5
    x[2, :256] *= 5e5
    x[2, 256:] *= 1e-4
    x[3, :256] = -x[3, :256].abs()
    x[3, 300] = 2.0
    x[3, 320:352] = 0
    return x.clamp(-6e4, 6e4).half().float()


def main(types: list[str]) -> int:
    torch.manual_seed(0)
    failed = 0
    for t in types:
        for with_imatrix in (False, True):
            for x in (edge_rows(), (torch.randn(256, 4096) * 0.02).half().float()):
                qw = torch.rand(x.shape[1]) ** 3 * 5 if with_imatrix else None
                ours = quantize_tensor(x.cuda(), t, imatrix=qw, backend="triton").cpu()
                ref = quantize_tensor(x, t, imatrix=qw, backend="torch")
                bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
                failed += bool(bad)
                print(f"{t:6} {'imatrix' if with_imatrix else 'plain':7} {tuple(x.shape)}: "
                      f"{'same bytes' if not bad else f'rows differ: {bad[:8]}'}", flush=True)
            big = (torch.randn(4096, 4096, device="cuda") * 0.02).half().float()
            qw = torch.rand(4096, device="cuda") ** 3 * 5 if with_imatrix else None
            quantize_tensor(big, t, imatrix=qw, backend="triton")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                quantize_tensor(big, t, imatrix=qw, backend="triton")
            torch.cuda.synchronize()
            print(f"{t:6} {'imatrix' if with_imatrix else 'plain':7} 4096x4096: "
                  f"{(time.perf_counter() - t0) / 3 * 1e3:.1f} ms", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["Q2_K", "Q4_K", "Q5_K"]))
