"""Why GPTQ sym g128 loses to RTN sym g128 on SmolLM2-135M in bench/results/awq_quality.md (only the 30 down_proj,
1536 wide, are quantizable at g128): each down_proj quantized alone from the float model's inputs, the output error
(GPTQ's objective, tr(dW H dW^T)) as a fraction of RTN's on the calibration inputs and on the evaluation text's own
inputs, and the WikiText-2 perplexity with all 30 replaced, for GPTQ settings and for GPTQ given the evaluation
text's Hessian (an oracle: what GPTQ does when the calibration represents the evaluation).

    QAAS_TEST_ASSETS=../shared/assets python bench/gptq_calibration_fit.py SMOLLM2_FP32_DIR

Calibration: tinyshakespeare, 16 x 512 tokens, seed 0 (awq_quality's tokens); evaluation: WikiText-2 test, 2 x 2048.
Not true-sequential (each layer sees the float model's inputs); writes bench/results/gptq_calibration_fit.json.
"""
import json, os, sys, time, torch
from pathlib import Path
from transformers import AutoTokenizer
from qaas.worker.engine.calibration_data import load_calibration
from qaas.worker.engine.evaluate import load_eval_data, perplexity, load_original_model
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.gptq_algorithm import gptq_quantize, rtn_quantize, output_error
torch.set_num_threads(2)
src = sys.argv[1]
A = os.environ.get("QAAS_TEST_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))
tok = AutoTokenizer.from_pretrained(src)
calib = load_calibration(f"{A}/text/tinyshakespeare/input.txt", tok, nsamples=16, seqlen=512, seed=0,
                         sources=EngineOptions(allowed_roots=("/",)).calibration_sources())
print("calibration sha256", calib.sha256[:16], flush=True)
data = load_eval_data(src, f"{A}/text/wikitext-2-raw-v1/test.joined.txt", seqlen=2048, max_windows=2)
model = load_original_model(src, device="cpu").float()
downs = {n: m for n, m in model.named_modules() if n.endswith("mlp.down_proj")}
H = {"calib": {}, "eval": {}}
def collect(ids, key):
    hs = []
    def hook(name):
        def f(m, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[key][name] = H[key].get(name, 0) + x.t() @ x
        return f
    hs = [m.register_forward_hook(hook(n)) for n, m in downs.items()]
    n = 0
    with torch.no_grad():
        for row in ids:
            model(row[None]); n += row.numel()
    for h in hs: h.remove()
    for k in H[key]: H[key][k] = (2 * H[key][k] / n).float()
collect(calib.input_ids, "calib"); collect(data.input_ids, "eval")
print("hessians", flush=True)
W0 = {n: m.weight.detach().clone() for n, m in downs.items()}
base = perplexity(model, data, device="cpu"); print("fp32", base, flush=True)
d = torch.diag(H["calib"][next(iter(downs))]); print("diag max/median", float(d.max() / d.median()), flush=True)
configs = {"rtn": None,
           "gptq gar damp0.01": dict(act_group_aware=True, damp_percent=0.01),
           "gptq none damp0.01": dict(act_group_aware=False, damp_percent=0.01),
           "gptq gar damp0.1": dict(act_group_aware=True, damp_percent=0.1),
           "gptq act damp0.01": dict(desc_act=True, damp_percent=0.01),
           "gptq gar damp0.01 H=eval": dict(act_group_aware=True, damp_percent=0.01, H="eval")}
out = {}
for name, c in configs.items():
    t = time.time(); ec, ee = [], []
    with torch.no_grad():
        for n, m in downs.items():
            W = W0[n]
            if c is None:
                Q = rtn_quantize(W, bits=4, group_size=128, sym=True)
            else:
                kw = {k: v for k, v in c.items() if k != "H"}
                Q = gptq_quantize(W, H[c.get("H", "calib")][n], bits=4, group_size=128, sym=True, backend="torch", **kw).Q
            R = rtn_quantize(W, bits=4, group_size=128, sym=True)
            ec.append(output_error(W, Q, H["calib"][n]) / output_error(W, R, H["calib"][n]))
            ee.append(output_error(W, Q, H["eval"][n]) / output_error(W, R, H["eval"][n]))
            m.weight.copy_(Q)
        ppl = perplexity(model, data, device="cpu")
        for n, m in downs.items(): m.weight.copy_(W0[n])
    out[name] = dict(ppl=ppl, calib_err_vs_rtn=sum(ec) / len(ec), eval_err_vs_rtn=sum(ee) / len(ee),
                     eval_err_worst=max(ee), worst_layer=list(downs)[ee.index(max(ee))], s=time.time() - t)
    print(name, json.dumps(out[name]), flush=True)
res = {"calibration_sha256": calib.sha256, "fp32_ppl": base, "torch": torch.__version__, "configs": out}
(Path(__file__).resolve().parent / "results" / "gptq_calibration_fit.json").write_text(json.dumps(res, indent=1) + "\n")
