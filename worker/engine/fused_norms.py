"""Blocks run their RMSNorms through the one-pass kernel (`qaas.kernels.rms_norm`) while the engine holds them.

Which modules qualify is read from their code, not their names: a module whose `forward` is, line for line,
`LlamaRMSNorm.forward` (Llama, Mistral, Mixtral, Qwen 2/3, Phi-3 and others copy it verbatim) computes
`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, which the kernel computes in the same order and precision.
Variants that differ in any line (Gemma's `1 + weight` in float32, OLMo 2's rounding after the weight) keep
their own forward. The kernel reads the module's weight at every call, so a method that rescales a norm (AWQ)
is seen.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from typing import Any

import torch

from qaas.kernels.rms_norm import rms_norm


def _body(fn: Any) -> str | None:
    """The statements of a function, without its signature and docstring (None if its source is unknown)."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    lines = src.splitlines()
    while lines and not lines[0].rstrip().endswith(":"):  # a signature over several lines
        lines.pop(0)
    body = [ln.strip() for ln in lines[1:] if ln.strip() and not ln.strip().startswith("#")]
    if body and body[0].startswith(('"""', "'''")):
        body = body[1:]
    return "\n".join(body)


@functools.cache
def _llama_body() -> str | None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _body(LlamaRMSNorm.forward)


@functools.cache
def computes_llama_rms_norm(cls: type) -> bool:
    """Whether `cls.forward` is LlamaRMSNorm's, statement for statement."""
    forward = getattr(cls, "forward", None)
    return forward is not None and _llama_body() is not None and _body(forward) == _llama_body()


def _forward(module: torch.nn.Module, backend: str, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon, backend=backend)


def fuse_rms_norms(block: torch.nn.Module, backend: str = "auto") -> list[str]:
    """Route the block's Llama-style RMSNorms through the kernel; the names of those routed."""
    names = []
    for name, m in block.named_modules():
        if (computes_llama_rms_norm(type(m)) and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
                and isinstance(getattr(m, "variance_epsilon", None), float) and "forward" not in m.__dict__):
            m.forward = functools.partial(_forward, m, backend)
            names.append(name)
    return names
