"""Quality measurements: perplexity GPTQ-paper style, and per-layer quantization error.

Perplexity: tokenize the evaluation text once (the tokenizer of the source model), cut it into
non-overlapping windows of `seqlen` tokens (at most `max_windows`), average the per-window mean NLL of
next-token prediction, exponentiate. Both the original and the quantized model see exactly the same
windows, so the two numbers compare; `text_sha256` says which text it was.

Which text (`choose_text`): the job's own, the operator's QAAS_EVAL_TEXT, else the packaged public-domain
slice (`qaas.eval_text`); windows that share a run of tokens with the calibration windows are left out
(`calibration_ngrams`). The pipeline runs the passes block by block (`streamed_eval`); `perplexity` here is the
whole-model pass, kept as the reference the streamed one is tested against and as the fallback for a method
without a format reader. On by default; `EngineOptions(evaluate=False)` turns it off.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qaas import eval_text as eval_text_rules

from .errors import CalibrationDataError, InvalidConfig
from .progress import Reporter


@dataclass
class EvalText:
    """The evaluation text of a job and where it came from."""

    text: str
    sha256: str
    #: Where it came from, in words: "options.eval_text (file x.txt)", "QAAS_EVAL_TEXT ...", the packaged text.
    source: str
    nbytes: int

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "bytes": self.nbytes}


def choose_text(job_value: Any, operator_path: str | None, sources: Any) -> EvalText:
    """The job's `options.eval_text`, else the operator's file, else the packaged text (`qaas.eval_text`)."""
    if job_value is not None:
        from qaas.quantization_rules.calibration import dataset_kind, local_file

        from .calibration_data import resolve_text

        try:
            text, where = resolve_text(job_value, sources)
        except CalibrationDataError as exc:
            raise InvalidConfig(exc.message.replace("dataset:", "eval_text:", 1).replace("calibration", "evaluation"),
                                field="eval_text") from None
        if dataset_kind(job_value) == "file":
            raw = local_file(job_value, sources.roots).read_bytes()
        else:
            raw = text.encode("utf-8")
        return EvalText(text, hashlib.sha256(raw).hexdigest(), f"options.eval_text ({where})", len(raw))
    if operator_path:
        path = Path(operator_path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidConfig(f"evaluation text {path} cannot be read: {exc.strerror}", field="eval_text_path") from None
        return EvalText(raw.decode("utf-8", errors="replace"), hashlib.sha256(raw).hexdigest(),
                        f"QAAS_EVAL_TEXT (file {path.name})", len(raw))
    raw = eval_text_rules.PACKAGED_TEXT.read_bytes()
    return EvalText(raw.decode("utf-8"), hashlib.sha256(raw).hexdigest(), eval_text_rules.PACKAGED_LABEL, len(raw))


def calibration_ngrams(windows: torch.Tensor | None, n: int = eval_text_rules.OVERLAP_TOKENS) -> set[int]:
    """Hashes of every run of `n` consecutive tokens in the calibration windows (`[samples, seqlen]`)."""
    if windows is None or windows.numel() == 0:
        return set()
    out: set[int] = set()
    for row in windows.to(torch.int64).numpy():
        b = row.tobytes()
        out.update(hash(b[i * 8 : (i + n) * 8]) for i in range(0, max(0, len(row) - n) + 1))
    return out


def _overlaps(window: list[int], grams: set[int], n: int) -> bool:
    if not grams:
        return False
    import numpy as np

    b = np.asarray(window, dtype=np.int64).tobytes()
    return any(hash(b[i * 8 : (i + n) * 8]) in grams for i in range(0, max(0, len(window) - n) + 1))


@dataclass
class EvalData:
    input_ids: torch.Tensor  # [windows, seqlen], int64, CPU
    seqlen: int
    text_sha256: str
    #: Windows of the text left out because the calibration windows hold one of their token runs.
    left_out: int = 0
    text_info: dict[str, Any] | None = None

    @property
    def windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def describe(self) -> dict[str, Any]:
        d = {"windows": self.windows, "seqlen": self.seqlen, "tokens": self.tokens, "text_sha256": self.text_sha256,
             "windows_left_out": self.left_out}
        if self.text_info is not None:
            d["text"] = self.text_info
        return d


def default_seqlen(config: dict[str, Any], requested: int | None = None) -> int:
    """`requested`, capped by the model's context; by default min(2048, max_position_embeddings)."""
    text = config.get("text_config") or config
    ctx = text.get("max_position_embeddings") or text.get("n_positions") or text.get("seq_length") or 2048
    return int(min(requested or 2048, ctx))


def load_eval_data(tokenizer_dir: str | Path, text_path: "str | Path | EvalText | None" = None, *, seqlen: int,
                   max_windows: int, allow_remote_code: bool = False, text: EvalText | None = None,
                   calibration_windows: torch.Tensor | None = None) -> EvalData:
    """Tokenize the text (`text`, or the file at `text_path`) and cut up to `max_windows` consecutive windows of
    `seqlen` tokens, leaving out every window that shares `OVERLAP_TOKENS` consecutive tokens with
    `calibration_windows` (never evaluate on what calibrated the model)."""
    from transformers import AutoTokenizer

    if isinstance(text_path, EvalText):
        text = text_path
    if text is None:
        if text_path is None:
            raise InvalidConfig("no evaluation text", field="eval_text_path")
        text = choose_text(None, str(text_path), None)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=allow_remote_code)
    n = eval_text_rules.OVERLAP_TOKENS
    grams = calibration_ngrams(calibration_windows, n)
    need = seqlen * max_windows
    body = text.text
    # Tokenizing 1 MB is cheap, tokenizing 1 GB is not: take a prefix that surely holds enough tokens,
    # a longer one when windows were left out, and the whole text only when the prefixes fall short.
    rows: list[list[int]] = []
    left_out = 0
    ids: list[int] = []
    for n_chars in (need * 32, need * 256, len(body)):
        # verbose=False: the text is longer than the model's context on purpose (it is cut into windows)
        ids = tokenizer(body[:n_chars], add_special_tokens=True, verbose=False)["input_ids"]
        rows, left_out = [], 0
        for k in range(len(ids) // seqlen):
            window = ids[k * seqlen : (k + 1) * seqlen]
            if _overlaps(window, grams, n):
                left_out += 1
                continue
            rows.append(window)
            if len(rows) == max_windows:
                break
        if len(rows) == max_windows or n_chars >= len(body):
            break
    if not rows:
        why = (f"all {left_out} windows of {seqlen} tokens share text with the calibration data" if left_out else
               f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
        raise InvalidConfig(why, field="eval_text_path")
    input_ids = torch.tensor(rows, dtype=torch.long)
    return EvalData(input_ids, seqlen, text.sha256, left_out=left_out, text_info=text.describe())


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
