"""GGUF block quantizers (qaas.kernels.gguf) against ggml's own: `ggml_quantize_chunk` of the libggml-base that
llama-cpp-python built, through ctypes (tests/support/ggml_oracle.py). Byte for byte, on weights as llama-quantize
sees them (rounded to F16 first), and on the blocks where the rules bite: all zeros, ties of magnitude with
opposite signs, one outlier, tiny scales."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from support.ggml_oracle import ggml_quantize

from qaas.kernels import gguf as gguf_kernels
from qaas.kernels.gguf import LEGACY, quantize_tensor, round_float


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[0, :32] = 0                                   # an all-zero block
    x[0, 32:64] = -0.0                              # ... of negative zeros
    x[5, 1:32] = 0
    x[5, 0] = -0.0                                  # zeros, the first one negative
    x[1, :32] = 0.5
    x[1, 3] = -0.5                                  # equal magnitudes, opposite signs: the first one wins
    x[2, 40] = 3.0                                  # one outlier
    x[3, :] = x[3, :] * 1e-6                        # tiny scales (subnormal halves)
    x[4, 64:96] = torch.arange(32) / 31 - 0.5       # codes exactly between two levels
    return x.half().float()


@pytest.mark.parametrize("type_name", [*LEGACY, "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_torch_reference_is_byte_exact_with_ggml(type_name):
    x = _weights(16, 512)
    ours = quantize_tensor(x, type_name, backend="torch").numpy()
    theirs = ggml_quantize(type_name, x.numpy())
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{(ours != theirs).sum()} bytes differ"


@pytest.mark.parametrize("type_name", [*LEGACY, "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_with_an_importance_matrix_byte_exact_with_ggml(type_name):
    """ggml's quantize_*_impl paths (quant_weights): other searches, weights qw * sqrt(sigma2 + x^2), a zero
    importance and a width (544) whose rows' mean square is not a division by a power of two."""
    cols = 512 if type_name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS") else 544
    x = _weights(16, cols, seed=2)
    g = torch.Generator().manual_seed(3)
    imatrix = torch.rand(cols, generator=g) ** 3 * 5
    imatrix[7] = 0
    ours = quantize_tensor(x, type_name, imatrix=imatrix, backend="torch").numpy()
    theirs = ggml_quantize(type_name, x.numpy(), imatrix.numpy())
    assert np.array_equal(ours, theirs), f"{(ours != theirs).sum()} bytes differ"
    if type_name != "Q8_0":  # ggml's Q8_0 ignores the matrix
        assert not np.array_equal(ours, quantize_tensor(x, type_name, backend="torch").numpy())


@pytest.mark.parametrize("type_name", list(LEGACY))
def test_triton_kernel_is_byte_exact_with_ggml(type_name):
    x = _weights(8, 256, seed=1)
    ours = quantize_tensor(x, type_name, backend="triton").cpu().numpy()
    assert np.array_equal(ours, ggml_quantize(type_name, x.numpy()))



@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_triton_kernels_with_an_importance_matrix_are_byte_exact_with_ggml(type_name):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 with an imatrix through gguf_triton_legacy_imatrix's kernels: _edge_weights'
    blocks (all-zero, -0.0, ties, an outlier, negative-only, constant, huge, tiny), a width of 17 blocks (the
    rows' mean square not a division by a power of two), zero importances (one column, and a whole block)."""
    x = _edge_weights(544)
    imatrix = torch.rand(544, generator=torch.Generator().manual_seed(5)) ** 3 * 5
    imatrix[7] = 0
    imatrix[96:128] = 0
    ours = quantize_tensor(x, type_name, imatrix=imatrix, backend="triton").cpu().numpy()
    theirs = ggml_quantize(type_name, x.numpy(), imatrix.numpy())
    assert ours.shape == theirs.shape
    differ = np.flatnonzero((ours != theirs).any(axis=1))
    assert differ.size == 0, f"rows {differ.tolist()} differ ({(ours != theirs).sum()} bytes)"
    assert not np.array_equal(ours, quantize_tensor(x, type_name, backend="triton").cpu().numpy())


def test_legacy_imatrix_kernels_over_several_programs(monkeypatch):
    """Programs smaller than the rows (gguf.LEGACY_IMATRIX_BLOCKS): each block still reads its own row's sigma2
    and its own columns' importances, the last program masked."""
    monkeypatch.setitem(gguf_kernels.LEGACY_IMATRIX_BLOCKS, "rows", (1, 1))
    monkeypatch.setitem(gguf_kernels.LEGACY_IMATRIX_BLOCKS, "tile", (16, 16))
    x = _weights(8, 544, seed=6)[:2].contiguous()  # 34 blocks: three programs of 16, the last masked
    imatrix = torch.rand(544, generator=torch.Generator().manual_seed(7)) + 0.1
    ours = quantize_tensor(x, "Q5_0", imatrix=imatrix, backend="triton").cpu().numpy()
    assert np.array_equal(ours, ggml_quantize("Q5_0", x.numpy(), imatrix.numpy()))

def _edge_weights(cols: int) -> torch.Tensor:
    """_weights' blocks, and a negative-only super-block, a constant one, huge and tiny magnitudes."""
    x = _weights(8, cols, seed=4)
    x[6, :256] = -x[6, :256].abs()                   # negative only
    x[6, 256:] = 0.25                                # constant (every block and sub-block of it)
    x[7, :256] *= 2e5                                # huge: up to about 2e4, near F16's largest
    x[7, 256:] *= 1e-3                               # tiny: F16 subnormals
    return x.half().float()


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", ["Q3_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_symmetric_triton_kernels_are_byte_exact_with_ggml(type_name, with_imatrix):
    """Q3_K, Q6_K, IQ4_NL, IQ4_XS through their Triton kernels (gguf_triton_symmetric), with and without an
    importance matrix; widths that leave a program's last blocks masked (768 = 3 super-blocks a row; 544 = 17
    blocks) and the imatrix read per column across super-blocks."""
    cols = 544 if type_name == "IQ4_NL" else 768
    x = _edge_weights(cols)
    imatrix = None
    if with_imatrix:
        g = torch.Generator().manual_seed(5)
        imatrix = torch.rand(cols, generator=g) ** 3 * 5
        imatrix[7] = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = quantize_tensor(x.to(device), type_name, imatrix=imatrix, backend="triton").cpu().numpy()
    theirs = ggml_quantize(type_name, x.numpy(), None if imatrix is None else imatrix.numpy())
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{(ours != theirs).sum()} bytes differ"


def _affine_edge_rows() -> torch.Tensor:
    """128 rows x 512 (256 super-blocks: one program of the interpreter's launch, whose cost is per operation,
    not per element, so 128 rows cost what 4 would, and catch more one-ulp slips): random rows, and in the first
    four the blocks where the affine k-quants' rules bite: an all-zero super-block (and negative zeros),
    constant blocks (positive: the minimum clamps to 0; negative: a flat range), huge and tiny magnitudes, a
    negative-only super-block, an outlier beside an all-zero sub-block."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(128, 512, generator=g) * 0.02
    x[64:] = torch.rand(64, 512, generator=g) ** 4 - 0.1  # skewed rows: mostly small, a long positive tail
    x[0, :256] = 0
    x[0, 40:48] = -0.0
    x[1, :256] = 0.01                               # constant, positive
    x[1, 256:320] = -0.03                           # constant, negative (two Q4_K sub-blocks, four Q2_K ones)
    x[1, 320:336] = 0.5                             # a constant Q2_K sub-block inside a varying Q4_K one
    x[2, :256] = x[2, :256] * 5e5                   # huge (rounded to F16 below: up to ~6e4)
    x[2, 256:] = x[2, 256:] * 1e-4                  # tiny (subnormal halves)
    x[3, :256] = -x[3, :256].abs()                  # negative only
    x[3, 300] = 2.0                                 # one outlier ...
    x[3, 320:352] = 0                               # ... beside an all-zero sub-block
    return x.clamp(-6e4, 6e4).half().float()


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("type_name", ["Q2_K", "Q4_K", "Q5_K"])
def test_affine_k_quant_kernel_is_byte_exact_with_ggml(type_name, with_imatrix):
    """The Triton kernel of the affine k-quants (gguf_triton_affine.py), in the interpreter, against ggml."""
    x = _affine_edge_rows()
    imatrix = None
    if with_imatrix:
        imatrix = torch.rand(512, generator=torch.Generator().manual_seed(5)) ** 3 * 5
        imatrix[7] = 0
    ours = quantize_tensor(x, type_name, imatrix=imatrix, backend="triton").cpu().numpy()
    theirs = ggml_quantize(type_name, x.numpy(), None if imatrix is None else imatrix.numpy())
    assert ours.shape == theirs.shape
    differ = np.flatnonzero((ours != theirs).any(axis=1))
    assert differ.size == 0, f"rows {differ.tolist()} differ ({(ours != theirs).sum()} bytes)"


def test_affine_k_quant_kernel_in_launches_of_a_few_rows(monkeypatch):
    """A tensor taken in several launches (gguf.AFFINE_CHUNK super-blocks each) gives the same bytes: each
    launch's importance columns start at its first row."""
    monkeypatch.setattr(gguf_kernels, "AFFINE_CHUNK", 2)
    x = _affine_edge_rows()[:2]
    imatrix = torch.rand(512, generator=torch.Generator().manual_seed(6)) + 0.1
    ours = quantize_tensor(x, "Q2_K", imatrix=imatrix, backend="triton").cpu().numpy()
    assert np.array_equal(ours, ggml_quantize("Q2_K", x.numpy(), imatrix.numpy()))


def test_symmetric_triton_tensor_in_several_launches_is_the_same(monkeypatch):
    """A tensor larger than a launch (CHUNK_WEIGHTS) is taken in runs of whole rows: the same bytes, the imatrix
    still read per column."""
    from qaas.kernels import gguf_triton_symmetric

    x = _edge_weights(512)
    imatrix = torch.rand(512, generator=torch.Generator().manual_seed(6)) + 0.1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(gguf_triton_symmetric, "CHUNK_WEIGHTS", 3 * 512)  # 3 rows a launch: 3 + 3 + 2
    ours = quantize_tensor(x.to(device), "Q6_K", imatrix=imatrix, backend="triton").cpu().numpy()
    assert np.array_equal(ours, ggml_quantize("Q6_K", x.numpy(), imatrix.numpy()))


def test_q6_k_on_a_real_model_tensor_is_byte_exact(stories_f16_rows):
    ours = quantize_tensor(stories_f16_rows, "Q6_K", backend="torch").numpy()
    assert np.array_equal(ours, ggml_quantize("Q6_K", stories_f16_rows.numpy()))


@pytest.fixture
def stories_f16_rows():
    from conftest import STORIES
    from safetensors.torch import load_file

    w = load_file(str(STORIES / "model.safetensors"))["model.embed_tokens.weight"]  # [512, 64]
    return w.reshape(-1, 256).half().float()


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_types_round_as_the_gguf_package_does(type_name):
    x = torch.randn(4, 64) * 1e3
    x[0, 0], x[0, 1], x[0, 2] = float("inf"), 1e-40, -0.0
    ours = round_float(x, type_name).numpy().reshape(-1)
    theirs = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[type_name]).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, theirs)


def test_a_row_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_tensor(torch.zeros(2, 64), "Q6_K")
