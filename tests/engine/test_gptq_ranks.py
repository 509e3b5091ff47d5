"""GPTQ on several processes (`options.gpus`, `qaas.worker.engine.ranks`) on the CPU with the gloo backend: two
ranks write the checkpoint one process writes, byte for byte, from the same calibration data (each rank runs its
shards of the windows through every block, the Hessians are summed shard by shard in shard order, the layers are
split between the ranks by cost)."""

from __future__ import annotations

import pytest
import torch
from conftest import ASSETS

from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize
from qaas.worker.engine.ranks import SHARDS, calibration_shards, split_by_cost

pytestmark = pytest.mark.timeout(300)

SHAKESPEARE = ASSETS / "text" / "tinyshakespeare" / "input.txt"
#: 20 windows: 8 shards of 2 or 3 batches (uneven, as real counts are); act-order and static groups exercise
#: the shared factorization of q/k/v and gate/up, which the rank of each layer computes for itself
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "static_groups": True,
        "dataset": str(SHAKESPEARE), "nsamples": 20, "model_seqlen": 64}


def _run(source, out, gpus: int) -> dict:
    # evaluated beside the quantization (`beside_eval`): rank 0 alone runs the evaluation windows
    opts = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(source.parent)), gpus=gpus,
                         eval_max_windows=2, eval_seqlen=64)
    return quantize({"path": str(source)}, GPTQ, out, options=opts)


def test_two_gloo_ranks_write_the_bytes_one_process_writes(tiny_llama_dir, tmp_path):
    one = _run(tiny_llama_dir, tmp_path / "one", 1)
    two = _run(tiny_llama_dir, tmp_path / "two", 2)
    assert one["quantized_modules"] == two["quantized_modules"] == 6 * 7  # every linear of the 6 blocks
    a, b = (tmp_path / "one" / "model.safetensors").read_bytes(), (tmp_path / "two" / "model.safetensors").read_bytes()
    assert len(a) == len(b) and a == b
    assert one["layer_errors"] == two["layer_errors"]
    e1, e2 = one["evaluation"], two["evaluation"]
    assert e1["mode"] == e2["mode"] == "streamed beside the quantization"
    assert (e1["perplexity_before"], e1["perplexity_after"]) == (e2["perplexity_before"], e2["perplexity_after"])


def test_the_shards_and_the_split_of_the_layers():
    assert calibration_shards(20) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 11], [12, 13, 14], [15, 16],
                                      [17, 18, 19]]
    assert calibration_shards(3) == [[0], [1], [2]]  # fewer batches than shards: the empty ones are left out
    assert sum(map(len, calibration_shards(1000))) == 1000 and len(calibration_shards(1000)) == SHARDS
    # Llama's q, k, v (4096 in): q alone weighs as much as k and v together with 8 KV heads of 4
    costs = [4096**2 * 4096, 4096**2 * 1024, 4096**2 * 1024, 4096**2 * 2048]
    assert split_by_cost(costs, 2) == [0, 1, 1, 1]
    assert split_by_cost(costs, 1) == [0, 0, 0, 0]
    assert split_by_cost([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    torch.manual_seed(0)
    loads = [0.0, 0.0, 0.0]
    many = torch.rand(30).tolist()
    for c, r in zip(many, split_by_cost(many, 3)):
        loads[r] += c
    assert max(loads) - min(loads) <= max(many)  # greedy largest-first: within one item of even
