"""The model card of a GGUF repo: a row per file (type, size, bits per weight, perplexity, change), the
llama-cli -hf / Ollama lines, metadata the Hub reads; and the default repo name."""

from __future__ import annotations

from huggingface_hub import ModelCard

from qaas.worker.publish.hub import default_repo_id
from qaas.worker.publish.model_card import method_and_bits, parse_front_matter, render_model_card

QC = {"quant_method": "gguf", "types": ["Q4_K_M", "Q8_0"], "imatrix": False, "dataset": None,
      "output_type_default": "F16", "split_max_size": None}
INFO = {
    "repo_id": "alice/stories260K-GGUF", "revision": None,
    "source": {"id": "karpathy/stories260K", "revision": "abc123"},
    "quantization_config": QC,
    "gguf": {"outputs": [
        {"type": "Q4_K_M", "files": [{"name": "model-Q4_K_M.gguf", "size": 250000, "sha256": "0" * 64}],
         "size": 250000, "bits_per_weight": 7.9, "tensor_types": {}},
        {"type": "Q8_0", "files": [{"name": "model-Q8_0.gguf", "size": 340000, "sha256": "1" * 64}],
         "size": 340000, "bits_per_weight": 10.15, "tensor_types": {}},
    ]},
    "evaluation": {"perplexity_before": 100.0, "seqlen": 256, "tokens": 512,
                   "per_type": {"Q4_K_M": {"perplexity": 104.0, "delta": 4.0}, "Q8_0": {"perplexity": 100.1,
                                                                                      "delta": 0.1}}},
    "job_id": "j-1", "endpoint": "https://huggingface.co",
}


def test_card_lists_every_file_with_quality_and_run_lines():
    card = render_model_card(INFO)
    meta = parse_front_matter(card)
    assert meta["base_model"] == "karpathy/stories260K" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and {"gguf", "Q4_K_M", "Q8_0"} <= set(meta["tags"])
    assert ModelCard(card).data.base_model == "karpathy/stories260K"
    assert "| `model-Q4_K_M.gguf` | Q4_K_M | 250.00 KB | 7.90 | 104.0000 | +4.0000 (+4.00%) |" in card
    assert "| `model-Q8_0.gguf` | Q8_0 | 340.00 KB | 10.15 | 100.1000 | +0.1000 (+0.10%) |" in card
    for t in ("Q4_K_M", "Q8_0"):
        assert f"llama-cli -hf alice/stories260K-GGUF:{t}" in card
        assert f"ollama run hf.co/alice/stories260K-GGUF:{t}" in card
    assert 'from_pretrained("alice/stories260K-GGUF", gguf_file="model-Q4_K_M.gguf")' in card


def test_method_bits_and_default_repo_name():
    assert method_and_bits(QC) == ("gguf", 4)
    assert default_repo_id("karpathy/stories260K", "alice", "gguf", 4) == "alice/stories260K-GGUF"
