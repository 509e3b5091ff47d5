"""The bitsandbytes exports load in transformers + bitsandbytes unchanged, and are byte-for-byte what
transformers itself writes after quantizing on load with the equivalent BitsAndBytesConfig."""

from __future__ import annotations

import json

import pytest
import torch

from support.consumers import require

require("bitsandbytes")  # a missing consumer fails in CI

from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from qaas.worker.engine.errors import InvalidConfig  # noqa: E402
from qaas.worker.engine.methods.bitsandbytes import BitsAndBytesMethod  # noqa: E402
from qaas.worker.engine.methods.bitsandbytes.planning import cpu_runnable_4bit  # noqa: E402

from .conftest import VARIANTS  # noqa: E402

PROMPT_IDS = torch.tensor([[1, 403, 407, 261, 378, 289, 414]])


def _equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _read_all(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _golden(source_dir, qc, tmp_path):
    """transformers' own on-the-fly quantization of the original + save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(source_dir, quantization_config=BitsAndBytesConfig.from_dict(dict(qc)))
    model.save_pretrained(tmp_path / "golden")
    return model, tmp_path / "golden"


@pytest.mark.parametrize("variant", ["nf4", "fp4", "nf4_dq", "int8"])
def test_stories_export_matches_transformers(variant, stories_dir, run_pipeline, tmp_path):
    """With cpu_compatible (4-bit), the layers bitsandbytes' CPU kernels cannot run stay float, so the export
    runs here; the default (every layer converted, as on a GPU) is the next test."""
    out, result, reporter = run_pipeline(stories_dir, variant, cpu_compatible=variant != "int8")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == result["quantization_config"]

    # The dict is exactly what BitsAndBytesConfig(...).to_dict() writes for the requested fields.
    fields = {k: v for k, v in VARIANTS[variant].items() if k != "quant_method"}
    expected = BitsAndBytesConfig(**fields, llm_int8_skip_modules=result["skipped_modules"]).to_dict()
    assert qc == json.loads(json.dumps(expected))
    assert "lm_head" in qc["llm_int8_skip_modules"]
    if variant == "int8":
        assert qc["llm_int8_skip_modules"] == ["lm_head"]  # every block Linear runs in int8 on the CPU
    else:
        # 172-wide MLP layers cannot run in bitsandbytes' CPU 4-bit kernel: kept in float and listed.
        assert "model.layers.0.mlp.up_proj" in qc["llm_int8_skip_modules"]
        assert "model.layers.0.self_attn.q_proj" not in qc["llm_int8_skip_modules"]
    assert result["bitsandbytes"]["runs_on"]["devices"] == ["cuda", "cpu"]

    golden_model, golden_dir = _golden(stories_dir, qc, tmp_path)
    ours, theirs = _read_all(out), _read_all(golden_dir)
    assert set(ours) == set(theirs)
    mismatched = [k for k in ours if not _equal_bytes(ours[k], theirs[k])]
    assert not mismatched, mismatched[:5]
    assert json.loads((golden_dir / "config.json").read_text())["quantization_config"] == qc

    # Loads with no quantization config passed; same logits as quantizing the original on load.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours_logits = model(PROMPT_IDS).logits
        ref_logits = golden_model.eval()(PROMPT_IDS).logits
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=20, do_sample=False)
    text = tok.decode(gen[0], skip_special_tokens=True)
    assert len(text.split()) >= 5, text
    if variant in ("int8", "nf4_dq", "nf4"):
        assert text.startswith("Once upon a time"), text

    # Metadata and files of FORMATS.md §4.
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    names = {f["name"] for f in result["files"]}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= names


def test_stories_default_is_what_bitsandbytes_config_gives_on_a_gpu(stories_dir, run_pipeline, tmp_path):
    """Default 4-bit: every Linear but the head converted, byte for byte what transformers + bitsandbytes write
    for the same BitsAndBytesConfig, including the 172-wide MLP the CPU kernels reject; the result says so."""
    out, result, _ = run_pipeline(stories_dir, "nf4_dq")
    qc = result["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    assert result["quantized_modules"] == 5 * 7
    _, golden_dir = _golden(stories_dir, dict(qc, llm_int8_skip_modules=None), tmp_path)
    ours, theirs = _read_all(out), _read_all(golden_dir)
    assert set(ours) == set(theirs)
    mismatched = [k for k in ours if not _equal_bytes(ours[k], theirs[k])]
    assert not mismatched, mismatched[:5]
    runs_on = result["bitsandbytes"]["runs_on"]
    assert runs_on["devices"] == ["cuda"]
    assert "model.layers.0.mlp.up_proj" in runs_on["cpu_unsupported_modules"]
    assert "model.layers.0.self_attn.q_proj" not in runs_on["cpu_unsupported_modules"]
    assert "cpu_compatible" in runs_on["note"] and runs_on["note"] in result["notes"]


def test_stories_quant_state_blob(stories_dir, run_pipeline):
    out, result, _ = run_pipeline(stories_dir, "nf4_dq", cpu_compatible=True)
    tensors = _read_all(out)
    prefix = "model.layers.0.self_attn.q_proj.weight"
    blob = json.loads(bytes(tensors[prefix + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert blob["quant_type"] == "nf4" and blob["blocksize"] == 64 and blob["shape"] == [64, 64]
    assert blob["dtype"] == "float32" and blob["nested_blocksize"] == 256 and "nested_offset" in blob
    assert tensors[prefix].dtype == torch.uint8 and tuple(tensors[prefix].shape) == (2048, 1)
    assert tensors[prefix + ".absmax"].dtype == torch.uint8
    # Non-linear tensors keep their dtype; the float-kept MLP keeps its plain weight.
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (172, 64)


@pytest.mark.parametrize("variant", ["nf4", "int8"])
def test_tiny_llama_all_layers_quantized(variant, tiny_llama_dir, run_pipeline, tmp_path):
    out, result, _ = run_pipeline(tiny_llama_dir, variant)
    qc = result["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head"]  # untied head, transformers' default skip
    assert result["quantized_modules"] == 6 * 7
    assert result["bitsandbytes"]["runs_on"]["devices"] == ["cuda", "cpu"]  # every shape runs on the CPU too
    golden_model, golden_dir = _golden(tiny_llama_dir, qc, tmp_path)
    ours, theirs = _read_all(out), _read_all(golden_dir)
    assert set(ours) == set(theirs)
    assert all(_equal_bytes(ours[k], theirs[k]) for k in ours)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT_IDS).logits, golden_model.eval()(PROMPT_IDS).logits)


@pytest.mark.parametrize("variant", ["nf4", "int8"])
def test_gpt2_conv1d_transposed(variant, tiny_gpt2_dir, run_pipeline, tmp_path):
    out, result, _ = run_pipeline(tiny_gpt2_dir, variant)
    ours = _read_all(out)
    if variant == "int8":
        # Conv1D stores [in, out]; the int8 weight is [out, in] = [192, 64] for c_attn.
        assert ours["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
    golden_model, golden_dir = _golden(tiny_gpt2_dir, result["quantization_config"], tmp_path)
    theirs = _read_all(golden_dir)
    assert set(ours) == set(theirs)
    assert all(_equal_bytes(ours[k], theirs[k]) for k in ours)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, golden_model.eval()(ids).logits)


def test_cpu_runnable_rule():
    assert cpu_runnable_4bit(64, 172) is not None
    assert cpu_runnable_4bit(172, 64) is not None
    assert cpu_runnable_4bit(64, 96) is None


@pytest.mark.parametrize(
    "config, field",
    [
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit"),
        ({}, "load_in_4bit"),
        ({"load_in_4bit": True, "bits": 4}, "bits"),
        ({"load_in_4bit": True, "dataset": "c4"}, "dataset"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"}, "bnb_4bit_compute_dtype"),
        ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight"),
        ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, "llm_int8_skip_modules"),
        ({"load_in_8bit": "yes"}, "load_in_8bit"),
    ],
)
def test_invalid_configs(config, field):
    with pytest.raises(InvalidConfig) as exc:
        BitsAndBytesMethod().validate({"quant_method": "bitsandbytes", **config})
    assert exc.value.field == field


def test_validate_accepts_to_dict_output():
    d = json.loads(json.dumps(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()))
    fields = BitsAndBytesMethod().validate(d)
    assert fields["load_in_4bit"] and fields["bnb_4bit_quant_type"] == "nf4"
    assert fields["llm_int8_threshold"] == 6.0


def test_user_skip_modules(stories_dir, run_pipeline):
    qc = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": ["lm_head", "o_proj"]}
    out, result, _ = run_pipeline(stories_dir, qc)
    skipped = result["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.3.self_attn.o_proj" in skipped and "lm_head" in skipped
    assert "model.layers.3.self_attn.q_proj" not in skipped
    tensors = _read_all(out)
    assert tensors["model.layers.3.self_attn.o_proj.weight"].dtype == torch.float32
    AutoModelForCausalLM.from_pretrained(out)(PROMPT_IDS)


@pytest.mark.parametrize("variant", ["nf4_dq", "int8"])
def test_bf16_source_matches_transformers(variant, tiny_llama_bf16_dir, run_pipeline, tmp_path):
    out, result, _ = run_pipeline(tiny_llama_bf16_dir, variant)
    _, golden_dir = _golden(tiny_llama_bf16_dir, result["quantization_config"], tmp_path)
    ours, theirs = _read_all(out), _read_all(golden_dir)
    assert set(ours) == set(theirs)
    assert all(_equal_bytes(ours[k], theirs[k]) for k in ours)
    assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16
