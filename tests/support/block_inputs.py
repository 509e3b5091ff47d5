"""Block-level test helpers: tiny models of three architectures, what a model passes to one of its blocks, and an
exact (float64) Gram matrix accumulator standing in for GPTQ's Hessian."""

from __future__ import annotations

import functools

import torch


@functools.cache
def tiny_models():
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    from conftest import STORIES

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    opt = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64))
    llama = AutoModelForCausalLM.from_pretrained(str(STORIES))
    return {"llama": (llama, llama.model.layers[1], ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]),
            "gpt2": (gpt2, gpt2.transformer.h[1], ["attn.c_attn", "attn.c_proj", "mlp.c_proj"]),
            "opt": (opt, opt.model.decoder.layers[1], ["self_attn.q_proj", "fc1", "fc2"])}


def block_inputs(model, block, batches):
    """What the model passes to `block` for each batch (hidden states, (other args, kwargs)), as the engine's
    catcher keeps them."""
    seen = []

    def pre(mod, args, kwargs):
        seen.append((args[0] if args else kwargs.pop("hidden_states"), (tuple(args[1:]), dict(kwargs))))

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return [s[0] for s in seen], [s[1] for s in seen]


class Gram:
    """X^T X of every input in float64 and the number of rows seen."""

    def __init__(self, n):
        self.sum = torch.zeros(n, n, dtype=torch.float64)
        self.n = 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.t() @ x
        self.n += x.shape[0]
