"""Quality measurements: perplexity GPTQ-paper style, and per-layer quantization error.

Perplexity: tokenize the evaluation text once (the tokenizer of the source model), cut it into
non-overlapping windows of `seqlen` tokens (at most `max_windows`), average the per-window mean NLL of
next-token prediction, exponentiate. Both the original and the quantized model see exactly the same
windows, so the two numbers compare; `text_sha256` says which text it was.

Unlike quantization, evaluation loads the whole model (original, then quantized) onto the device; it is
on by default and can be turned off with `EngineOptions(evaluate=False)`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidConfig
from .progress import Reporter


@dataclass
class EvalData:
    input_ids: torch.Tensor  # [windows, seqlen], int64, CPU
    seqlen: int
    text_sha256: str

    @property
    def windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def describe(self) -> dict[str, Any]:
        return {"windows": self.windows, "seqlen": self.seqlen, "tokens": self.tokens, "text_sha256": self.text_sha256}


def default_seqlen(config: dict[str, Any], requested: int | None = None) -> int:
    """`requested`, capped by the model's context; by default min(2048, max_position_embeddings)."""
    text = config.get("text_config") or config
    ctx = text.get("max_position_embeddings") or text.get("n_positions") or text.get("seq_length") or 2048
    return int(min(requested or 2048, ctx))


def load_eval_data(tokenizer_dir: str | Path, text_path: str | Path, *, seqlen: int, max_windows: int,
                   allow_remote_code: bool = False) -> EvalData:
    """Tokenize the text at `text_path` and cut `max_windows` windows of `seqlen` tokens."""
    from transformers import AutoTokenizer

    path = Path(text_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"evaluation text {path} cannot be read: {exc.strerror}", field="eval_text_path") from None
    text = raw.decode("utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=allow_remote_code)
    need = seqlen * max_windows
    # Tokenizing 1 MB is cheap, tokenizing 1 GB is not: take a prefix that surely holds enough tokens,
    # and the whole text only when the prefix falls short.
    ids: list[int] = []
    for n_chars in (need * 32, len(text)):
        ids = tokenizer(text[:n_chars], add_special_tokens=True)["input_ids"]
        if len(ids) >= need or n_chars >= len(text):
            break
    windows = min(max_windows, len(ids) // seqlen)
    if windows < 1:
        raise InvalidConfig(
            f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}", field="eval_text_path"
        )
    input_ids = torch.tensor(ids[: windows * seqlen], dtype=torch.long).view(windows, seqlen)
    return EvalData(input_ids, seqlen, hashlib.sha256(raw).hexdigest())


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    data: EvalData,
    *,
    device: str | torch.device,
    reporter: Reporter | None = None,
    label: str = "",
) -> float:
    """exp(mean over windows of the mean next-token NLL)."""
    model.eval()
    total = 0.0
    for i in range(data.windows):
        if reporter is not None:
            reporter.check_cancelled()
        ids = data.input_ids[i : i + 1].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean").item()
        total += nll
        if reporter is not None:
            reporter.progress(i + 1, data.windows, message=f"{label} window {i + 1}/{data.windows}".strip(),
                              metrics={"nll": nll})
    return float(math.exp(total / data.windows))


def load_original_model(source_dir: str | Path, *, device: str | torch.device, allow_remote_code: bool = False,
                        use_safetensors: bool | None = None) -> torch.nn.Module:
    """The source model in its stored dtype, on `device`, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(source_dir), dtype="auto", trust_remote_code=allow_remote_code, use_safetensors=use_safetensors
    )
    return model.to(device).eval()


def load_with_replaced_weights(
    source_dir: str | Path,
    replacements: Callable[[torch.nn.Module], None],
    *,
    device: str | torch.device,
    allow_remote_code: bool = False,
) -> torch.nn.Module:
    """The original architecture and weights, then `replacements(model)` swaps in dequantized weights.

    The fallback for evaluating a quantized model where its real loader is not available on the device.
    """
    model = load_original_model(source_dir, device="cpu", allow_remote_code=allow_remote_code)
    with torch.no_grad():
        replacements(model)
    return model.to(device).eval()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float32 (0 for an all-zero W reproduced exactly)."""
    w = w.float()
    num = torch.linalg.vector_norm(w - w_hat.float().to(w.device)).item()
    den = torch.linalg.vector_norm(w).item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def default_eval_text(cache_dir: str | None) -> tuple[str | None, str | None]:
    """WikiText-2 test (the text GPTQ papers report), fetched through `datasets` and joined as they join it.

    Returns (path of the text file, None), or (None, why it is not available) when `datasets` is not
    installed or no hub is reachable: evaluation is then skipped rather than failing the job.
    """
    import tempfile

    try:
        from datasets import load_dataset
    except ImportError:
        return None, ("no evaluation text: set QAAS_EVAL_TEXT to a text file (e.g. WikiText-2 test joined "
                      "with blank lines), or install `datasets` where a hub is reachable")
    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as exc:  # datasets raises many types when offline
        return None, f"WikiText-2 test could not be fetched ({type(exc).__name__}); set QAAS_EVAL_TEXT to a local file"
    text = "\n\n".join(rows)
    folder = Path(cache_dir or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"wikitext-2-raw-v1-test-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not path.exists():
        path.write_text(text)
    return str(path), None
