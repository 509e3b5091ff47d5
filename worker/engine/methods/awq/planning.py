"""What AWQ decides before it touches a weight: the architecture's scaling groups as they apply to this
model's block, and which Linear layers stay in float16.

The map itself (`qaas.quantization_rules.awq.SCALING_MAPS`, by model_type) is plain data the API reads too;
here it is checked against the real block (every module it names exists, prev is the kind the map says,
the shapes agree) and narrowed to what applies: a group whose layers are all kept in float16 has nothing to
protect, and `when_shapes_match` groups (v_proj -> o_proj) drop out under grouped-query attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qaas.quantization_rules.awq import ScalingGroup, scaling_map

from ...architecture import LinearInfo
from ...errors import UnsupportedModel
from .format import unsupported_reason


@dataclass(frozen=True)
class PlannedGroup:
    group: ScalingGroup
    #: Of group.layers, those quantized (the rest are scaled too, to keep the model exact, but stay float).
    quantized: tuple[str, ...]


def not_converted(full_name: str, modules_to_not_convert: list[str] | None) -> bool:
    """transformers' rule for `modules_to_not_convert`: a module whose name contains an entry."""
    return any(entry in full_name for entry in modules_to_not_convert or ())


def skipped_layers(linears: dict[str, LinearInfo], *, group_size: int,
                   modules_to_not_convert: list[str] | None) -> dict[str, str]:
    """{block-relative layer name: why it stays in float16} for the layers of one block (decided on the
    first block by shape, which every block shares; names by the full module name of each block)."""
    skipped: dict[str, str] = {}
    for name, li in linears.items():
        if li.transposed:
            skipped[name] = "a Conv1D layer (AWQ's scaling maps cover Linear layers only)"
            continue
        why = unsupported_reason(li.in_features, li.out_features, group_size)
        if why:
            skipped[name] = why
        elif not_converted(li.name, modules_to_not_convert):
            skipped[name] = "listed in modules_to_not_convert"
    return skipped


def plan_groups(model_config: dict[str, Any], block: torch.nn.Module, linears: dict[str, LinearInfo],
                skipped: dict[str, str]) -> list[PlannedGroup]:
    """The scaling groups of this architecture that apply to `block`, in the map's order."""
    groups = scaling_map(model_config)
    if groups is None:  # the rules refuse it first; a config edited between submission and run lands here
        raise UnsupportedModel(f"AWQ has no scaling map for model_type {model_config.get('model_type')!r}",
                               field="model")
    modules = dict(block.named_modules())
    planned = []
    for g in groups:
        missing = [n for n in (g.prev, g.inspect, *g.layers) if n not in modules]
        if missing:
            raise UnsupportedModel(f"the {model_config.get('model_type')} scaling map names modules this block "
                                   f"does not have: {', '.join(missing)}", field="model")
        prev = modules[g.prev]
        layer_mods = [modules[n] for n in g.layers]
        if any(type(m) is not torch.nn.Linear for m in layer_mods):
            raise UnsupportedModel(f"AWQ scales Linear layers; {', '.join(g.layers)} are not all Linear",
                                   field="model")
        width = layer_mods[0].in_features
        if g.prev_kind == "linear":
            if type(prev) is not torch.nn.Linear:
                raise UnsupportedModel(f"{g.prev} is not a Linear layer", field="model")
            if prev.out_features != width:
                if g.when_shapes_match:
                    continue
                raise UnsupportedModel(f"{g.prev} writes {prev.out_features} channels, {g.layers[0]} reads {width}",
                                       field="model")
        elif getattr(prev, "weight", None) is None or tuple(prev.weight.shape) != (width,):
            raise UnsupportedModel(f"{g.prev} has no per-channel weight of {width} to fold scales into",
                                   field="model")
        quantized = tuple(n for n in g.layers if n not in skipped)
        if quantized:
            planned.append(PlannedGroup(g, quantized))
    return planned
