"""Running a causal LM one decoder block at a time on calibration data: what every calibrated method needs
(GPTQ's Hessians today; activation statistics for AWQ, SmoothQuant or an importance matrix alike).

* `BlockInputCapture`: the model with its blocks replaced by a catcher runs the
  calibration batches up to the first block (embeddings, position embeddings, masks exactly as the model
  computes them) and keeps the block's positional and keyword inputs; with real blocks in front of the
  catcher it yields the inputs of any later block the same way (`cache_block_outputs=false`).
* `materialize_block`: one block of the meta model gets real memory and its checkpoint tensors; rotary
  modules (whose buffers are computed, not stored) are rebuilt on the device.
* `discover_input_groups`: which Linear layers see the same input tensor (they share one Hessian), in the
  order they run: for Llama [q,k,v], [o], [gate,up], [down] — the paper's true-sequential groups.
* `BlockRunner.collect`: forward passes over all batches with hooks that feed each shared input to one
  accumulator per input class (GPTQ: a Hessian), stopping a pass as soon as every hooked layer has seen its
  input (before the last one computes); `BlockRunner.forward_all`: the block's outputs, the next block's inputs. Both run many windows per
  forward pass (`merge_batches`, `forward_chunk_tokens`): one pass per window is bound by kernel launches.
  With `changing` and `memo_bytes` the outputs of the block's settled parts are reused by later passes
  (`block_memo.ChildOutputMemo`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from .block_memo import ChildOutputMemo
from .errors import UnsupportedModel
from .fused_norms import fuse_rms_norms


class _StopForward(Exception):
    pass


class InputAccumulator(Protocol):
    """What `BlockRunner.collect` feeds a layer's input to (e.g. GPTQ's HessianAccumulator)."""

    def add(self, x: torch.Tensor) -> None: ...


class _Catcher(torch.nn.Module):
    """Stands where a decoder block would run: keeps its inputs and stops the forward pass.

    Attribute lookups it cannot answer go to the block it stands for (`like`), so a model that reads e.g.
    `decoder_layer.attention_type` to pick the block's mask gets the real block's answer.
    """

    def __init__(self, sink: list, store: torch.device, like: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.sink = sink
        self.store = store
        self.__dict__["_like"] = like  # not a submodule: it stays on the meta device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            like = self.__dict__.get("_like")
            if like is None:
                raise
            return getattr(like, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((hidden.detach().to(self.store), rest, kwargs))
        raise _StopForward


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _rebuild_rotary(module: torch.nn.Module, device: torch.device) -> None:
    """Recompute non-persistent rotary buffers (inv_freq) that `to_empty` leaves uninitialized."""
    for name, sub in list(module.named_modules()):
        if "Rotary" in type(sub).__name__ and hasattr(sub, "config"):
            fresh = type(sub)(config=sub.config).to(device)
            if name:
                p, attr = _parent(module, name)
                setattr(p, attr, fresh)
            else:  # pragma: no cover - a rotary module is never the root here
                raise UnsupportedModel("rotary module at the root")


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    state = module.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise UnsupportedModel(f"checkpoint lacks tensors the model needs: {', '.join(missing[:5])}")
    with torch.no_grad():
        for k, t in state.items():
            src = tensors[k]
            t.copy_(src.to(t.dtype if not t.is_floating_point() else dtype))


def materialize_block(block: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                      dtype: torch.dtype) -> torch.nn.Module:
    """Give a meta block real memory on `device` in `dtype` and load its (block-relative) tensors."""
    block.to_empty(device=device)
    block.to(dtype)
    _load_into(block, tensors, dtype)
    _rebuild_rotary(block, device)
    if device.type == "cuda":  # the CPU runs float32, where HF's own RMSNorm is as fast
        fuse_rms_norms(block)
    return block.eval()


class BlockInputCapture:
    """The model without its decoder blocks, given memory once, that runs calibration batches up to a block.

    `model` is a meta model; its block container is swapped for an empty list while the rest gets memory on
    `device` and the tensors before the blocks (embeddings, position embeddings) are loaded. `capture(batches,
    prefix, index)` then runs every batch through `prefix` (real, e.g. already quantized, blocks 0..index-1)
    into a catcher standing at position `index`, so the model computes that block's own inputs (its mask for
    per-layer attention types, its position embeddings) exactly as in a full forward pass.
    """

    def __init__(self, model: torch.nn.Module, block_name: str, pre_tensors: dict[str, torch.Tensor], *,
                 device: torch.device, dtype: torch.dtype) -> None:
        container = model.get_submodule(block_name)
        if not isinstance(container, torch.nn.ModuleList):
            raise UnsupportedModel(
                f"{block_name!r} is not a list of decoder blocks; set block_name_to_quantize",
                field="block_name_to_quantize")
        self.model, self.block_name, self.blocks, self.device = model, block_name, container, device
        self._parent, self._attr = _parent(model, block_name)
        setattr(self._parent, self._attr, torch.nn.ModuleList())
        try:
            model.to_empty(device=device)
            model.to(dtype)
            with torch.no_grad():
                state = model.state_dict()
                for k, v in pre_tensors.items():
                    if k in state:
                        state[k].copy_(v.to(state[k].dtype if not state[k].is_floating_point() else dtype))
            _rebuild_rotary(model, device)
            model.eval()
        finally:
            setattr(self._parent, self._attr, container)

    @torch.no_grad()
    def capture(self, batches: Iterable[torch.Tensor], prefix: list[torch.nn.Module], index: int,
                store: torch.device) -> tuple[list[torch.Tensor], list[tuple[tuple, dict[str, Any]]]]:
        """Inputs of block `index` for each batch: (hidden states, (other args, kwargs)) per batch."""
        sink: list = []
        catcher = _Catcher(sink, store, like=self.blocks[index])
        setattr(self._parent, self._attr, torch.nn.ModuleList([*prefix, catcher]))
        try:
            for ids in batches:
                try:
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                except _StopForward:
                    continue
                raise UnsupportedModel(
                    f"the forward pass never reached the blocks under {self.block_name!r}; set "
                    "block_name_to_quantize (and module_name_preceding_first_block)",
                    field="block_name_to_quantize",
                )
        finally:
            setattr(self._parent, self._attr, self.blocks)
        return [h for h, _, _ in sink], [(a, kw) for _, a, kw in sink]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def discover_input_groups(block: torch.nn.Module, linear_names: list[str], hidden: torch.Tensor,
                          args: tuple, kwargs: dict[str, Any], device: torch.device) -> list[list[str]]:
    """Linear layers grouped by the input tensor they share, in execution order."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name in linear_names:
        mod = block.get_submodule(name)

        def hook(m, inp, out, name=name):
            seen.append((name, inp[0]))

        hooks.append(mod.register_forward_hook(hook))
    try:
        block(hidden[:1].to(device), *_slice_args(args, 1), **_slice_kwargs(kwargs, 1))
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    owners: list[torch.Tensor] = []
    for name, x in seen:  # the tensors are all alive here, so identity is meaningful
        if any(name in g for g in groups):
            continue
        for g, o in zip(groups, owners):
            if x is o:
                g.append(name)
                break
        else:
            groups.append([name])
            owners.append(x)
    missing = [n for n in linear_names if not any(n in g for g in groups)]
    if missing:
        groups.append(missing)  # never called on calibration data: quantized from a zero Hessian
    return groups


def _slice_one(v: Any, n: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > n:
        return v[:n]
    if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(t[:n] if t.dim() > 0 and t.shape[0] > n else t for t in v)
    return v


def _slice_args(args: tuple, n: int) -> tuple:
    """Positional inputs for the first n samples (GPT-2 passes its causal mask positionally)."""
    return tuple(_slice_one(v, n) for v in args)


def _slice_kwargs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Keyword inputs for the first n samples (tensors with a batch dimension > n are sliced)."""
    return {k: _slice_one(v, n) for k, v in kwargs.items()}


#: what `_merge_value` answers when values of several batches cannot be passed as one
_UNMERGEABLE = object()


def _merge_value(vals: list[Any], sizes: list[int]) -> Any:
    """One value for the concatenated batches: per-sample tensors (first dimension = the batch's size)
    concatenated, values equal in every batch passed once, anything else `_UNMERGEABLE`."""
    v0 = vals[0]
    if isinstance(v0, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in vals):
            return _UNMERGEABLE
        if all(v.dim() > 0 and v.shape[0] == n and v.shape[1:] == v0.shape[1:] and v.dtype == v0.dtype
               and v.device == v0.device for v, n in zip(vals, sizes)):
            return torch.cat(vals)
        if all(v is v0 or (v.shape == v0.shape and v.dtype == v0.dtype and torch.equal(v, v0)) for v in vals):
            return v0
        return _UNMERGEABLE
    if isinstance(v0, tuple):
        if not all(isinstance(v, tuple) and len(v) == len(v0) for v in vals):
            return _UNMERGEABLE
        parts = [_merge_value([v[i] for v in vals], sizes) for i in range(len(v0))]
        return _UNMERGEABLE if any(p is _UNMERGEABLE for p in parts) else tuple(parts)
    try:
        same = all(v is v0 or (type(v) is type(v0) and bool(v == v0)) for v in vals)
    except Exception:  # a value whose == is not a plain truth value
        same = False
    return v0 if same else _UNMERGEABLE


def merge_batches(hidden: list[torch.Tensor], rest: list[tuple[tuple, dict[str, Any]]]
                  ) -> tuple[torch.Tensor, tuple, dict[str, Any]] | None:
    """The inputs of several calibration batches as the inputs of one larger batch, or None when the block's
    other inputs cannot be combined (then the batches run one by one)."""
    sizes = [h.shape[0] for h in hidden]
    if len({h.shape[1:] for h in hidden}) != 1 or len({h.dtype for h in hidden}) != 1:
        return None
    a0, k0 = rest[0]
    if any(len(a) != len(a0) or kw.keys() != k0.keys() for a, kw in rest):
        return None
    args = [_merge_value([a[i] for a, _ in rest], sizes) for i in range(len(a0))]
    kwargs = {k: _merge_value([kw[k] for _, kw in rest], sizes) for k in k0}
    if any(v is _UNMERGEABLE for v in [*args, *kwargs.values()]):
        return None
    return torch.cat(hidden) if len(hidden) > 1 else hidden[0], tuple(args), kwargs


def forward_chunk_tokens(block: torch.nn.Module, device: torch.device, *, budget_bytes: int = 4 << 30,
                         share_of_free: float = 0.15) -> int:
    """How many calibration tokens one forward pass of `block` takes at once: as many as keep about eight
    activations of its widest Linear output within the budget (and a share of the free device memory).

    One pass over many windows instead of one per window: the per-window passes are bound by kernel launches
    (hundreds per block forward, each on a few thousand tokens), a pass over ~20k tokens by the tensor cores."""
    widest = max((m.weight.shape[0] if type(m).__name__ != "Conv1D" else m.weight.shape[1]
                  for m in block.modules() if hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2),
                 default=1)
    elem = next((p.element_size() for p in block.parameters()), 4)
    budget = budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, int(share_of_free * free))
    return max(1, budget // (8 * widest * elem))


class BlockRunner:
    """Forward passes of one materialized block over all calibration batches.

    With `max_tokens`, consecutive batches run as one forward pass of up to that many tokens (their inputs
    concatenated by `merge_batches`); the results are the same per batch, up to the rounding of larger matrix
    products. With `shards` (shard -> batch indices; a job on several GPUs, `ranks`), a pass never takes
    batches of two shards, so that a shard's passes are the same whichever process runs it.

    With `changing` (the layers a true-sequential method changes between passes) and `memo_bytes`, the outputs
    of the block's parts whose layers are all `settled` are kept and reused by later passes (`ChildOutputMemo`):
    the same results, bit for bit, without recomputing e.g. a quantized attention in every later pass."""

    def __init__(self, block: torch.nn.Module, hidden: list[torch.Tensor], rest: list[tuple[tuple, dict]],
                 device: torch.device, max_tokens: int = 0, shards: dict[int, list[int]] | None = None,
                 changing: Iterable[str] = (), memo_bytes: int = 0) -> None:
        self.block = block
        self.hidden = hidden
        self.rest = rest
        self.device = device
        shards = shards if shards is not None else {0: list(range(len(hidden)))}
        self.shard_chunks = {s: self._chunk(max_tokens, idx) for s, idx in shards.items()}
        changing = list(changing)
        self.memo = ChildOutputMemo(block, changing, memo_bytes) if changing and memo_bytes > 0 else None

    def settled(self, names: Iterable[str]) -> None:
        """These layers have their final weights (the method changed them for the last time)."""
        if self.memo is not None:
            self.memo.settled(names)

    def _pass(self, idx: list[int], collecting: Iterable[str] = (), last: bool = False
              ) -> contextlib.AbstractContextManager:
        """The memo's context for one forward pass over the batches `idx` (nothing without a memo)."""
        if self.memo is None:
            return contextlib.nullcontext()
        return self.memo.active(tuple(idx), collecting, last)

    @property
    def chunks(self) -> list[list[int]]:
        """Batch indices per forward pass, all shards in order."""
        return [c for cs in self.shard_chunks.values() for c in cs]

    def _chunk(self, max_tokens: int, indices: list[int]) -> list[list[int]]:
        """Consecutive batch indices per forward pass."""
        chunks: list[list[int]] = []
        tokens = 0
        for i in indices:
            h = self.hidden[i]
            t = h.numel() // max(h.shape[-1], 1)
            if chunks and tokens + t <= max_tokens:
                chunks[-1].append(i)
                tokens += t
            else:
                chunks.append([i])
                tokens = t
        return chunks

    def _passes(self, shard: int | None = None):
        """(batch indices, hidden on the device, args, kwargs) per forward pass (of one shard, or all)."""
        for idx in (self.shard_chunks[shard] if shard is not None else self.chunks):
            merged = None
            if len(idx) > 1:
                merged = merge_batches([self.hidden[i].to(self.device) for i in idx], [self.rest[i] for i in idx])
            if merged is None:
                for i in idx:
                    args, kw = self.rest[i]
                    yield [i], self.hidden[i].to(self.device), args, kw
            else:
                yield (idx, *merged)

    @torch.no_grad()
    def collect(self, classes: list[list[str]], accumulator: Callable[[int], InputAccumulator],
                shard: int | None = None) -> dict[str, InputAccumulator]:
        """Every calibration input of each class (linears sharing an input) fed to one accumulator made by
        `accumulator(in_features)`, keyed by the class's first name (the inputs of one shard's batches only,
        with `shard`)."""
        accs: dict[str, InputAccumulator] = {}
        fired: set[str] = set()
        hooks = []
        for cls in classes:
            rep = cls[0]
            mod = self.block.get_submodule(rep)
            in_f = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.in_features
            accs[rep] = accumulator(in_f)

            # a pre-hook: the pass stops before the last hooked layer computes (its output is never used),
            # which saves one matrix product per pass (~8 % of a Llama block's calibration work)
            def hook(m, args, kwargs, rep=rep):
                x = args[0] if args else next(iter(kwargs.values()))
                accs[rep].add(x.detach())
                fired.add(rep)
                if len(fired) == len(accs):
                    raise _StopForward

            hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        collecting = [n for cls in classes for n in cls]
        try:
            for idx, h, args, kw in self._passes(shard):
                fired.clear()
                try:
                    with self._pass(idx, collecting):
                        self.block(h, *args, **kw)
                except _StopForward:
                    pass
        finally:
            for hk in hooks:
                hk.remove()
        return accs

    @torch.no_grad()
    def forward_all(self) -> list[torch.Tensor]:
        """Outputs of the block for every batch (the next block's inputs), stored where the inputs were."""
        out: list[torch.Tensor | None] = [None] * len(self.hidden)
        for idx, h, args, kw in self._passes():
            with self._pass(idx, last=True):
                y = _first(self.block(h, *args, **kw))
            pieces = y.split([self.hidden[i].shape[0] for i in idx]) if len(idx) > 1 else (y,)
            for i, piece in zip(idx, pieces):
                out[i] = piece.to(self.hidden[i].device)
        if self.memo is not None:
            self.memo.clear()
        return out  # type: ignore[return-value]


def compute_dtype(device: torch.device, source_config: dict[str, Any]) -> torch.dtype:
    """The dtype blocks run in: the source's half precision on CUDA (bfloat16 if it is bfloat16, else float16),
    float32 on the CPU (where half-precision matmuls are slow and imprecise)."""
    if device.type != "cuda":
        return torch.float32
    src = str(source_config.get("torch_dtype") or source_config.get("dtype") or "float16")
    return torch.bfloat16 if "bfloat16" in src else torch.float16
