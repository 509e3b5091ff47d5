"""Kernel tests: without a GPU, run Triton kernels in the interpreter (must be set before any kernel module is
imported), and keep bitsandbytes' CPU fallbacks out of torch.compile (slow, and irrelevant to the bytes)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
torch._dynamo.config.disable = True
