"""Shared fixtures for engine tests: the real stories260K model and WikiText-2 text from the shared
assets, small random models built here (all shapes runnable by bitsandbytes on the CPU, and a GPT-2 with
Conv1D), and a cache of pipeline runs so each export is produced once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, STORIES, WIKITEXT  # one home for where the assets are (QAAS_TEST_ASSETS or ../shared)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip("shared asset stories260K not available")
    return STORIES


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip("shared asset wikitext-2 not available")
    return WIKITEXT


def save_random_model(directory: Path, config, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      tokenizer_from: Path | None = None) -> Path:
    """A randomly initialised transformers model saved as safetensors (+ stories' tokenizer if given)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (tokenizer_from / name).is_file():
                (directory / name).write_bytes((tokenizer_from / name).read_bytes())
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, stories_dir) -> Path:
    """Llama with shapes bitsandbytes' CPU 4-bit kernels accept (hidden 64, MLP 128), 6 blocks, untied head."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return save_random_model(tmp_path_factory.mktemp("tiny_llama"), cfg, tokenizer_from=stories_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """GPT-2 (Conv1D layers, stored [in, out]) with tied embeddings."""
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    return save_random_model(tmp_path_factory.mktemp("tiny_gpt2"), cfg, seed=1)


class RecordingReporter:
    """Records every call; optionally cancels after a given number of progress events."""

    def __init__(self, cancel_after_progress: int | None = None) -> None:
        self.events: list[tuple] = []
        self.cancel_after_progress = cancel_after_progress
        self._progress = 0

    def stage(self, name, *, total=None, message=""):
        self.events.append(("stage", name, total))

    def progress(self, done, total, *, message="", metrics=None):
        self._progress += 1
        json.dumps(metrics)  # metrics must be JSON-serialisable
        self.events.append(("progress", done, total, metrics))

    def log(self, message, *, level="info", data=None):
        self.events.append(("log", level, message))

    def check_cancelled(self):
        from qaas.worker.engine.progress import JobCancelled

        if self.cancel_after_progress is not None and self._progress >= self.cancel_after_progress:
            raise JobCancelled("test cancel")

    @property
    def stages(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "stage"]


VARIANTS = {
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4_dq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
}


@pytest.fixture(scope="session")
def run_pipeline(tmp_path_factory):
    """run_pipeline(source_dir, variant_or_config, evaluate=False, **options) -> (out_dir, result), cached."""
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    cache: dict = {}

    def run(source_dir: Path, config, *, evaluate: bool = False, **opts):
        qc = VARIANTS[config] if isinstance(config, str) else config
        key = (str(source_dir), json.dumps(qc, sort_keys=True), evaluate, json.dumps(opts, sort_keys=True, default=str))
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "out"
            options = EngineOptions(allowed_roots=(str(source_dir.parent), str(ASSETS)), evaluate=evaluate,
                                    eval_text_path=str(WIKITEXT), eval_max_windows=opts.pop("eval_max_windows", 4),
                                    **opts)
            reporter = RecordingReporter()
            result = quantize({"path": str(source_dir)}, qc, out, options=options, reporter=reporter)
            cache[key] = (out, result, reporter)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def tiny_llama_bf16_dir(tmp_path_factory) -> Path:
    """A bfloat16 checkpoint: quantization must see bf16 weights and copy the rest in bf16."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return save_random_model(tmp_path_factory.mktemp("tiny_llama_bf16"), cfg, seed=2, dtype=torch.bfloat16)
