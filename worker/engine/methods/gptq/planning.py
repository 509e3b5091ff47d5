"""Decisions GPTQ takes before it quantizes anything: the compute dtype, where calibration activations live,
which Linear layers of a block are quantized, and in which sequential groups.

A block's layers are planned once, on the first block, from the input classes `discover_input_groups`
finds (layers that share one input tensor, and so one Hessian), and the plan is reused for every block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from qaas.quantization_rules import engines

from ...architecture import LinearInfo
from ...errors import InvalidConfig
from .format import unsupported_reason

#: Fraction of the free device memory the calibration activations (inputs and outputs of a block) may take.
ACTIVATIONS_SHARE_OF_FREE_MEMORY = 0.4


def activation_device(device: torch.device, activation_bytes: int) -> torch.device:
    """Where the calibration activations are kept: on the device when a block's inputs and outputs fit in
    its share of the free memory, else on the CPU (moved to the device batch by batch)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if 2 * activation_bytes > ACTIVATIONS_SHARE_OF_FREE_MEMORY * free:
            return torch.device("cpu")
    return device


def layer_refusal(in_features: int, out_features: int, *, bits: int, group_size: int,
                  targets: Iterable[str] = ()) -> str | None:
    """Why a layer of this shape stays in float16, or None: the format cannot hold it, or an engine the output
    must load in (transformers, GPTQModel and `options.targets`: `engines.required`) could not read it."""
    why = unsupported_reason(in_features, out_features, bits, group_size)
    if why:
        return why
    for engine in engines.required(targets):
        why = engines.layer_refusal(engine, in_features, out_features, bits)
        if why:
            return why
    return None


def skipped_layers(linears: dict[str, LinearInfo], *, bits: int, group_size: int,
                   modules_in_block: list[list[str]] | None, targets: Iterable[str] = ()) -> dict[str, str]:
    """{block-relative layer name: why it stays in float16} for the layers of one block."""
    listed = {m for g in modules_in_block for m in g} if modules_in_block else None
    skipped: dict[str, str] = {}
    for name, li in linears.items():
        why = layer_refusal(li.in_features, li.out_features, bits=bits, group_size=group_size, targets=targets)
        if why:
            skipped[name] = why
        elif listed is not None and name not in listed:
            skipped[name] = "not listed in modules_in_block_to_quantize"
    return skipped


def sequential_groups(classes: list[list[str]], layer_names: list[str], *, true_sequential: bool,
                      modules_in_block: list[list[str]] | None) -> list[list[list[str]]]:
    """The groups quantized one after the other, each a list of input classes (layers sharing one Hessian).

    With `modules_in_block_to_quantize`, its groups in its order; with `true_sequential` each input class on
    its own (the paper's order: attention inputs, attention output, MLP inputs, MLP output); else one group.
    """
    if modules_in_block:
        known = set(layer_names)
        for g in modules_in_block:
            for m in g:
                if m not in known:
                    raise InvalidConfig(f"modules_in_block_to_quantize names {m!r}, which is not a Linear layer "
                                        f"of the block (layers: {', '.join(sorted(known))})",
                                        field="modules_in_block_to_quantize")
        return [[[m for m in cls if m in g] for cls in classes if any(m in g for m in cls)] for g in modules_in_block]
    if true_sequential:
        return [[cls] for cls in classes]
    return [classes]


def without(groups: list[list[list[str]]], skipped: dict[str, str]) -> list[list[list[str]]]:
    """The groups with skipped layers removed, dropping classes and groups left empty."""
    out = []
    for group in groups:
        classes = [[m for m in cls if m not in skipped] for cls in group]
        classes = [c for c in classes if c]
        if classes:
            out.append(classes)
    return out
