"""transformers itself downloads a published model from the fake Hub (the path real users take)."""

import pytest

from qaas.worker.publish.hub import publish_folder
from support.hub_fixtures import WRITE_TOKEN

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_from_pretrained_through_fake_hub(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "out")
    res = publish_folder(tmp_path / "out", repo_id="alice/tiny-llama", token=WRITE_TOKEN, endpoint=fake_hub.url,
                         private=True, revision="v1")
    loaded = AutoModelForCausalLM.from_pretrained("alice/tiny-llama", revision="v1", token=WRITE_TOKEN,
                                                  cache_dir=tmp_path / "cache").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert res["revision"] == "v1"
