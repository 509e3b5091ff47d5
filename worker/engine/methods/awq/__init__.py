"""AWQ (Lin et al., 2023: activation-aware weight quantization), streamed one decoder block at a time, written
in AutoAWQ's GEMM layout.

calibrate: the calibration text (`qaas.worker.engine.calibration_data`) becomes `nsamples` windows of
  `model_seqlen` tokens; the model without its blocks runs them to the first block
  (`qaas.worker.engine.blockwise`).
quantize, per block: one float forward keeps every Linear's input and each scaling group's submodule's
  inputs and output; per scaling group of the architecture (`qaas.quantization_rules.awq.SCALING_MAPS`:
  for Llama input_layernorm -> q,k,v; v -> o when the shapes match; post_attention_layernorm -> gate,up;
  up -> down) a grid search of per-input-channel scales s = mean|x|^alpha (`search`) minimizes the squared
  error of the submodule's output with the group's layers quantized; the scales are folded into the
  preceding norm or Linear, a clipping range is searched per group (`apply_clip`), and each layer is
  rounded to 4-bit asymmetric groups and packed (`format`). Like AutoAWQ, every block is calibrated on the
  float model's activations.

The modules: `method` (the QuantizationMethod), `run` (the steps of one quantization, in order),
`planning` (the scaling groups as they apply to the block, the layers kept in float16), `search` (the
arithmetic), `format` (the GEMM layout, the config, the reader).

Peak memory: one block, its calibration inputs, and every Linear's captured inputs for that block (about
`tokens x (3 hidden + intermediate)` values).

Progress metrics during `quantize`: per layer `{"layer", "block", "rel_error", "columns"}`; per block
`{"layers": {<module>: {"rel_error"}}, "alphas": {<prev op>: alpha},
"scale_search": {<prev op>: {"alpha", "loss", "loss_alpha_0"}}}` (loss_alpha_0 is the loss without scaling: how much the search won).
"""

from .method import AWQMethod

__all__ = ["AWQMethod"]
