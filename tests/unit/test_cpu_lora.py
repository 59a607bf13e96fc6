"""The batched CPU LoRA ops: every token gets exactly its own adapter's product, tokens without
an adapter keep their bits, at every adapter count, slot layout and dtype vLLM can hand over."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from gateway import cpu_lora
from gateway.cpu_lora import StepPlans, add_expand, add_lora, add_lora_rows, plan_step
from gateway.engine_patches import register

MAX_LORAS, RANK = 16, 16
SLICES = (24, 8, 8)  # a fused qkv-like layer: three outputs side by side
RANKS = (4, 8, 16, 8)  # adapters of mixed rank: the stacks are zero past each adapter's rank


def _stacks(dtype: torch.dtype = torch.float32, hidden: int = 32):
    """vLLM-shaped stacks: A [max_loras, 1, rank, in], B [max_loras, 1, out, rank] per slice."""
    a = tuple(torch.zeros(MAX_LORAS, 1, RANK, hidden, dtype=dtype) for _ in SLICES)
    b = tuple(torch.zeros(MAX_LORAS, 1, out, RANK, dtype=dtype) for out in SLICES)
    for slot in range(MAX_LORAS):
        r = RANKS[slot % len(RANKS)]
        for i, out in enumerate(SLICES):
            a[i][slot, 0, :r] = torch.randn(r, hidden)
            b[i][slot, 0, :, :r] = torch.randn(out, r)
    return a, b


def _want(x, a, b, indices, scale):
    """Row by row in float64: the adapter's product, or None for a row without an adapter."""
    rows = []
    for row, slot in zip(x.double(), indices, strict=True):
        if slot < 0:
            rows.append(None)
            continue
        parts = [b[i][slot, 0].double() @ (a[i][slot, 0].double() @ row) for i in range(3)]
        rows.append(scale * torch.cat(parts))
    return rows


def _check(y, before, want, atol):
    for row, expected in enumerate(want):
        if expected is None:
            assert torch.equal(y[row], before[row]), f"row {row} has no adapter but changed"
        else:
            got = y[row].double() - before[row].double()
            assert torch.allclose(got, expected, atol=atol, rtol=0.02), f"row {row}"


def _serves_each_row_its_adapter(plan, indices, a, b, scale=1.0, dtype=torch.float32, atol=1e-4):
    """Run `plan` on random inputs: each row gets its adapter's product, others keep their bits."""
    x = torch.randn(len(indices), a[0].shape[-1], dtype=dtype)
    y = torch.randn(len(indices), sum(SLICES), dtype=dtype)
    before = y.clone()
    add_lora(plan, y, x, a, b, scale, SLICES)
    _check(y, before, _want(x, a, b, indices.tolist(), scale), atol=atol)


def _mixed(adapters: int, tokens: int, base_share: float = 0.0, slots: list[int] | None = None):
    """Token indices cycling over `adapters` slots, some tokens on the base (-1), shuffled."""
    slots = slots or list(range(adapters))
    g = torch.Generator().manual_seed(adapters * 100 + tokens)
    indices = torch.tensor([slots[i % adapters] for i in range(tokens)])
    indices[torch.rand(tokens, generator=g) < base_share] = -1
    return indices[torch.randperm(tokens, generator=g)]


@pytest.mark.parametrize("adapters", [1, 4, 8, 16])
@pytest.mark.parametrize("base_share", [0.0, 0.2])
def test_every_token_gets_its_own_adapter_at_each_adapter_count(adapters, base_share):
    torch.manual_seed(adapters)
    a, b = _stacks()
    indices = _mixed(adapters, 64, base_share)
    plan = plan_step(indices)
    _serves_each_row_its_adapter(plan, indices, a, b, scale=0.5)
    if adapters > 1:
        assert plan.gather is not None  # the batched path, not one matmul per adapter


def test_the_grid_holds_each_adapter_token_once_and_no_base_token():
    indices = torch.tensor([2, -1, 0, 2, 2, -1, 0, 1])
    plan = plan_step(indices)
    assert (plan.low, plan.slots, plan.depth) == (0, 3, 3)
    assert plan.tokens is not None and plan.cells is not None and plan.gather is not None
    assert sorted(plan.tokens.tolist()) == [0, 2, 3, 4, 6, 7]
    for token, cell in zip(plan.tokens.tolist(), plan.cells.tolist(), strict=True):
        assert plan.gather[cell] == token
        assert cell // plan.depth == indices[token] - plan.low  # its own slot's block
    assert len(set(plan.cells.tolist())) == len(plan.cells)


def test_steps_without_adapters_or_with_one_token_take_no_grid():
    assert plan_step(torch.tensor([-1, -1, -1])).groups == []
    assert plan_step(torch.tensor([-1, -1])).gather is None
    assert plan_step(torch.tensor([3])).groups == [(3, slice(0, 1))]
    one = plan_step(torch.tensor([7, -1, 7, 7]))  # one adapter in a high slot: no padding
    assert (one.low, one.slots, one.depth) == (7, 1, 3)


def test_a_prompt_among_decoding_requests_takes_its_own_matmul_beside_the_grid():
    """Continuous batching's usual step: one prompt prefilled while the others decode."""
    torch.manual_seed(2)
    a, b = _stacks()
    indices = torch.tensor([5] * 40 + [0, -1, 9, 5, 1, 2, 0, 1, 2])
    plan = plan_step(indices)
    assert [slot for slot, _ in plan.groups] == [5]  # the prompt and its decode token
    assert plan.gather is not None and plan.depth == 2  # the rest: a grid 2 rows deep
    _serves_each_row_its_adapter(plan, indices, a, b)


def test_steps_that_would_be_mostly_padding_take_one_matmul_per_adapter():
    torch.manual_seed(7)
    a, b = _stacks()
    indices = torch.tensor([0, 15, 0, -1])  # two adapters 16 slots apart: a 32-row grid
    plan = plan_step(indices)
    assert plan.gather is None and {slot for slot, _ in plan.groups} == {0, 15}
    _serves_each_row_its_adapter(plan, indices, a, b)


def test_adapters_in_scattered_slots_share_one_grid():
    torch.manual_seed(3)
    a, b = _stacks()
    indices = _mixed(4, 32, 0.2, slots=[1, 6, 11, 15])
    plan = plan_step(indices)
    assert plan.gather is not None and (plan.low, plan.slots) == (1, 15)
    _serves_each_row_its_adapter(plan, indices, a, b)


def test_bf16_matches_the_float64_product_within_bf16_rounding():
    torch.manual_seed(4)
    a, b = _stacks(torch.bfloat16)
    indices = _mixed(8, 32, 0.2)
    _serves_each_row_its_adapter(plan_step(indices), indices, a, b, dtype=torch.bfloat16, atol=0.6)


def test_a_new_adapter_in_a_slot_is_used_from_the_next_call():
    """The joined A stacks are a copy; vLLM's in-place writes must reach it."""
    torch.manual_seed(5)
    a, b = _stacks()
    indices = torch.tensor([0, 1, 0, 1])
    x = torch.randn(4, 32)
    plan = plan_step(indices)
    add_lora(plan, torch.zeros(4, sum(SLICES)), x, a, b, 1.0, SLICES)  # joins and keeps a copy
    a[1][1, 0].copy_(torch.randn(RANK, 32))  # vLLM's set_lora: an in-place write to one slot
    y = torch.zeros(4, sum(SLICES))
    add_lora(plan, y, x, a, b, 1.0, SLICES)
    _check(y, torch.zeros_like(y), _want(x, a, b, indices.tolist(), 1.0), atol=1e-4)


def test_embedding_and_logits_layers_use_the_same_rows():
    torch.manual_seed(6)
    indices = _mixed(8, 16, 0.25)
    plan = plan_step(indices)
    b = torch.randn(MAX_LORAS, 1, 20, RANK)
    x, y = torch.randn(16, RANK), torch.randn(16, 24)  # y wider than B: padded columns
    before = y.clone()
    add_expand(plan, y, x, b)
    a = torch.randn(MAX_LORAS, 1, RANK, 32)
    h = torch.randn(16, 32)
    logits = torch.randn(16, 24)
    logits_before = logits.clone()
    add_lora_rows(plan, logits, h, a, b, 2.0)
    for row, slot in enumerate(indices.tolist()):
        if slot < 0:
            assert torch.equal(y[row], before[row]) and torch.equal(logits[row], logits_before[row])
            continue
        assert torch.allclose(y[row, :20], before[row, :20] + b[slot, 0] @ x[row], atol=1e-4)
        want = logits_before[row, :20] + 2.0 * b[slot, 0] @ (a[slot, 0] @ h[row])
        assert torch.allclose(logits[row, :20], want, atol=1e-3)
        assert torch.equal(y[row, 20:], before[row, 20:])
        assert torch.equal(logits[row, 20:], logits_before[row, 20:])


def test_plans_are_made_once_per_step_and_only_when_used(monkeypatch):
    made = []
    real = cpu_lora.plan_step
    monkeypatch.setattr(cpu_lora, "plan_step", lambda i: made.append(i) or real(i))
    plans = StepPlans(torch.tensor([0, 1, -1]), torch.tensor([0, 1]))
    assert plans.tokens is plans.tokens
    assert len(made) == 1  # the sampler plan waits for a logits layer with LoRA


@pytest.mark.parametrize("adapters", [1, 4, 8, 16])
def test_vllms_cpu_wrapper_serves_a_mixed_batch_at_each_adapter_count(adapters):
    """vLLM's PunicaWrapperCPU with the patch: metadata from a LoRAMapping, add_lora_linear."""
    register()
    torch.manual_seed(10 + adapters)
    lora_ids = list(range(101, 101 + MAX_LORAS))  # slot -> LoRA id
    indices = _mixed(adapters, 48, 0.2)
    tokens = tuple(lora_ids[i] if i >= 0 else 0 for i in indices.tolist())
    punica = PunicaWrapperCPU(256, 64, "cpu")
    a, b = _stacks()
    for is_prefill in (True, False):
        punica.update_metadata(LoRAMapping(tokens, tokens, is_prefill=is_prefill), lora_ids, 16, 32)
        x, y = torch.randn(48, 32), torch.randn(48, sum(SLICES))
        before = y.clone()
        punica.add_lora_linear(y, x, a, b, 1.0, SLICES)
        _check(y, before, _want(x, a, b, indices.tolist(), 1.0), atol=1e-4)
