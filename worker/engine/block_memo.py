"""Reusing the outputs of a block's settled parts across the calibration passes of true-sequential methods.

True-sequential GPTQ runs a block's calibration data through it once per group of layers ([q,k,v], [o],
[gate,up], [down] for Llama) and once more after the last group (the next block's inputs). Each pass starts at
the block's input, so once the attention's layers are quantized, the attention computes the same output in the
[down] pass and in the final pass as in the [gate,up] pass: about a fifth of a Llama block's calibration work
repeated for nothing.

`ChildOutputMemo` keeps, per forward pass (keyed by the pass's batch indices) and per call, the output of a
direct child of the block that holds layers the method changes, when that output can no longer change: the
child's own changing layers are all settled (their final weights are in place) and no unsettled changing layer
ran earlier in the same pass (so the child's inputs are final too). Later passes get the kept output instead of
recomputing it. What changes and what is settled is the method's word (`settled`); a layer a pass collects
inputs of is unsettled for that pass, whatever the method said, so its inputs are always computed.

The kept tensors live on the device, within a byte budget (what does not fit is recomputed, as without the
memo); an output changed in place after it was kept (its version counter moved) is recomputed, never served.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _tensors(out: Any) -> list[torch.Tensor] | None:
    """The tensors of a child's output (a tensor, or a tuple of tensors and Nones as attention modules return),
    or None for any other structure (then it is not kept)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple) and all(v is None or isinstance(v, torch.Tensor) for v in out):
        return [v for v in out if v is not None]
    return None


def _versions(tensors: list[torch.Tensor]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter: an in-place change could not be seen
        return None


class ChildOutputMemo:
    """Outputs of the block's children kept between forward passes (see the module's docstring).

    `changing`: the block-relative names of the layers the method will change; `budget_bytes`: how much the
    kept outputs may take (0 keeps nothing). Use `active(pass_key, collecting, last)` around each forward pass."""

    def __init__(self, block: torch.nn.Module, changing: Iterable[str], budget_bytes: int) -> None:
        self.block = block
        self.changing = set(changing)
        self.settled_layers: set[str] = set()
        self.budget = budget_bytes
        self.used = 0
        self.kept: dict[tuple, tuple[Any, list[torch.Tensor], tuple[int, ...]]] = {}
        self.hits = 0
        #: direct children holding at least one changing layer -> the changing layers under them
        self.children: dict[str, set[str]] = {}
        for name, child in block.named_children():
            inner = {f"{name}.{sub}" if sub else name for sub, _ in child.named_modules()}
            held = inner & self.changing
            if held:
                self.children[name] = held
        # per pass
        self._key: tuple = ()
        self._pending: set[str] = set()
        self._last = False
        self._calls: dict[str, int] = {}
        self._pending_ran = False

    def settled(self, names: Iterable[str]) -> None:
        """These layers have their final weights: outputs that depend only on settled layers may be kept."""
        self.settled_layers.update(names)

    def clear(self) -> None:
        self.kept.clear()
        self.used = 0

    def active(self, pass_key: tuple, collecting: Iterable[str] = (), last: bool = False) -> _Pass:
        """A context for one forward pass over the batches `pass_key`. `collecting`: layers whose inputs this
        pass collects (never served from the memo); `last`: no later pass reads what is kept (a kept output is
        handed over and dropped, nothing new is kept)."""
        self._key = pass_key
        self._pending = (self.changing - self.settled_layers) | set(collecting)
        self._last = last
        self._calls = {}
        self._pending_ran = False
        return _Pass(self)

    # -- inside a pass -------------------------------------------------------------------------------------
    def _run_child(self, name: str, forward: Any, args: tuple, kwargs: dict) -> Any:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        if self.children[name] & self._pending:  # it holds a layer still changing, or one this pass collects
            return forward(*args, **kwargs)
        key = (name, self._key, call)
        hit = self.kept.pop(key, None) if self._last else self.kept.get(key)
        if hit is not None:
            out, tensors, versions = hit
            if _versions(tensors) == versions:
                self.hits += 1
                if self._last:
                    self.used -= sum(t.nbytes for t in tensors)
                return out
            self.kept.pop(key, None)  # changed in place since it was kept: recompute
            self.used -= sum(t.nbytes for t in tensors)
        final_inputs = not self._pending_ran
        out = forward(*args, **kwargs)
        if not self._last and final_inputs:
            tensors = _tensors(out)
            versions = _versions(tensors) if tensors is not None else None
            size = sum(t.nbytes for t in tensors) if tensors is not None else 0
            if versions is not None and self.used + size <= self.budget:
                self.kept[key] = (out, tensors, versions)
                self.used += size
        return out

    def _layer_runs(self, name: str) -> None:
        if name in self._pending:
            self._pending_ran = True


class _Pass:
    """Child forwards routed through the memo, and pre-hooks on the changing layers, for one forward pass."""

    def __init__(self, memo: ChildOutputMemo) -> None:
        self.memo = memo
        self.hooks: list[Any] = []
        #: the wrapped children, each with the instance forward it had (None: its class's)
        self.wrapped: list[tuple[torch.nn.Module, Any]] = []

    def __enter__(self) -> ChildOutputMemo:
        memo = self.memo
        for name in memo.changing:
            self.hooks.append(memo.block.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: memo._layer_runs(name)))
        for name in memo.children:
            child = memo.block.get_submodule(name)
            forward = child.forward  # bound: the class's, or an instance's own (e.g. a fused kernel's)

            def routed(*args: Any, name: str = name, forward: Any = forward, **kwargs: Any) -> Any:
                return memo._run_child(name, forward, args, kwargs)

            self.wrapped.append((child, child.__dict__.get("forward")))
            child.forward = routed  # instance attribute: Module.__call__ (and the child's own hooks) call it
        return memo

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()
        for child, own in self.wrapped:
            if own is None:
                del child.forward
            else:
                child.forward = own


def memo_budget(device: torch.device, *, cap_bytes: int = 8 << 30, share_of_free: float = 0.25) -> int:
    """Bytes the kept outputs may take: a share of the device's free memory, capped (a Llama-3-70B block's
    attention output over 128 x 2048 calibration tokens is 4.3 GB in half precision, an 8B block's 2.1 GB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(cap_bytes, int(share_of_free * free))
    return cap_bytes // 8  # host memory: the CPU's jobs are small models
