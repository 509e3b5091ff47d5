"""Many calibration windows per block forward pass (`BlockRunner` with `max_tokens`): the same outputs and the
same layer inputs as one pass per window, on Llama (stories260K: keyword position embeddings), GPT-2 (Conv1D,
mask passed positionally) and OPT (learned positions), with batches of 1 and of 2 and a short last batch."""

from __future__ import annotations

import pytest
import torch

from qaas.worker.engine.blockwise import BlockRunner, merge_batches

from support.block_inputs import Gram, block_inputs, tiny_models

MODELS = tiny_models()


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 2])
def test_merged_passes_equal_one_pass_per_window(arch, batch_size):
    model, block, layers = MODELS[arch]
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (5, 64), generator=g)
    batches = [ids[i : i + batch_size] for i in range(0, 5, batch_size)]  # the last batch is short with 2
    hidden, rest = block_inputs(model, block, batches)
    assert merge_batches(hidden, rest) is not None, "the block's inputs of several batches could not be combined"

    one = BlockRunner(block, hidden, rest, torch.device("cpu"))
    many = BlockRunner(block, hidden, rest, torch.device("cpu"), max_tokens=10**6)
    assert len(one.chunks) == len(batches) and len(many.chunks) == 1
    with torch.no_grad():
        ref_out, out = one.forward_all(), many.forward_all()
    assert [o.shape for o in out] == [o.shape for o in ref_out]
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def in_features(name):
        m = block.get_submodule(name)
        return m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.in_features

    # what each layer really sees in a whole forward of the block, by an independent hook
    seen = {n: Gram(in_features(n)) for n in layers}
    hs = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].add(i[0])) for n in layers]
    try:
        with torch.no_grad():
            one.forward_all()
    finally:
        for h in hs:
            h.remove()

    classes = [[n] for n in layers]
    ref_acc = one.collect(classes, lambda n: Gram(n))
    acc = many.collect(classes, lambda n: Gram(n))
    for n in layers:
        assert acc[n].n == ref_acc[n].n == seen[n].n == ids.numel()
        assert acc[n].sum.shape == (in_features(n), in_features(n))
        torch.testing.assert_close(ref_acc[n].sum, seen[n].sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc[n].sum, ref_acc[n].sum, rtol=1e-5, atol=1e-4)

    # one class per pass, as true-sequential GPTQ runs them: the pass stops before its layer computes
    calls = []
    h = block.get_submodule(layers[-1]).register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        many.collect([[layers[-1]]], lambda n: Gram(n))
    finally:
        h.remove()
    assert calls == []


def test_batches_that_cannot_be_combined_run_one_by_one():
    model, block, _ = MODELS["llama"]
    g = torch.Generator().manual_seed(2)
    hidden, rest = block_inputs(model, block, [torch.randint(3, 500, (1, 32), generator=g) for _ in range(3)])
    rest[1] = (rest[1][0], {**rest[1][1], "output_attentions": object()})  # a value that differs between batches
    assert merge_batches(hidden, rest) is None
    runner = BlockRunner(block, hidden, [(a, {k: v for k, v in kw.items() if k != "output_attentions"})
                                          for a, kw in rest], torch.device("cpu"), max_tokens=10**6)
    with torch.no_grad():
        ref = [BlockRunner(block, [h], [r], torch.device("cpu")).forward_all()[0] for h, r in zip(hidden, runner.rest)]
        out = runner.forward_all()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
