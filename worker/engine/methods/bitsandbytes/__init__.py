"""bitsandbytes quantization (NF4 / FP4, optional double quantization, and LLM.int8), done ahead of time.

The output is what `from_pretrained(source, quantization_config=BitsAndBytesConfig(...))` followed by
`save_pretrained` would write, tensor for tensor (FORMATS.md §2-§4), but produced one decoder block at a
time through the project's kernels (`qaas.kernels.bnb4`, `qaas.kernels.int8`), which are byte-exact with
bitsandbytes on the device they run on. bitsandbytes itself is needed only to evaluate the result.

Which Linear layers are converted is decided exactly as transformers decides it (every `nn.Linear` /
`Conv1D` of the model class except `llm_int8_skip_modules`, or transformers' default skips when that is
None, plus the class's `_keep_in_fp32_modules`): the same checkpoint `BitsAndBytesConfig` gives on a GPU.
Some of those 4-bit layers do not run on the CPU: bitsandbytes' CPU inference repacks weights for its
AVX512-BF16 kernel and asserts `out_features % 32 == 0` and `in_features % blocksize == 0` (stories260K's MLP
with 172 fails with "N must be divisible by block_n"); the result's `runs_on` then says CUDA only and names
them. With `options.cpu_compatible: true` such layers stay in floating point instead, so the export loads and
runs on any device. Every Linear kept in floating point is listed by full name in `llm_int8_skip_modules` of
the written config.

The modules: `method` (the QuantizationMethod: request, the block loop, evaluation), `planning` (which layers
are converted), `format` (one weight to its bitsandbytes tensors and back, and the written config).
"""

from .method import BitsAndBytesMethod

__all__ = ["BitsAndBytesMethod"]
