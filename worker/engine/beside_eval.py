"""Evaluation beside quantization: perplexity before and after measured in the quantization's own block stream,
so that the job streams the weights once.

A block-streamed method (GPTQ) holds each decoder block on the device once: it loads the block, quantizes its
layers group after group, runs the quantized block to make the next block's calibration inputs, writes it. The
evaluation windows ride along: the original model's windows go through the block with its original weights just
after it is loaded (before any of its layers is quantized); the quantized model's windows go through it once all
its layers are quantized, with every tensor as the checkpoint stores it (the quantized layers' weights as the
quantization put them into the block, what a reader dequantizes from their stored tensors; every other tensor
rounded to its stored dtype for the pass, then given back). Both streams start from the embeddings (captured by
the quantization's own first-block capture; a second capture from the embeddings as stored when they differ from
the source's) and end in the model's own head (`streamed_eval`). The numbers are those of the streamed evaluation
of the source checkpoint and of the exported files read back within float tolerance, without the second and
third stream of the weights (load, read back, dequantize) that costs. Reading the exported files back proves the
files themselves: `EngineOptions(eval_read_back=True)` keeps that path.

The pipeline makes one `EvaluationBeside` per job when the method `evaluates_beside` (`EngineContext.evaluation_beside`);
the method, in the process that reports (rank 0 of several GPUs), calls `begin` once the calibration windows are
known (windows sharing text with them are left out, as on every path), then `before` and `after` on every block;
the pipeline calls `finish` in the evaluate stage: the heads of both models, the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .architecture import ModelLayout
from .blockwise import BlockInputCapture
from .evaluate import EvalData
from .progress import Reporter
from .streamed_eval import StreamedEvaluator, WindowStream

#: The evaluation result's "mode" on this path.
MODE = "streamed beside the quantization"
#: The evaluation data, or the result that says why there is none (every window shares text with calibration).
DataLoader = Callable[[], "EvalData | dict[str, Any]"]


class EvaluationBeside:
    """The evaluation of one job, run in the quantization's block stream (see the module docstring)."""

    def __init__(self, layout: ModelLayout, source_reader: Any, device: torch.device, load_data: DataLoader, *,
                 allow_remote_code: bool = False) -> None:
        self.layout, self.reader, self.device = layout, source_reader, device
        self.load_data, self.allow_remote_code = load_data, allow_remote_code
        #: Whether the method began it (else the pipeline evaluates after the quantization, as for other methods).
        self.began = False
        #: The result when there is nothing to evaluate (said at `begin`).
        self.skipped: dict[str, Any] | None = None
        self.evaluator: StreamedEvaluator | None = None
        self.original: WindowStream | None = None
        self.quantized: WindowStream | None = None
        self._stored: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: Seconds of each model's passes, and of the whole evaluation (data, captures, blocks, heads).
        self.seconds = {"original": 0.0, "quantized": 0.0, "total": 0.0}
        #: Seconds of both models' passes through each block, by block index: what the evaluation adds to the
        #: quantization's time per block (the benchmarks take it off the block times).
        self.block_seconds: dict[int, float] = {}

    # -- called by the method ------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, capture: BlockInputCapture, pre_tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
              stored: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The windows up to the first block, for both models: `capture` is the quantization's model without its
        blocks (the source's embeddings `pre_tensors` in `dtype`, the dtype the blocks run in); `stored(t)` is a
        source tensor as the checkpoint stores it."""
        t0 = time.perf_counter()
        self.began = True
        data = self.load_data()
        if isinstance(data, dict):
            self.skipped = data
            return
        self.data, self._stored = data, stored
        ev = self.evaluator = StreamedEvaluator(self.layout, data, device=self.device, dtype=dtype,
                                                allow_remote_code=self.allow_remote_code)
        ev.sync()
        t_data = time.perf_counter()
        self.original = ev.start(capture, streams=2)
        ev.sync()
        t1 = time.perf_counter()
        as_stored = {k: stored(v) for k, v in pre_tensors.items()}
        if all(_same(pre_tensors[k], v, dtype) for k, v in as_stored.items()):
            self.quantized = self.original.copy()  # the same embeddings: the same start
        else:
            stored_capture = ev.outside_model(as_stored)
            self.quantized = ev.start(stored_capture, streams=2)
            del stored_capture
        ev.sync()
        t2 = time.perf_counter()
        self.seconds["original"] += t1 - t_data  # the text's tokenization counts in the total only
        self.seconds["quantized"] += t2 - t1
        self.seconds["total"] += t2 - t0

    @contextmanager
    def _timed(self, which: str, index: int) -> Iterator[None]:
        assert self.evaluator is not None
        self.evaluator.sync()
        t0 = time.perf_counter()
        yield
        self.evaluator.sync()
        dt = time.perf_counter() - t0
        self.seconds[which] += dt
        self.seconds["total"] += dt
        self.block_seconds[index] = self.block_seconds.get(index, 0.0) + dt

    def before(self, block: torch.nn.Module, index: int) -> None:
        """The original model's windows through block `index`, live with its original weights."""
        if self.evaluator is None:
            return
        with self._timed("original", index):
            self.evaluator.through(self.original, block, index)

    def after(self, block: torch.nn.Module, index: int, stored: dict[str, torch.Tensor]) -> None:
        """The quantized model's windows through block `index`, all its layers quantized; `stored`: the block's
        other tensors (block-relative names) as the checkpoint stores them, put into the block for this pass."""
        if self.evaluator is None:
            return
        with self._timed("quantized", index), _holding(block, stored):
            self.evaluator.through(self.quantized, block, index)

    # -- called by the pipeline ----------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self, reporter: Reporter) -> dict[str, Any]:
        """Both models' heads on their last hidden states (the evaluate stage, 2 steps); the evaluation result."""
        if self.skipped is not None:
            return self.skipped
        ev, layout = self.evaluator, self.layout
        assert ev is not None and self._stored is not None
        t0 = time.perf_counter()
        outside = self.reader.load_many(list(layout.pre_tensors) + list(layout.post_tensors))
        ppl: dict[str, float] = {}
        for step, (which, stream, tensors) in enumerate(
                [("original", self.original, outside),
                 ("quantized", self.quantized, {k: self._stored(v) for k, v in outside.items()})], start=1):
            reporter.check_cancelled()
            t = time.perf_counter()
            capture = ev.outside_model(tensors)
            nll = ev.head(capture, stream)
            del capture
            ev.sync()
            self.seconds[which] += time.perf_counter() - t
            ppl[which] = float(math.exp(sum(nll) / len(nll)))
            reporter.progress(step, 2, message=f"{which} head", metrics={"perplexity": ppl[which]})
        self.original = self.quantized = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.seconds["total"] += time.perf_counter() - t0
        dtype = str(ev.dtype).removeprefix("torch.")
        where = f"{dtype} on {self.device.type}"
        seconds = {k: round(v, 3) for k, v in self.seconds.items()}
        reporter.log(f"perplexity {ppl['original']:.4f} -> {ppl['quantized']:.4f} ({seconds['total']:.1f} s, beside "
                     "the quantization)", data={"before": ppl["original"], "after": ppl["quantized"]})
        return {
            "perplexity_before": ppl["original"],
            "perplexity_after": ppl["quantized"],
            "quantized_loaded_with": "the quantized blocks' weights as the checkpoint stores them, in the "
                                     "quantization's block stream",
            "mode": MODE,
            "measured": {
                "original": (f"the source checkpoint's tensors in the original architecture, {where}: each block "
                             "with its original weights as the quantization loaded it"),
                "quantized": (f"the quantized block's weights as the checkpoint stores them, in the quantization's "
                              f"block stream: every quantized layer with the weight the quantization put into the "
                              f"block (what a reader dequantizes from its stored tensors), every other tensor "
                              f"rounded to its stored dtype, in the original architecture, {where}; the exported "
                              f"files are not read back (EngineOptions(eval_read_back=True) reads them)"),
            },
            "dtype": dtype,
            "seconds": seconds,
            **self.data.describe(),
        }


def _same(source: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a tensor as stored gives the blocks the same values as the source's (a float16 source is stored
    as it is: no comparison of a gigabyte of embeddings)."""
    if stored is source or not source.is_floating_point():
        return True
    return torch.equal(source.to(dtype), stored.to(dtype))


@contextmanager
def _holding(block: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """`tensors` in the block's parameters and buffers of the same names for the duration, the block's own values
    given back after (the quantization goes on with them); only those that differ are swapped."""
    state = block.state_dict(keep_vars=True)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, value in tensors.items():
                live = state.get(name)
                if live is None or not live.is_floating_point():
                    continue
                value = value.to(device=live.device, dtype=live.dtype)
                if not torch.equal(live, value):
                    saved.append((live, live.detach().clone()))
                    live.data.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for live, own in saved:
                live.data.copy_(own)
