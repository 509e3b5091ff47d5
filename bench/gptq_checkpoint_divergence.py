"""How far apart two GPTQ checkpoints of one source are, layer by layer in the order GPTQ quantized them: where
two runs that should agree part ways.

    nice -n 10 python bench/gptq_checkpoint_divergence.py SOURCE_DIR CKPT_A CKPT_B

Per linear of each block: ||Q_a - Q_b|| / ||Q_b - W|| (the two dequantized weights' distance as a fraction of B's
quantization error; 0 = the same weights, about 1.4 = two independent errors of the same size) and `*` where their
g_idx differ (act-order's column order, hence which columns share a scale, is not the same). Both read through
bench/gptq_vs_gptqmodel.py's independent dequantizer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_vs_gptqmodel import dequantize_gptq  # noqa: E402  (one dequantizer for every comparison)

# the order of the sequential groups within a Llama block (true_sequential)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def tensors(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def gptq_format(folder: str) -> tuple[int, bool]:
    """(bits, whether the zeros are stored v1-style, zero - 1)."""
    qc = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    return int(qc["bits"]), qc.get("checkpoint_format", qc.get("format", "gptq")) == "gptq"


def divergence(src: str, a: str, b: str) -> list[dict[str, dict[str, float | bool]]]:
    W0, A, B = tensors(src), tensors(a), tensors(b)
    fa, fb = gptq_format(a), gptq_format(b)
    blocks = []
    i = 0
    while f"model.layers.{i}.{LINEARS[0]}.weight" in W0:
        row = {}
        for lin in LINEARS:
            m = f"model.layers.{i}.{lin}"
            if f"{m}.qweight" not in A or f"{m}.qweight" not in B:
                continue
            W = W0[m + ".weight"].float()

            def dq(T, fmt):
                parts = {s: T[f"{m}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
                return dequantize_gptq(parts, fmt[0], W.shape[1], W.shape[0], fmt[1])

            qa, qb = dq(A, fa), dq(B, fb)
            row[lin] = {"distance": float((qa - qb).norm() / (qb - W).norm()),
                        "g_idx_equal": bool(torch.equal(A[m + ".g_idx"], B[m + ".g_idx"]))}
        blocks.append(row)
        i += 1
    return blocks


def main() -> None:
    src, a, b = sys.argv[1:4]
    for i, row in enumerate(divergence(src, a, b)):
        print(f"block {i:2d}: " + " | ".join(f"{k.split('.')[1]} {v['distance']:.3f}{'' if v['g_idx_equal'] else '*'}"
                                             for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
