"""Which Linear layers a compressed-tensors scheme quantizes, and what config.json's `ignore` lists.

compressed-tensors applies a scheme to every module whose class (or a parent class) is named by `targets`
(["Linear"]) and that `ignore` does not name (exact module names, class names, or `re:<regex>` matched from the
start of the name: `compressed_tensors.utils.match`). Besides the request's `ignore`, a layer stays in floating
point when the format cannot hold it: FP8_BLOCK needs both dimensions to tile 128 (vLLM's block kernels do not
pad), W4A16/W8A16 need in_features to be whole groups (compressed-tensors refuses partial groups). The written
`ignore` lists every nn.Linear module of the model left in floating point by name, as llm-compressor writes it,
so that a loader converts exactly the layers stored quantized.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...architecture import LinearInfo, ModelLayout
from ...errors import UnsupportedModel
from .schemes import Scheme


def matches(name: str, module: torch.nn.Module, patterns: list[str]) -> str | None:
    """The first pattern of `patterns` that names this module, as compressed-tensors matches them."""
    classes = {c.__name__ for c in type(module).__mro__}
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return p
        elif p == name or p in classes:
            return p
    return None


def shape_problem(scheme: Scheme, li: LinearInfo) -> str | None:
    """Why the scheme's format cannot hold a layer of this shape, or None."""
    if scheme.block is not None:
        bh, bw = scheme.block
        if li.out_features % bh or li.in_features % bw:
            return (f"shape [{li.out_features}, {li.in_features}] does not tile into {bh}x{bw} blocks "
                    "(FP8_BLOCK kernels need whole blocks)")
    if scheme.group_size is not None and li.in_features % scheme.group_size:
        return f"in_features {li.in_features} is not a multiple of group_size {scheme.group_size}"
    return None


def plan(cfg: dict[str, Any], scheme: Scheme, layout: ModelLayout, *, calibrated: bool
         ) -> tuple[dict[str, LinearInfo], dict[str, str]]:
    """({module name: layer} to quantize, {module name kept in floating point: why}), over every Linear of the
    model class (a tied head, never stored, is kept)."""
    stored = {li.name: li for li in layout.all_linears()}
    in_blocks = {li.name for b in layout.blocks for li in b.linears}
    quantize: dict[str, LinearInfo] = {}
    kept: dict[str, str] = {}
    for name, mod in layout.meta_model.named_modules():
        li = stored.get(name)
        is_linear = isinstance(mod, torch.nn.Linear)
        if not is_linear:
            if li is not None:  # GPT-2's Conv1D
                kept[name] = "not an nn.Linear (compressed-tensors targets Linear layers)"
            continue
        pattern = matches(name, mod, cfg["ignore"])
        if pattern is not None:
            kept[name] = f"ignored ({pattern})"
        elif li is None:
            kept[name] = "weight not stored (tied to the embeddings)"
        elif li.transposed:
            kept[name] = "not an nn.Linear (compressed-tensors targets Linear layers)"
        elif (why := shape_problem(scheme, li)) is not None:
            kept[name] = why
        elif calibrated and name not in in_blocks:
            kept[name] = "outside the decoder blocks, which calibration runs through"
        else:
            quantize[name] = li
    if not quantize:
        raise UnsupportedModel(f"{scheme.name} quantizes no layer of this model: "
                               + "; ".join(f"{n}: {w}" for n, w in sorted(kept.items())[:4]), field="scheme")
    return quantize, kept
