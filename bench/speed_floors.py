"""Arithmetic floors of issue 17's jobs: FLOPs and bytes per phase of the GPTQ jobs at the Llama-3-8B and -70B
shapes, of today's evaluation stage, and of the NF4 quantize kernels, over the ceilings measured on the H200.
Prints the Markdown tables of bench/NOTES-speed.md (`python bench/speed_floors.py`); no GPU needed.

Counting (one multiply-add = 2 FLOPs; T = calibration tokens; per decoder block):
* forward passes, as the engine runs them today (true-sequential, `BlockRunner.collect` stops each pass once the
  group's layers have seen their input): pass 1 (q/k/v) = the input norm only; pass 2 (o) = q/k/v + attention;
  pass 3 (gate/up) = + o; pass 4 (down) = + gate/up; then the quantized block's forward for the next block's
  inputs = all of it. "One pass per layer" is the floor of an engine that computes each layer's input once (the
  quantized block's forward, each layer's output reused as the next layer's input as soon as that layer is done).
  Attention = QK^T and PV at causal cost (half of 4 s^2 h per sequence: flash kernels skip the masked tiles).
* Hessians: X^T X per input class (q/k/v share one, gate/up share one): 2 T in^2 as a full matrix product
  (a symmetric rank-k update would need half); exact on fp16 tensor cores with fp32 accumulation for fp16
  activations, on TF32 today (half the fp16 rate).
* GPTQ per layer (R = out, C = in, lazy blocks of B = 128): the lazy updates R C^2 + the in-block column loop
  R C B (fp32 today); the factorization (Cholesky of H, its inverse, the Cholesky of the inverse) 4/3 C^3 in
  fp32, computed once per layer today (q/k/v and gate/up recompute the same factor); the layer metric
  tr(dW H dW^T) 2 R C^2 (TF32).
* Bytes: fp16 weights read from storage and moved host -> device once; the packed 4-bit output (4 bits + one
  fp16 scale and packed zero per 128) plus the fp16 embedding, norms and head written once.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
from random_llama import SHAPES, Shape  # noqa: E402

#: ceilings measured on the lent H200 (PERFORMANCE.md), and two rates the datasheet gives where none was measured
PEAK_FP16_TC = 790e12  # bf16/fp16 dense matrix product, measured
PEAK_TF32_TC = PEAK_FP16_TC / 2  # datasheet ratio (TF32 dense is half the fp16 rate on Hopper)
PEAK_FP32 = 67e12  # datasheet, non-tensor-core fp32
COPY_BPS = 4.22e12  # device-to-device copy, bytes read + written, measured
H2D_BPS = 50e9  # pinned host -> device over PCIe, measured on the H100 machine (49-55 GB/s)
TOKENS = 128 * 2048
EVAL_TOKENS = 16 * 2048
SEQ = 2048
B = 128


def forward_flops(s: Shape, tokens: int) -> dict[str, float]:
    """FLOPs of the pieces of one block's forward over `tokens` tokens (sequences of SEQ)."""
    lin = s.linears()
    mm = {k: 2.0 * tokens * o * i for k, (o, i) in lin.items()}
    attn = 2.0 * tokens * SEQ * s.heads * s.head_dim  # causal QK^T + PV
    qkv = mm["self_attn.q_proj"] + mm["self_attn.k_proj"] + mm["self_attn.v_proj"]
    o = mm["self_attn.o_proj"]
    gu = mm["mlp.gate_proj"] + mm["mlp.up_proj"]
    down = mm["mlp.down_proj"]
    return {"qkv": qkv, "attn": attn, "o": o, "gate_up": gu, "down": down}


def gptq_block(s: Shape, tokens: int = TOKENS) -> dict[str, float]:
    f = forward_flops(s, tokens)
    full = sum(f.values())
    passes_today = (0.0 + (f["qkv"] + f["attn"]) + (f["qkv"] + f["attn"] + f["o"])
                    + (f["qkv"] + f["attn"] + f["o"] + f["gate_up"]) + full)
    h, inter = s.hidden, s.intermediate
    hess = 2.0 * tokens * (h * h + h * h + h * h + inter * inter)  # q/k/v, o, gate/up, down inputs
    lazy = col = fact = metric = 0.0
    for o_, i_ in s.linears().values():
        lazy += o_ * i_ * i_
        col += o_ * i_ * B
        fact += 4.0 / 3.0 * i_**3
        metric += 2.0 * o_ * i_ * i_
    fact_shared = 4.0 / 3.0 * (3 * h**3 + inter**3)  # once per distinct Hessian
    return {"forward_today": passes_today, "forward_one_pass": full, "hessian": hess, "gptq_updates": lazy + col,
            "factorization": fact, "factorization_shared": fact_shared, "layer_metric": metric}


def job_bytes(s: Shape, blocks: int) -> dict[str, float]:
    w = sum(o * i for o, i in s.linears().values())
    per_block_in = 2.0 * (w + 2 * s.hidden)
    per_block_out = w * (0.5 + 2 / 128 + 0.5 / 128) + 4 * s.hidden  # codes, fp16 scales, packed zeros; norms
    outside = 2.0 * (2 * s.vocab * s.hidden + s.hidden)  # embedding, head, final norm (fp16, read and written)
    return {"read": blocks * per_block_in + outside, "written": blocks * per_block_out + outside}


def gptq_table(name: str) -> list[str]:
    s = SHAPES[name]
    n = s.full_blocks
    g = gptq_block(s)
    by = job_bytes(s, n)
    rows = [
        ("calibration forwards, today's 4 passes + quantized forward", g["forward_today"], PEAK_FP16_TC, "fp16 TC"),
        ("  the same, one pass per layer (floor of a re-organized engine)", g["forward_one_pass"], PEAK_FP16_TC,
         "fp16 TC"),
        ("Hessians X^T X (fp16 TC, exact; TF32 today = 2x)", g["hessian"], PEAK_FP16_TC, "fp16 TC"),
        ("GPTQ lazy updates + column loops (fp32 today)", g["gptq_updates"], PEAK_FP32, "fp32"),
        ("Cholesky + inverse + Cholesky, once per layer (today)", g["factorization"], PEAK_FP32, "fp32"),
        ("  the same, once per distinct Hessian", g["factorization_shared"], PEAK_FP32, "fp32"),
        ("layer metric tr(dW H dW^T) (TF32)", g["layer_metric"], PEAK_TF32_TC, "TF32 TC"),
    ]
    L = [f"### {name.upper()} shape: hidden {s.hidden}, MLP {s.intermediate}, {s.heads}/{s.kv_heads} heads, "
         f"{n} blocks, {TOKENS:,} calibration tokens", "",
         "| phase | per block TFLOP | whole job PFLOP | at | floor s |", "|---|---:|---:|---|---:|"]
    for label, fl, peak, unit in rows:
        L.append(f"| {label} | {fl / 1e12:,.1f} | {fl * n / 1e15:,.2f} | {unit} {peak / 1e12:.0f} TFLOP/s | "
                 f"{fl * n / peak:,.1f} |")
    best = (g["forward_one_pass"] / PEAK_FP16_TC + g["hessian"] / PEAK_FP16_TC + g["gptq_updates"] / PEAK_FP32
            + g["factorization_shared"] / PEAK_FP32) * n
    today_shape = (g["forward_today"] / PEAK_FP16_TC + 2 * g["hessian"] / PEAK_FP16_TC + g["gptq_updates"] / PEAK_FP32
                   + g["factorization"] / PEAK_FP32 + g["layer_metric"] / PEAK_TF32_TC) * n
    L += ["", f"Bytes: {by['read'] / 1e9:.1f} GB of fp16 weights read ({by['read'] / H2D_BPS:.1f} s host -> device at "
          f"{H2D_BPS / 1e9:.0f} GB/s; from storage at 2-7 GB/s: {by['read'] / 7e9:.0f}-{by['read'] / 2e9:.0f} s unless "
          f"cached or overlapped), {by['written'] / 1e9:.1f} GB written.",
          f"Compute floor with today's structure (4 passes + quantized forward, TF32 Hessians, factor per layer, "
          f"metric): **{today_shape:.0f} s**; with one pass per layer, fp16 Hessians, one factor per Hessian: "
          f"**{best:.0f} s** ({best / n:.2f} s per block). Load and write overlap with compute in a pipelined "
          "engine; otherwise add them.", ""]
    return L


def eval_table() -> list[str]:
    L = ["### Evaluation, 16 x 2048 tokens", "",
         "| shape | forward TFLOP (one model) | two models at fp16 TC s | weights GB (one model) | host -> device of "
         "both s |", "|---|---:|---:|---:|---:|"]
    for name in ("8b", "70b"):
        s = SHAPES[name]
        f = sum(forward_flops(s, EVAL_TOKENS).values()) * s.full_blocks + 2.0 * EVAL_TOKENS * s.vocab * s.hidden
        w = job_bytes(s, s.full_blocks)["read"]
        L.append(f"| {name} | {f / 1e12:,.0f} | {2 * f / PEAK_FP16_TC:.1f} | {w / 1e9:.0f} | {2 * w / H2D_BPS:.1f} |")
    L += ["", "Block-streamed (the quantization's own stream of blocks, each block's forward on the evaluation "
          "windows beside the calibration ones) the weights move once more at most; the evaluation's arithmetic is "
          f"1/{TOKENS // EVAL_TOKENS} of one calibration forward per model.", ""]
    return L


def nf4_table() -> list[str]:
    L = ["### NF4 quantize (bitsandbytes layout, blocksize 64, fp16 in)", "",
         "| shape | elements | NF4 bytes (read 2n, write n/2 + 4n/64) | floor µs | NF4 + DQ bytes | floor µs |",
         "|---|---:|---:|---:|---:|---:|"]
    for a, b in [(4096, 4096), (14336, 4096), (28672, 8192)]:
        n = a * b
        q = 2 * n + n // 2 + 4 * (n // 64)
        dq = q - 4 * (n // 64) + (n // 64) + 4 * (n // 64 // 256)
        L.append(f"| {a}x{b} | {n:,} | {q / 1e6:,.1f} MB | {q / COPY_BPS * 1e6:,.0f} | {dq / 1e6:,.1f} MB | "
                 f"{dq / COPY_BPS * 1e6:,.0f} |")
    L += ["", "(bench/bnb_kernels.py counts the same bytes; the double quant's absmax round trip through memory, "
          "4n/64 written and read again, is not in the floor: a fused kernel keeps it on chip.)", ""]
    return L


def main() -> int:
    print("\n".join(gptq_table("8b") + gptq_table("70b") + eval_table() + nf4_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
