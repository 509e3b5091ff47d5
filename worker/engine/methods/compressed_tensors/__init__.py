"""compressed-tensors checkpoints (what llm-compressor writes, what vLLM and SGLang load natively): FP8 W8A8
(FP8_DYNAMIC, FP8 with static input scales, FP8_BLOCK), INT8 W8A8 (optionally SmoothQuant-smoothed) and
W4A16 / W8A16 pack-quantized, with round-to-nearest or GPTQ weights.

The request is llm-compressor's (`scheme`, `ignore`, `smoothing_strength`, GPTQ or RTN weights; the rules are
`qaas.quantization_rules.compressed_tensors`). Round-to-nearest tensors are byte for byte what llm-compressor
writes for the same scheme and weights (compressed-tensors' torch arithmetic in the weight's dtype:
`qaas.kernels.fp8` for e4m3, `format.int_codes`); GPTQ runs the engine's solver (`qaas.worker.engine.gptq_algorithm`)
and only the writer differs from the gptq method. config.json's `quantization_config` is compressed-tensors'
own `QuantizationConfig` serialization, with every Linear left in floating point listed in `ignore`.

The modules: `method` (the QuantizationMethod), `run` (the steps: streamed RTN, or calibrated block by block),
`planning` (which layers), `schemes` (the presets and the config), `format` (the tensors, the reader, the
run-time activation quantization used when evaluating without compressed-tensors).
"""

from .method import CompressedTensorsMethod

__all__ = ["CompressedTensorsMethod"]
