"""qaas.kernels.bnb4 against the bitsandbytes package: same bytes, same absmax, same double quant, same dequant,
same serialized state dict. Both backends (torch reference, Triton kernels — in the interpreter on the CPU) and,
when a GPU is present, CUDA tensors against bitsandbytes' CUDA kernels."""

from __future__ import annotations

import math
import random

import pytest
import torch

from support.consumers import require

bnb = require("bitsandbytes")  # a missing consumer fails in CI
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from qaas.kernels import bnb4, bnb4_reference, codebooks  # noqa: E402
from qaas.kernels.bnb4 import QuantState4bit, dequantize_4bit, quantize_4bit  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# With a GPU, Triton runs compiled (not in the interpreter), so CPU tensors cannot take the Triton path there:
# the GPU machine checks CUDA tensors against bitsandbytes' CUDA kernels, the CPU machine checks the CPU rules.
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cuda"] if HAS_CUDA else ["cpu"]
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no GPU")


def _case(seed: int, device: str):
    rng = random.Random(seed)
    dtype = DTYPES[seed % 3]
    blocksize = BLOCKSIZES[(seed // 3) % len(BLOCKSIZES)]
    quant_type = ["nf4", "fp4"][(seed // 2) % 2]
    dq = bool(seed % 2)
    scale = 24 if device == "cuda" else 1
    kind = rng.random()
    if kind < 0.15:
        shape = (rng.randint(1, 700 * scale),)  # 1-D, any length
    elif kind < 0.3:
        shape = (rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 33))
    else:
        shape = (rng.randint(1, 60 * scale), rng.choice([rng.randint(1, 97), 64, 96, 128, 130]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * rng.choice([1e-3, 0.02, 1.0, 30.0])
    r = rng.random()
    if r < 0.15 and x.numel() > 1:
        x.view(-1)[: x.numel() // 2] = 0  # whole zero blocks (absmax 0)
    elif r < 0.25:
        x = x * torch.randint(0, 2, shape, generator=g)  # many exact zeros
    return x.to(dtype).to(device), blocksize, quant_type, dq


def _bnb_dequant_default(packed, qs) -> torch.Tensor:
    """bitsandbytes' dequantization through its default (pure torch) op, with its own nested-absmax path.
    (On the CPU, bitsandbytes 0.50.2's native 4-bit dequant kernel mis-indexes absmax when a row's length is not a
    multiple of the blocksize, so we compare with its reference op as well as with dequantize_4bit where it is
    correct.)"""
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        absmax = absmax.float()
    code = F.get_4bit_type(qs.quant_type, device=packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, qs.blocksize, qs.shape, qs.dtype)


def _bnb_native_dequant_ok(shape, blocksize, device) -> bool:
    if device == "cuda" or len(shape) == 1:
        return True
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def _assert_state_equal(st: QuantState4bit, qs, x):
    assert st.absmax.dtype == qs.absmax.dtype and torch.equal(st.absmax, qs.absmax)
    assert torch.equal(st.code, qs.code)
    assert st.shape == tuple(qs.shape) and st.dtype == qs.dtype and st.blocksize == qs.blocksize
    if qs.nested:
        assert st.nested
        assert torch.equal(st.nested_absmax, qs.state2.absmax)
        assert torch.equal(st.nested_code, qs.state2.code)
        assert st.offset == qs.offset.item()
        assert st.nested_blocksize == qs.state2.blocksize == 256
    else:
        assert not st.nested and st.offset is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(48))
def test_quantize_dequantize_match_bitsandbytes(seed, device):
    x, blocksize, quant_type, dq = _case(seed, device)
    packed_ref, qs = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    want_deq = _bnb_dequant_default(packed_ref, qs)
    if _bnb_native_dequant_ok(x.shape, blocksize, device):
        native = F.dequantize_4bit(packed_ref, qs)
        assert torch.equal(native, want_deq.reshape(native.shape)) or device == "cpu"
        want_deq = native
    for backend in ("torch", "triton"):
        packed, st = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq,
                                   backend=backend)  # fmt: skip
        assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(x.numel() / 2), 1)
        assert torch.equal(packed, packed_ref), f"{backend}: {(packed != packed_ref).sum().item()} bytes differ"
        _assert_state_equal(st, qs, x)
        for dbackend in ("torch", "triton"):
            out = dequantize_4bit(packed, st, backend=dbackend)
            assert out.dtype == x.dtype and out.shape == x.shape
            assert torch.equal(out.view(-1), want_deq.reshape(-1)), f"dequant {dbackend}"


@cpu_only
@pytest.mark.parametrize("seed", range(16))
def test_cuda_rules_triton_equals_reference(seed):
    """The CUDA rule set (decision trees, binary search of the 8-bit map) checked on the CPU: the Triton kernels
    (the general one, and the fast pair-word one in every NF4 code mode of bnb4.FAST_MODES) against the torch
    reference, all forced to the CUDA flavor."""
    x, blocksize, quant_type, _ = _case(1000 + seed, "cpu")
    p1, a1 = bnb4_reference.quantize_4bit_codes_reference(x, blocksize, quant_type, "cuda")
    q1, o1, n1 = bnb4_reference.double_quant_reference(a1, "cuda")
    fast_ok = bnb4.fast_path_ok(x, "cuda")
    variants = [(False, 1)] + ([(True, mode) for mode in bnb4.FAST_MODES] if fast_ok else [])
    saved = dict(bnb4.FAST_TILE)
    try:
        for fast, mode in variants:
            bnb4.FAST_TILE.update(mode=mode, per_sm=seed % 2)
            p2, a2, q2, o2, n2 = bnb4.quantize_4bit_triton(x, blocksize, quant_type, True, "cuda", fast=fast)
            assert torch.equal(p1, p2) and torch.equal(a1, a2), (fast, mode)
            assert torch.equal(q1, q2) and torch.equal(n1, n2) and o1.item() == o2.item()
    finally:
        bnb4.FAST_TILE.update(saved)


def test_nf4_bin_table_equals_threshold_count():
    """The fast kernel's NF4 table (bin of s + 3.0, one threshold per bin) gives count(s > t) for every float32 s
    near each threshold (+-64 ulps), near each bin edge, on a dense grid, at and just outside +-1 (x * rcp(absmax)
    can overshoot by an ulp or two), at +-0, and NaN (-> 0)."""
    import numpy as np

    tab = bnb4.nf4_bin_table()
    thr = np.array(codebooks.NF4_CUDA_THRESHOLDS, dtype=np.float32)
    pts = [np.linspace(-1, 1, 200001, dtype=np.float32), np.float32([-1, 1, 0, -0.0])]
    for c in list(thr) + [np.float32(-1 + b / 16) for b in range(33)]:
        i = np.arange(-64, 65, dtype=np.int64)
        pts.append((np.array([c], np.float32).view(np.int32).astype(np.int64) + i).astype(np.int32).view(np.float32))
    s = np.concatenate(pts).astype(np.float32)
    s = s[np.abs(s) <= np.float32(1.0001)]
    assert (s < -1).any() and (s > 1).any()

    def code(v):
        u = np.minimum((v + np.float32(3.0)).view(np.uint32) >> 18, 4095 + 34).astype(np.int64) - 4095
        e = tab[u]
        return (e >> 32) + (v > (e & 0xFFFFFFFF).astype(np.uint32).view(np.float32))

    assert np.array_equal(code(s), (s[:, None] > thr[None, :]).sum(1))
    assert list(code(np.float32([np.nan, -np.nan]))) == [0, 0]


def test_nf4_popc_tables_equal_threshold_count():
    """The MODE 3 NF4 code (popcount of the bins below, then one compare with the next threshold) gives
    count(s > t) on the same points as the bin table's test, and NaN -> 0."""
    import numpy as np

    mask, thr16 = bnb4.nf4_popc_tables()
    thr = np.array(codebooks.NF4_CUDA_THRESHOLDS, dtype=np.float32)
    pts = [np.linspace(-1, 1, 200001, dtype=np.float32), np.float32([-1, 1, 0, -0.0, -1.0000002, 1.0000002])]
    for c in list(thr) + [np.float32(-1 + b / 16) for b in range(33)]:
        i = np.arange(-64, 65, dtype=np.int64)
        pts.append((np.array([c], np.float32).view(np.int32).astype(np.int64) + i).astype(np.int32).view(np.float32))
    s = np.concatenate(pts).astype(np.float32)

    def code(v):
        u = ((v + np.float32(3.0)).view(np.uint32) >> 18).astype(np.int64)
        b = np.clip(u - 4096, 0, 31)
        below = mask & ((1 << b) - 1)
        base = np.array([bin(int(x)).count("1") for x in below])
        c = base + (v > thr16[base])
        return np.where(v == v, c, 0)

    assert np.array_equal(code(s), (s[:, None] > thr[None, :]).sum(1))
    assert list(code(np.float32([np.nan, -np.nan]))) == [0, 0]


@cpu_only
def test_nf4_half2_ties_decided_in_float32():
    """The packed-half2 NF4 code (MODEs 4 and 5, their interpreter twin) on weights built to land on its ties:
    blocks whose elements are float16 neighbours (+-3 ulps) of threshold * absmax, so that rn16(x / absmax)
    often equals a float16 threshold and only the float32 decision gives bitsandbytes' code."""
    import numpy as np

    rng = np.random.default_rng(7)
    nblk = 96
    am = rng.uniform(0.01, 50.0, nblk).astype(np.float16)
    thr = np.array(codebooks.NF4_CUDA_THRESHOLDS, dtype=np.float32)
    near = (thr[rng.integers(0, 15, (nblk, 63))] * am.astype(np.float32)[:, None]).astype(np.float16)
    near = (near.view(np.int16) + rng.integers(-3, 4, near.shape).astype(np.int16)).view(np.float16)
    sign = np.where(rng.random(nblk) < 0.5, -1, 1).astype(np.float16)
    x = torch.from_numpy(np.concatenate([(am * sign)[:, None], near], axis=1).reshape(-1).copy())
    assert bool((x.view(nblk, 64).abs().amax(1) == torch.from_numpy(am)).all())

    s = x.view(nblk, 64).float() * (1.0 / torch.from_numpy(am).float())[:, None]
    t16 = torch.from_numpy(np.array(codebooks.NF4_CUDA_THRESHOLD_F16_BITS, np.uint16).view(np.float16).copy())
    ties = torch.isin(s.half(), t16)
    assert ties.sum() > 300  # the data does reach the tie rule, with both outcomes
    assert 0 < (ties & (s > s.half().float())).sum() < ties.sum()

    p1, a1 = bnb4_reference.quantize_4bit_codes_reference(x, 64, "nf4", "cuda")
    saved = dict(bnb4.FAST_TILE)
    try:
        for mode in (4, 5):
            bnb4.FAST_TILE.update(mode=mode, per_sm=0)
            p2, a2, *_ = bnb4.quantize_4bit_triton(x, 64, "nf4", False, "cuda", fast=True)
            assert torch.equal(a1, a2), mode
            assert torch.equal(p1, p2), (mode, int((p1 != p2).sum()))
    finally:
        bnb4.FAST_TILE.update(saved)


def test_cuda_rules_agree_with_cpu_rules_mostly():
    """Sanity: both rule sets give the same codes except at a handful of ties near thresholds."""
    x = torch.randn(64, 256)
    p1, a1 = bnb4_reference.quantize_4bit_codes_reference(x, 64, "nf4", "cuda")
    p2, a2 = bnb4_reference.quantize_4bit_codes_reference(x, 64, "nf4", "cpu")
    assert torch.equal(a1, a2)
    assert (p1 != p2).float().mean() < 1e-3


def test_codebooks_match_bitsandbytes():
    assert torch.equal(codebooks.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebooks.fp4_code(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codebooks.dynamic_map_signed(), F.create_dynamic_map(signed=True))


@cpu_only
@pytest.mark.parametrize("quant_type,dq,dtype", [("nf4", True, torch.bfloat16), ("fp4", False, torch.float16),
                                                 ("nf4", False, torch.float32), ("fp4", True, torch.float16)])
def test_state_dict_equals_bitsandbytes_serialization(quant_type, dq, dtype):
    """as_state_dict == what bnb.nn.Linear4bit.state_dict() writes (keys, dtypes, shapes, bytes), and bitsandbytes
    loads our entries back (Params4bit.from_prequantized) to the same weights."""
    torch.manual_seed(0)
    out_f, in_f = 48, 128  # rows a multiple of the blocksize: bnb 0.50.2 CPU dequant mis-indexes otherwise
    w = torch.randn(out_f, in_f, dtype=dtype)
    p = bnb.nn.Params4bit(data=w, requires_grad=False, quant_type=quant_type, blocksize=64,
                          compress_statistics=dq)._quantize("cpu")  # fmt: skip
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=dq,
                            quant_type=quant_type)  # fmt: skip
    lin.weight = p
    ref = {k: v for k, v in lin.state_dict().items()}

    for backend in ("torch", "triton"):
        packed, st = quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq, backend=backend)
        ours = {"weight": packed, **st.as_state_dict("weight")}
        assert list(ours) == list(ref)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
            assert torch.equal(ours[k], ref[k]), k
        blob = bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()).decode()
        assert f'"dtype": "{str(dtype)[6:]}"' in blob

        stats = {k[len("weight."):]: v for k, v in ours.items() if k != "weight"}
        loaded = bnb.nn.Params4bit.from_prequantized(packed, stats, device="cpu")
        back = F.dequantize_4bit(loaded.data, loaded.quant_state)
        assert torch.equal(back, dequantize_4bit(packed, st, backend="torch"))


@cpu_only
def test_transformers_loads_our_state_dict(tmp_path):
    """A tiny Llama quantized by transformers+bitsandbytes on the CPU: our entries for each Linear equal its
    state dict entries, so the saved checkpoint is what transformers would have written."""
    transformers = pytest.importorskip("transformers")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "fp")
    fp_sd = {k: v.clone() for k, v in model.state_dict().items()}
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    try:
        qmodel = LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qcfg, device_map="cpu",
                                                  dtype=torch.bfloat16)  # fmt: skip
    except Exception as e:  # pragma: no cover - depends on the CPU support of this transformers/bnb pair
        pytest.skip(f"transformers cannot quantize to 4-bit on this CPU: {e}")
    qsd = qmodel.state_dict()
    checked = 0
    for name, w in fp_sd.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            continue
        packed, st = quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True,
                                   backend="torch")  # fmt: skip
        ours = {name: packed, **st.as_state_dict(name)}
        for k, v in ours.items():
            assert k in qsd, k
            assert qsd[k].dtype == v.dtype and torch.equal(qsd[k].cpu(), v), k
        checked += 1
    assert checked == 7


@cpu_only
def test_small_and_odd_sizes():
    for n in (1, 2, 3, 31, 33, 63, 65, 257):
        x = torch.randn(n, dtype=torch.float16)
        for dq in (False, True):
            ref, qs = F.quantize_4bit(x, blocksize=32, quant_type="nf4", compress_statistics=dq)
            for backend in ("torch", "triton"):
                packed, st = quantize_4bit(x, blocksize=32, compress_statistics=dq, backend=backend)
                assert torch.equal(packed, ref)
                _assert_state_equal(st, qs, x)


def test_validation_errors():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(x, blocksize=48)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(x, blocksize=8192)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(x, quant_type="int4")
    with pytest.raises(ValueError, match="float16"):
        quantize_4bit(x.to(torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        quantize_4bit(x.t())
    with pytest.raises(ValueError, match="backend"):
        quantize_4bit(x, backend="cuda")
    with pytest.raises(ValueError, match="at least one"):
        quantize_4bit(torch.empty(0))
    packed, st = quantize_4bit(x)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_4bit(packed.to(torch.int32), st)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_4bit(packed[:-1], st)
