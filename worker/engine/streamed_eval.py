"""Perplexity of a model that never sits whole in memory: evaluation streamed one decoder block at a time.

The same schedule as quantization (`blockwise`): the model without its blocks (embeddings, final norm, head) is
given memory once; every evaluation window runs up to the first block; then for each block in turn its tensors
are loaded, *all* windows go through it, and it is freed before the next is loaded. The device holds one block,
the hidden states of the windows and the outside tensors, so a model larger than the GPU's memory gets its
perplexity before and after, and the weights are read once per pass, not once per window.

At the end the model's own forward computes the logits: its block list is replaced by one module that hands
back the stored last hidden state of the window, so the final norm, the head and anything a model does after
its blocks (logit soft-capping, scaling) are the model's own code, and the number equals the whole-model
evaluation (`evaluate.perplexity`) within float tolerance.

Where a block's tensors come from is the caller's `load(names) -> {name: tensor}`: the source checkpoint for the
original model, the exported files read back by the method's format reader for the quantized one. Or the caller
holds the blocks itself and uses the parts of a pass (`outside_model`, `start`, `through`, `head`): the
evaluation beside the quantization (`beside_eval`) runs the windows through each block while the quantization
holds it.

Blocks of different types (sliding-window and full attention layers) get the mask and position inputs of their
own type: they are computed for the first block of each type, from the embeddings, once per pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import ModelLayout, build_meta_model
from .blockwise import BlockInputCapture, materialize_block
from .evaluate import EvalData
from .progress import Reporter

#: Tokens per block forward: windows are run through a block in batches of about this many tokens (the
#: activations of one 8B MLP for 32K tokens are ~1 GB in 16-bit).
DEFAULT_BATCH_TOKENS = 32768

TensorLoader = Callable[[list[str]], dict[str, torch.Tensor]]


def eval_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype:
    """The stored dtype on a GPU (what a user runs it in); float32 on the CPU, where half-precision matmuls
    are slow and less exact."""
    if device.type != "cuda":
        return torch.float32
    text = config.get("text_config") or config
    name = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "float16")
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name, torch.float16)


class _Replay(torch.nn.Module):
    """Stands where the blocks were: returns the stored last hidden state of the current window."""

    def __init__(self, like: torch.nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.as_tuple = as_tuple
        self.__dict__["_like"] = like  # attribute lookups (attention_type) answered by a real block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_like"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        h = self.hidden.to(device=hidden_states.device, dtype=hidden_states.dtype)
        return (h,) if self.as_tuple else h


class _PassThrough(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@dataclass
class StreamedPass:
    perplexity: float
    seconds: float
    #: Per-window mean next-token NLL, in window order.
    nll: list[float]


@dataclass
class WindowStream:
    """The evaluation windows of one model on their way through its blocks."""

    #: Hidden states per batch of windows, after the blocks run so far (replaced block by block).
    hidden: list[torch.Tensor]
    #: The blocks' other inputs (mask, positions) per batch, for every block type (`layer_types`).
    inputs_by_type: dict[Any, list[tuple[tuple, dict]]]
    #: Where the hidden states live between blocks (the device, or the CPU when they do not fit).
    store: torch.device
    #: Whether the blocks return a tuple (the head's stand-in answers alike).
    as_tuple: bool = False

    def copy(self) -> "WindowStream":
        """A second stream starting where this one is (the block inputs besides the hidden states are only
        read, never written: they are shared)."""
        return WindowStream([h.clone() for h in self.hidden], self.inputs_by_type, self.store, self.as_tuple)


class StreamedEvaluator:
    """Perplexity of the model described by `layout`, block by block (see the module docstring).

    `run` is one whole pass with the tensors a loader gives. Its parts serve a caller that holds the blocks
    itself (`beside_eval`: the quantization's own block stream): `outside_model` (the model without its
    blocks), `start` (the windows up to the first block), `through` (every window through one live block),
    `head` (the model's own forward after the blocks: the NLLs)."""

    def __init__(self, layout: ModelLayout, data: EvalData, *, device: torch.device, dtype: torch.dtype,
                 allow_remote_code: bool = False, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> None:
        self.layout, self.data, self.device, self.dtype = layout, data, device, dtype
        self.allow_remote_code = allow_remote_code
        per_batch = max(1, batch_tokens // data.seqlen)
        self.batches = [data.input_ids[i : i + per_batch] for i in range(0, data.windows, per_batch)]

    @property
    def steps(self) -> int:
        """Progress steps of one pass: every block, then the head."""
        return self.layout.num_blocks + 1

    def _store(self, streams: int = 1) -> torch.device:
        """Where the windows' hidden states live between blocks: the device when `streams` of them take under a
        quarter of its free memory, else the CPU."""
        if self.device.type != "cuda":
            return self.device
        hidden = int(getattr(self.layout.hf_config.get_text_config(), "hidden_size", 0) or 0)
        need = streams * self.data.tokens * hidden * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free // 4 else torch.device("cpu")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, load: TensorLoader, *, reporter: Reporter | None = None, step_offset: int = 0,
            total_steps: int | None = None, label: str = "") -> StreamedPass:
        """One pass over every window with the tensors `load` gives; progress reported per block."""
        layout, device = self.layout, self.device
        total = total_steps or self.steps
        self.sync()
        t0 = time.perf_counter()
        capture = self.outside_model(load(list(layout.pre_tensors) + list(layout.post_tensors)))
        stream = self.start(capture)
        # the next block's tensors are read (and, for the quantized model, dequantized) while this one runs;
        # only the loader thread touches `load` meanwhile
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-load")
        load_block = self._onto_device(load)
        pending: Future | None = pool.submit(load_block, layout.blocks[0].tensor_names) if layout.blocks else None
        try:
            for binfo in layout.blocks:
                if reporter is not None:
                    reporter.check_cancelled()
                tensors = pending.result()
                if device.type == "cuda":  # made on the loader's stream, read on this one: keep them alive for it
                    for t in tensors.values():
                        if t.is_cuda:
                            t.record_stream(torch.cuda.current_stream(device))
                nxt = binfo.index + 1
                pending = (pool.submit(load_block, layout.blocks[nxt].tensor_names) if nxt < layout.num_blocks
                           else None)
                prefix = binfo.prefix
                block = materialize_block(capture.blocks[binfo.index],
                                          {k[len(prefix) + 1 :]: v for k, v in tensors.items()}, device, self.dtype)
                del tensors
                self.through(stream, block, binfo.index)
                block.to("meta")
                if reporter is not None:
                    reporter.progress(step_offset + binfo.index + 1, total,
                                      message=f"{label} block {binfo.index + 1}/{layout.num_blocks}".strip())
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)
        nll = self.head(capture, stream)
        self.sync()
        seconds = time.perf_counter() - t0
        ppl = math.exp(sum(nll) / len(nll))
        if reporter is not None:
            reporter.progress(step_offset + self.steps, total, message=f"{label} head".strip(),
                              metrics={"perplexity": ppl, "seconds": round(seconds, 3)})
        del stream, capture
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return StreamedPass(float(ppl), seconds, nll)

    def outside_model(self, tensors: dict[str, torch.Tensor]) -> BlockInputCapture:
        """The model without its blocks on the device, with `tensors` (those before the blocks are enough to
        `start`; `head` needs those after them too)."""
        meta = build_meta_model(self.layout.hf_config, allow_remote_code=self.allow_remote_code)
        capture = BlockInputCapture(meta, self.layout.block_name, tensors, device=self.device, dtype=self.dtype)
        if self.layout.tied_embeddings:  # to_empty gave the head its own (empty) weight: share the embeddings again
            capture.model.get_output_embeddings().weight = capture.model.get_input_embeddings().weight
        return capture

    @torch.no_grad()
    def start(self, capture: BlockInputCapture, *, streams: int = 1) -> WindowStream:
        """Every window up to the first block (`capture`: a model without its blocks holding the embeddings),
        and the other inputs of every block type; kept where `streams` such streams fit."""
        store = self._store(streams)
        hidden, rest = capture.capture(self.batches, [], 0, store)
        return WindowStream(hidden, self._inputs_per_block_type(capture, store, rest), store)

    @torch.no_grad()
    def through(self, stream: WindowStream, block: torch.nn.Module, index: int) -> None:
        """Every batch of windows through one live block (block `index`, on the device, in this evaluator's
        dtype); the stream's hidden states replaced."""
        hidden = stream.hidden
        for j, (args, kw) in enumerate(stream.inputs_by_type.get(self._block_type(index),
                                                                 stream.inputs_by_type[self._block_type(0)])):
            out = block(hidden[j].to(self.device), *args, **kw)
            stream.as_tuple = isinstance(out, (tuple, list))
            hidden[j] = (out[0] if stream.as_tuple else out).to(stream.store)

    def _onto_device(self, load: TensorLoader) -> TensorLoader:
        """On CUDA, the loader thread also copies the block's tensors to the device, on a stream of its own, so
        the host read and the host-to-device copy of block i+1 overlap block i's forward."""
        if self.device.type != "cuda":
            return load
        side = torch.cuda.Stream(self.device)

        def loaded(names: list[str]) -> dict[str, torch.Tensor]:
            with torch.cuda.stream(side):
                out = {k: v.to(self.device) for k, v in load(names).items()}
            side.synchronize()
            return out

        return loaded

    def _block_type(self, index: int) -> Any:
        types = getattr(self.layout.hf_config.get_text_config(), "layer_types", None)
        return types[index] if isinstance(types, (list, tuple)) and index < len(types) else None

    def _inputs_per_block_type(self, capture: BlockInputCapture, store: torch.device,
                               first: list[tuple[tuple, dict]]) -> dict[Any, list[tuple[tuple, dict]]]:
        """Mask and position inputs of the first block of every other block type (computed from the embeddings,
        the catcher standing in for a block of that type)."""
        out: dict[Any, list[tuple[tuple, dict]]] = {self._block_type(0): first}
        for b in self.layout.blocks:
            kind = self._block_type(b.index)
            if kind not in out:
                # pass-through blocks in front put the catcher at this block's position: models that pick the
                # mask by position (`layer_types[i]`) and those that ask the block (`attention_type`) agree
                _, out[kind] = capture.capture(self.batches, [_PassThrough() for _ in range(b.index)], b.index,
                                               store)
        return out

    @torch.no_grad()
    def head(self, capture: BlockInputCapture, stream: WindowStream) -> list[float]:
        """The model's own forward after its blocks, window by window (logits of one window at a time), on the
        stream's last hidden states: each window's mean next-token NLL. `capture` holds every tensor outside the
        blocks."""
        parent, attr = capture._parent, capture._attr
        hidden = stream.hidden
        replay = _Replay(capture.blocks[len(capture.blocks) - 1], stream.as_tuple)
        setattr(parent, attr, torch.nn.ModuleList([replay]))
        nll: list[float] = []
        try:
            for batch, h in zip(self.batches, hidden):
                for w in range(batch.shape[0]):
                    ids = batch[w : w + 1].to(self.device)
                    replay.hidden = h[w : w + 1]
                    logits = capture.model(input_ids=ids, use_cache=False).logits.float()
                    nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean").item())
                    del logits
        finally:
            setattr(parent, attr, capture.blocks)
        return nll
