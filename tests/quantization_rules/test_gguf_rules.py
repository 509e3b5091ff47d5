"""The GGUF request rules on their own: llama.cpp's type names, what is produced, imatrix and its data,
split sizes, and the architectures converted."""

from __future__ import annotations

import pytest

from qaas import quantization_rules
from qaas.quantization_rules import InvalidQuantizationConfig
from qaas.quantization_rules.gguf import SUPPORTED_TYPES, split_bytes


def _field(qc: dict) -> str:
    with pytest.raises(InvalidQuantizationConfig) as exc:
        quantization_rules.normalize({"quant_method": "gguf", **qc})
    return exc.value.field


def test_defaults_and_normalizing_twice():
    once = quantization_rules.normalize({"quant_method": "gguf", "types": ["Q8_0", "F16"]})
    assert once == {"quant_method": "gguf", "types": ["Q8_0", "F16"], "imatrix": False, "dataset": None,
                    "nsamples": None, "model_seqlen": 512, "seed": 0, "output_type_default": "F16",
                    "split_max_size": None}
    assert quantization_rules.normalize(once) == once
    assert quantization_rules.bits(once) == 8


@pytest.mark.parametrize("qc, field", [
    ({}, "types"),
    ({"types": []}, "types"),
    ({"types": "Q8_0"}, "types"),
    ({"types": ["Q4_K_X"]}, "types.0"),
    ({"types": ["Q8_0", "q4_0"]}, "types.1"),          # llama.cpp's spelling only
    ({"types": ["Q8_0", "Q8_0"]}, "types.1"),
    ({"types": ["IQ2_XXS"]}, "types.0"),               # not produced (and needs an importance matrix)
    ({"types": ["Q8_0"], "dataset": ["text " * 100]}, "dataset"),  # read only by the imatrix
    ({"types": ["Q8_0"], "imatrix": True}, "dataset"),
    ({"types": ["Q8_0"], "split_max_size": "12"}, "split_max_size"),
    ({"types": ["Q8_0"], "split_max_size": "big"}, "split_max_size"),
    ({"types": ["Q8_0"], "output_type_default": "Q8_0"}, "output_type_default"),
    ({"types": ["Q8_0"], "bits": 4}, "bits"),
])
def test_refusals_name_the_field(qc, field):
    assert _field(qc) == field


def test_a_type_not_produced_yet_is_refused_with_that_reason():
    not_yet = [t for t in ("IQ3_XS", "TQ1_0", "IQ2_XXS") if t not in SUPPORTED_TYPES]
    assert not_yet
    for t in not_yet:
        with pytest.raises(InvalidQuantizationConfig, match="does not produce yet|importance matrix"):
            quantization_rules.normalize({"quant_method": "gguf", "types": [t]})


def test_split_sizes_are_llama_gguf_split_units():
    assert split_bytes("48GB") == 48 * 10**9
    assert split_bytes("500M") == 500 * 10**6
    assert split_bytes(None) is None


def test_architectures_outside_the_llama_and_qwen_graphs_are_refused_naming_model():
    qc = quantization_rules.normalize({"quant_method": "gguf", "types": ["F16"]})
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        quantization_rules.check_model(qc, {"architectures": [arch]})
    for arch in (["GPT2LMHeadModel"], ["Qwen2MoeForCausalLM"], [], None):
        with pytest.raises(InvalidQuantizationConfig) as exc:
            quantization_rules.check_model(qc, {"architectures": arch})
        assert exc.value.field == "model" and "Qwen3ForCausalLM" in str(exc.value)


def test_iq4_types_take_an_importance_matrix_when_given_and_do_without():
    for qc in ({"types": ["IQ4_NL", "IQ4_XS"]},
               {"types": ["IQ4_XS"], "imatrix": True, "dataset": ["text " * 100], "nsamples": 8}):
        quantization_rules.normalize({"quant_method": "gguf", **qc})
