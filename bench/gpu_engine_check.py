"""End-to-end engine check on a GPU: our CUDA exports against transformers + bitsandbytes on the same GPU.

For each bitsandbytes variant, a model is quantized by the engine (Triton kernels, block at a time) and,
separately, loaded by transformers with the equivalent BitsAndBytesConfig on CUDA and saved with
save_pretrained. Every tensor both quantized is compared byte for byte, and our export is loaded back
with transformers and its logits compared with the bitsandbytes-quantized original. A GPTQ job runs too.

Run on the GPU machine (see bench/gpu_env.sh):  python -P bench/gpu_engine_check.py --stories DIR --text FILE
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize

VARIANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype="bfloat16"),
    "int8": dict(load_in_8bit=True),
}


def tiny_llama(path: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(path)
    for f in tokenizer_dir.glob("tokenizer*"):
        (path / f.name).write_bytes(f.read_bytes())
    return path


def compare(ours: Path, theirs: Path) -> dict:
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    common = sorted(set(a) & set(b))
    differing = [k for k in common if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.uint8 else a[k], b[k].view(torch.uint8) if b[k].dtype == torch.uint8 else b[k])]
    return {"keys_ours": len(a), "keys_theirs": len(b), "common": len(common), "only_ours": sorted(set(a) - set(b))[:5],
            "only_theirs": sorted(set(b) - set(a))[:5], "differing": differing[:10], "n_differing": len(differing)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stories", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", default="gpu_engine_check.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    src = tiny_llama(work / "tiny", Path(a.stories))
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": {}}
    ids = torch.randint(0, 512, (1, 64), device="cuda")
    for name, fields in VARIANTS.items():
        qc = {"quant_method": "bitsandbytes", **fields}
        out = work / f"ours-{name}"
        t = time.time()
        res = quantize({"path": str(src)}, qc, out, options=EngineOptions(device="cuda", allowed_roots=(str(work),),
                                                                         eval_text_path=a.text, eval_max_windows=4))
        took = time.time() - t
        theirs = work / f"bnb-{name}"
        ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**fields), device_map="cuda")
        ref.save_pretrained(theirs)
        with torch.no_grad():
            ref_logits = ref(ids).logits.float()
        del ref
        mine = AutoModelForCausalLM.from_pretrained(out, device_map="cuda")
        with torch.no_grad():
            my_logits = mine(ids).logits.float()
        del mine
        cmp = compare(out, theirs)
        report["variants"][name] = {
            "seconds": round(took, 2), "skipped_modules": res["skipped_modules"], "evaluation": res["evaluation"],
            "bytes": cmp, "max_abs_logit_diff": float((my_logits - ref_logits).abs().max()),
        }
        print(name, json.dumps(report["variants"][name]), flush=True)
    # GPTQ on CUDA: a job through the same pipeline, and on stories260K
    text = Path(a.text).read_text()
    for label, path in (("gptq-tiny", src), ("gptq-stories", Path(a.stories))):
        out = work / label
        t = time.time()
        res = quantize({"path": str(path)}, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                             "dataset": [text[:200000]], "nsamples": 32, "model_seqlen": 256},
                       out, options=EngineOptions(device="cuda", allowed_roots=(str(work), a.stories),
                                                  eval_text_path=a.text, eval_max_windows=4))
        report[label] = {"seconds": round(time.time() - t, 2), "evaluation": res["evaluation"],
                         "skipped": len(res["skipped_modules"]), "layer_error_mean": res["layer_errors"]["mean"]}
        print(label, json.dumps(report[label]), flush=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
