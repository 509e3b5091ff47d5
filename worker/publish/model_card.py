"""The model card (`README.md`) of a published quantized model.

`render_model_card(info)` takes one plain dict, assembled by the caller from the job request and result:

    {
      "repo_id": "alice/Llama-3.2-1B-GPTQ-4bit-g128",      # where it is published (load snippets)
      "revision": None,                                    # branch, when not main
      "source": {"id": "meta-llama/Llama-3.2-1B", "revision": "<commit sha>"},
      "quantization_config": {...},                        # exactly what config.json carries
      "calibration": {"dataset": "c4", "num_samples": 128, "seqlen": 2048, "tokens": 262144},  # GPTQ; optional
      "evaluation": {"dataset": "wikitext2", "seqlen": 2048,
                     "perplexity_before": 9.12, "perplexity_after": 9.47},                    # optional
      "size": {"before_bytes": 2471645608, "after_bytes": 1009431552},                        # optional
      "gptq": {"checkpoint_format": {"written": "gptq_v2", "requested": "gptq", "reason": "..."},
               "engines": [{"engine": "vllm", "title": ..., "loads": False, "why_not": ..., "source": ...}]},
      "bitsandbytes": {"runs_on": {"devices": ["cuda"], "note": "..."}},   # the result's method details; optional
      "license": "apache-2.0", "job_id": "…", "qaas_version": "0.1.0", "endpoint": "https://huggingface.co",
    }

The YAML front matter carries `base_model`, `base_model_relation: quantized`, `library_name: transformers`,
`tags` (method, bits, `qaas`) and `source_revision`; it parses with huggingface_hub's `ModelCard` and passes the
Hub's metadata validation. The body states the recipe, the calibration data, the quality measured, the sizes
and load snippets (transformers; vLLM for GPTQ, AWQ and compressed-tensors).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Methods whose quantization reads calibration data, and what they do with it (the card's sentence).
CALIBRATED = {"gptq": "GPTQ minimises each layer's output error on calibration activations",
              "awq": "AWQ searches per-channel scales that protect the weights of the most active input channels, "
                     "on calibration activations"}
METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "gguf": "GGUF",
                "compressed-tensors": "compressed-tensors"}


def method_and_bits(qc: dict[str, Any]) -> tuple[str, int]:
    """("gptq", 4) / ("awq", 4) / ("bitsandbytes", 4) / ("bitsandbytes", 8) from a quantization_config."""
    method = str(qc.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return method, int(qc.get("bits", 4))
    if method == "bitsandbytes":
        eight = qc.get("load_in_8bit") or qc.get("_load_in_8bit")
        return "bitsandbytes", 8 if eight else 4
    if method == "gguf":
        from qaas.quantization_rules.gguf import bits

        return "gguf", bits(qc) or 16
    if method == "compressed-tensors":
        weights = (next(iter((qc.get("config_groups") or {}).values()), None) or {}).get("weights") or {}
        return "compressed-tensors", int(weights.get("num_bits") or 8)
    raise ValueError(f"unknown quant_method {qc.get('quant_method')!r}")


def ct_scheme(qc: dict[str, Any]) -> str:
    """The llm-compressor preset a compressed-tensors config_group is (FP8_DYNAMIC, W4A16, ...), read back from
    its weights and input activations."""
    group = next(iter((qc.get("config_groups") or {}).values()), None) or {}
    w, x = group.get("weights") or {}, group.get("input_activations")
    if w.get("type") == "float":
        return {"channel": "FP8_DYNAMIC", "tensor": "FP8", "block": "FP8_BLOCK"}.get(w.get("strategy"), "FP8")
    if x:
        return f"W{w.get('num_bits')}A8"
    return f"W{w.get('num_bits')}A16"


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def _metadata(info: dict[str, Any], method: str, bits: int) -> dict[str, Any]:
    source = info.get("source") or {}
    meta: dict[str, Any] = {}
    if info.get("license"):
        meta["license"] = str(info["license"])
    meta["base_model"] = str(source["id"])
    meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [method, f"{bits}-bit", "qaas"]
    if source.get("revision"):
        meta["source_revision"] = str(source["revision"])
    calib = _calibration(info, method)
    if calib and calib.get("dataset") and "/" in str(calib["dataset"]):  # a Hub dataset id
        meta["datasets"] = [str(calib["dataset"])]
    return meta


def _calibration(info: dict[str, Any], method: str) -> dict[str, Any] | None:
    if method not in CALIBRATED and not (method == "compressed-tensors" and info.get("calibration")):
        return None
    calib = dict(info.get("calibration") or {})
    if "dataset" not in calib and calib.get("source"):  # the engine's CalibrationSet.describe()
        calib["dataset"] = calib["source"]
    if "num_samples" not in calib and calib.get("samples") is not None:
        calib["num_samples"] = calib["samples"]
    qc = info.get("quantization_config") or {}
    if "dataset" not in calib and qc.get("dataset") is not None:
        calib["dataset"] = qc["dataset"]
    if "seqlen" not in calib and qc.get("model_seqlen"):
        calib["seqlen"] = qc["model_seqlen"]
    return calib or None


def _recipe_rows(qc: dict[str, Any], method: str, bits: int) -> list[tuple[str, Any]]:
    if method == "gptq":
        keys = ["bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent", "true_sequential",
                "static_groups", "checkpoint_format", "lm_head"]
        return [("method", "GPTQ")] + [(k, qc[k]) for k in keys if k in qc]
    if method == "compressed-tensors":
        group = next(iter((qc.get("config_groups") or {}).values()), None) or {}
        w = group.get("weights") or {}
        return [("method", f"compressed-tensors {ct_scheme(qc)}"), ("format", qc.get("format")),
                ("weights", {k: w.get(k) for k in ("num_bits", "type", "strategy", "group_size", "block_structure")
                             if w.get(k) is not None}),
                ("input_activations", group.get("input_activations")), ("ignore", qc.get("ignore"))]
    if method == "awq":
        keys = ["bits", "group_size", "zero_point", "version", "modules_to_not_convert"]
        return [("method", "AWQ (GEMM)")] + [(k, qc[k]) for k in keys if k in qc]
    rows: list[tuple[str, Any]] = [("method", "bitsandbytes " + ("LLM.int8" if bits == 8 else "4-bit"))]
    keys = (["llm_int8_threshold", "llm_int8_skip_modules"] if bits == 8 else
            ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage",
             "llm_int8_skip_modules"])
    return rows + [(k, qc[k]) for k in keys if k in qc]


def _gguf_card(info: dict[str, Any]) -> str:
    """The card of a GGUF repo: one row per file (type, size, bits per weight, perplexity and its change), the
    llama.cpp / Ollama / LM Studio lines that run it, how it was made."""
    qc: dict[str, Any] = dict(info["quantization_config"])
    source = info.get("source") or {}
    source_id, repo_id = str(source["id"]), str(info["repo_id"])
    endpoint = str(info.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
    outputs = list((info.get("gguf") or {}).get("outputs") or [])
    meta: dict[str, Any] = {}
    if info.get("license"):
        meta["license"] = str(info["license"])
    meta.update({"base_model": source_id, "base_model_relation": "quantized", "library_name": "gguf",
                 "pipeline_tag": "text-generation", "tags": ["gguf", "llama.cpp", "qaas"] + [o["type"] for o in outputs]})
    if source.get("revision"):
        meta["source_revision"] = str(source["revision"])
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]
    out += [f"# {repo_id.split('/')[-1]}", ""]
    src_rev = f" at revision {_code(source['revision'])}" if source.get("revision") else ""
    out += [f"GGUF files of [{source_id}]({endpoint}/{source_id}){src_rev} for llama.cpp, Ollama and LM Studio, made "
            "with qaas (quantization as a service)" + (f", job {_code(info['job_id'])}" if info.get("job_id") else "")
            + ". Each quantized file holds the bytes llama.cpp's own `llama-quantize"
            + (" --imatrix imatrix.gguf" if qc.get("imatrix") else "") + "` writes for that type from the "
            f"{qc.get('output_type_default', 'F16')} conversion"
            + (" (`imatrix.gguf`: the importance matrix computed from the job's calibration data, in "
               "llama.cpp's format)" if qc.get("imatrix") else "") + ".", ""]
    ev = info.get("evaluation") or {}
    per_type = ev.get("per_type") or {}
    before = ev.get("perplexity_before")
    out += ["## Files", "", "| file | type | size | bits per weight | perplexity | delta |", "|---|---|---|---|---|---|"]
    for o in outputs:
        ppl = (per_type.get(o["type"]) or {}).get("perplexity")
        delta = (f"{ppl - before:+.4f} ({100 * (ppl - before) / before:+.2f}%)" if ppl is not None and before
                 else "-")
        names = ", ".join(_code(f["name"]) for f in o["files"])
        out.append(f"| {names} | {o['type']} | {_human(o['size'])} | {o['bits_per_weight']:.2f} | "
                   f"{f'{ppl:.4f}' if ppl is not None else '-'} | {delta} |")
    out.append("")
    if any(len(o["files"]) > 1 for o in outputs):
        out += ["A type in several parts (`-00001-of-0000N.gguf`) loads from its first part: llama.cpp finds "
                "the others beside it.", ""]
    if before is not None:
        where = [f"sequence length {ev['seqlen']}"] if ev.get("seqlen") else []
        if ev.get("tokens"):
            where.append(f"{ev['tokens']:,} tokens")
        out += [f"Perplexity through llama.cpp's logits (lower is better; the source model in transformers: "
                f"{before:.4f})" + (", " + ", ".join(where) if where else "") + ".", ""]
    elif ev.get("skipped"):
        out += [f"Perplexity not measured: {ev['skipped']}.", ""]
    first = next((o for o in outputs if o["type"] == "Q4_K_M"), outputs[0] if outputs else None)
    tags = [o["type"] for o in outputs] or ["Q4_K_M"]
    # Ollama's own spelling of a Hugging Face repo (hf.co/...); another Hub endpoint by its host
    host = "hf.co" if endpoint == DEFAULT_ENDPOINT else endpoint.split("://", 1)[-1]
    out += ["## How to run", "", "llama.cpp (the tag picks the file):", "", "```bash",
            *[f"llama-cli -hf {repo_id}:{t} -p \"Once upon a time\"" for t in tags], "```", "",
            "Ollama:", "", "```bash", *[f"ollama run {host}/{repo_id}:{t}" for t in tags], "```", "",
            "LM Studio: search for the repo name and pick a file.", ""]
    files = (first or {}).get("files") or []
    if len(files) == 1:  # transformers reads one GGUF file (dequantized to floating point; needs `gguf`)
        out += ["transformers (`pip install transformers gguf`; the weights are dequantized to float on load):", "",
                "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", gguf_file="{files[0]["name"]}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", gguf_file="{files[0]["name"]}")', "```", ""]
    rows = [("types", ", ".join(qc.get("types") or [])), ("conversion", qc.get("output_type_default")),
            ("importance matrix", "yes" if qc.get("imatrix") else "no"), ("split", qc.get("split_max_size") or "no")]
    out += ["## Recipe", "", "| parameter | value |", "|---|---|"]
    out += [f"| {k} | {_code(v)} |" for k, v in rows]
    out += ["", "```json", json.dumps(qc, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(out)


def _compatibility(info: dict[str, Any], method: str) -> list[str]:
    """Where the output loads: GPTQ's checkpoint format and engine list, bitsandbytes' devices."""
    out: list[str] = []
    fmt = (info.get("gptq") or {}).get("checkpoint_format") or {}
    engines = (info.get("gptq") or {}).get("engines")
    if method == "gptq" and (fmt or engines):
        out += ["## Where it loads", ""]
        if fmt.get("written"):
            out += [f"Checkpoint format: {_code(fmt['written'])}"
                    + (f" (asked: {_code(fmt['requested'])}; {fmt['reason']})" if fmt.get("reason") else "") + ".", ""]
        if engines:
            out += ["| engine | loads | why not |", "|---|---|---|"]
            out += [f"| {e.get('title') or e.get('engine')} | {'yes' if e.get('loads') else 'no'} | "
                    f"{str(e.get('why_not') or '').replace('|', '/')} |" for e in engines]
            out += ["", "Each rule was read from the engine's own source (the version is in the job result)."]
        out.append("")
    runs_on = (info.get("bitsandbytes") or {}).get("runs_on") or {}
    if method == "bitsandbytes" and runs_on:
        out += ["## Where it runs", "", f"Devices: {', '.join(runs_on.get('devices') or [])}. "
                + str(runs_on.get("note") or ""), ""]
    return out


def render_model_card(info: dict[str, Any]) -> str:
    qc: dict[str, Any] = dict(info["quantization_config"])
    method, bits = method_and_bits(qc)
    if method == "gguf":
        return _gguf_card(info)
    source = info.get("source") or {}
    source_id = str(source["id"])
    repo_id = str(info["repo_id"])
    revision = info.get("revision")
    endpoint = str(info.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
    method_name = METHOD_NAMES[method]
    flavour = f"{bits}-bit {method_name}"
    if method == "compressed-tensors":
        flavour = f"compressed-tensors {ct_scheme(qc)}"
    elif method == "bitsandbytes" and bits == 4:
        flavour = f"4-bit bitsandbytes ({str(qc.get('bnb_4bit_quant_type', 'nf4')).upper()})"

    meta = _metadata(info, method, bits)
    out: list[str] = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]
    out += [f"# {repo_id.split('/')[-1]}", ""]
    src_rev = f" at revision {_code(source['revision'])}" if source.get("revision") else ""
    out += [f"A {flavour} quantization of [{source_id}]({endpoint}/{source_id}){src_rev}, "
            f"made with qaas (quantization as a service)"
            + (f", job {_code(info['job_id'])}" if info.get("job_id") else "")
            + (f", version {_code(info['qaas_version'])}" if info.get("qaas_version") else "") + ".", ""]

    # Recipe
    out += ["## Recipe", "", "| parameter | value |", "|---|---|"]
    out += [f"| {k} | {_code(v if isinstance(v, str) else json.dumps(v))} |" for k, v in _recipe_rows(qc, method, bits)]
    out += ["", "The exact `quantization_config` (also in `config.json`):", "", "```json",
            json.dumps(qc, indent=2, sort_keys=True, default=str), "```", ""]

    # Calibration
    out += ["## Calibration data", ""]
    calib = _calibration(info, method)
    if method == "compressed-tensors" and not calib:
        out += ["None: the weights are rounded to nearest from the weights alone, and activation scales are "
                "computed at run time (data-free).", ""]
    elif method == "compressed-tensors":
        out += ["Calibration activations set the static input scales, SmoothQuant's smoothing or GPTQ's weights: "
                f"dataset {_code(calib.get('dataset'))}, {calib.get('num_samples')} samples of "
                f"{calib.get('seqlen')} tokens.", ""]
    elif method not in CALIBRATED:
        out += ["None: bitsandbytes quantizes each weight block from the weights alone (data-free).", ""]
    elif calib:
        ds = calib.get("dataset")
        if isinstance(ds, list):
            ds_text = f"{len(ds)} user-supplied text samples"
        else:
            ds_text = _code(ds) if ds is not None else "unspecified"
        parts = [f"dataset {ds_text}"]
        if calib.get("num_samples") is not None:
            parts.append(f"{calib['num_samples']} samples")
        if calib.get("seqlen") is not None:
            parts.append(f"sequence length {calib['seqlen']}")
        if calib.get("tokens") is not None:
            parts.append(f"{calib['tokens']:,} tokens in all")
        out += [CALIBRATED[method] + ": " + ", ".join(parts) + ".", ""]
    else:
        out += ["Not recorded.", ""]

    # Quality
    out += ["## Quality", ""]
    ev = info.get("evaluation") or {}
    before, after = ev.get("perplexity_before"), ev.get("perplexity_after")
    if before is not None or after is not None:
        where = []
        if ev.get("dataset"):
            where.append(f"on {_code(ev['dataset'])}")
        text = ev.get("text") or {}
        if text.get("source"):
            where.append(f"on {text['source']}")
        if ev.get("text_sha256"):
            where.append(f"text sha256 {_code(ev['text_sha256'])}")
        if ev.get("windows") and ev.get("seqlen"):
            where.append(f"{ev['windows']} windows of {ev['seqlen']} tokens")
        elif ev.get("seqlen"):
            where.append(f"sequence length {ev['seqlen']}")
        if ev.get("num_tokens") or ev.get("tokens"):
            where.append(f"{ev.get('num_tokens') or ev.get('tokens'):,} tokens")
        out += ["Perplexity (lower is better)" + (", " + ", ".join(where) if where else "") + ":", "",
                "| model | perplexity |", "|---|---|"]
        if before is not None:
            out.append(f"| original ({source_id}) | {before:.4f} |")
        if after is not None:
            out.append(f"| quantized ({flavour}) | {after:.4f} |")
        if before and after is not None:
            out += ["", f"Change: {100 * (after - before) / before:+.2f}%."]
        measured = ev.get("measured") or {}
        if measured:
            out += ["", "What was measured:", ""]
            out += [f"- {which}: {measured[which]}" for which in ("original", "quantized") if measured.get(which)]
        if ev.get("windows_left_out"):
            out += ["", f"{ev['windows_left_out']} windows of the text were left out: they share text with the "
                        "calibration data."]
        seconds = (ev.get("seconds") or {}).get("total")
        if seconds is not None:
            out += ["", f"Evaluation took {seconds:.1f} s ({ev.get('mode') or 'whole model'})."]
        out.append("")
    elif ev.get("skipped"):
        out += [f"Not evaluated: {ev['skipped']}", ""]
    else:
        out += ["Not evaluated for this model.", ""]

    # Size
    size = info.get("size") or {}
    sb = size.get("before_bytes", info.get("size_before_bytes"))
    sa = size.get("after_bytes", info.get("size_after_bytes"))
    if sb or sa:
        out += ["## Size", "", "| | size on disk |", "|---|---|"]
        if sb:
            out.append(f"| original | {_human(sb)} |")
        if sa:
            out.append(f"| quantized | {_human(sa)} |")
        if sb and sa:
            out += ["", f"{sb / sa:.2f}x smaller ({100 * (1 - sa / sb):.1f}% saved)."]
        out.append("")

    out += _compatibility(info, method)

    # Usage
    rev_arg = f', revision="{revision}"' if revision and revision != "main" else ""
    # transformers loads AWQ through GPTQModel's kernels
    needs = {"gptq": "gptqmodel", "awq": "gptqmodel", "compressed-tensors": "compressed-tensors"}.get(method, "bitsandbytes")
    out += ["## How to use", "", f"With transformers (needs `{needs}` installed: `pip install transformers accelerate {needs}`):", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model_id = "{repo_id}"',
            f"tokenizer = AutoTokenizer.from_pretrained(model_id{rev_arg})",
            f'model = AutoModelForCausalLM.from_pretrained(model_id{rev_arg}, device_map="auto")', "",
            'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
            "output = model.generate(**inputs, max_new_tokens=32)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))", "```", ""]
    engines = (info.get("gptq") or {}).get("engines")
    vllm_loads = any(e.get("engine") == "vllm" and e.get("loads") for e in engines or [])
    if (method == "gptq" and (vllm_loads or engines is None)) or method in ("compressed-tensors", "awq"):
        kernel = {"gptq": "reads the GPTQ config; picks the Marlin kernel when the shapes allow it",
                  "awq": "reads the AWQ config; picks the AWQ-Marlin kernel when the shapes allow it",
                  }.get(method, "compressed-tensors is vLLM's and SGLang's native format; FP8 runs on Hopper/Ada "
                                "FP8 kernels")
        out += [f"With vLLM ({kernel}):", "",
                "```python", "from vllm import LLM, SamplingParams", "",
                f'llm = LLM(model="{repo_id}"{rev_arg})',
                'print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))[0].outputs[0].text)',
                "```", "", "or as an OpenAI-compatible server:", "", "```bash",
                f"vllm serve {repo_id}" + (f" --revision {revision}" if rev_arg else ""), "```", ""]
    return "\n".join(out)


def parse_front_matter(card: str) -> dict[str, Any]:
    """The YAML metadata of a card (for tests and for reading back a published card)."""
    if not card.startswith("---\n"):
        return {}
    end = card.index("\n---", 4)
    return yaml.safe_load(card[4:end]) or {}
