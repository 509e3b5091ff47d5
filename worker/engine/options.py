"""Engine options: how a job runs (device, where the source may come from, evaluation), as opposed to
the quantization request itself, which is the `quantization_config` dict.

The worker builds one `EngineOptions` per job (from settings and the job row); library users construct it
directly. The Hub token is an option so that the engine never reads the environment on its own, and it is
excluded from `repr` and from `to_dict(redact=True)` so that it never reaches a log line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaas.quantization_rules import CalibrationSources
from qaas.quantization_rules import gpus as gpu_rules

from .errors import InvalidConfig

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", as transformers' save_pretrained


@dataclass
class EngineOptions:
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: Hub server (None: huggingface_hub's default, i.e. HF_ENDPOINT or huggingface.co).
    hub_endpoint: str | None = None
    #: Hub token for private/gated sources. Never logged.
    hub_token: str | None = field(default=None, repr=False)
    #: huggingface_hub cache directory for downloaded sources.
    cache_dir: str | None = None
    #: Local sources must resolve (after symlinks) inside one of these directories; empty = no local sources.
    allowed_roots: tuple[str, ...] = ()
    #: Local copies of named calibration datasets (name -> file under allowed_roots): a job naming one is
    #: calibrated on the file, with no `datasets` library or hub needed.
    calibration_datasets: dict[str, str] = field(default_factory=dict)
    #: Accept pickle (*.bin/*.pt) weights when a source has no safetensors.
    allow_pickle: bool = False
    #: Accept configs that need custom code (auto_map); only then is trust_remote_code=True passed.
    allow_remote_code: bool = False
    #: Measure perplexity before/after (on the text `qaas.eval_text` says: the job's, the operator's, else the
    #: packaged one).
    evaluate: bool = True
    #: The operator's evaluation text file (QAAS_EVAL_TEXT); None: the packaged default.
    eval_text_path: str | None = None
    #: The job's own evaluation text (`options.eval_text`: a `dataset`-like value); wins over eval_text_path.
    eval_text: Any = None
    #: Evaluate block by block (`streamed_eval`: models larger than the device, the quantized model read back
    #: from the exported files by the method's format reader); False: the whole model at once, quantized
    #: model loaded by `method.load_for_evaluation`.
    eval_streamed: bool = True
    #: With eval_streamed, for a method that evaluates beside its quantization (GPTQ, `beside_eval`: the windows
    #: ride its block stream, the weights streamed once): True evaluates the quantized model from the exported
    #: files read back by the method's format reader, in passes of their own after the quantization, which
    #: proves the files as written at the cost of streaming the weights twice more.
    eval_read_back: bool = False
    #: At most this many non-overlapping windows of eval_seqlen tokens.
    eval_max_windows: int = 16
    #: Window length; None = min(2048, the model's max_position_embeddings).
    eval_seqlen: int | None = None
    #: Largest shard in bytes (int) or as "5GB"/"500MB"/"2GiB".
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    #: Inference engines the output must also load in (`qaas.quantization_rules.engines` names, e.g. "vllm"),
    #: beyond transformers and GPTQModel: GPTQ keeps in float16 any layer one of them could not read.
    targets: tuple[str, ...] = ()
    #: bitsandbytes 4-bit: keep in float the layers bitsandbytes' CPU kernels cannot run, so the output runs on
    #: the CPU too (default: every layer transformers would convert, as on a GPU).
    cpu_compatible: bool = False
    #: GPUs the job runs on (`options.gpus`): above 1, GPTQ starts one process per GPU (`ranks`), rank r on
    #: cuda:r (on the CPU: that many processes, the `gloo` backend), and writes the bytes one process writes.
    gpus: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.allowed_roots, (str, Path)):
            self.allowed_roots = (str(self.allowed_roots),)
        self.allowed_roots = tuple(str(r) for r in self.allowed_roots)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(str(t) for t in self.targets or ())
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise InvalidConfig(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {self.device!r}", field="device")
        if self.eval_max_windows is not None and int(self.eval_max_windows) < 1:
            raise InvalidConfig("eval_max_windows must be >= 1", field="eval_max_windows")
        if self.eval_seqlen is not None and int(self.eval_seqlen) < 2:
            raise InvalidConfig("eval_seqlen must be >= 2", field="eval_seqlen")
        if not 1 <= int(self.gpus) <= gpu_rules.MOST:
            raise InvalidConfig(f"gpus must be 1 to {gpu_rules.MOST}", field="gpus")
        self.max_shard_size_bytes  # validate early

    @property
    def max_shard_size_bytes(self) -> int:
        return parse_size(self.max_shard_size, field_name="max_shard_size")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "EngineOptions":
        """Build from a JSON-like dict; unknown keys are an InvalidConfig naming the key."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise InvalidConfig(f"unknown engine option {key!r}", field=key)
        if "allowed_roots" in data and data["allowed_roots"] is not None:
            data["allowed_roots"] = tuple(data["allowed_roots"])
        if data.get("targets") is not None:
            data["targets"] = tuple(data["targets"])
        return cls(**data)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["allowed_roots"] = list(self.allowed_roots)
        d["targets"] = list(self.targets)
        if redact:
            d["hub_token"] = "***" if self.hub_token else None
        return d

    def calibration_sources(self) -> CalibrationSources:
        """Where this job's calibration data may come from (the rules the API applies at submission)."""
        return CalibrationSources.here(self.allowed_roots, self.calibration_datasets)

    def resolved_device(self) -> str:
        """The torch device string the engine will use ("cpu" or "cuda:N")."""
        import torch

        if self.device == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise InvalidConfig("device 'cuda' requested but CUDA is not available", field="device")
            return self.device if ":" in self.device else "cuda:0"
        return "cpu"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, *, field_name: str = "size") -> int:
    """`5000000000`, `"5GB"`, `"500MB"`, `"2GiB"` -> bytes (transformers' convention: GB = 10**9)."""
    if isinstance(value, bool):
        raise InvalidConfig(f"{field_name} must be a size", field=field_name)
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not m or m.group(2) not in _UNITS:
            raise InvalidConfig(f"{field_name}: cannot parse size {value!r}", field=field_name)
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n < 1:
        raise InvalidConfig(f"{field_name} must be positive", field=field_name)
    return n
