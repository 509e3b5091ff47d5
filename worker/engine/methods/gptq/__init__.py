"""GPTQ (Frantar et al., 2022), layer-wise and sequential, streamed one decoder block at a time.

calibrate: the calibration text (`qaas.worker.engine.calibration_data`) becomes `nsamples` windows of
  `model_seqlen` tokens; the model without its blocks runs them to the first block
  (`qaas.worker.engine.blockwise`).
quantize, per block: load only this block's tensors, group its Linear layers (true-sequential groups found by
  which layers share an input, or `modules_in_block_to_quantize`: `planning`), and for each group accumulate
  the Hessian of each shared input (`qaas.worker.engine.hessian`), quantize the group's layers
  (`qaas.worker.engine.gptq_algorithm.gptq_quantize`: Triton on CUDA), put the quantized weights into the
  live block, move on; then run the *quantized* block to produce the next block's inputs. Packed tensors
  are written as soon as a block is done (`format`).

The modules: `method` (the QuantizationMethod: request, stages, evaluation), `run` (the steps of one
quantization, in order), `planning`, `format` (the checkpoint layout, writer and reader). The one-layer
algorithm and the Hessians sit beside `methods/` (`gptq_algorithm`, `hessian`): compressed-tensors' GPTQ
weights run the same solver.

Peak memory: one block, its calibration activations (on the device when they fit, else on the CPU) and
the Hessians of one group.

`cache_block_outputs` (GPTQConfig; optimum's meaning). true (default): the quantized block's outputs on the
  calibration batches are kept and become the next block's inputs; the keyword inputs captured at the first
  block (mask, position embeddings) are reused for every block. false: no block outputs are kept; before
  each block the model runs again from the embeddings through the blocks already quantized (kept in memory)
  into that block, so each block gets the inputs the model itself gives it (per-layer attention types such as
  alternating sliding/full masks, anything a model does between blocks). Costs n(n+1)/2 block forwards
  instead of n and keeps the quantized blocks in memory (about the model's size in the compute dtype):
  for small or non-standard models, not for models larger than the device.

Progress metrics (`reporter.progress(done, total, metrics=...)`), during the `quantize` stage:
  * after each quantized layer, one event with a flat dict (done = blocks finished so far):
    `{"layer": "<module name>", "block": <block index>, "rel_error": ||W - Q||_F / ||W||_F,
      "sq_error": tr((W - Q) H (W - Q)^T) (the squared output error on the calibration inputs, GPTQ's own
      objective; H = 2/n X X^T without damping), "gptq_loss": the algorithm's accumulated loss,
      "damp_percent": the damping actually used, "columns": in_features}`;
  * after each block (unchanged, kept for existing readers): `{"layers": {"<module name>": {"rel_error",
    "sq_error", "gptq_loss", "damp_percent"}}}` with every layer of the block.
"""

from .method import GPTQMethod

__all__ = ["GPTQMethod"]
