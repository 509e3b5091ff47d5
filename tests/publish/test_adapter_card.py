"""The model card of a published LoRA adapter: Hub metadata (base_model, library_name: peft), the recipe, the
data's fingerprint, the loss summary and the evaluation, and load snippets that parse."""

import ast
import re

from huggingface_hub import ModelCard

from qaas.worker.publish.adapter_card import hub_base, render_adapter_card

QC = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
RESULT = {
    "quantization_config": QC,
    "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "bias": "none",
             "trainable_parameters": 41_943_040, "total_parameters": 8_072_204_288},
    "training": {"learning_rate": 2e-4, "total_steps": 500, "optim": "paged_adamw_8bit", "max_seq_length": 2048,
                 "gradient_checkpointing": True},
    "data": {"train_examples": 9000, "train_sequences": 9000, "eval_examples": 1000,
             "held_out": "no eval_dataset: 1000 of 10000 examples held out (seed 42)", "dataset_sha256": "ab" * 32,
             "tokens_trained": 123456},
    "loss": {"first": 2.41, "last": 1.52, "min": 1.49, "mean_first_10pct": 2.2, "mean_last_10pct": 1.55,
             "evals": [[0, 2.3], [250, 1.7], [500, 1.6]]},
    "evaluation": {"perplexity_before": 9.97, "perplexity_after": 4.95, "full_precision_perplexity": 9.8},
    "resumed_from_step": 200,
}


def test_adapter_card_metadata_recipe_data_and_loss():
    text = render_adapter_card({"repo_id": "alice/Llama-3-8B-qlora-4bit", "base_model": "meta-llama/Meta-Llama-3-8B",
                                "result": RESULT, "job_id": "j-1", "qaas_version": "0.1.0"})
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Meta-Llama-3-8B" and card.data.library_name == "peft"
    assert {"peft", "lora", "qlora"} <= set(card.data.tags)
    assert "| lora.r | `16` |" in text and "| training.optim | `paged_adamw_8bit` |" in text
    assert "ab" * 32 in text and "9.970 / 4.950" in text and "2.4100" in text and "1.5200" in text
    assert "0: 2.3000, 250: 1.7000, 500: 1.6000" in text and "from step | 200" in text
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        ast.parse(block)
    assert 'PeftModel.from_pretrained(base, "alice/Llama-3-8B-qlora-4bit")' in text


def test_only_a_hub_id_becomes_base_model():
    assert hub_base("org/name") == "org/name"
    assert hub_base("/models/stories260K") is None and hub_base("job:123") is None and hub_base("name") is None
    text = render_adapter_card({"repo_id": "a/b", "base_model": None, "base_label": "stories260K", "result": RESULT})
    assert ModelCard(text).data.base_model is None and "`stories260K`" in text


def test_a_merged_output_gets_its_own_section_with_how_to_load_it():
    merged = {"folder": "merged", "method": "gptq", "merged_layers": 224,
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True},
              "float_model": {"perplexity": 4.951}, "size_after_bytes": 5_700_000_000,
              "evaluation": {"perplexity_before": 8.1, "perplexity_after": 8.4,
                             "text": {"source": "packaged tinyshakespeare-eval.txt"}}}
    text = render_adapter_card({"repo_id": "alice/x-qlora-4bit", "base_model": "org/base",
                                "result": {**RESULT, "merged": merged}})
    assert "## Merged model" in text and "re-quantized with gptq to 4 bits" in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/x-qlora-4bit", subfolder="merged")' in text
    assert "| layers merged | 224 |" in text and "4.950 / 4.951" in text and "8.100 / 8.400" in text
    assert '"group_size": 128' in text
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        ast.parse(block)
    assert "## Merged model" not in render_adapter_card({"repo_id": "a/b", "base_model": None, "result": RESULT})


def test_auto_peft_loading_is_offered_only_for_a_hub_base():
    # adapter_config.json names a local base by its directory name (or job:<id>): peft cannot find it
    local = render_adapter_card({"repo_id": "a/b", "base_model": None, "base_label": "job:1234", "result": RESULT})
    assert "AutoPeftModelForCausalLM" not in local and 'PeftModel.from_pretrained(base, "a/b")' in local
    hub = render_adapter_card({"repo_id": "a/b", "base_model": "org/base", "result": RESULT})
    assert 'AutoPeftModelForCausalLM.from_pretrained("a/b")' in hub
