"""qaas.kernels.rms_norm against transformers' LlamaRMSNorm (the expression it replaces), in the Triton
interpreter on the CPU and on the GPU when one is present; and which modules the engine routes through it."""

from __future__ import annotations

import pytest
import torch

from qaas.kernels.rms_norm import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _hf_norm(width, dtype, seed):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width, generator=g))
    return norm.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 72), (9, 256), (2, 1, 4096)])
def test_the_kernel_computes_llamas_rms_norm(dtype, shape):
    norm = _hf_norm(shape[-1], dtype, seed=shape[-1])
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0])[(...,) + (None,) * (len(shape) - 1)])
    x = x.to(DEVICE, dtype)
    with torch.no_grad():
        ref = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon, backend="triton")
    assert got.shape == ref.shape and got.dtype == ref.dtype == dtype
    # the same expression in the same precision; only the order of the sum of squares (and the rsqrt's last
    # bit) differ, which rounding to half precision hides almost always
    if dtype != torch.float32:
        assert (got == ref).float().mean() > 0.98
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=ulp, atol=ulp * 1e-2)


def test_a_strided_input_and_a_wide_row_fall_back_or_read_right():
    norm = _hf_norm(128, torch.float16, seed=2)
    x = torch.randn(6, 256, dtype=torch.float16, device=DEVICE)[:, ::2]  # a row stride, columns not unit stride
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5, backend="triton"), norm(x), rtol=1e-3, atol=1e-5)
    wide = _hf_norm(40_000, torch.float32, seed=3)  # wider than one program holds: the reference
    y = torch.randn(2, 40_000, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(rms_norm(y, wide.weight, 1e-5, backend="triton"), wide(y))


def test_the_engine_routes_llama_style_norms_only():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from qaas.worker.engine.fused_norms import computes_llama_rms_norm, fuse_rms_norms
    from support.block_inputs import block_inputs, tiny_models

    assert computes_llama_rms_norm(Qwen3RMSNorm)
    assert not computes_llama_rms_norm(GemmaRMSNorm) and not computes_llama_rms_norm(Olmo2RMSNorm)

    model, block, _ = tiny_models()["llama"]  # stories260K
    g = torch.Generator().manual_seed(4)
    hidden, rest = block_inputs(model, block, [torch.randint(3, 500, (2, 24), generator=g)])
    with torch.no_grad():
        ref = block(hidden[0], *rest[0][0], **rest[0][1])[0]
    try:
        assert sorted(fuse_rms_norms(block, backend="triton")) == ["input_layernorm", "post_attention_layernorm"]
        assert fuse_rms_norms(block, backend="triton") == []  # never wrapped twice
        calls = []
        h = block.input_layernorm.register_forward_hook(lambda m, i, o: calls.append(1))  # hooks still run
        with torch.no_grad():
            got = block(hidden[0], *rest[0][0], **rest[0][1])[0]
        h.remove()
    finally:
        for m in (block.input_layernorm, block.post_attention_layernorm):
            m.__dict__.pop("forward", None)
    assert calls == [1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_with_gradients_wanted_the_reference_runs_so_autograd_sees_it():
    norm = _hf_norm(64, torch.float32, seed=5)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, norm.weight, 1e-5, backend="triton")
    assert y.grad_fn is not None
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    norm(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
