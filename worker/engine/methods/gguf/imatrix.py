"""llama.cpp's importance matrix, computed from the job's calibration data.

The definition is imatrix.cpp's: for every matrix product with a weight of a decoder block (`blk.*`; the head
and the token embeddings get none, as llama-imatrix gives them none by default), the sum over the calibration
tokens of the square of each input column, and the number of tokens; llama-quantize divides the one by the
other, so a weight's importance is the mean of x_j^2 over the tokens, one value per input column (ggml's
`quant_weights`). llama-imatrix runs the unquantized model, so the inputs here are those of the source model:
block by block (`blockwise`): the first block's inputs captured from the calibration windows, each block's
linear layers hooked for their inputs, its outputs the next block's inputs, on the job's device in the
compute dtype, the squares summed in float32.

The matrix is also written as `imatrix.gguf` in llama.cpp's format (`<tensor>.in_sum2` sums and `<tensor>.counts`,
general.type "imatrix"), which `llama-quantize --imatrix` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...architecture import build_meta_model
from ...blockwise import (BlockInputCapture, BlockRunner, compute_dtype, discover_input_groups,
                          forward_chunk_tokens, materialize_block)
from ...calibration_data import CalibrationSet, load_calibration
from ..base import EngineContext


class SquaredInputs:
    """The float32 sum of x_j^2 over the tokens of a layer's inputs, and their number."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sums = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sums.device, torch.float32)
        self.sums += (x * x).sum(dim=0)
        self.count += x.shape[0]


@dataclass
class ImportanceMatrix:
    """Per Hugging Face module name (e.g. "model.layers.0.self_attn.q_proj"): the sums and the token count."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, int]
    calibration: CalibrationSet

    def values(self, module: str) -> torch.Tensor | None:
        """The importance of each input column of `module` (what llama-quantize computes from the file:
        in_sum2 / counts in float32), or None for a module without an entry."""
        if module not in self.sums:
            return None
        s = self.sums[module]
        return s / torch.full_like(s, float(self.counts[module]))  # a true division on every device

    def quantize_metadata(self, file_name: str, n_entries: int) -> list[tuple[str, Any, Any]]:
        """(key, value, gguf value type) of what `llama-quantize --imatrix <file_name>` adds to every file it
        quantizes (tools/quantize/quantize.cpp hands them to llama_model_quantize as metadata overrides, which
        llama-quant.cpp writes after general.file_type, integers as UINT32): the file name as given on the
        command line, the first of the file's `imatrix.datasets`, its entry count, and its `imatrix.chunk_count`
        (written when positive, as the windows' count always is). quantize.cpp copies the strings into 128-byte buffers, so at most 127 bytes of
        each reach the file; here they are cut at a character boundary instead (a cut through a multibyte
        character would not be a valid GGUF string)."""
        import gguf

        def cut(text: str) -> str:
            return text.encode("utf-8")[:127].decode("utf-8", errors="ignore")

        return [("quantize.imatrix.file", cut(file_name), gguf.GGUFValueType.STRING),
                ("quantize.imatrix.dataset", cut(self.calibration.source), gguf.GGUFValueType.STRING),
                ("quantize.imatrix.entries_count", n_entries, gguf.GGUFValueType.UINT32),
                ("quantize.imatrix.chunks_count", self.calibration.nsamples, gguf.GGUFValueType.UINT32)]

    def write(self, path: Path, gguf_names: dict[str, str]) -> int:
        """`imatrix.gguf` as llama-imatrix writes it, the entries named by GGUF tensor names (`gguf_names`:
        module -> "blk.0.attn_q.weight"), sorted by name; returns the number of entries written."""
        import gguf

        w = gguf.GGUFWriter(path, "imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes general.type only
        w.add_type("imatrix")
        w.add_array(gguf.Keys.IMatrix.DATASETS, [self.calibration.source])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.calibration.nsamples)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.calibration.seqlen)
        entries = sorted((gguf_names[m], m) for m in self.sums if m in gguf_names)
        for name, module in entries:
            w.add_tensor(f"{name}.in_sum2", self.sums[module].cpu().numpy().reshape(1, -1))
            w.add_tensor(f"{name}.counts", torch.tensor([[float(self.counts[module])]]).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return len(entries)


def calibration_windows(ctx: EngineContext) -> CalibrationSet:
    from transformers import AutoTokenizer

    from qaas.quantization_rules.gguf import DEFAULT_NSAMPLES

    fields = ctx.quantization_config
    tok = AutoTokenizer.from_pretrained(str(ctx.source_dir), trust_remote_code=ctx.options.allow_remote_code)
    return load_calibration(fields["dataset"], tok, nsamples=fields["nsamples"] or DEFAULT_NSAMPLES,
                            seqlen=fields["model_seqlen"], seed=fields["seed"],
                            sources=ctx.options.calibration_sources())


@torch.no_grad()
def compute_imatrix(ctx: EngineContext, calib: CalibrationSet) -> ImportanceMatrix:
    """The importance matrix of every linear layer of every block (see the module docstring); progress is
    reported per block on the current stage."""
    device, layout, rep = ctx.device, ctx.layout, ctx.reporter
    dtype = compute_dtype(device, ctx.config)
    meta = build_meta_model(layout.hf_config, allow_remote_code=ctx.options.allow_remote_code)
    pre = ctx.reader.load_many(layout.pre_tensors)
    capture = BlockInputCapture(meta, layout.block_name, pre, device=device, dtype=dtype)
    batches = list(calib.input_ids.split(1))  # one window a batch: BlockRunner merges them into long passes
    hidden, rest = capture.capture(batches, [], 0, device)
    del pre
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    groups: list[list[str]] | None = None
    n = len(layout.blocks)
    for binfo in layout.blocks:
        rep.check_cancelled()
        prefix = binfo.prefix
        tensors = ctx.reader.load_prefix(prefix)
        block = materialize_block(capture.blocks[binfo.index], {k[len(prefix) + 1:]: v for k, v in tensors.items()},
                                  device, dtype)
        del tensors
        if groups is None:  # the same in every block of the model
            names = [li.name[len(prefix) + 1:] for li in binfo.linears]
            args, kwargs = rest[0]
            groups = discover_input_groups(block, names, hidden[0], args, kwargs, device)
        runner = BlockRunner(block, hidden, rest, device, max_tokens=forward_chunk_tokens(block, device))
        accs: dict[str, Any] = runner.collect(groups, lambda n_in: SquaredInputs(n_in, device))
        for cls in groups:
            acc = accs[cls[0]]
            for name in cls:  # the layers of a class see the same inputs: one sum serves them all
                sums[f"{prefix}.{name}"] = acc.sums
                counts[f"{prefix}.{name}"] = acc.count
        hidden = runner.forward_all()
        block.to("meta")  # its memory is given back
        del block, runner, accs
        rep.progress(binfo.index + 1, n, message=f"importance matrix: block {binfo.index + 1}/{n}")
    return ImportanceMatrix(sums, counts, calib)
