"""QLoRA training speed and memory: the engine's fine-tuning loop against plain transformers + peft + bitsandbytes
(the peer: `Trainer` with the same base, adapters, optimizer and batches), side by side in one run.

The model is Llama-3-8B-shaped with random weights (`random_llama`: fp16 shards, a word-level tokenizer), so
the loss values mean nothing; speed and memory do not depend on the weights' values. The base is loaded once in
4-bit (NF4 + double quantization, bfloat16 compute: the engine's `model.load_base`, i.e. transformers'
bitsandbytes integration) and shared: each phase puts fresh LoRA adapters on it (r=16 on every linear layer of
the blocks, `model.add_adapters`, seeded), makes a fresh optimizer, trains `--steps` steps of one sequence of
`--seq` tokens, and removes its adapters. Phases: ours and the peer, with gradient checkpointing on, then off,
interleaved. Step time is the median over the steps after the first (warm-up); tokens/s = seq / step time;
peak memory is `torch.cuda.max_memory_allocated` over the phase (the base included).

Memory model: the blocks' 4-bit weights and their quantization constants are counted from the loaded tensors
(bits per parameter with double quantization), beside the same layers' bytes without it (one fp32 absmax per
block of 64 instead of 8-bit absmax with fp32 constants per 256 of them). Each layer holds a 1 KB copy of the
double quantization's code table, so at tiny shapes double quantization costs bytes; at 8B shapes it saves about
0.37 bits per parameter. The embedding and head stay in 16-bit.

Paged optimizers: `paged_adamw_8bit` (CUDA only). That they prevent out-of-memory spikes is not measured here
(that takes a run that spikes); what is measured is their cost per step against the same loop.

    python bench/qlora_speed.py                      # GPU: 8B shape, seq 2048, 6 steps per phase, --budget 170 s
    python bench/qlora_speed.py --smoke              # CPU: tiny shape, seq 64, 3 steps, adamw_torch, float32
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # the sibling bench modules (run with -P)

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "bias": "none",
        "task_type": "CAUSAL_LM"}
QC = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "auto"}


class _Clock:
    """The engine's reporter: when training began (the eval before it has been reported) and when each step was
    reported (logging_steps=1), the device synchronized first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.step_times = device, None, []

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict | None = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if metrics and "loss" in metrics:
            self.step_times.append(time.perf_counter())
        elif self.start is None:
            self.start = time.perf_counter()

    def stage(self, *a: Any, **k: Any) -> None:
        pass

    def log(self, *a: Any, **k: Any) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _timings(stamps: list[float], start: float, seq: int) -> dict[str, Any]:
    """Per-step seconds from the stamps (the first step measured from `start`), median after the warm-up."""
    steps = [b - a for a, b in zip([start, *stamps], stamps)]
    timed = steps[1:] or steps
    median = statistics.median(timed)
    return {"steps": len(steps), "step_s": [round(s, 4) for s in steps], "median_step_s": round(median, 4),
            "tokens_per_s": round(seq / median, 1)}


def _adapters(base: torch.nn.Module, ckpt: bool) -> torch.nn.Module:
    from qaas.worker.engine.finetune.model import add_adapters

    if not ckpt and getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    torch.manual_seed(0)
    return add_adapters(base, LORA, gradient_checkpointing=ckpt)


def run_ours(base, ids: list[int], *, steps: int, ckpt: bool, optim: str, device: torch.device,
             compute_dtype: torch.dtype) -> dict[str, Any]:
    """The engine's loop (`finetune.train.run`) on the shared base, with the base's compute dtype for autocast
    (as the peer's bf16=True)."""
    from transformers import get_scheduler

    from qaas.worker.engine.finetune import train
    from qaas.worker.engine.finetune.data import collate
    from qaas.worker.engine.finetune.model import make_optimizer

    net = _adapters(base, ckpt)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, used = make_optimizer(optim, params, lr=2e-4, weight_decay=0.0, device=device)
    scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=steps)
    training = {"gradient_accumulation_steps": 1, "per_device_train_batch_size": 1, "seed": 0, "max_grad_norm": 1.0,
                "eval_steps": None, "logging_steps": 1, "save_steps": steps + 1}
    clock = _Clock(device)
    probe = [collate([ids[:16]], 0)]  # the loop's eval before training: 16 tokens, outside the timed steps
    _reset_peak(device)
    train.run(net, optimizer, scheduler, train_seqs=[ids] * steps, eval_batches=probe, training=training,
              steps=steps, pad_id=0, device=device, reporter=clock, checkpoint_dir=None, resume=None,
              compute_dtype=compute_dtype)
    out = {"impl": "qaas", "gradient_checkpointing": ckpt, "optim": used, **_timings(clock.step_times, clock.start, len(ids)),
           "peak_memory_bytes": _peak(device), "trainable_parameters": sum(p.numel() for p in params)}
    del optimizer, scheduler, params
    net.unload()  # the adapters out, the base as it was
    _free(device)
    return out


def run_peer(base, ids: list[int], *, steps: int, ckpt: bool, optim: str, device: torch.device,
             workdir: Path) -> dict[str, Any]:
    """Plain transformers + peft + bitsandbytes: prepare_model_for_kbit_training, get_peft_model, Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    if not ckpt and getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    torch.manual_seed(0)
    model = prepare_model_for_kbit_training(base, use_gradient_checkpointing=ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(**LORA))
    stamps: list[float] = []
    start: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not start:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(workdir / "peer"), per_device_train_batch_size=1, max_steps=steps, learning_rate=2e-4,
        lr_scheduler_type="constant", optim=optim, gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=bf16, logging_steps=1, report_to=[],
        save_strategy="no", max_grad_norm=1.0, use_cpu=device.type == "cpu", dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    data = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids),
             "attention_mask": torch.ones(len(ids), dtype=torch.long)}] * steps
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[Stamp()])
    _reset_peak(device)
    trainer.train()
    out = {"impl": "peer (transformers Trainer + peft + bitsandbytes)", "gradient_checkpointing": ckpt,
           "optim": optim, **_timings(stamps, start[0], len(ids)), "peak_memory_bytes": _peak(device),
           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del trainer
    model.unload()
    _free(device)
    return out


def memory_model(base: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the blocks' 4-bit weights and their quantization constants, from the loaded tensors."""
    import bitsandbytes as bnb

    params = packed = constants = alone = 0
    for m in base.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        qs = m.weight.quant_state
        n = m.in_features * m.out_features
        params += n
        packed += m.weight.numel() * m.weight.element_size()
        code = qs.code.numel() * qs.code.element_size()  # every layer holds its own copy of the code tables
        constants += qs.absmax.numel() * qs.absmax.element_size() + code
        if qs.nested and qs.state2 is not None:  # 8-bit absmax, their fp32 absmax per 256, offset, 256-entry code
            constants += qs.state2.absmax.numel() * 4 + 4 + qs.state2.code.numel() * qs.state2.code.element_size()
        # the same layer without double quantization: one fp32 absmax per block of the weight, the same code
        alone += m.weight.numel() * m.weight.element_size() + 4 * -(-n // qs.blocksize) + code
    bits = 8 * (packed + constants) / max(params, 1)
    bits_alone = 8 * alone / max(params, 1)
    return {"quantized_parameters": params, "packed_weight_bytes": packed, "quantization_constant_bytes": constants,
            "blocks_4bit_bytes": packed + constants, "bits_per_parameter_nf4_dq": round(bits, 4),
            "bits_per_parameter_nf4_alone": round(bits_alone, 4),
            "dq_saves_bits_per_parameter": round(bits_alone - bits, 4),
            "footprint_bytes": int(base.get_memory_footprint())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (tests)")
    ap.add_argument("--shape", default=None, help="random_llama shape (default 8b; tiny with --smoke)")
    ap.add_argument("--blocks", type=int, default=None, help="decoder blocks (default: the shape's full count)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 64 with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="steps per phase, the first a warm-up (default 6; 3)")
    ap.add_argument("--optim", default=None, help="default paged_adamw_8bit on CUDA, adamw_torch on the CPU")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; phases not begun by then are skipped")
    ap.add_argument("--workdir", default="/tmp/qlora-bench")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/qlora_speed[-smoke].json)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    from random_llama import SHAPES, random_model

    from qaas.worker.engine.finetune.model import DTYPES, base_config, load_base

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    shape = args.shape or ("tiny" if args.smoke else "8b")
    blocks = args.blocks or SHAPES[shape].full_blocks
    seq = args.seq or (64 if args.smoke else 2048)
    steps = args.steps or (3 if args.smoke else 6)
    optim = args.optim or ("paged_adamw_8bit" if device.type == "cuda" else "adamw_torch")
    workdir = Path(args.workdir)
    model = random_model(workdir, shape, blocks)
    t_written = time.perf_counter()
    used_qc, prequantized = base_config(QC, model.path, device)
    _reset_peak(device)
    base = load_base(model.path, used_qc, prequantized, device, allow_remote_code=False)
    loaded = {"load_s": round(time.perf_counter() - t_written, 2), "peak_memory_bytes": _peak(device),
              "allocated_bytes": int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[shape].vocab, (seq,), generator=gen).tolist()
    report: dict[str, Any] = {
        "what": "QLoRA training step: qaas' loop against transformers Trainer + peft + bitsandbytes, same base and batches",
        "weights": "random (Llama-shaped); loss values are meaningless, speed and memory are not",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": model.describe(), "quantization_config": used_qc, "lora": LORA,
        "seq": seq, "batch": 1, "steps_per_phase": steps, "optim": optim, "write_s": round(t_written - t0, 2),
        "base": {**loaded, **memory_model(base)}, "phases": [], "skipped": []}
    try:
        import bitsandbytes, peft, transformers  # noqa: E401

        report["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                              "bitsandbytes": bitsandbytes.__version__}
    except ImportError:
        pass
    plan = [("qaas", True), ("peer", True), ("qaas", False), ("peer", False)]
    for impl, ckpt in plan:
        if time.perf_counter() - t0 > args.budget:
            report["skipped"].append({"impl": impl, "gradient_checkpointing": ckpt, "why": "budget"})
            continue
        kw = dict(steps=steps, ckpt=ckpt, optim=optim, device=device)
        try:
            r = (run_ours(base, ids, compute_dtype=DTYPES[used_qc["bnb_4bit_compute_dtype"]], **kw) if impl == "qaas"
                 else run_peer(base, ids, workdir=workdir, **kw))
        except torch.cuda.OutOfMemoryError as exc:
            r = {"impl": impl, "gradient_checkpointing": ckpt, "error": f"out of memory: {exc}"[:300]}
            _free(device)
        report["phases"].append(r)
        print(json.dumps(r), flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"qlora_speed{'-smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _gb(n: Any) -> str:
    return f"{n / 1e9:.2f} GB" if isinstance(n, (int, float)) else "–"


def markdown(report: dict[str, Any]) -> str:
    b = report["base"]
    lines = [f"# QLoRA training speed ({report['device']})", "",
             f"{report['model']['shape']} shape, {report['model']['blocks']} blocks, random weights; NF4 + double quant, "
             f"compute {report['quantization_config'].get('bnb_4bit_compute_dtype')}; LoRA r={LORA['r']} on all linear "
             f"layers; batch 1 x {report['seq']} tokens; {report['optim']}; {report['steps_per_phase']} steps per phase "
             "(median after the first).", "",
             "| impl | grad ckpt | median step s | tokens/s | peak memory |", "|---|---|---:|---:|---:|"]
    for p in report["phases"]:
        if "error" in p:
            lines.append(f"| {p['impl']} | {p['gradient_checkpointing']} | {p['error']} | | |")
            continue
        lines.append(f"| {p['impl']} | {'on' if p['gradient_checkpointing'] else 'off'} | {p['median_step_s']:.3f} | "
                     f"{p['tokens_per_s']:.0f} | {_gb(p['peak_memory_bytes'])} |")
    for s in report["skipped"]:
        lines.append(f"| {s['impl']} | {'on' if s['gradient_checkpointing'] else 'off'} | skipped ({s['why']}) | | |")
    lines += ["", "Base in 4-bit:", "",
              f"- blocks' 4-bit weights + constants: {_gb(b['blocks_4bit_bytes'])} for {b['quantized_parameters']:,} "
              f"parameters = {b['bits_per_parameter_nf4_dq']} bits/parameter with double quant; NF4 alone "
              f"{b['bits_per_parameter_nf4_alone']} (saves {b['dq_saves_bits_per_parameter']} bits/parameter)",
              f"- whole model footprint {_gb(b['footprint_bytes'])} (embedding and head in 16-bit); "
              f"GPU memory after load {_gb(b.get('allocated_bytes'))}, load {b['load_s']} s", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
