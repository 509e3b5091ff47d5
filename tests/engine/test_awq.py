"""AWQ: the GEMM packing against AutoAWQ's own loop, the scale search and its folding, and jobs end to end on
stories260K and small Llamas, read back by an independent dequantizer (tests/support/awq_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ASSETS, SHAKESPEARE, STORIES, WIKITEXT

from support.awq_reference import autoawq_pack, autoawq_unpack, dequantize, dequantized_state, rtn_asym
from qaas import quantization_rules
from qaas.quantization_rules import InvalidQuantizationConfig
from qaas.worker.engine.errors import EngineError
from qaas.worker.engine.evaluate import load_eval_data, perplexity
from qaas.worker.engine.methods.awq import format as fmt
from qaas.worker.engine.methods.awq import search
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize



def _options(tmp_path: Path, *, evaluate: bool = False) -> EngineOptions:
    return EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(tmp_path)), evaluate=evaluate,
                         eval_text_path=str(WIKITEXT), eval_max_windows=4, eval_seqlen=256)


def _awq(**kw) -> dict:
    return {"quant_method": "awq", "group_size": 32, "dataset": str(SHAKESPEARE), "nsamples": 8, "model_seqlen": 128,
            **kw}


# ---- the layout -----------------------------------------------------------------------------------------
def test_gemm_packing_is_autoawqs_loop_and_reads_back():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (64, 48), dtype=torch.int32)
    assert torch.equal(fmt.pack_columns(codes), autoawq_pack(codes))
    assert torch.equal(fmt.unpack_columns(autoawq_pack(codes)), codes)
    assert torch.equal(autoawq_unpack(fmt.pack_columns(codes)), codes)
    # a code 15 in the last position sets the sign bit, as AutoAWQ's int32 words do
    assert (fmt.pack_columns(torch.full((1, 8), 15, dtype=torch.int32)) == -1).all()

    w = torch.randn(48, 64)  # [out, in]
    q = search.group_quantize(w, 32)
    tensors = fmt.pack_layer(q.codes, q.scales, q.zeros)
    assert tensors["qweight"].shape == (64, 6) and tensors["qzeros"].shape == (2, 6)
    assert tensors["scales"].shape == (2, 48) and tensors["scales"].dtype == torch.float16
    assert torch.equal(dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"]), q.w_hat)
    assert torch.equal(fmt.dequantize_layer(tensors, 32), q.w_hat)
    assert torch.equal(q.w_hat, rtn_asym(w, 32))  # the final rounding is plain asymmetric RTN on the scaled weight


def test_shapes_the_gemm_layout_cannot_hold():
    assert fmt.unsupported_reason(64, 64, 32) is None
    assert "group_size" in fmt.unsupported_reason(172, 64, 32)
    assert "multiple of 8" in fmt.unsupported_reason(64, 172, 32)


# ---- the search -----------------------------------------------------------------------------------------
def test_scale_search_protects_the_salient_input_channels():
    """Inputs with a few channels 30x larger than the rest (AWQ's premise): the search picks alpha > 0 and
    its quantized output error is well below plain RTN's (alpha = 0, the first point of the grid)."""
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    x[:, [3, 40, 77, 100]] *= 30
    lin = torch.nn.Linear(128, 64, bias=False)
    ref = [lin(x).detach()]
    res = search.search_scales([lin], [True], search.channel_mean_abs([x]), lambda: [lin(x)], ref,
                               group_size=32, n_grid=20, duo_scaling=False)
    assert res.alpha > 0 and len(res.losses) == 20
    rtn_loss = search.mse(ref, [x @ rtn_asym(lin.weight.detach(), 32).t()])
    assert res.losses[0] == pytest.approx(rtn_loss, rel=2e-2)  # the search rounds with float32 scales
    assert res.loss < 0.7 * rtn_loss
    # the weights are restored after the search
    w = lin.weight.detach().clone()
    search.search_scales([lin], [True], search.channel_mean_abs([x]), lambda: [lin(x)], ref, group_size=32,
                         n_grid=4, duo_scaling=True)
    assert torch.equal(lin.weight.detach(), w)


def test_folded_scales_leave_a_llama_block_unchanged():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=1)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0).double().eval()
    with torch.no_grad():  # norms away from 1 so that folding into them is visible
        block.input_layernorm.weight.uniform_(0.5, 1.5)
        block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 16, 64, dtype=torch.float64)
    pos = LlamaRotaryEmbedding(cfg)(h, torch.arange(16)[None])
    before = block(h, position_embeddings=pos)
    before = before[0] if isinstance(before, tuple) else before
    a = block.self_attn
    for prev, kind, layers in ((block.input_layernorm, "norm", [a.q_proj, a.k_proj, a.v_proj]),
                               (a.v_proj, "linear", [a.o_proj]),
                               (block.post_attention_layernorm, "norm", [block.mlp.gate_proj, block.mlp.up_proj]),
                               (block.mlp.up_proj, "linear", [block.mlp.down_proj])):
        s = torch.rand(layers[0].in_features, dtype=torch.float64) * 4 + 0.25
        search.apply_scales(prev, kind, layers, s)
    after = block(h, position_embeddings=pos)
    after = after[0] if isinstance(after, tuple) else after
    assert torch.allclose(before, after, atol=1e-10)


def test_clip_search_never_does_worse_than_no_clipping():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[0, 5] = 12.0  # an outlier weight that stretches its group's range
    x = torch.randn(256, 64)
    bound = search.search_clip(w, [x], group_size=32)
    assert bound.shape == (64, 2)
    assert torch.all(bound <= w.reshape(64, 2, 32).abs().amax(-1) + 1e-6)
    clipped = torch.nn.Linear(64, 64, bias=False)
    clipped.weight.data = w.clone()
    search.apply_clip(clipped, bound, 32)
    err_clip = (x @ search.group_quantize(clipped.weight.data, 32).w_hat.t() - x @ w.t()).pow(2).mean()
    err_none = (x @ search.group_quantize(w, 32).w_hat.t() - x @ w.t()).pow(2).mean()
    assert err_clip <= err_none
    assert bound[0, 0] < 12.0  # the outlier's group was clipped


# ---- jobs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_awq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("awq_stories")
    res = quantize({"path": str(STORIES)}, _awq(), tmp / "out", options=_options(tmp, evaluate=True))
    return Path(res["out_dir"]), res


def test_stories_awq_writes_the_config_transformers_writes_and_lists_what_it_kept(stories_awq):
    from transformers import AwqConfig

    out, res = stories_awq
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    # MLP width 172: gate/up (out 172) and down (in 172) cannot be packed; every block's three stay float16
    kept = [f"model.layers.{i}.mlp.{p}" for i in range(5) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(qc["modules_to_not_convert"]) == sorted(kept)
    want = AwqConfig(bits=4, group_size=32, zero_point=True, version="gemm", modules_to_not_convert=qc["modules_to_not_convert"])
    assert qc == json.loads(json.dumps(want.to_dict()))
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True
    assert cfg["torch_dtype"] == "float16"
    assert res["quantized_modules"] == 5 * 4 and set(kept) <= set(res["skipped_modules"])
    assert res["calibration"]["samples"] == 8 and len(res["calibration"]["sha256"]) == 64
    assert any("kept in float16" in n for n in res["notes"])
    assert not (out / "quantize_config.json").exists()


def test_stories_awq_reloads_through_an_independent_dequantizer_with_the_reported_perplexity(stories_awq):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, res = stories_awq
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert sd["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 64 // 8)
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in sd
    # the scales were folded into the norms: the stored norm weights differ from the source's
    src = load_file(str(STORIES / "model.safetensors"))
    assert not torch.allclose(sd["model.layers.0.input_layernorm.weight"].float(),
                              src["model.layers.0.input_layernorm.weight"].float(), atol=1e-3)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    missing, unexpected = model.load_state_dict(dequantized_state(sd), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=4)
    ev = res["evaluation"]
    assert perplexity(model, data, device="cpu") == pytest.approx(ev["perplexity_after"], rel=1e-4)
    assert ev["perplexity_after"] < 1.3 * ev["perplexity_before"]


def test_awq_beats_round_to_nearest_on_stories(stories_awq):
    """The same layers rounded on the same grid without scale search or clipping lose more (WikiText-2)."""
    from transformers import AutoModelForCausalLM

    _, res = stories_awq
    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".self_attn." in name:
                mod.weight.copy_(rtn_asym(mod.weight, 32))
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=4)
    rtn = perplexity(model, data, device="cpu")
    ev = res["evaluation"]
    assert ev["perplexity_before"] < ev["perplexity_after"] < rtn


def test_progress_reports_each_groups_alpha_and_what_the_search_won(tmp_path, tiny_llama_dir):
    from .conftest import RecordingReporter

    rep = RecordingReporter()
    quantize({"path": str(tiny_llama_dir)}, _awq(nsamples=4, model_seqlen=64), tmp_path / "out",
             options=_options(tmp_path.parent), reporter=rep)
    assert rep.stages == ["resolve", "load", "calibrate", "quantize", "export"]
    per_block = [e[3] for e in rep.events if e[0] == "progress" and e[3] and "alphas" in e[3]]
    assert len(per_block) == 6
    # grouped-query attention (2 KV heads): v_proj -> o_proj has no scaling group, the three others do
    assert set(per_block[0]["alphas"]) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    for block in per_block:
        assert set(block["scale_search"]) == set(block["alphas"])
        for found in block["scale_search"].values():
            assert 0 <= found["alpha"] < 1 and found["loss"] <= found["loss_alpha_0"]


def test_an_architecture_without_a_scaling_map_is_refused(tmp_path, tiny_gpt2_dir):
    cfg = json.loads((tiny_gpt2_dir / "config.json").read_text())
    qc = quantization_rules.normalize(_awq())
    with pytest.raises(InvalidQuantizationConfig) as exc:
        quantization_rules.check_model(qc, cfg)
    assert exc.value.field == "model" and "gpt2" in exc.value.message
    with pytest.raises(EngineError) as exc2:  # the engine asks too (a Hub model's config is first read there)
        quantize({"path": str(tiny_gpt2_dir)}, _awq(), tmp_path / "out", options=_options(tiny_gpt2_dir.parent))
    assert exc2.value.field == "model"
    assert not (tmp_path / "out").exists()


def test_modules_to_not_convert_keeps_layers_float_and_names_them(tmp_path, tiny_llama_dir):
    res = quantize({"path": str(tiny_llama_dir)}, _awq(nsamples=4, model_seqlen=64, modules_to_not_convert=["down_proj"],
                                                        apply_clip=False, duo_scaling=True),
                   tmp_path / "out", options=_options(tmp_path.parent))
    qc = res["quantization_config"]
    assert qc["modules_to_not_convert"] == ["down_proj"]  # the user's entry covers every block's down_proj
    assert res["quantized_modules"] == 6 * 6
    assert all("down_proj" not in m for m in res["layer_errors"]["per_layer"])
