"""GPTQ speed on one GPU: the whole job on Llama-3-shaped models, per phase and per block, its evaluation stage,
a torch-profiler view of one block, and the per-linear comparison with the paper's loop.

Run on the GPU machine from the repository root (`source bench/gpu_env.sh` first where the editable install
does not work); every mode runs on the CPU too at `--shape tiny`, as a smoke test:

    python -P bench/gptq_speed.py --out DIR [--shape 8b|70b|tiny] [--blocks N] [--defaults] [--evaluate] [--gpus N]
    python -P bench/gptq_speed.py --out DIR --mode profile [--shape 8b|70b] [--defaults]
    python -P bench/gptq_speed.py --out DIR --mode linear

e2e (default): a Llama-shaped checkpoint of N blocks with random fp16 weights (`random_llama`: only the N blocks
  are written, plus the full-vocabulary embedding and head) is quantized from disk by the engine
  (`pipeline.quantize`, GPTQ 4-bit g128 sym, true-sequential, no act-order, `--nsamples` x `--seqlen` calibration
  tokens of random vocabulary words). Options: the fastest (damp 0.01, act_group_aware off) or, with `--defaults`,
  GPTQConfig's defaults (damp 0.1, act_group_aware on). Reports the job's stages, the engine's own phase timers
  (CUDA synchronized at their boundaries), each block's time, peak GPU memory (during quantization, and during
  evaluation), and extrapolates to the real model's block count (32 or 80) from the median steady block.
  `--evaluate` runs the evaluation too (16 windows of 2048 tokens, beside the quantization: the windows go through
  each block while the job holds it, the original before its layers are quantized, the quantized after; the
  heads in the evaluate stage) and times it against the quantization time (the evaluation's own clock: its block
  passes run inside the quantize stage), extrapolated to the real model's block count alongside the job.
  `--eval-read-back`: the evaluation streamed after the quantization instead (the original from the source
  checkpoint, then the exported files read back through qaas' GPTQ reader), the evaluate stage's time.
  `--gpus N` runs the job on N GPUs of the machine (`options.gpus`: one engine rank per GPU, NCCL; the phase
  timers are rank 0's); the claim is the 70B shape on 1, 2 and 4 GPUs (goal >= 1.8x on 2, >= 3.2x on 4). It has
  not been run on GPUs yet: no machine of several GPUs was lent when it was written (on the CPU, `--shape tiny
  --gpus 2` runs it with gloo as a smoke test).
profile: a 3-block model; block 1 (the middle one: compiled kernels, a next block to feed) runs under
  torch.profiler with CPU and CUDA activities, engine functions wrapped in named ranges (`engine_phases`);
  `trace_summary` turns the trace into per-phase tables (host wall, device busy, device idle between launches,
  top kernels, the longest gaps). Only the tables are kept, not the trace.
linear: per linear (4096->4096, 4096->14336, 14336->4096; Hessian of 128 x 2048 tokens; 4-bit, group 128, sym,
  blocksize 128): Hessian accumulation and quantization time of the paper's loop
  (`tests/support/gptq_paper.fasterquant_reference`) and of `gptq_quantize` on the same W and H, with the output
  error tr(dW H dW^T) of each (equal error is part of the claim).

Writes DIR/gptq_speed-<tag>.json and .md; the last line printed starts with SUMMARY.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import shutil
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # the sibling bench modules (run with -P)


def _import_root() -> None:
    """Make `qaas.*` importable from this checkout when the editable install is not there."""
    try:
        import qaas.kernels  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import types

    root = Path(__file__).resolve().parents[1]
    pkg = types.ModuleType("qaas")
    pkg.__path__ = [str(root / "qaas")]
    sys.modules["qaas"] = pkg
    for sub in ("kernels", "worker"):
        spec = importlib.util.spec_from_file_location(
            f"qaas.{sub}", root / sub / "__init__.py", submodule_search_locations=[str(root / sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"qaas.{sub}"] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, sub, mod)


_import_root()
# The paper's loop, the yardstick, lives with the tests (`tests/support/gptq_paper.py`); appended, so that
# nothing under tests/ shadows an installed package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))


def sync():
    torch.cuda.synchronize()


def reference_hessian(X: torch.Tensor, chunk: int) -> torch.Tensor:
    """The paper's add_batch: running average, float32 matmul (TF32 off), one call per sample."""
    n_in = X.shape[1]
    H = torch.zeros((n_in, n_in), device=X.device, dtype=torch.float32)
    nsamples = 0
    for i in range(0, X.shape[0], chunk):
        inp = X[i : i + chunk].float().t()
        tmp = 1
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = (2 / nsamples) ** 0.5 * inp
        H += inp.matmul(inp.t())
    return H


def bench_linear(results: dict, tokens: int, chunk: int) -> None:
    from qaas.worker.engine.gptq_algorithm import gptq_quantize
    from qaas.worker.engine.hessian import HessianAccumulator
    from support.gptq_paper import fasterquant_reference, layer_error

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    # warm up: Triton compile, cuSOLVER handles
    W0 = torch.randn(256, 512, device=dev)
    X0 = torch.randn(4096, 512, device=dev)
    gptq_quantize(W0, X0.t() @ X0, bits=4, group_size=128)
    fasterquant_reference(W0, X0.t() @ X0, bits=4, group_size=128)
    rows = []
    for n_in, n_out in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        g = torch.Generator(device=dev).manual_seed(n_in * 7 + n_out)
        scale = torch.exp(torch.randn(n_in, device=dev, generator=g) * 0.7).half()
        X = (torch.randn(tokens, n_in, device=dev, generator=g, dtype=torch.float16) * scale)
        W = (torch.randn(n_out, n_in, device=dev, generator=g) * 0.02).half()
        sync(); t = time.perf_counter()
        Href = reference_hessian(X, chunk)
        sync(); t_h_ref = time.perf_counter() - t
        acc = HessianAccumulator(n_in, dev)
        sync(); t = time.perf_counter()
        for i in range(0, tokens, chunk):
            acc.add(X[i : i + chunk])
        H = acc.finalize()
        sync(); t_h_fast = time.perf_counter() - t
        # the paper averages over samples, we over tokens: same H up to the factor (GPTQ is scale-invariant)
        h_rel = float((H * chunk - Href).norm() / Href.norm())
        del X
        row = {"shape": f"{n_in}->{n_out}", "hessian_ref_s": t_h_ref, "hessian_fast_s": t_h_fast,
               "hessian_rel_diff": h_rel}
        gptq_quantize(W, Href, bits=4, group_size=128, damp_percent=0.01, act_group_aware=False)  # warm-up
        for act in (False, True):
            sync(); t = time.perf_counter()
            ref = fasterquant_reference(W, Href, bits=4, group_size=128, sym=True, damp_percent=0.01, desc_act=act)
            sync(); t_ref = time.perf_counter() - t
            e_ref = layer_error(W, ref["Q"], Href)
            del ref
            # same H for both: the comparison is of the quantization step
            sync(); t = time.perf_counter()
            res = gptq_quantize(W, Href, bits=4, group_size=128, sym=True, damp_percent=0.01, desc_act=act,
                                act_group_aware=False)
            sync(); t_fast = time.perf_counter() - t
            e_fast = layer_error(W, res.Q, Href)
            del res
            tag = "actorder" if act else "plain"
            row.update({f"quant_ref_s_{tag}": t_ref, f"quant_fast_s_{tag}": t_fast,
                        f"speedup_{tag}": t_ref / t_fast, f"err_ref_{tag}": e_ref, f"err_fast_{tag}": e_fast,
                        f"err_ratio_{tag}": e_fast / e_ref})
        rows.append(row)
        print(json.dumps(row), flush=True)
        del W, H, Href, acc
        torch.cuda.empty_cache()
    results["linear"] = rows


def gptq_request(defaults: bool, dataset: str, nsamples: int, seqlen: int) -> dict:
    """4-bit g128 sym, no act-order; GPTQConfig's defaults for damping and group-aware reordering, or the fastest."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "dataset": dataset, "sym": True, "desc_act": False,
          "model_seqlen": seqlen, "nsamples": nsamples}
    if not defaults:
        qc.update(damp_percent=0.01, act_group_aware=False)
    return qc


def _cuda() -> bool:
    return torch.cuda.is_available()


def _peak() -> int | None:
    return torch.cuda.max_memory_allocated() if _cuda() else None


class JobClock:
    """A reporter that keeps each stage's start, each block's end, and the quantization-stage GPU peak."""

    def __init__(self, on_block=None, partial: dict | None = None) -> None:
        from qaas.worker.engine.progress import NullReporter

        self._null = NullReporter()
        #: kept up to date while the job runs, so that a run stopped at its time limit still says how far it got
        self.partial = partial if partial is not None else {}
        self.t0 = time.perf_counter()
        self.quantize_start: float | None = None
        self.block_ends: list[float] = []
        self.quantize_peak: int | None = None
        self.on_block = on_block

    def stage(self, name, *, total=None, message=""):
        now = time.perf_counter()
        if name == "quantize":
            self.quantize_start = now
        if name in ("evaluate", "export") and self.quantize_peak is None:
            self.quantize_peak = _peak()
            if _cuda():
                torch.cuda.reset_peak_memory_stats()
        self.partial.setdefault("stages_started_s", {})[name] = round(now - self.t0, 2)
        print(f"  [{now - self.t0:7.1f}s] stage {name} {message}", flush=True)

    def progress(self, done, total, *, message="", metrics=None):
        if metrics and "layers" in metrics:  # the per-block event (after every block)
            now = time.perf_counter()
            self.block_ends.append(now)
            self.partial["block_s"] = [round(b, 3) for b in self.block_s()]
            print(f"  [{now - self.t0:7.1f}s] block {done}/{total} {self.block_s()[-1]:.2f}s"
                  + (f" peak {_peak() / 2**30:.2f} GiB" if _cuda() else ""), flush=True)
            if self.on_block:
                self.on_block(done)

    def log(self, message, *, level="info", data=None):
        if level != "info":
            print(f"  {level}: {message}", flush=True)

    def check_cancelled(self):
        self._null.check_cancelled()

    def block_s(self) -> list[float]:
        marks = [self.quantize_start, *self.block_ends]
        return [b - a for a, b in zip(marks, marks[1:])]


def steady_block_s(blocks: list[float]) -> float:
    """Median block time without the first (kernel compilation) and, with 3+ blocks, the last (no next block to
    feed: it skips the quantized forward)."""
    if len(blocks) >= 3:
        return statistics.median(blocks[1:-1])
    return blocks[-1]


@contextmanager
def method_context():
    """The EngineContext of the job run inside the block (its state holds the method's phase timers)."""
    from qaas.worker.engine import pipeline

    seen: dict = {}
    real = pipeline.get_method

    def get_method(name):
        method = real(name)
        inner = method.quantize

        def quantize(ctx):
            seen["ctx"] = ctx
            return inner(ctx)

        method.quantize = quantize
        return method

    pipeline.get_method = get_method
    try:
        yield seen
    finally:
        pipeline.get_method = real


def run_job(model, args, out_dir: Path, *, evaluate: bool, reporter: JobClock) -> tuple[dict, dict, float]:
    """The engine's whole job on `model`; returns (result, method state, wall seconds)."""
    from random_llama import random_text

    from qaas.quantization_rules.calibration import MIN_CALIBRATION_TOKENS
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    workdir = model.path.parent.resolve()  # a calibration file is named by its absolute path
    # twice the tokens the windows take, and never below the engine's minimum (tiny smoke shapes)
    words = max(2 * args.nsamples * args.seqlen, MIN_CALIBRATION_TOKENS)
    calib = random_text(workdir / f"calibration-{model.shape.vocab}-{words}.txt", model.shape.vocab, words, seed=10)
    options = EngineOptions(device="cuda" if _cuda() else "cpu", evaluate=evaluate, allowed_roots=(str(workdir),),
                            eval_max_windows=args.eval_windows, eval_seqlen=args.seqlen, gpus=args.gpus,
                            eval_read_back=args.eval_read_back)
    if evaluate:
        text = random_text(workdir / f"eval-{model.shape.vocab}-{args.eval_windows * args.seqlen}.txt",
                           model.shape.vocab, args.eval_windows * args.seqlen + 16, seed=11)
        options.eval_text_path = str(text)
    shutil.rmtree(out_dir, ignore_errors=True)
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    request = gptq_request(args.defaults, str(calib), args.nsamples, args.seqlen)
    t0 = time.perf_counter()
    with method_context() as seen:
        res = quantize({"path": str(model.path)}, request, out_dir, options=options, reporter=reporter)
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    state = dict(seen["ctx"].state.get("gptq", {}))
    beside = seen["ctx"].evaluation_beside
    if beside is not None:  # the evaluation's passes inside each block's time, by block index
        state["eval_block_s"] = dict(beside.block_seconds)
    return res, state, wall


def evaluation_s(res: dict) -> float:
    """The job's evaluation time: beside the quantization its block passes run inside the quantize stage, so the
    evaluation's own clock (data, windows to the first block, block passes, heads); else the evaluate stage."""
    from qaas.worker.engine.beside_eval import MODE

    ev = res.get("evaluation") or {}
    if ev.get("mode") == MODE:
        return float(ev["seconds"]["total"])
    return float(res["timings"].get("evaluate", 0.0))


def job_figures(model, res: dict, state: dict, wall: float, clock: JobClock) -> dict:
    # beside the quantization the evaluation's passes run inside each block: the block times are without them
    in_block = state.get("eval_block_s") or {}
    blocks = [b - in_block.get(i, 0.0) for i, b in enumerate(clock.block_s())]
    steady = steady_block_s(blocks)
    stages = res["timings"]
    quant_wall = wall - evaluation_s(res)
    full = model.shape.full_blocks
    out = {
        "model": model.describe(), "quantization_config": res["quantization_config"],
        "wall_s": round(wall, 2), "job_without_evaluation_s": round(quant_wall, 2), "stages_s": stages,
        "phases_s": {k: round(v, 2) for k, v in state.get("timings", {}).items()},
        "block_s": [round(b, 3) for b in blocks], "first_block_s": round(blocks[0], 3),
        "steady_block_s": round(steady, 3),
        "eval_in_blocks_s": round(sum(in_block.values()), 3) if in_block else None,
        "peak_gpu_gib_quantize": round(clock.quantize_peak / 2**30, 2) if clock.quantize_peak else None,
        "layer_rel_error_mean": res["layer_errors"]["mean"], "quantized_modules": res["quantized_modules"],
        "size_after_bytes": res["size_after_bytes"], "notes": res.get("notes"),
    }
    if model.blocks < full:
        out["extrapolated_full_model"] = {
            "blocks": full, "job_without_evaluation_s": round(quant_wall + steady * (full - model.blocks), 1),
            "how": f"this job + {full - model.blocks} x the steady block ({steady:.2f} s)"}
    return out


def bench_e2e(args, results: dict) -> None:
    from engine_phases import EVAL_PHASES, PhaseTimer, instrument
    from random_llama import random_model

    model = random_model(Path(args.workdir), args.shape, args.blocks)
    print(f"model {model.path}: {model.blocks} blocks, {model.written_bytes / 1e9:.2f} GB of new shards written in "
          f"{model.write_s:.1f}s", flush=True)
    clock = JobClock(partial=results.setdefault("partial", {}))
    timer = PhaseTimer()
    _preload_as_a_standby(args, results)
    profiler = cProfile.Profile() if args.cprofile else None
    with instrument(EVAL_PHASES if args.evaluate else {}, timer.wrap):
        if profiler:
            profiler.enable()
        try:
            res, state, wall = run_job(model, args, Path(args.workdir) / "out", evaluate=args.evaluate,
                                       reporter=clock)
        finally:
            if profiler:
                profiler.disable()
                _write_cprofile(profiler, Path(args.out) / f"gptq_speed-{results['tag']}.cprofile.txt")
    fig = job_figures(model, res, state, wall, clock)
    if args.evaluate:
        ev = res.get("evaluation") or {}
        t_eval = round(evaluation_s(res), 3)
        fig["evaluation"] = {
            "windows": ev.get("windows"), "seqlen": ev.get("seqlen"), "stage_s": t_eval,
            "evaluate_stage_s": res["timings"].get("evaluate", 0.0),
            "parts_s": {k: round(v, 2) for k, v in timer.seconds.items()},
            "peak_gpu_gib": round(_peak() / 2**30, 2) if _cuda() else None,
            "fraction_of_quantization": round(t_eval / fig["job_without_evaluation_s"], 3),
            "perplexity_before": ev.get("perplexity_before"), "perplexity_after": ev.get("perplexity_after"),
            "loaded_with": ev.get("quantized_loaded_with"), "mode": ev.get("mode"), "passes_s": ev.get("seconds")}
        x = fig.get("extrapolated_full_model")
        if x:
            through = timer.seconds.get("eval: windows through the blocks")
            if through is not None and "eval: streamed passes (read back)" not in timer.seconds:
                # beside the quantization: the windows' block passes scale with the blocks, the rest (the model
                # outside its blocks built, the windows embedded, the head) is paid once
                full_eval = t_eval - through + through * x["blocks"] / model.blocks
                how = (f"the windows' block passes x {x['blocks']}/{model.blocks} blocks, the rest "
                       f"({t_eval - through:.1f} s: outside model, embedding, head) once")
            else:  # the read-back pass streams every block again: scaled by blocks, the head too (an upper bound)
                full_eval = t_eval * x["blocks"] / model.blocks
                how = f"this stage x {x['blocks']}/{model.blocks} blocks (the head's fixed cost scaled too)"
            fig["evaluation"]["extrapolated_full_model"] = {
                "blocks": x["blocks"], "stage_s": round(full_eval, 1),
                "fraction_of_quantization": round(full_eval / x["job_without_evaluation_s"], 3), "how": how}
    results["e2e"] = fig
    results.pop("partial")
    print(json.dumps(fig, indent=1), flush=True)


def _preload_as_a_standby(args, results: dict) -> None:
    """With --preloaded, what a standby engine (worker/child.py) has done before its job arrives, timed apart:
    the job's clock starts after it."""
    if not args.preloaded:
        return
    from qaas.worker.engine.runner import preload

    t0 = time.perf_counter()
    preload()
    results["preload_s"] = round(time.perf_counter() - t0, 2)


def _write_cprofile(profiler: cProfile.Profile, path: Path) -> None:
    """The host side of the whole job by function (where a fixed cost of seconds comes from: imports, CUDA and
    library initialization, tokenizer, JIT compilation), cumulative and self time, top 60 each."""
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    for sort in ("cumulative", "tottime"):
        buf.write(f"==== sorted by {sort}\n")
        stats.sort_stats(sort).print_stats(60)
    path.write_text(buf.getvalue())


def bench_profile(args, results: dict) -> None:
    from engine_phases import GPTQ_PHASES, instrument, ranged
    from random_llama import random_model
    from trace_summary import summarize

    model = random_model(Path(args.workdir), args.shape, 3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if _cuda():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)

    target = args.profile_block  # 0: the first block, with the job's start before it (its fixed costs)

    def on_block(done: int) -> None:
        if _cuda():
            torch.cuda.synchronize()
        if done == target and target > 0:
            prof.start()
        elif done == target + 1:
            prof.stop()

    _preload_as_a_standby(args, results)
    if target == 0:
        prof.start()
    clock = JobClock(on_block=on_block, partial=results.setdefault("partial", {}))
    with instrument(GPTQ_PHASES, ranged):
        res, state, wall = run_job(model, args, Path(args.workdir) / "out", evaluate=False, reporter=clock)
    trace = Path(args.workdir) / "profile-trace.json"
    prof.export_chrome_trace(str(trace))
    t0 = time.perf_counter()
    summary = summarize(trace)
    trace.unlink()
    ops = "(unavailable)"
    for sort in ("self_device_time_total", "self_cuda_time_total") if _cuda() else ("self_cpu_time_total",):
        try:
            ops = prof.key_averages().table(sort_by=sort, row_limit=25)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    results["profile"] = {"profiled_block": target, "job": job_figures(model, res, state, wall, clock),
                          "summary": summary, "analysis_s": round(time.perf_counter() - t0, 1)}
    results["profile_ops_table"] = ops
    results.pop("partial")
    print(json.dumps(summary["phases"], indent=1), flush=True)


def write_md(results: dict, path: Path) -> None:
    from trace_summary import markdown

    L = [f"# GPTQ speed: {results['tag']}", "",
         f"Measured {results['date']} on {results['device']}, torch {results['torch']}, Triton {results['triton']}, "
         f"transformers {results['transformers']}, Python {results['python']}.", "",
         f"Command: `{results['command']}`", ""]
    jobs = [("Whole job", results.get("e2e")), ("Profile run (block 1 under the profiler)",
                                                (results.get("profile") or {}).get("job"))]
    for title, e in jobs:
        if not e:
            continue
        m, qc = e["model"], e["quantization_config"]
        L += [f"## {title}", "",
              f"{m['shape']} shape (hidden {m['hidden']}, MLP {m['intermediate']}, {m['heads']}/{m['kv_heads']} heads, "
              f"vocab {m['vocab']}), {m['blocks']} of {m['full_blocks']} blocks, random fp16 weights from safetensors "
              f"on local disk; GPTQ {qc.get('bits')}-bit g{qc.get('group_size')}, damp {qc.get('damp_percent')}, "
              f"act_group_aware {qc.get('act_group_aware')}, desc_act {qc.get('desc_act')}.", "",
              "| figure | value |", "|---|---|",
              f"| job without evaluation | **{e['job_without_evaluation_s']:.1f} s** |"]
        if e.get("extrapolated_full_model"):
            x = e["extrapolated_full_model"]
            L.append(f"| extrapolated to {x['blocks']} blocks | **{x['job_without_evaluation_s']:.0f} s** ({x['how']}) |")
        L += [f"| first block / steady block | {e['first_block_s']:.2f} s / **{e['steady_block_s']:.2f} s** |",
              f"| every block (s) | {', '.join(f'{b:.2f}' for b in e['block_s'])}"
              + (f" (without the evaluation's passes through them, {e['eval_in_blocks_s']:.1f} s in all)"
                 if e.get("eval_in_blocks_s") else "") + " |",
              f"| peak GPU memory while quantizing | {e['peak_gpu_gib_quantize']} GiB |",
              f"| stages (s) | {', '.join(f'{k} {v:.1f}' for k, v in e['stages_s'].items())} |",
              f"| engine phases (s, all blocks) | {', '.join(f'{k} {v:.1f}' for k, v in e['phases_s'].items())} |",
              f"| mean layer relative error | {e['layer_rel_error_mean']:.4f} ({e['quantized_modules']} layers) |"]
        ev = e.get("evaluation")
        if ev:
            beside = ev.get("mode") == "streamed beside the quantization"
            L += [f"| evaluation ({ev['windows']} x {ev['seqlen']} tokens, {ev.get('mode')}) | "
                  f"**{ev['stage_s']:.1f} s** = {ev['fraction_of_quantization']:.0%} of the job without it (goal < 15 %; "
                  f"the evaluate stage {ev['evaluate_stage_s']:.1f} s"
                  + (", the rest inside the quantize stage" if beside else "") + "); "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in ev["parts_s"].items())
                  + f"; passes (s) {ev.get('passes_s')}; peak GPU memory in the evaluate stage {ev['peak_gpu_gib']} GiB"
                  + (" (the block passes' memory is in the peak while quantizing)" if beside else "") + " |"]
            xe = ev.get("extrapolated_full_model")
            if xe:
                L.append(f"| evaluation extrapolated to {xe['blocks']} blocks | **{xe['stage_s']:.0f} s** = "
                         f"{xe['fraction_of_quantization']:.0%} of the extrapolated job (goal < 15 %; {xe['how']}) |")
        L.append("")
    prof = results.get("profile")
    if prof:
        L += ["## Profile of one block", "", markdown(prof["summary"], f"Block {prof['profiled_block']}"),
              "Top operators (torch.profiler key_averages):", "", "```", results["profile_ops_table"], "```", ""]
    if results.get("linear"):
        L += ["## Per linear layer (paper's loop vs ours, same W and H)", "",
              "| in -> out | ref quant s | fast quant s | speed-up | error fast/ref | act-order ref s | fast s | "
              "speed-up | error fast/ref | Hessian ref s | fast s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["linear"]:
            L.append(f"| {r['shape']} | {r['quant_ref_s_plain']:.3f} | {r['quant_fast_s_plain']:.3f} | "
                     f"{r['speedup_plain']:.1f}x | {r['err_ratio_plain']:.6f} | {r['quant_ref_s_actorder']:.3f} | "
                     f"{r['quant_fast_s_actorder']:.3f} | {r['speedup_actorder']:.1f}x | {r['err_ratio_actorder']:.6f} "
                     f"| {r['hessian_ref_s']:.3f} | {r['hessian_fast_s']:.3f} |")
    path.write_text("\n".join(L) + "\n")


def summary_line(results: dict) -> str:
    parts = [results["tag"]]
    for key in ("e2e", "profile"):
        e = results.get(key)
        e = e.get("job") if key == "profile" and e else e
        if e:
            x = e.get("extrapolated_full_model")
            parts.append(f"job {e['job_without_evaluation_s']:.1f}s, steady {e['steady_block_s']:.2f}s/block"
                         + (f", {x['blocks']} blocks ~{x['job_without_evaluation_s']:.0f}s" if x else "")
                         + f", peak {e['peak_gpu_gib_quantize']} GiB")
            if e.get("evaluation"):
                ev = e["evaluation"]
                xe = ev.get("extrapolated_full_model")
                parts.append(f"eval {ev['stage_s']:.1f}s = {ev['fraction_of_quantization']:.0%} of the job"
                             + (f" (~{xe['stage_s']:.0f}s = {xe['fraction_of_quantization']:.0%} at {xe['blocks']} "
                                "blocks)" if xe else ""))
    if results.get("profile"):
        s = results["profile"]["summary"]
        parts.append(f"profiled block: device busy {s['device_busy_ms']:.0f} ms of {s['window_ms']:.0f} ms")
    for r in results.get("linear", []):
        parts.append(f"{r['shape']} {r['speedup_plain']:.1f}x")
    return "SUMMARY " + "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--mode", choices=("e2e", "profile", "linear"), default="e2e")
    ap.add_argument("--shape", choices=("8b", "70b", "tiny"), default="8b")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of the model (default: all of the real model's)")
    ap.add_argument("--defaults", action="store_true",
                    help="GPTQConfig's defaults (damp 0.1, act_group_aware on) instead of the fastest options")
    ap.add_argument("--evaluate", action="store_true", help="run (and time) the evaluation stage too")
    ap.add_argument("--eval-read-back", action="store_true",
                    help="evaluate after the quantization from the exported files read back, not beside it")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--workdir", default="/tmp/gptq-bench", help="checkpoints (kept and reused) and outputs")
    ap.add_argument("--gpus", type=int, default=1, help="e2e: GPUs the job runs on (one engine rank per GPU)")
    ap.add_argument("--tag", default=None, help="name of the results files (default: from the options)")
    ap.add_argument("--profile-block", type=int, default=1, choices=(0, 1),
                    help="profile mode: the block profiled (0: the first, from the job's start)")
    ap.add_argument("--preloaded", action="store_true",
                    help="the job as a standby engine runs it (its imports done before the job starts)")
    ap.add_argument("--cprofile", action="store_true",
                    help="e2e: the job under cProfile, host time by function written beside the results")
    a = ap.parse_args()
    import triton
    import transformers

    from random_llama import SHAPES

    if a.mode == "linear" and not _cuda():
        print("SUMMARY linear: skipped, it needs CUDA (the reference loop and the Triton kernels on the GPU)")
        return 0
    if a.blocks is None:
        a.blocks = SHAPES[a.shape].full_blocks
    opts = "defaults" if a.defaults else "fastest"
    tag = a.tag or {"linear": "linear", "profile": f"profile-{a.shape}-{opts}"}.get(
        a.mode, f"{a.shape}-{opts}-{a.blocks}b" + ("-eval" if a.evaluate else "") + ("-readback" if a.eval_read_back else "") + (f"-{a.gpus}gpus" if a.gpus > 1 else ""))
    results = {
        "tag": tag, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if _cuda() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "command": "python -P bench/gptq_speed.py " + " ".join(sys.argv[1:]),
        "options": vars(a),
    }
    print(json.dumps(results), flush=True)
    # a time limit's SIGTERM ends the run through the `finally` below, which keeps what was measured so far
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if a.mode == "linear":
            bench_linear(results, a.nsamples * a.seqlen, a.seqlen)
        elif a.mode == "profile":
            bench_profile(a, results)
        else:
            bench_e2e(a, results)
    finally:
        (out / f"gptq_speed-{tag}.json").write_text(json.dumps(results, indent=1, default=str))
        if "partial" in results:
            print(f"SUMMARY {tag}: stopped early; so far {json.dumps(results['partial'])}", flush=True)
    write_md(results, out / f"gptq_speed-{tag}.md")
    print(summary_line(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
