"""Which implementation a kernel call runs: the one rule every kernel family follows.

Every public kernel function takes `backend="auto" | "triton" | "torch"`:
  * "auto": the Triton kernel when every tensor argument lives on CUDA, else the torch reference;
  * "triton": the Triton kernel whatever the device (CPU tests run it under `TRITON_INTERPRET=1`);
  * "torch": the torch reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the call should launch the Triton kernel (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    if backend == "auto":
        return bool(tensors) and all(t.is_cuda for t in tensors)
    return backend == "triton"


def interpreting() -> bool:
    """Triton runs in its interpreter (CPU tests): no inline PTX, no persistent-grid loops."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
