"""GPTQ on single real layers, qaas against GPTQModel's own `GPTQ` class: the same weight and the same calibration
inputs, so that the layer objective and the chosen codes, scales, zeros and g_idx can be compared with the rest of
the pipeline (inputs of later blocks, write-back, loaders) taken out.

    QAAS_TEST_ASSETS=/work/shared/assets nice -n 10 python bench/gptq_layer_vs_gptqmodel.py \
        --src ~/.cache/qaas-bench/smollm2-fp32 --layers model.layers.0.self_attn.q_proj,model.layers.0.mlp.down_proj

Inputs: each named linear's input on the unquantized model for bench/gptq_vs_gptqmodel.py's calibration windows
(tinyshakespeare, `--nsamples` x `--calib-seqlen`, `--seed`; the same token sha256), one window per forward.
GPTQModel gets them through `add_batch`, one window at a time (its float32 Hessian); qaas gets H = 2/n X^T X summed
in float64 (its accumulator's precision). The Hessians differ by float32 rounding only: codes that differ come from
that, not from the algorithm (tests/engine/test_gptq_quality.py::test_gptq_layer_is_gptqmodels feeds both one
Hessian and requires equal codes).

Per layer and config: g_idx equal, share of codes that differ, the objective tr((W - Q) H (W - Q)^T) as a fraction of
round-to-nearest's for qaas's stored weights and GPTQModel's (float16 scales, as its checkpoint holds them; and its
float32-scale weights, what it writes back into the block).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_vs_gptqmodel import SHAKESPEARE  # noqa: E402  (the sweep's calibration text)

PEER = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from gptqmodel import QuantizeConfig
from gptqmodel.quantization.gptq import GPTQ
t = load_file(sys.argv[1]); names = json.loads(sys.argv[2]); cfgs = json.loads(sys.argv[3]); window = int(sys.argv[5])
out = {}
for n in names:
    W, X = t[n + ".W"], t[n + ".X"]
    for i, c in enumerate(cfgs):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data.copy_(W)
        g = GPTQ(lin, QuantizeConfig(bits=c["bits"], group_size=c["group_size"], sym=c["sym"], desc_act=c["desc_act"],
                                     act_group_aware=c["act_group_aware"], damp_percent=c["damp_percent"]))
        g.quantizer.configure(perchannel=True)  # what GPTQModel's GPTQProcessor does for every layer
        for r in range(0, X.shape[0], window):
            g.add_batch(X[r : r + window].unsqueeze(0), None)
        Q, scale, zero, g_idx, *_ = g.quantize()
        out.update({f"{n}.{i}.Q": Q.float().contiguous(), f"{n}.{i}.scale": scale.float().contiguous(),
                    f"{n}.{i}.zero": zero.float().contiguous(), f"{n}.{i}.g_idx": g_idx.int().contiguous()})
save_file(out, sys.argv[4])
"""


@torch.no_grad()
def capture(src: str, names: list[str], nsamples: int, seqlen: int, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """Each named linear's weight and its inputs on the unquantized model for the calibration windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qaas.worker.engine.calibration_data import load_calibration
    from qaas.worker.engine.options import EngineOptions

    calib = load_calibration(str(SHAKESPEARE), AutoTokenizer.from_pretrained(src), nsamples=nsamples, seqlen=seqlen,
                             seed=seed, sources=EngineOptions(allowed_roots=("/",)).calibration_sources())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, inp, _o, n=n: xs[n].append(inp[0].reshape(-1, inp[0].shape[-1]).clone())) for n in names]
    for row in calib.input_ids:
        model(row[None])
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        out[n + ".X"] = torch.cat(xs[n]).contiguous()
        out[n + ".W"] = model.get_submodule(n).weight.detach().contiguous()
    return out, calib.sha256


def main() -> None:
    from safetensors.torch import load_file, save_file

    from qaas.worker.engine.gptq_algorithm import gptq_quantize, output_error, rtn_quantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated module names")
    ap.add_argument("--configs", default="3:64", help="bits:group_size list")
    ap.add_argument("--orderings", default="act,gar,none")
    ap.add_argument("--sym", default="sym,asym")
    ap.add_argument("--damp", type=float, default=0.1)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON file for the table's numbers")
    a = ap.parse_args()

    names = a.layers.split(",")
    cfgs = [dict(bits=int(c.split(":")[0]), group_size=int(c.split(":")[1]), sym=s == "sym", desc_act=o == "act",
                 act_group_aware=o == "gar", damp_percent=a.damp)
            for c in a.configs.split(",") for s in a.sym.split(",") for o in a.orderings.split(",")]
    tensors, sha = capture(a.src, names, a.nsamples, a.calib_seqlen, a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inp, peer_out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file(tensors, str(inp))
        # GPTQModel patches transformers and torch when imported: a child process
        r = subprocess.run([sys.executable, "-P", "-c", PEER, str(inp), json.dumps(names), json.dumps(cfgs),
                            str(peer_out), str(a.calib_seqlen)], capture_output=True, text=True,
                           env={**os.environ, "GPTQMODEL_CPU_WORKERS": "1", "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        peer = load_file(str(peer_out))
    print(f"calibration sha256 {sha[:16]}; objective as a fraction of round-to-nearest's")
    print("| layer | config | g_idx equal | codes differing | qaas | GPTQModel (float16 scales) | GPTQModel (float32) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        W, X = tensors[n + ".W"], tensors[n + ".X"]
        H = (2 * X.t().double() @ X.double() / X.shape[0]).float()
        for i, c in enumerate(cfgs):
            ours = gptq_quantize(W, H, backend="torch", **c)
            g_idx = peer[f"{n}.{i}.g_idx"].long()
            scale, zero = peer[f"{n}.{i}.scale"][:, g_idx], peer[f"{n}.{i}.zero"][:, g_idx]
            codes = torch.round(peer[f"{n}.{i}.Q"] / scale + zero)
            stored = (codes - zero) * scale.half().float()
            base = output_error(W, rtn_quantize(W, bits=c["bits"], group_size=c["group_size"], sym=c["sym"]), H)
            order = "act" if c["desc_act"] else "gar" if c["act_group_aware"] else "none"
            row = {"layer": n, "config": f"{c['bits']}:{c['group_size']} {order} {'sym' if c['sym'] else 'asym'}",
                   "g_idx_equal": bool(torch.equal(ours.g_idx.long(), g_idx)),
                   "codes_differing": float((ours.codes.float() != codes).float().mean()),
                   "qaas": output_error(W, ours.Q, H) / base, "gptqmodel_f16": output_error(W, stored, H) / base,
                   "gptqmodel_f32": output_error(W, peer[f"{n}.{i}.Q"], H) / base}
            rows.append(row)
            print(f"| {n} | {row['config']} | {row['g_idx_equal']} | {row['codes_differing']:.2e} | {row['qaas']:.5f} "
                  f"| {row['gptqmodel_f16']:.5f} | {row['gptqmodel_f32']:.5f} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"calibration_sha256": sha, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
