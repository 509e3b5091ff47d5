"""AWQ speed on one GPU, beside GPTQ in the same run: the engine's whole job on a Llama-3-shaped checkpoint of N
blocks with random fp16 weights (`random_llama`), the same calibration tokens for both methods.

Run on the GPU machine from the repository root (`source bench/gpu_env.sh` first where the editable install
does not work); `--shape tiny` runs on the CPU as a smoke test:

    python -P bench/awq_speed.py --out DIR [--shape 8b|tiny] [--blocks 4] [--nsamples 128] [--seqlen 512]
                                 [--methods awq,gptq] [--budget 420]

Per method: the job's stages, the engine's phase timers (CUDA synchronized at their boundaries: for AWQ the
float forward, scale search, clip search, rounding, packing), each block's time, peak GPU memory, and the
full model's time extrapolated from the median steady block. AWQ runs AutoAWQ's defaults (128 x 512 tokens,
g128, 20-point grid, clipping); GPTQ 4-bit g128 sym on the same tokens. `--budget` (seconds) skips a method
that would start after it is spent. Writes DIR/awq_speed-<shape>.json; the last line printed starts with
SUMMARY.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_llama beside this file


class BlockClock:
    """A reporter that keeps the time each block of the quantize stage ends (and the GPU peak)."""

    def __init__(self) -> None:
        self.stage_name = None
        self.block_end: dict[int, float] = {}
        self.t_stage = 0.0

    def stage(self, name, *, total=None, message=""):
        self.stage_name = name
        if name == "quantize":
            self.t_stage = time.perf_counter()

    def progress(self, done, total, *, message="", metrics=None):
        if self.stage_name == "quantize" and metrics and "layers" in metrics and done not in self.block_end:
            self.block_end[done] = time.perf_counter()

    def log(self, *a, **k):
        pass

    def check_cancelled(self):
        pass

    def block_s(self) -> list[float]:
        ends = [self.block_end[k] for k in sorted(self.block_end)]
        return [b - a for a, b in zip([self.t_stage, *ends[:-1]], ends)]


@contextmanager
def captured_context():
    """The job's EngineContext (its method state holds the engine's phase timers)."""
    from qaas.worker.engine import pipeline

    real, seen = pipeline.get_method, {}

    def get_method(quant_method):
        method = real(quant_method)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default="awq,gptq")
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--workdir", default="/tmp/awq-speed")
    a = ap.parse_args(argv)

    from random_llama import SHAPES, random_model, random_text

    from qaas.quantization_rules.calibration import MIN_CALIBRATION_TOKENS
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    work = Path(a.workdir)
    model = random_model(work, a.shape, a.blocks)
    words = max(2 * a.nsamples * a.seqlen, MIN_CALIBRATION_TOKENS)
    calib = random_text(model.path.parent.resolve() / f"calibration-{model.shape.vocab}-{words}.txt",
                        model.shape.vocab, words, seed=10)
    gs = 128 if a.shape != "tiny" else 32
    requests = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm"},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": gs, "sym": True, "damp_percent": 0.01},
    }
    options = EngineOptions(device="cuda" if cuda else "cpu", evaluate=False,
                            allowed_roots=(str(model.path.parent.resolve()),))
    results: dict = {"model": model.describe(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "torch": torch.__version__, "nsamples": a.nsamples, "seqlen": a.seqlen, "methods": {}}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in a.methods.split(","):
        if time.perf_counter() - t_start > a.budget:
            results["methods"][name] = {"skipped": "budget spent"}
            continue
        job_out = work / f"out-{name}"
        shutil.rmtree(job_out, ignore_errors=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        clock = BlockClock()
        qc = {**requests[name], "dataset": str(calib), "nsamples": a.nsamples, "model_seqlen": a.seqlen}
        t0 = time.perf_counter()
        with captured_context() as seen:
            res = quantize({"path": str(model.path)}, qc, job_out, options=options, reporter=clock)
        wall = time.perf_counter() - t0
        phases = (seen["ctx"].state.get(name) or {}).get("timings", {})
        blocks = clock.block_s()
        steady = statistics.median(blocks[1:]) if len(blocks) > 1 else blocks[0]
        full = model.shape.full_blocks
        results["methods"][name] = {
            "wall_s": round(wall, 2), "stages_s": res["timings"],
            "phases_s": {k: round(v, 2) for k, v in phases.items()}, "block_s": [round(b, 3) for b in blocks],
            "steady_block_s": round(steady, 3),
            "full_model_s_extrapolated": round(wall + steady * (full - model.blocks), 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "layer_rel_error_mean": res["layer_errors"]["mean"], "quantized_modules": res["quantized_modules"],
        }
        shutil.rmtree(job_out, ignore_errors=True)
        print(json.dumps({name: results["methods"][name]}), flush=True)
        (out_dir / f"awq_speed-{a.shape}.json").write_text(json.dumps(results, indent=1))
    summary = {m: (r.get("steady_block_s"), r.get("full_model_s_extrapolated"), r.get("peak_gpu_gib"))
               for m, r in results["methods"].items()}
    print("SUMMARY steady block s, full model s, peak GiB:", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
