"""Which inference engines load a GPTQ checkpoint qaas writes: one table, each row's rules read from that
engine's source (the version is in the row), plain Python so the API decides `options.targets` at submission
with the same rules the engine states in the result and the model card.

Two kinds of rule:
  * config rules (bits, sym, group size, act-order, checkpoint format), known at submission: a request whose
    config an engine named in `options.targets` refuses is a 422 naming the field that excludes it
    (`check_targets`);
  * layer-shape rules (packing alignment, Marlin tiles), known once the model is read: the engine keeps any
    layer a target could not load in float16 (`layer_refusal`), and the result lists for every engine
    whether the written checkpoint loads (`gptq_engines`).

What qaas writes (`qaas.worker.engine.methods.gptq.format`): whole groups only, 3-bit layers 32-aligned,
2/4/8-bit layers of any width padded to whole words as GPTQModel allocates them, `sym: false` as `gptq_v2`
(`gptq.written_format`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .fields import FieldError
from .gptq import written_format


@dataclass(frozen=True)
class Engine:
    #: The `options.targets` value.
    name: str
    title: str
    #: Where the rules below were read.
    source: str
    bits: tuple[int, ...]
    #: None: any group size (whole groups; qaas writes no partial group).
    group_sizes: tuple[int, ...] | None = None
    sym_only: bool = False
    #: desc_act with group_size > 0 accepted.
    act_order_with_groups: bool = True
    #: False: every file is read as v1 (zero - 1), whatever `checkpoint_format` says, so a v2 file is misread.
    reads_checkpoint_format: bool = True
    #: bits -> (in_features multiple, out_features multiple) a layer needs (0: every bit width; absent: any
    #: width, padded words read).
    shapes: tuple[tuple[int, int, int], ...] = ()
    #: Packed tensors sized exactly `in * bits / 32` rows and `out * bits / 32` zero columns
    #: (`in // pack_factor`): a padded word does not fit.
    pack_aligned: bool = False
    devices: tuple[str, ...] = ("cuda",)
    note: str = ""


_VLLM_SOURCE = ("vLLM 0.33 (model_executor/layers/quantization/gptq.py, gptq_marlin.py; AutoGPTQConfig used by "
                "both): weight_bits in (4, 8) and sym only; desc_act with group_size > 0 refused; g_idx dropped; "
                "checkpoint_format never read; scales sized in // group_size, qweight in // pack_factor, qzeros "
                "out // pack_factor")

#: The table. Order: the libraries people load checkpoints with first, then serving engines, then kernels.
ENGINES: tuple[Engine, ...] = (
    Engine("transformers", "transformers + GPTQModel (AutoModelForCausalLM.from_pretrained)",
           "transformers 5.17 quantizers/quantizer_gptq.py + optimum 2.3 + GPTQModel 7.7 (the kernel GPTQModel "
           "selects on the CPU: 2/3/8-bit TorchLinear (any width), 4-bit TorchCpuAvx512Linear for group sizes "
           "16-512 (out_features divisible by 32, in_features by 2) or TorchFusedLinear for -1 (int4pack: out "
           "divisible by 16); a refusal is raised, not a fallback)",
           bits=(2, 3, 4, 8), shapes=((4, 2, 32),), devices=("cpu", "cuda"),
           note="CPU kernel choice measured; on CUDA GPTQModel picks Marlin/ExLlama v2/Triton by the same table"),
    Engine("gptqmodel", "GPTQModel.load", "GPTQModel 7.7 nn_modules/qlinear/torch.py (TorchQuantLinear: bits 2-8, "
           "group sizes -1/16..1024, sym and asym, desc_act, any in/out width: buffers ceil(in * bits / 32) rows, "
           "unpacked codes cut at in_features); models/loader.py (v1 asym refused, v1 -> v2 with a carry)",
           bits=(2, 3, 4, 8), group_sizes=(-1, 16, 32, 64, 128, 256, 512, 1024), devices=("cpu", "cuda")),
    Engine("vllm", "vLLM (gptq / gptq_marlin)", _VLLM_SOURCE, bits=(4, 8), sym_only=True,
           act_order_with_groups=False, reads_checkpoint_format=False, pack_aligned=True,
           note="gptq_marlin is picked for group sizes -1/32/64/128 and needs in % 128 == 0, out % 64 == 0"),
    Engine("sglang", "SGLang (gptq / gptq_marlin)",
           "SGLang main at 006d096 (python/sglang/srt/layers/quantization/gptq.py: GPTQConfig weight_bits in "
           "(2, 3, 4, 8); checkpoint_format read only for 'marlin'; GPTQLinearMethod needs in % group_size == 0, "
           "out % pack_factor == 0, qweight in // pack_factor; gptq_marlin for 4/8-bit sym)",
           bits=(2, 3, 4, 8), reads_checkpoint_format=False, pack_aligned=True),
    Engine("exllamav2", "GPTQModel's ExLlama v2 kernel (BACKEND.EXLLAMA_V2)",
           "GPTQModel 7.7 nn_modules/qlinear/exllamav2.py (SUPPORTS_BITS [4], group sizes -1/32/64/128, sym and "
           "asym, desc_act, in and out divisible by 32; REQUIRES_FORMAT_V2: GPTQModel converts v1 on load)",
           bits=(4,), group_sizes=(-1, 32, 64, 128), shapes=((0, 32, 32),)),
    Engine("marlin", "GPTQModel's Marlin kernel (BACKEND.GPTQ_MARLIN)",
           "GPTQModel 7.7 nn_modules/qlinear/marlin.py (SUPPORTS_BITS [4, 8], group sizes -1/32/64/128, sym only, "
           "desc_act, no auto padding of groups; tile-misaligned shapes padded at run time when the backend is "
           "asked for, skipped by automatic selection)",
           bits=(4, 8), group_sizes=(-1, 32, 64, 128), sym_only=True),
)

BY_NAME: dict[str, Engine] = {e.name: e for e in ENGINES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
#: Every output must load in these, whatever `options.targets` adds.
ALWAYS: tuple[str, ...] = ("transformers", "gptqmodel")


def required(targets: Iterable[str] = ()) -> list[Engine]:
    """The engines a GPTQ output must load in: transformers and GPTQModel, plus the request's targets."""
    names = list(ALWAYS) + [t for t in targets if t not in ALWAYS]
    return [BY_NAME[n] for n in names]


def config_refusal(engine: Engine, config: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) when `engine` cannot load what qaas writes for the normalized GPTQ `config`, else None."""
    bits, gs = config["bits"], config["group_size"]
    fmt, _ = written_format(config)
    if bits not in engine.bits:
        return "bits", f"{engine.title} loads {'/'.join(map(str, engine.bits))}-bit GPTQ only, not {bits}-bit"
    if engine.sym_only and not config["sym"]:
        return "sym", f"{engine.title} loads symmetric GPTQ only (sym: true)"
    if engine.group_sizes is not None and gs not in engine.group_sizes:
        return "group_size", (f"{engine.title} takes group_size in {list(engine.group_sizes)}, not {gs}")
    if not engine.act_order_with_groups and config["desc_act"] and gs != -1:
        return "desc_act", f"{engine.title} refuses desc_act (act-order) with a positive group_size"
    if not engine.reads_checkpoint_format and fmt != "gptq":
        field = "sym" if not config["sym"] else "format"
        return field, (f"{engine.title} reads every checkpoint as v1 (it ignores checkpoint_format), and this config "
                       f"is written as {fmt}" + (" (sym: false is always gptq_v2)" if field == "sym" else ""))
    return None


def layer_refusal(engine: Engine, in_features: int, out_features: int, bits: int) -> str | None:
    """Why `engine` cannot load one quantized layer of this shape (as qaas writes it), else None."""
    for b, in_m, out_m in engine.shapes:
        if b in (0, bits) and (in_features % in_m or out_features % out_m):
            return (f"{engine.title} needs in_features % {in_m} == 0 and out_features % {out_m} == 0 at {bits} bits "
                    f"(in {in_features}, out {out_features})")
    if engine.pack_aligned and (in_features * bits % 32 or out_features * bits % 32):
        return (f"{engine.title} sizes packed tensors in_features * bits / 32 exactly: {in_features}x{out_features} "
                f"at {bits} bits needs padded words it does not read")
    return None


def gptq_engines(config: dict[str, Any], layer_shapes: Iterable[tuple[int, int]] = ()) -> list[dict[str, Any]]:
    """For every engine of the table: does the checkpoint written for `config` with quantized layers of
    `layer_shapes` ((in, out) pairs) load there, and if not, why. The list every GPTQ result carries."""
    shapes = sorted(set(layer_shapes))
    rows = []
    for engine in ENGINES:
        refusal = config_refusal(engine, config)
        why = refusal[1] if refusal else next(
            (w for i, o in shapes if (w := layer_refusal(engine, i, o, config["bits"]))), None)
        row: dict[str, Any] = {"engine": engine.name, "title": engine.title, "loads": why is None,
                               "devices": list(engine.devices), "source": engine.source}
        if why:
            row["why_not"] = why
        if engine.note:
            row["note"] = engine.note
        rows.append(row)
    return rows


def check_targets(config: dict[str, Any], targets: Iterable[str]) -> None:
    """FieldError naming the field that excludes an engine the request names in `options.targets` (for a
    normalized GPTQ config; other methods have no engine table yet and accept only an empty list)."""
    targets = list(targets)
    unknown = [t for t in targets if t not in BY_NAME]
    if unknown:
        raise FieldError("options.targets", f"unknown engine(s) {unknown}; known: {', '.join(NAMES)}")
    if not targets:
        return
    if config.get("quant_method") != "gptq":
        raise FieldError("options.targets", "engine targets are checked for GPTQ outputs only")
    for name in targets:
        refusal = config_refusal(BY_NAME[name], config)
        if refusal:
            field, why = refusal
            raise FieldError(f"quantization_config.{field}", f"options.targets names {name!r}: {why}")
