"""The model card (`README.md`) of a published LoRA adapter (a fine-tuning job's output).

`render_adapter_card(info)` takes one plain dict assembled by the publisher from the job's request and result:

    {"repo_id": "alice/stories-qlora-4bit", "revision": None, "base_model": "org/name" | None,
     "base_label": "org/name" | "stories260K", "result": {...the job's result...}, "job_id": "...",
     "qaas_version": "0.1.0", "endpoint": "https://huggingface.co"}

Front matter: `base_model` (when the base is a Hub model), `library_name: peft`, `pipeline_tag`, `tags`. Body: the
recipe (the base's 4-bit config, the LoRA config, the training arguments), the data (example counts, sha256 of
the dataset as given, held-out split), the loss curve summary, perplexity before/after on the held-out data,
and the two lines that load it.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from qaas.quantization_rules.hub_ids import repo_id_problem

DEFAULT_ENDPOINT = "https://huggingface.co"
TRAINING_SHOWN = ("learning_rate", "total_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "warmup_steps", "lr_scheduler_type", "weight_decay", "max_grad_norm",
                  "gradient_checkpointing", "optim", "seed", "max_seq_length", "packing")
LORA_SHOWN = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
              "modules_to_save", "trainable_parameters", "total_parameters")


def hub_base(name: str | None) -> str | None:
    """`name` when it is a Hub model id (what `base_model` may hold), else None."""
    if not name or name.startswith(("/", "job:")) or "/" not in name:
        return None
    return None if repo_id_problem(name) else name


def _code(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return "`" + str(text).replace("`", "'") + "`"


def _num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def render_adapter_card(info: dict[str, Any]) -> str:
    r = info["result"]
    repo_id = str(info["repo_id"])
    endpoint = str(info.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
    base = info.get("base_model")
    label = info.get("base_label") or base or "the base model"
    qc = r.get("quantization_config") or {}
    lora, training, data = r.get("lora") or {}, r.get("training") or {}, r.get("data") or {}
    loss, ev = r.get("loss") or {}, r.get("evaluation") or {}

    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["peft", "lora", "qlora", "bitsandbytes", "4-bit", "qaas"]
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip("\n"), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    base_ref = f"[{base}]({endpoint}/{base})" if base else _code(label)
    out += [f"A LoRA adapter for {base_ref}, trained with QLoRA (the base frozen in 4-bit "
            f"{str(qc.get('bnb_4bit_quant_type', 'nf4')).upper()}"
            + (" with double quantization" if qc.get("bnb_4bit_use_double_quant") else "")
            + ") by qaas" + (f", job {_code(info['job_id'])}" if info.get("job_id") else "")
            + (f", version {_code(info['qaas_version'])}" if info.get("qaas_version") else "") + ".", ""]

    out += ["## Use", ""]
    if base:  # adapter_config.json names a Hub base, which peft then finds by itself
        out += ["```python", "from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")', "```", "",
                "or on the 4-bit base it was trained on:", ""]
    else:
        out += [f"On the 4-bit base it was trained on ({_code(label)}, not a Hub model: give its local copy):", ""]
    out += ["```python",
            "from transformers import AutoModelForCausalLM, BitsAndBytesConfig", "from peft import PeftModel", "",
            f"bnb = BitsAndBytesConfig(**{json.dumps({k: v for k, v in qc.items() if k != 'quant_method'})})",
            f'base = AutoModelForCausalLM.from_pretrained("{base or label}", quantization_config=bnb)',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", ""]

    out += ["## Recipe", "", "| parameter | value |", "|---|---|"]
    out += [f"| lora.{k} | {_code(lora[k])} |" for k in LORA_SHOWN if lora.get(k) is not None]
    out += [f"| training.{k} | {_code(training[k])} |" for k in TRAINING_SHOWN if training.get(k) is not None]
    out += ["", "The base's `quantization_config`:", "", "```json", json.dumps(qc, indent=2, sort_keys=True), "```", ""]

    out += ["## Data", "", "| | |", "|---|---|",
            f"| training examples | {data.get('train_examples', '–')} ({data.get('train_sequences', '–')} sequences) |",
            f"| held-out examples | {data.get('eval_examples', '–')} ({data.get('held_out', '–')}) |",
            f"| tokens trained | {data.get('tokens_trained', '–')} |",
            f"| dataset sha256 | {_code(data.get('dataset_sha256', '–'))} |"]
    if data.get("eval_dataset_sha256"):
        out.append(f"| eval dataset sha256 | {_code(data['eval_dataset_sha256'])} |")
    out += [""]

    out += ["## Training and evaluation", "", "| | |", "|---|---|",
            f"| loss, first step | {_num(loss.get('first'))} |", f"| loss, last step | {_num(loss.get('last'))} |",
            f"| loss, lowest | {_num(loss.get('min'))} |",
            f"| loss, mean of the first / last tenth of the steps | {_num(loss.get('mean_first_10pct'))} / "
            f"{_num(loss.get('mean_last_10pct'))} |",
            f"| held-out perplexity before / after | {_num(ev.get('perplexity_before'), '.3f')} / "
            f"{_num(ev.get('perplexity_after'), '.3f')} |"]
    if ev.get("full_precision_perplexity") is not None:
        out.append(f"| held-out perplexity of the unquantized base | {_num(ev['full_precision_perplexity'], '.3f')} |")
    if r.get("resumed_from_step"):
        out.append(f"| resumed after a lost worker from step | {r['resumed_from_step']} |")
    evals = loss.get("evals") or []
    if evals:
        out += ["", "Held-out loss by step: " + ", ".join(f"{int(s)}: {_num(v)}" for s, v in evals) + "."]
    out += ["", "`training_log.json` holds the loss and learning rate of every step."]
    if r.get("merged"):
        out += [""] + _merged_section(r["merged"], repo_id, ev)
    return "\n".join(out) + "\n"


def _merged_section(m: dict[str, Any], repo_id: str, adapter_eval: dict[str, Any]) -> list[str]:
    """The second output (`merge`): the adapter merged into the de-quantized base and re-quantized, in
    the repo's `merged/` folder; how to load it, its quantization config and what it measured."""
    qc = m.get("quantization_config") or {}
    method = str(m.get("method") or qc.get("quant_method") or "")
    folder = m.get("folder") or "merged"
    bits = qc.get("bits") or (4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None)
    fm, ev = m.get("float_model") or {}, m.get("evaluation") or {}
    out = ["## Merged model", "",
           f"`{folder}/` holds the adapter merged into the de-quantized base (bitsandbytes' own dequantization, "
           f"the LoRA delta added in float32) and re-quantized with {method}"
           + (f" to {bits} bits" if bits else "") + ": a deployable model without peft.", "",
           "```python", "from transformers import AutoModelForCausalLM",
           f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="{folder}")', "```", "",
           "| | |", "|---|---|",
           f"| layers merged | {m.get('merged_layers', '–')} |",
           f"| held-out perplexity: adapter on the 4-bit base / merged float model | "
           f"{_num(adapter_eval.get('perplexity_after'), '.3f')} / {_num(fm.get('perplexity'), '.3f')} |"]
    if ev.get("perplexity_before") is not None:
        text = (ev.get("text") or {}).get("source") or "the evaluation text"
        out.append(f"| perplexity on {text}: merged float / re-quantized | {_num(ev.get('perplexity_before'), '.3f')} / "
                   f"{_num(ev.get('perplexity_after'), '.3f')} |")
    if m.get("size_after_bytes"):
        out.append(f"| size of the re-quantized weights | {m['size_after_bytes']} bytes |")
    out += ["", f"Its `quantization_config` ({method}):", "", "```json",
            json.dumps({k: v for k, v in qc.items() if k not in ("meta", "dynamic", "modules_in_block_to_quantize")},
                       indent=2, sort_keys=True), "```"]
    return out
