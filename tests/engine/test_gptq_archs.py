"""GPTQ beyond the Llama family: GPT-2 (Conv1D, weights stored [in, out], fused c_attn) and OPT
(model.decoder.layers, fc1/fc2, learned positions with offset 2), tiny and randomly initialised; an unknown
block layout; `cache_block_outputs=false`; the per-layer progress metrics.

GPT-2's checkpoint is what AutoGPTQ and GPTQModel write for it: they replace each Conv1D by a QuantLinear
with in_features = weight.shape[0], out_features = weight.shape[1], and pack `W.t()` (Linear orientation,
`[out, in]`), so qweight is `[in * bits / 32, out]`, scales `[G, out]`, g_idx `[in]` exactly as for a Linear.
Reading it back into the original (Conv1D) architecture therefore transposes the dequantized weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qaas.worker.engine.errors import EngineError
from qaas.worker.engine.evaluate import load_eval_data, perplexity
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize


def _load_sibling(name: str):
    """tests/ runs with --import-mode=importlib (no package): load the FORMATS.md-only dequantizer by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_qaas_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_g = _load_sibling("test_gptq")
ASSETS, SHAKESPEARE, STORIES, WIKITEXT = _g.ASSETS, _g.SHAKESPEARE, _g.STORIES, _g.WIKITEXT
independent_dequantize = _g.independent_dequantize

SEQLEN = 128


def _save(directory: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((STORIES / name).read_bytes())
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    root = tmp_path_factory.mktemp("archs")
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): the weights then matter to the logits, so a wrongly oriented layer
    # shows in the perplexity, not only in the weights
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      initializer_range=0.1, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                   init_std=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return {"gpt2": _save(root / "gpt2", gpt2.eval()), "opt": _save(root / "opt", opt.eval())}


class _Recorder:
    def __init__(self) -> None:
        self.progress_events: list[tuple[int, int, dict]] = []
        self.logs: list[str] = []

    def stage(self, name, *, total=None, message=""):
        pass

    def progress(self, done, total, *, message="", metrics=None):
        json.dumps(metrics)
        self.progress_events.append((done, total, metrics or {}))

    def log(self, message, *, level="info", data=None):
        self.logs.append(message)

    def check_cancelled(self):
        pass


def _job(src: Path, out: Path, qc: dict, *, evaluate: bool = True, reporter=None) -> dict:
    opts = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(src.parent), str(out.parent)),
                         evaluate=evaluate, eval_text_path=str(WIKITEXT), eval_max_windows=4, eval_seqlen=SEQLEN)
    base = {"quant_method": "gptq", "dataset": str(SHAKESPEARE), "nsamples": 8, "model_seqlen": SEQLEN,
            "bits": 4, "group_size": 32}
    return quantize({"path": str(src)}, {**base, **qc}, out, options=opts, reporter=reporter)


EXPECTED = {
    # AutoGPTQ's GPT2GPTQForCausalLM / OPTGPTQForCausalLM: block container and true-sequential groups
    "gpt2": ("transformer.h", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
    "opt": ("model.decoder.layers", [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                     ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
}


@pytest.mark.parametrize("arch,desc_act,batch_size", [("gpt2", False, 2), ("opt", True, 1)])
def test_gpt2_and_opt_jobs_write_loader_checkpoints_that_reload_with_the_reported_perplexity(
        models, tmp_path, arch, desc_act, batch_size):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    src = models[arch]
    rec = _Recorder()
    res = _job(src, tmp_path / arch, {"desc_act": desc_act, "batch_size": batch_size}, reporter=rec)
    out = Path(res["out_dir"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    block_name, groups = EXPECTED[arch]
    assert qc["block_name_to_quantize"] == block_name == res["architecture"]["block_name"]
    assert [sorted(g) for g in qc["modules_in_block_to_quantize"]] == groups
    assert res["quantized_modules"] == 2 * sum(len(g) for g in groups)
    assert res["skipped_modules"] == []  # the tied head is not stored: nothing outside the blocks is a Linear
    assert qc["desc_act"] is desc_act

    sd = load_file(str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    state = model.state_dict()
    qmods = sorted(n[: -len(".qweight")] for n in sd if n.endswith(".qweight"))
    assert len(qmods) == res["quantized_modules"]
    with torch.no_grad():
        for m in qmods:
            mod = modules[m]
            conv = isinstance(mod, Conv1D)
            assert conv == (arch == "gpt2")
            n_in, n_out = mod.weight.shape if conv else mod.weight.shape[::-1]
            # Linear orientation for Conv1D too, as AutoGPTQ/GPTQModel pack it
            assert sd[m + ".qweight"].shape == (n_in * 4 // 32, n_out) and sd[m + ".qweight"].dtype == torch.int32
            assert sd[m + ".qzeros"].shape == (math.ceil(n_in / 32), n_out * 4 // 32)
            assert sd[m + ".scales"].shape == (math.ceil(n_in / 32), n_out)
            assert sd[m + ".scales"].dtype == torch.float16
            assert sd[m + ".g_idx"].shape == (n_in,)
            assert sd[m + ".bias"].shape == (n_out,) and sd[m + ".bias"].dtype == torch.float16
            assert m + ".weight" not in sd
            if desc_act:
                assert not torch.equal(sd[m + ".g_idx"], torch.arange(n_in, dtype=torch.int32) // 32)
            w = independent_dequantize(sd[m + ".qweight"], sd[m + ".qzeros"], sd[m + ".scales"],
                                       sd[m + ".g_idx"], 4)  # [out, in]
            if conv:
                w = w.t()
            ref = original[m + ".weight"]
            # right orientation: close to the original weight (a transposed square c_proj would be ~1.4 off)
            assert ((w - ref).norm() / ref.norm()).item() < 0.2, m
            state[m + ".weight"].copy_(w)
        for name, t in sd.items():  # everything else (biases, norms, embeddings) as saved, in float16
            if name in state:
                state[name].copy_(t.float())
    data = load_eval_data(src, WIKITEXT, seqlen=SEQLEN, max_windows=4)
    ppl = perplexity(model, data, device="cpu")
    ev = res["evaluation"]
    assert ppl == pytest.approx(ev["perplexity_after"], rel=1e-4)
    assert math.isfinite(ev["perplexity_before"]) and 1 < ev["perplexity_before"] < 4 * 512
    assert ev["perplexity_before"] * 0.9 < ev["perplexity_after"] < 1.25 * ev["perplexity_before"]

    # one flat metrics event per quantized layer, then the per-block summary
    per_layer = [m for _, _, m in rec.progress_events if "layer" in m]
    assert sorted(m["layer"] for m in per_layer) == qmods
    for m in per_layer:
        assert m["rel_error"] == pytest.approx(res["layer_errors"]["per_layer"][m["layer"]])
        assert m["sq_error"] >= 0 and m["block"] in (0, 1)
    per_block = [m["layers"] for _, _, m in rec.progress_events if "layers" in m]
    assert len(per_block) == 2 and all("sq_error" in v for b in per_block for v in b.values())


def test_unknown_block_layout_names_block_name_to_quantize(models, tmp_path):
    """A checkpoint whose blocks sit where the model class does not expect them: the job fails up front with
    an error that says to set block_name_to_quantize."""
    from safetensors.torch import load_file, save_file

    from qaas.worker.engine.architecture import find_block_name

    src = tmp_path / "renamed"
    src.mkdir()
    for f in models["gpt2"].iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(models["gpt2"] / "model.safetensors"))
    save_file({k.replace("transformer.h.", "transformer.stack.blocks."): v.contiguous() for k, v in sd.items()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EngineError) as e:
        _job(src, tmp_path / "out", {}, evaluate=False)
    assert "block_name_to_quantize" in str(e.value) and e.value.field == "block_name_to_quantize"
    assert not (tmp_path / "out").exists()
    # two equally plausible stacks and none of the known names
    names = [f"enc.layers.{i}.w.weight" for i in range(2)] + [f"dec.layers.{i}.w.weight" for i in range(2)]
    with pytest.raises(EngineError) as e:
        find_block_name(names, 2)
    assert "block_name_to_quantize" in str(e.value) and "dec.layers" in str(e.value)


def test_cache_block_outputs_false_recomputes_inputs_and_matches_on_llama(tmp_path):
    """On Llama (every block gets the same mask and rotary) recomputing each block's inputs through the
    quantized blocks gives bit-identical checkpoints to caching the outputs."""
    from safetensors.torch import load_file

    outs = {}
    for cache in (True, False):
        rec = _Recorder()
        res = _job(STORIES, tmp_path / f"c{cache}", {"cache_block_outputs": cache, "nsamples": 4},
                   evaluate=False, reporter=rec)
        assert res["quantization_config"]["cache_block_outputs"] is cache
        assert any("cache_block_outputs=false" in n for n in res["notes"]) is (not cache)
        outs[cache] = load_file(str(Path(res["out_dir"]) / "model.safetensors"))
    assert outs[True].keys() == outs[False].keys()
    for k in outs[True]:
        assert torch.equal(outs[True][k], outs[False][k]), k


def test_block_input_capture_gives_each_block_its_own_mask(tmp_path):
    """Qwen2 with alternating sliding/full attention: the inputs captured for block 1 behind block 0 are the
    ones the real model passes to its layer 1 (a catcher at position 0 would get layer 0's sliding mask)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qaas.worker.engine.architecture import build_meta_model
    from qaas.worker.engine.blockwise import BlockInputCapture, materialize_block

    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                      use_sliding_window=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    seen = {}

    def hook(i):
        def f(mod, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).clone(), kwargs.get("attention_mask")
        return f

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)

    sd = model.state_dict()
    cap = BlockInputCapture(build_meta_model(model.config), "model.layers",
                            {k: v for k, v in sd.items() if not k.startswith("model.layers.")},
                            device=torch.device("cpu"), dtype=torch.float32)
    block0 = materialize_block(cap.blocks[0], {k[len("model.layers.0."):]: v for k, v in sd.items()
                                               if k.startswith("model.layers.0.")}, torch.device("cpu"),
                               torch.float32)
    for index, prefix in ((0, []), (1, [block0])):
        hidden, rest = cap.capture([ids], prefix, index, torch.device("cpu"))
        h_ref, mask_ref = seen[index]
        torch.testing.assert_close(hidden[0], h_ref)
        mask = rest[0][1].get("attention_mask")
        assert (mask is None and mask_ref is None) or torch.equal(mask, mask_ref)
    assert not torch.equal(seen[0][1], seen[1][1])  # the two layers really get different masks

    # whole jobs: the cached path warns that it reuses block 0's inputs, the recomputing path does not
    src = _save(tmp_path / "qwen2", model)
    for cache in (True, False):
        res = _job(src, tmp_path / f"q{cache}", {"cache_block_outputs": cache, "nsamples": 2, "model_seqlen": 32},
                   evaluate=False)
        assert res["quantized_modules"] == 14
        assert any("first block's mask" in n for n in res["notes"]) is cache
