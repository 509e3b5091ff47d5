"""The fine-tuning engine's parts on their own: training data to sequences and batches, the held-out split, the
seeded batch order a resumed run depends on, checkpoints without pickle, and optimizer refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES

from qaas.quantization_rules.calibration import CalibrationSources
from qaas.worker.engine.errors import InvalidConfig
from qaas.worker.engine.finetune import checkpoint, data
from qaas.worker.engine.finetune.model import make_optimizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def test_files_of_text_and_messages_rows_and_refusals(tmp_path):
    sources = CalibrationSources.here([tmp_path])
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"text": "one"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert data.load_examples(str(rows), sources, "dataset") == ["one", [{"role": "user", "content": "hi"}]]
    (tmp_path / "t.txt").write_text("first example\n\nsecond\nline\n\n\n")
    assert data.load_examples(str(tmp_path / "t.txt"), sources, "dataset") == ["first example", "second\nline"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InvalidConfig, match="line 1: a row must hold") as e:
        data.load_examples(str(tmp_path / "bad.jsonl"), sources, "eval_dataset")
    assert e.value.field == "eval_dataset"
    with pytest.raises(InvalidConfig, match="outside the allowed roots"):
        data.load_examples("/etc/passwd.txt", sources, "dataset")


def test_texts_get_an_end_of_sequence_and_packing_fills_whole_sequences(tokenizer):
    texts = ["Once upon a time there was a cat.", "The dog ran."]
    seqs = data.tokenize(tokenizer, texts, max_seq_length=512, packing=False, name="dataset")
    assert [s[-1] for s in seqs] == [tokenizer.eos_token_id] * 2 and seqs[0][0] == tokenizer.bos_token_id
    packed = data.tokenize(tokenizer, texts * 5, max_seq_length=8, packing=True, name="dataset")
    assert all(len(s) == 8 for s in packed[:-1]) and sum(map(len, packed)) == 5 * sum(map(len, seqs))
    cut = data.tokenize(tokenizer, texts, max_seq_length=4, packing=False, name="dataset")
    assert [len(s) for s in cut] == [4, 4]
    with pytest.raises(InvalidConfig, match="no chat template") as e:
        data.tokenize(tokenizer, [[{"role": "user", "content": "hi"}]], max_seq_length=64, packing=False,
                      name="dataset")
    assert e.value.field == "dataset"


def test_conversations_render_with_the_models_template(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(STORIES)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    conv = [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a time."}]
    (seq,) = data.tokenize(tokenizer, [conv], max_seq_length=256, packing=False, name="dataset")
    assert tokenizer.decode(seq).strip().startswith("user: Tell a story.")
    assert "assistant: Once upon a time." in tokenizer.decode(seq)


def test_assistant_only_loss_targets_the_assistant_turns_through_packing(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(STORIES)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    conv = [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a time."}]
    (seq,) = data.tokenize(tokenizer, [conv], max_seq_length=256, packing=False, name="dataset",
                           assistant_only_loss=True)
    batch = data.collate([seq], pad_id=0)
    kept = [t for t, label in zip(seq, batch.labels[0].tolist()) if label != -100]
    assert 0 < len(kept) < len(seq)
    assert "Once upon a time." in tokenizer.decode(kept) and "Tell a story" not in tokenizer.decode(kept)
    (whole,) = data.tokenize(tokenizer, [conv], max_seq_length=256, packing=False, name="dataset")
    assert (data.collate([whole], 0).labels != -100).all()  # the default: every token
    packed = data.tokenize(tokenizer, [conv, "a plain text"] * 3, max_seq_length=16, packing=True, name="dataset",
                           assistant_only_loss=True)
    labels = data.collate(packed, 0).labels
    assert (labels == -100).any() and (labels != -100).any()
    assert sum(len(s) for s in packed) == sum(len(s.targets) for s in packed)  # masks travel with the ids


def test_held_out_split_is_seeded_and_batches_pad_out_of_the_loss():
    examples = [f"text {i}" for i in range(30)]
    train, held, how = data.split_held_out(examples, 7)
    assert len(held) == 3 and len(train) == 27 and not set(train) & set(held) and "3 of 30" in how
    assert data.split_held_out(examples, 7) == (train, held, how)
    assert data.split_held_out(["only"], 7)[1] == ["only"]
    b = data.collate([[5, 6, 7], [8]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and b.labels.tolist() == [[5, 6, 7], [8, -100, -100]]
    assert b.tokens == 4
    seqs = [[i, i + 1] for i in range(10)]
    one = [x.input_ids.tolist() for x in data.epoch_batches(seqs, 3, seed=1, epoch=2, pad_id=0)]
    assert one == [x.input_ids.tolist() for x in data.epoch_batches(seqs, 3, seed=1, epoch=2, pad_id=0)]
    assert one != [x.input_ids.tolist() for x in data.epoch_batches(seqs, 3, seed=1, epoch=3, pad_id=0)]


def test_a_checkpoint_restores_adapter_optimizer_scheduler_and_rng_without_pickle(tmp_path):
    from transformers import get_scheduler

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        net[0].weight.requires_grad_(False)  # a frozen base weight is not part of the checkpoint
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        return net, opt, get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)

    net, opt, sched = make()
    for _ in range(3):
        net(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path = checkpoint.save(tmp_path, 3, net, opt, sched, {"step": 3, "losses": [[1, 2.0, 0.1]], "evals": [], "tokens": 9})
    checkpoint.save(tmp_path, 4, net, opt, sched, {"step": 4, "losses": [], "evals": [], "tokens": 9})
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-4"] and not path.exists()  # only the newest
    assert checkpoint.latest(tmp_path).name == "step-4"
    assert {p.name for p in (tmp_path / "step-4").iterdir()} == {"adapter.safetensors", "optimizer.safetensors",
                                                               "state.json"}
    json.loads((tmp_path / "step-4" / "state.json").read_text())
    after = torch.rand(3)

    fresh, opt2, sched2 = make()
    state = checkpoint.load(tmp_path / "step-4", fresh, opt2, sched2)
    assert state["loop"]["step"] == 4 and sched2.last_epoch == sched.last_epoch
    for a, b in zip(net.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert torch.equal(torch.rand(3), after)  # the RNG continues where it was saved
    (tmp_path / ".step-9.partial").mkdir()  # a save killed half-way is not a checkpoint
    assert checkpoint.latest(tmp_path).name == "step-4"


def test_paged_optimizers_are_refused_on_the_cpu_and_auto_picks_by_device():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("paged_adamw_8bit", "paged_adamw_32bit"):
        with pytest.raises(InvalidConfig, match="CUDA") as e:
            make_optimizer(name, params, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
        assert e.value.field == "training.optim"
    opt, used = make_optimizer("auto", params, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    assert used == "adamw_torch" and isinstance(opt, torch.optim.AdamW)


def test_the_engine_as_a_library_without_evaluation_trains_on_every_example(tmp_path):
    """`finetune()` called directly (no service): options.evaluate false holds nothing out and runs no
    evaluation pass, and the output is the adapter peft saves."""
    from qaas.worker.engine.finetune.pipeline import finetune
    from qaas.worker.engine.options import EngineOptions

    texts = ["Once upon a time, there was a little girl named Lily.", "She loved to play outside."] * 3
    spec = {"kind": "finetune", "source": {"path": str(STORIES)}, "dataset": texts, "out_dir": str(tmp_path / "out"),
            "checkpoint_dir": str(tmp_path / "ck"), "training": {"max_steps": 2, "optim": "adamw_torch",
                                                                 "max_seq_length": 32, "logging_steps": 1}}
    result = finetune(spec, options=EngineOptions(device="cpu", allowed_roots=(str(STORIES.parent),), evaluate=False))
    assert result["evaluation"] == {"skipped": "options.evaluate is false"}
    assert result["data"]["train_examples"] == 6 and result["data"]["eval_examples"] == 0
    assert result["loss"]["evals"] == [] and [s for s, _, _ in result["loss"]["curve"]] == [1, 2]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f["name"] for f in result["files"]}
    assert not list((tmp_path / "ck").glob("step-*"))  # save_steps is capped at the last step: nothing to resume
