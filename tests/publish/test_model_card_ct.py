"""Model cards of compressed-tensors checkpoints: the preset named from config.json's config_groups, the vLLM
snippet, calibration said only where there was some."""

import ast
import re

import pytest

from qaas.worker.engine.methods.compressed_tensors.schemes import quantization_config, scheme_for
from qaas.worker.publish.model_card import parse_front_matter, render_model_card


def _info(scheme: str, **over):
    qc = quantization_config(scheme_for({"scheme": scheme, "group_size": 128}), ["lm_head"])
    info = {"repo_id": f"alice/Llama-3.1-8B-{scheme}", "source": {"id": "meta-llama/Llama-3.1-8B"},
            "quantization_config": qc,
            "evaluation": {"perplexity_before": 6.24, "perplexity_after": 6.27, "windows": 8, "seqlen": 2048}}
    info.update(over)
    return info


@pytest.mark.parametrize("scheme, bits", [("FP8_DYNAMIC", 8), ("FP8", 8), ("FP8_BLOCK", 8), ("W8A8", 8),
                                          ("W4A16", 4), ("W8A16", 8)])
def test_card_names_the_scheme_and_shows_vllm(scheme, bits):
    card = render_model_card(_info(scheme))
    assert parse_front_matter(card)["tags"] == ["compressed-tensors", f"{bits}-bit", "qaas"]
    assert f"compressed-tensors {scheme} quantization of" in card
    assert "from vllm import LLM" in card and f"vllm serve alice/Llama-3.1-8B-{scheme}" in card
    assert "pip install transformers accelerate compressed-tensors" in card
    assert '"quant_method": "compressed-tensors"' in card
    for block in re.findall(r"```python\n(.*?)```", card, re.S):
        ast.parse(block)
    assert "data-free" in card


def test_calibrated_card_says_what_calibrated_it():
    calib = {"source": "file input.txt", "samples": 128, "seqlen": 2048, "tokens": 262144}
    card = render_model_card(_info("FP8", calibration=calib))
    assert "`file input.txt`, 128 samples of 2048 tokens" in card and "data-free" not in card
