"""compressed-tensors exports, checked by compressed-tensors and transformers themselves:

* round-to-nearest tensors are byte for byte what compressed-tensors' own compressors write for the same
  scheme and weights (the scales from its `calculate_qparams` on each tile's min/max, as llm-compressor's
  observers feed it, then `NaiveQuantizationCompressor` / `PackedQuantizationCompressor.compress`);
* config.json's quantization_config is what `ModelCompressor.update_config` writes;
* `ModelCompressor.decompress_model` (through transformers' loader, `dequantize=True`) reconstructs exactly
  the weights our reader gives;
* `AutoModelForCausalLM.from_pretrained` loads each checkpoint and generates, and its logits equal those of an
  independent reference written here (plain-torch dequantization of the stored tensors into the float model,
  and the scheme's activation quantization as forward pre-hooks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.consumers import require

require("compressed_tensors")  # a missing consumer fails in CI
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from qaas.worker.engine.errors import InvalidConfig, UnsupportedModel  # noqa: E402

from .conftest import ASSETS, save_random_model  # noqa: E402

SHAKESPEARE_TEXT = (ASSETS / "text" / "tinyshakespeare" / "input.txt").read_text()[:6000]

CT = {"quant_method": "compressed-tensors"}
FORMATS = {"FP8_DYNAMIC": "float-quantized", "FP8": "float-quantized", "FP8_BLOCK": "float-quantized",
           "W8A8": "int-quantized", "W4A16": "pack-quantized", "W8A16": "pack-quantized"}
PROMPT = torch.tensor([[1, 403, 407, 261, 378, 289, 414, 300]])


@pytest.fixture(scope="session")
def llama128_dir(tmp_path_factory, stories_dir) -> Path:
    """A Llama whose every Linear tiles 128 x 128 (hidden 128, MLP 256), untied head, stories' tokenizer."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return save_random_model(tmp_path_factory.mktemp("llama128"), cfg, seed=3, tokenizer_from=stories_dir)


@pytest.fixture(scope="session")
def llama128_bf16_dir(tmp_path_factory, stories_dir) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return save_random_model(tmp_path_factory.mktemp("llama128bf16"), cfg, seed=4, dtype=torch.bfloat16,
                             tokenizer_from=stories_dir)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _quantized(out: Path) -> list[str]:
    """Module names stored quantized (they have a weight_scale)."""
    return sorted({k.rsplit(".", 1)[0] for k in _tensors(out) if k.endswith(".weight_scale")})


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _preset(scheme: str, group_size: int | None = None) -> QuantizationScheme:
    s = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        s.weights.group_size = group_size
    s.format = FORMATS[scheme]
    return s


def _oracle_layer(w: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """What llm-compressor saves for one RTN weight: its observer's min/max per tile, compressed-tensors'
    calculate_qparams, then the format's compressor."""
    args = scheme.weights
    R, C = w.shape
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(w)
    elif args.strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif args.strategy == "group":
        g = w.reshape(R, C // args.group_size, args.group_size)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
    else:
        b = w.reshape(R // 128, 128, C // 128, 128)
        lo, hi = b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    compressor = PackedQuantizationCompressor if scheme.format == "pack-quantized" else NaiveQuantizationCompressor
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)


def _reference_logits(source: Path, out: Path, scheme: str, ids: torch.Tensor) -> torch.Tensor:
    """Independent of qaas: dequantize the stored tensors with plain torch into the float model, and quantize
    each quantized layer's input as the scheme says."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    stored = _tensors(out)
    state = model.state_dict()
    layers = sorted({k.rsplit(".", 1)[0] for k in stored if k.endswith(".weight_scale")})
    for k, t in stored.items():  # everything stored as it is (SmoothQuant changes the norms)
        if k.rsplit(".", 1)[0] not in layers:
            state[k].copy_(t)
    for m in layers:
        s = stored[f"{m}.weight_scale"]
        if f"{m}.weight_packed" in stored:
            bits = 4 if scheme == "W4A16" else 8
            packed = stored[f"{m}.weight_packed"].to(torch.int64) & 0xFFFFFFFF
            per = 32 // bits
            vals = torch.stack([(packed >> (bits * i)) & (2**bits - 1) for i in range(per)], dim=-1)
            rows, cols = stored[f"{m}.weight_shape"].tolist()
            q = (vals.reshape(rows, -1)[:, :cols] - 2 ** (bits - 1)).float()
        else:
            q = stored[f"{m}.weight"].float()
        R, C = q.shape
        s2 = s.float().reshape(1, 1) if s.numel() == 1 else s.float()
        full = s2.repeat_interleave(-(-R // s2.shape[0]), 0)[:R].repeat_interleave(-(-C // s2.shape[1]), 1)[:, :C]
        w = (q * full).to(s.dtype)  # compressed-tensors multiplies in the scale's dtype
        state[f"{m}.weight"].copy_(w.to(state[f"{m}.weight"].dtype))
        in_scale = stored.get(f"{m}.input_scale")

        def hook(mod, args, in_scale=in_scale):
            x = args[0]
            if scheme in ("W4A16", "W8A16"):
                return None
            fp8 = scheme.startswith("FP8")
            qmax = 448.0 if fp8 else 127.5
            xs = x.unflatten(-1, (-1, 128)) if scheme == "FP8_BLOCK" else x
            if in_scale is not None:
                sc = in_scale.to(x.dtype)
            else:
                sc = xs.abs().amax(dim=-1, keepdim=True) / qmax
                sc = torch.where(sc == 0, torch.finfo(x.dtype).eps, sc)
            y = xs / sc
            y = y.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) if fp8 else y.clamp(-128, 127).round()
            return ((y * sc).reshape(x.shape),)

        model.get_submodule(m).register_forward_pre_hook(hook)
    with torch.no_grad():
        return model(ids).logits


def _load(out: Path, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()


RTN = [("FP8_DYNAMIC", {}), ("FP8_BLOCK", {}), ("W8A8", {}), ("W4A16", {"group_size": 64}), ("W8A16", {})]


@pytest.mark.parametrize("scheme, extra", RTN, ids=[s for s, _ in RTN])
def test_rtn_export_is_what_compressed_tensors_writes(scheme, extra, llama128_dir, run_pipeline, tmp_path):
    out, result, reporter = run_pipeline(llama128_dir, {**CT, "scheme": scheme, **extra})
    assert "calibrate" not in reporter.stages
    source, ours = _tensors(llama128_dir), _tensors(out)
    preset = _preset(scheme, extra.get("group_size"))
    quantized = _quantized(out)
    assert len(quantized) == result["quantized_modules"] == 14 and "lm_head" not in quantized  # 7 Linear per block; the head ignored
    expected_names = set()
    for m in quantized:
        want = _oracle_layer(source[f"{m}.weight"], preset)
        for suffix, t in want.items():
            expected_names.add(f"{m}.{suffix}")
            assert _same_bytes(ours[f"{m}.{suffix}"], t), f"{m}.{suffix}"
    unquantized = {k for k in source if k.rsplit(".", 1)[0] not in quantized}
    assert set(ours) == expected_names | unquantized
    for k in unquantized:
        assert _same_bytes(ours[k], source[k]), k

    # config.json: compressed-tensors' own serialization of the same QuantizationConfig
    config = json.loads((out / "config.json").read_text())
    golden = tmp_path / "golden"
    golden.mkdir()
    (golden / "config.json").write_text("{}")
    ModelCompressor(quantization_config=QuantizationConfig(
        config_groups={"group_0": preset}, ignore=["lm_head"], format=FORMATS[scheme],
        quantization_status="compressed")).update_config(str(golden))
    want_qc = json.loads((golden / "config.json").read_text())["quantization_config"]
    want_qc.pop("version")
    got_qc = dict(config["quantization_config"])
    assert got_qc.pop("version")
    assert got_qc == want_qc

    # compressed-tensors' decompression (ModelCompressor.decompress_model, through transformers) == our reader
    from qaas.worker.engine.methods.compressed_tensors.format import dequantize_layer
    from qaas.worker.engine.methods.compressed_tensors.schemes import scheme_for

    ours_scheme = scheme_for({"scheme": scheme, "group_size": extra.get("group_size", 128)})
    decompressed = _load(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    dstate = decompressed.state_dict()
    for m in quantized:
        layer = {k.rsplit(".", 1)[1]: v for k, v in ours.items() if k.rsplit(".", 1)[0] == m}
        assert torch.equal(dstate[f"{m}.weight"], dequantize_layer(layer, ours_scheme).to(dstate[f"{m}.weight"].dtype)), m

    # transformers loads the compressed checkpoint as users do, generates, and its logits are the reference's
    model = _load(out)
    with torch.no_grad():
        logits = model(PROMPT).logits
        generated = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, PROMPT.shape[1] + 8)
    torch.testing.assert_close(logits, _reference_logits(llama128_dir, out, scheme, PROMPT), rtol=0, atol=1e-4)


CALIBRATED = [
    ("FP8", {}),
    ("W4A16", {"group_size": 64, "weights": "gptq"}),
    ("W8A8", {"smoothing_strength": 0.5}),
    ("W8A8", {"smoothing_strength": 0.8, "weights": "gptq"}),
]


@pytest.mark.parametrize("scheme, extra", CALIBRATED, ids=["fp8-static", "w4a16-gptq", "w8a8-smooth",
                                                           "w8a8-smooth-gptq"])
def test_calibrated_export_loads_and_matches_reference(scheme, extra, llama128_dir, run_pipeline):
    qc = {**CT, "scheme": scheme, **extra, "dataset": [SHAKESPEARE_TEXT], "nsamples": 4, "model_seqlen": 64}
    out, result, reporter = run_pipeline(llama128_dir, qc)
    assert reporter.stages[:4] == ["resolve", "load", "calibrate", "quantize"]
    assert result["calibration"]["samples"] == 4 and result["calibration"]["seqlen"] == 64
    ours = _tensors(out)
    quantized = _quantized(out)
    assert len(quantized) == result["quantized_modules"] == 14
    if scheme == "FP8":
        for m in quantized:  # a calibrated per-tensor input scale, a per-tensor weight scale
            assert ours[f"{m}.input_scale"].shape == (1,) and float(ours[f"{m}.input_scale"]) > 0
            assert ours[f"{m}.weight_scale"].shape == (1,)
    if "smoothing_strength" in extra:  # smoothing moved scale into the norms, which are stored changed
        source = _tensors(llama128_dir)
        assert not torch.equal(ours["model.layers.0.input_layernorm.weight"],
                               source["model.layers.0.input_layernorm.weight"])
    model = _load(out)
    with torch.no_grad():
        logits = model(PROMPT).logits
    ref = _reference_logits(llama128_dir, out, scheme, PROMPT)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
    # and the quantized model still computes what the original does, roughly (random weights, 2 blocks)
    original = AutoModelForCausalLM.from_pretrained(llama128_dir).eval()
    with torch.no_grad():
        base = original(PROMPT).logits
    assert torch.nn.functional.cosine_similarity(logits.flatten(), base.flatten(), dim=0) > 0.95


def test_gptq_beats_rtn_on_its_calibration_objective(llama128_dir, run_pipeline):
    calib = {"dataset": [SHAKESPEARE_TEXT], "nsamples": 4, "model_seqlen": 64}
    _, rtn, _ = run_pipeline(llama128_dir, {**CT, "scheme": "W4A16", "group_size": 64})
    _, gptq, _ = run_pipeline(llama128_dir, {**CT, "scheme": "W4A16", "group_size": 64, "weights": "gptq", **calib})
    # GPTQ trades weight error for output error: its weights differ more from the originals than RTN's
    assert gptq["layer_errors"]["mean"] > rtn["layer_errors"]["mean"]


def test_bf16_source_keeps_bf16_arithmetic(llama128_bf16_dir, run_pipeline):
    for scheme in ("FP8_DYNAMIC", "W4A16"):
        out, result, _ = run_pipeline(llama128_bf16_dir, {**CT, "scheme": scheme})
        source, ours = _tensors(llama128_bf16_dir), _tensors(out)
        preset = _preset(scheme)
        for m in _quantized(out):
            for suffix, t in _oracle_layer(source[f"{m}.weight"], preset).items():
                assert _same_bytes(ours[f"{m}.{suffix}"], t), (scheme, m, suffix)
        assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16
        # tied head: not stored, listed in ignore all the same
        assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]


def test_awkward_shapes_are_kept_and_listed(stories_dir, run_pipeline):
    """stories260K: MLP 172 is not whole groups of 64; those layers stay float, listed in ignore, and the
    checkpoint loads in transformers."""
    out, result, _ = run_pipeline(stories_dir, {**CT, "scheme": "W4A16", "group_size": 64})
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    assert ignore == sorted(["lm_head", *downs])
    assert not set(downs) & set(_quantized(out)) and result["quantized_modules"] == 30
    assert any("in_features 172 is not a multiple of group_size 64" in n for n in result["notes"])
    model = _load(out)
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()
    with pytest.raises(InvalidConfig, match="hidden_size 64 is not a multiple of 128") as exc:  # nothing tiles
        run_pipeline(stories_dir, {**CT, "scheme": "FP8_BLOCK"})
    assert exc.value.field == "scheme"
    with pytest.raises(UnsupportedModel, match="quantizes no layer") as exc:  # all ignored
        run_pipeline(stories_dir, {**CT, "scheme": "FP8_DYNAMIC", "ignore": ["re:.*"]})
    assert exc.value.field == "scheme"


def test_smoothing_needs_a_known_mapping(tiny_gpt2_dir, run_pipeline):
    with pytest.raises(InvalidConfig, match="no SmoothQuant mapping") as exc:
        run_pipeline(tiny_gpt2_dir, {**CT, "scheme": "W8A8", "smoothing_strength": 0.5,
                                     "dataset": [SHAKESPEARE_TEXT]})
    assert exc.value.field == "smoothing_strength"


def test_ignore_regex_and_names(llama128_dir, run_pipeline):
    out, result, _ = run_pipeline(llama128_dir, {**CT, "scheme": "FP8_DYNAMIC",
                                                 "ignore": ["lm_head", "re:.*mlp\\.down_proj$",
                                                            "model.layers.0.self_attn.q_proj"]})
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == sorted(["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                             "model.layers.0.self_attn.q_proj"])
    assert len(_quantized(out)) == result["quantized_modules"] == 11
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(PROMPT).logits,
                                   _reference_logits(llama128_dir, out, "FP8_DYNAMIC", PROMPT), rtol=0, atol=1e-4)
