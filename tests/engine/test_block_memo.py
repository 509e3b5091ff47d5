"""Settled parts of a block reused across true-sequential passes (`BlockRunner` with `changing`/`memo_bytes`,
`ChildOutputMemo`): every layer's collected inputs and the block's outputs are bit for bit those of the runner
without the memo while the layers change group by group as GPTQ changes them, on Llama (stories260K), GPT-2
(Conv1D) and GPT-J (attention and MLP in parallel on one input); the settled attention stops running."""

from __future__ import annotations

import pytest
import torch

from qaas.worker.engine.blockwise import BlockRunner, discover_input_groups

from support.block_inputs import Gram, block_inputs, tiny_models

CPU = torch.device("cpu")


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                       n_positions=256))
    return model, model.transformer.h[1]


def _arch(arch):
    if arch == "gptj":
        return _gptj()
    model, block, _ = tiny_models()[arch]
    return model, block


def _linears(block):
    return [n for n, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def _in_features(block, name):
    m = block.get_submodule(name)
    return m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.in_features


def _perturb(block, names, seed):
    """What quantizing a group does to the live block: new weights for its layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            w = block.get_submodule(n).weight
            w.data.copy_(w + 0.05 * w.abs().mean() * torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj"])
def test_sequential_passes_equal_bit_for_bit_and_skip_the_settled_attention(arch):
    model, block = _arch(arch)
    model.eval()
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    hidden, rest = block_inputs(model, block, [torch.randint(3, 500, (2, 48), generator=g) for _ in range(3)])
    linears = _linears(block)
    groups = discover_input_groups(block, linears, hidden[0], rest[0][0], rest[0][1], CPU)
    assert len(groups) >= 3, groups
    plain = BlockRunner(block, hidden, rest, CPU, max_tokens=200)  # two passes: batches [0, 1] and [2]
    memo = BlockRunner(block, hidden, rest, CPU, max_tokens=200, changing=linears, memo_bytes=1 << 30)
    assert len(memo.chunks) == 2

    calls = {n: 0 for n in linears}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in linears]
    try:
        for step, cls in enumerate(groups):
            ref = plain.collect([cls], lambda n: Gram(n))
            before = dict(calls)
            got = memo.collect([cls], lambda n: Gram(n))
            assert got[cls[0]].n == ref[cls[0]].n == sum(h.shape[0] * h.shape[1] for h in hidden)
            assert torch.equal(got[cls[0]].sum, ref[cls[0]].sum), f"{arch}: inputs of {cls} differ with the memo"
            assert calls[cls[0]] - before[cls[0]] == len(memo.chunks)  # a collected layer always runs
            _perturb(block, cls, seed=step)
            memo.settled(cls)
        before = dict(calls)
        out = memo.forward_all()
        memo_calls = {n: calls[n] - before[n] for n in linears}
        ref_out = plain.forward_all()
    finally:
        for h in hooks:
            h.remove()
        block.load_state_dict(saved)
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b), f"{arch}: block outputs differ with the memo"
    # the attention's layers are settled before the MLP's last group: the final pass does not run them
    first = groups[0][0]
    assert memo_calls[first] == 0 and memo.memo.hits > 0
    assert memo.memo.kept == {} and memo.memo.used == 0  # the final pass hands everything over


def test_no_budget_keeps_nothing_and_a_small_one_keeps_what_fits():
    model, block = _arch("llama")
    g = torch.Generator().manual_seed(4)
    hidden, rest = block_inputs(model, block, [torch.randint(3, 500, (1, 32), generator=g) for _ in range(2)])
    linears = _linears(block)
    assert BlockRunner(block, hidden, rest, CPU, changing=linears, memo_bytes=0).memo is None
    one_output = hidden[0].nbytes  # the attention's output is as large as the block's input
    runner = BlockRunner(block, hidden, rest, CPU, changing=linears, memo_bytes=one_output)
    runner.settled(linears)
    runner.collect([["mlp.down_proj"]], lambda n: Gram(n))
    assert len(runner.memo.kept) == 1 and runner.memo.used == one_output  # one pass's of two
    out = runner.forward_all()
    ref = BlockRunner(block, hidden, rest, CPU).forward_all()
    assert runner.memo.hits == 1
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


class _MutatingBlock(torch.nn.Module):
    """A block that changes its first part's output in place: a kept output would be served changed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2)
        return self.b(h)


def test_an_output_changed_in_place_is_recomputed():
    torch.manual_seed(5)
    block = _MutatingBlock()
    hidden = [torch.randn(1, 4, 8)]
    rest = [((), {})]
    runner = BlockRunner(block, hidden, rest, CPU, changing=["a", "b"], memo_bytes=1 << 20)
    runner.collect([["a"]], lambda n: Gram(n))
    runner.settled(["a"])
    runner.collect([["b"]], lambda n: Gram(n))
    assert len(runner.memo.kept) == 1  # a's output, kept before the block doubled it
    out = runner.forward_all()
    assert runner.memo.hits == 0
    assert torch.equal(out[0], block(hidden[0]).detach())


def test_a_layer_being_collected_runs_even_when_settled():
    model, block = _arch("llama")
    g = torch.Generator().manual_seed(6)
    hidden, rest = block_inputs(model, block, [torch.randint(3, 500, (1, 32), generator=g)])
    linears = _linears(block)
    runner = BlockRunner(block, hidden, rest, CPU, changing=linears, memo_bytes=1 << 30)
    runner.settled(linears)
    runner.collect([["mlp.down_proj"]], lambda n: Gram(n))  # keeps the attention's output
    assert runner.memo.kept
    again = runner.collect([["self_attn.o_proj"]], lambda n: Gram(n))
    ref = BlockRunner(block, hidden, rest, CPU).collect([["self_attn.o_proj"]], lambda n: Gram(n))
    assert again["self_attn.o_proj"].n == ref["self_attn.o_proj"].n == 32
    assert torch.equal(again["self_attn.o_proj"].sum, ref["self_attn.o_proj"].sum)


class _ChainBlock(torch.nn.Module):
    """p (two layers) -> q -> r: a part holding several layers, then single layers."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        self.q = torch.nn.Linear(8, 8)
        self.r = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.r(self.q(self.p(x)))


def test_outputs_of_or_after_a_changing_layer_are_never_kept():
    """Layers settled out of execution order: p holds an unsettled layer, and q runs after it, so neither
    output is final; keeping either would hand the final pass an output of the old weights."""
    torch.manual_seed(7)
    block = _ChainBlock()
    hidden, rest = [torch.randn(1, 4, 8)], [((), {})]
    runner = BlockRunner(block, hidden, rest, CPU, changing=["p.0", "p.1", "q", "r"], memo_bytes=1 << 20)
    runner.settled(["p.1", "q"])
    runner.collect([["r"]], lambda n: Gram(n))
    assert runner.memo.kept == {}
    _perturb(block, ["p.0", "r"], seed=8)
    runner.settled(["p.0", "r"])
    assert torch.equal(runner.forward_all()[0], block(hidden[0]).detach())
