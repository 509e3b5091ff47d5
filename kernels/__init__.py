"""Triton kernels (imported as `qaas.kernels`), each beside a plain-torch reference.

Every kernel family has the same three modules:
  * `<family>.py`, the launcher and public API: checks shapes and dtypes, picks the grid, and runs either
    the Triton kernel or the torch reference by the one rule of `dispatch.use_triton`
    (`backend="auto" | "triton" | "torch"`);
  * `<family>_triton.py`: the `@triton.jit` kernels and their device helpers, nothing else;
  * `<family>_reference.py`: the torch reference of each kernel, what the tests compare it against and
    what runs for tensors off CUDA.
Families: `gptq` (group scale/zero, GPTQ's column loop, packing, dequantization), `bnb4` (NF4/FP4 with
double quantization; `codebooks` holds its tables) and `int8` (LLM.int8 rows). Device helpers used by
several families live in `triton_common`.

Import submodules explicitly; this file imports nothing so that loading the package is free.
"""
