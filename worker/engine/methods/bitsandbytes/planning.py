"""Which Linear layers bitsandbytes converts: exactly those transformers would convert; with `cpu_compatible`,
minus the 4-bit shapes bitsandbytes' CPU inference cannot run (see the package docstring)."""

from __future__ import annotations

from typing import Any

import torch

from ...architecture import ModelLayout
from ...errors import UnsupportedModel
from .format import BLOCKSIZE

#: bitsandbytes' CPU 4-bit inference packs weights in groups of 32 output rows (functional.py).
CPU_BLOCK_N = 32


def cpu_runnable_4bit(in_features: int, out_features: int, blocksize: int = BLOCKSIZE) -> str | None:
    """None if bitsandbytes' CPU 4-bit inference can run this shape, else the reason it cannot."""
    if out_features % CPU_BLOCK_N:
        return f"out_features {out_features} is not a multiple of {CPU_BLOCK_N}"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of the block size {blocksize}"
    return None


def plan(fields: dict[str, Any], layout: ModelLayout, *, cpu_compatible: bool = False
         ) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """(module names to quantize, {module name kept in float: why}, {converted module the CPU kernels cannot
    run: why}) for the validated `fields`. The last is empty with `cpu_compatible`, whose plan keeps those
    layers in float instead."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    user_skip = fields["llm_int8_skip_modules"]
    patterns = list(user_skip) if user_skip is not None else list(layout.default_skip_modules)
    patterns += list(layout.keep_in_fp32_modules)
    stored = {l.name: l for l in layout.all_linears()}
    # Linear modules of the class whose weight is not stored (a tied head) are never converted here.
    all_modules = [
        n for n, m in layout.meta_model.named_modules() if type(m) is torch.nn.Linear or isinstance(m, Conv1D)
    ]
    quantize: set[str] = set()
    kept: dict[str, str] = {}
    gpu_only: dict[str, str] = {}
    for name in all_modules:
        if not should_convert_module(name, patterns):
            kept[name] = ("skipped (llm_int8_skip_modules)" if user_skip is not None
                          else "skipped by default (output head / tied / last module)")
            continue
        li = stored.get(name)
        if li is None:
            kept[name] = "weight not stored (tied)"
            continue
        if fields["load_in_4bit"]:
            why = cpu_runnable_4bit(li.in_features, li.out_features)
            if why and cpu_compatible:
                kept[name] = f"kept in float (cpu_compatible): bitsandbytes' CPU 4-bit kernel cannot run it ({why})"
                continue
            if why:
                gpu_only[name] = why
        quantize.add(name)
    # The written list must make transformers convert exactly `quantize`: check with its own matcher.
    written = sorted(kept)
    for name in quantize:
        if not should_convert_module(name, written):
            raise UnsupportedModel(f"module {name} would be matched by llm_int8_skip_modules {written}")
    return quantize, kept, gpu_only
