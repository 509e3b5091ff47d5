"""llm-compressor's preset schemes (compressed-tensors' `PRESET_SCHEMES`), as the engine needs them: what the
weights become, what the activations do at run time, and the `QuantizationArgs` serialization each writes
into config.json (compared with compressed-tensors' own in the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The compressed-tensors release whose serialization and tensor layout this writer follows.
FORMAT_VERSION = "0.20.1"


@dataclass(frozen=True)
class Scheme:
    name: str
    #: "float" (e4m3) or "int"
    weight_type: str
    bits: int
    #: "tensor", "channel", "block" or "group"
    strategy: str
    #: compressed-tensors' CompressionFormat the layers are saved in
    format: str
    #: activations: None (16-bit), or (type, strategy, dynamic, group_size)
    inputs: tuple[str, str, bool, int | None] | None
    group_size: int | None = None
    block: tuple[int, int] | None = None

    @property
    def static_inputs(self) -> bool:
        return self.inputs is not None and not self.inputs[2]

    def weights_args(self) -> dict[str, Any]:
        """`QuantizationArgs(...).model_dump()` of the weights, as compressed-tensors serializes it."""
        args: dict[str, Any] = {"num_bits": self.bits, "type": self.weight_type, "symmetric": True,
                                "group_size": self.group_size, "strategy": self.strategy}
        if self.block is not None:
            args["block_structure"] = list(self.block)
        args["dynamic"] = False
        return args

    def input_args(self) -> dict[str, Any] | None:
        if self.inputs is None:
            return None
        typ, strategy, dynamic, group = self.inputs
        args: dict[str, Any] = {"num_bits": 8, "type": typ, "symmetric": True, "group_size": group,
                                "strategy": strategy, "dynamic": dynamic}
        if not dynamic:
            args["observer"] = "static_minmax"
        return args


def scheme_for(config: dict[str, Any]) -> Scheme:
    """The scheme of a normalized `quant_method: compressed-tensors` config."""
    name = config["scheme"]
    if name == "FP8_DYNAMIC":
        return Scheme(name, "float", 8, "channel", "float-quantized", ("float", "token", True, None))
    if name == "FP8":
        return Scheme(name, "float", 8, "tensor", "float-quantized", ("float", "tensor", False, None))
    if name == "FP8_BLOCK":
        return Scheme(name, "float", 8, "block", "float-quantized", ("float", "group", True, 128), block=(128, 128))
    if name == "W8A8":
        return Scheme(name, "int", 8, "channel", "int-quantized", ("int", "token", True, None))
    if name in ("W4A16", "W8A16"):
        return Scheme(name, "int", 4 if name == "W4A16" else 8, "group", "pack-quantized", None,
                      group_size=config["group_size"])
    raise ValueError(f"unknown scheme {name!r}")  # the rules refuse it before


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`: what `ModelCompressor.update_config` writes for a model whose Linear
    layers carry `scheme` except `ignore` (keys sorted, as it dumps them)."""
    group = {"format": scheme.format, "input_activations": scheme.input_args(), "output_activations": None,
             "targets": ["Linear"], "weights": scheme.weights_args()}
    return {
        "config_groups": {"group_0": group},
        "format": scheme.format,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION,
    }
