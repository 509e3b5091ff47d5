"""The merge of a trained adapter into its de-quantized 4-bit base (`finetune.merge`), against peft's own
`merge_and_unload()` on the base that transformers de-quantizes (`model.dequantize()`): the same weights, so
the same logits, for the scaling rules (alpha / r, rank-stabilized alpha / sqrt(r), rank_pattern), trained
`modules_to_save` copies and tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES

from qaas.worker.engine.finetune import merge, model as base_model

TOKENS = torch.tensor([[1, 5, 9, 33, 100, 7, 8, 250, 17, 400, 3, 77]])
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}


def _tiny(directory, *, tie: bool):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(directory)
    return directory


def _trained_adapter(source, lora):
    """The engine's 4-bit base with adapters whose weights are random (as if trained: B is not zero)."""
    from qaas.quantization_rules import lora as lora_rules

    net = base_model.load_base(source, dict(NF4), False, torch.device("cpu"), allow_remote_code=False)
    net = base_model.add_adapters(net, lora_rules.normalize(lora), gradient_checkpointing=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return net


def _peft_reference(source, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = {k: v for k, v in NF4.items() if k != "quant_method"}
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(**qc))
    base = base.dequantize()  # transformers' own: every 4-bit weight back to float
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


@pytest.mark.parametrize("tie, lora", [
    (False, {"r": 4, "lora_alpha": 16, "use_rslora": True, "modules_to_save": ["lm_head"], "bias": "lora_only"}),
    (False, {"r": 8, "lora_alpha": 8, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32}}),
    (True, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    (True, {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}),
], ids=["rslora-head-bias", "patterns", "tied", "tied-head-trained"])
def test_the_merged_float_model_is_peft_merge_and_unload_on_the_dequantized_base(tmp_path, tie, lora):
    from transformers import AutoModelForCausalLM

    source = _tiny(tmp_path / "tiny", tie=tie)
    net = _trained_adapter(source, lora)
    net.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    written = merge.write_float_checkpoint(net, source, tmp_path / "merged", use_rslora=bool(lora.get("use_rslora")),
                                           max_shard_size=10**9)
    assert written.merged_layers == (4 if "target_modules" in lora else 14) and written.dtype == "float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    # a trained head no longer equals the embedding it was tied to: both are kept, untied
    assert written.untied == (tie and "modules_to_save" in lora) and config["tie_word_embeddings"] == (
        tie and not written.untied)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ref = _peft_reference(source, tmp_path / "adapter")
    net.eval()
    with torch.no_grad():
        got, want, trained = ours(TOKENS).logits, ref(TOKENS).logits, net(input_ids=TOKENS).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max())
    # and it is the trained model itself, merged: the adapter on its 4-bit base computes the same function
    assert float((got - trained).abs().max()) <= 1e-3 * scale
    with torch.no_grad(), net.disable_adapter():
        untrained = net(input_ids=TOKENS).logits
    assert float((got - untrained).abs().max()) > 1e-2 * scale  # the adapter changed the model


def test_scaling_follows_lora_and_rslora():
    assert merge.lora_scaling(16, 32, False) == 2.0 and merge.lora_scaling(16, 32, True) == 8.0
