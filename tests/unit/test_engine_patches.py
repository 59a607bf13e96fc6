"""The vLLM CPU LoRA-op fix: tokens without an adapter (index -1) are left untouched."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from gateway import engine_patches
from gateway.engine_patches import _skip_rows_without_lora, register


def test_index_minus_one_no_longer_picks_the_last_slot():
    torch.manual_seed(0)
    inputs = torch.randn(3, 8)
    weights = torch.randn(2, 1, 4, 8)  # 2 adapter slots, rank 4
    indices = torch.tensor([0, -1, 1])
    upstream = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    buggy = torch.zeros(3, 4)
    upstream(inputs, weights, buggy, indices)
    assert buggy[1].abs().sum() > 0, "upstream op no longer wraps -1; the patch may be dropped"

    fixed = torch.zeros(3, 4)
    _skip_rows_without_lora(upstream)(inputs, weights, fixed, indices)
    assert torch.equal(fixed[1], torch.zeros(4))
    assert torch.allclose(fixed[0], weights[0, 0] @ inputs[0])
    assert torch.allclose(fixed[2], weights[1, 0] @ inputs[2])


def test_expand_with_add_inputs_leaves_base_rows_unchanged():
    register()
    inputs = torch.randn(3, 4)
    weights = torch.randn(2, 1, 8, 4)
    output = torch.ones(3, 8)
    lora_ops.bgmv_expand(inputs, weights, output, torch.tensor([-1, 1, -1]), add_inputs=True)
    assert torch.equal(output[0], torch.ones(8)) and torch.equal(output[2], torch.ones(8))
    assert torch.allclose(output[1], 1 + weights[1, 0] @ inputs[1])
    register()  # idempotent: no double wrapping
    assert not hasattr(lora_ops.bgmv_expand.__wrapped__, "__loraplex_patched__")


class _Punica:
    """The two index views of vLLM's punica wrapper that add_lora_logits reads."""

    def __init__(self, per_request, per_token):
        self.sampler_indices = torch.tensor(per_request)
        self.token_lora_indices = torch.tensor(per_token)


class _Model:
    def compute_logits(self, rows):
        return engine_patches._logits_lora_indices(self.punica, rows).tolist()


class _Runner:
    def __init__(self, punica):
        self.model = _Model()
        self.model.punica = punica

    def prompt_logprobs(self, hidden_states, slices):
        return [self.model.compute_logits(hidden_states[a:b]) for a, b in slices]


def test_prompt_logit_rows_use_their_own_requests_adapter():
    """Batch of 3 requests with 2, 3 and 2 tokens: [0,0 | 1,1,1 | -1,-1] (the review case:
    a prompt slice as long as the batch has requests must not take per-request indices)."""
    batch = torch.randn(7, 4)
    runner = _Runner(_Punica([0, 1, -1], [0, 0, 1, 1, 1, -1, -1]))
    run = engine_patches._with_prompt_rows(_Runner.prompt_logprobs)
    assert run(runner, batch, [(2, 5), (0, 2), (5, 7)]) == [[1], [0], [-1]]
    assert engine_patches._prompt_rows is None
    assert "compute_logits" not in vars(runner.model)  # restored
    # sampling logits (one row per request) keep vLLM's per-request indices
    assert runner.model.compute_logits(batch[:3]) == [0, 1, -1]


def test_a_copy_instead_of_a_slice_is_refused():
    runner = _Runner(_Punica([0], [0, 0]))
    run = engine_patches._with_prompt_rows(
        lambda self, hidden: self.model.compute_logits(hidden[0:2].clone())
    )
    with pytest.raises(RuntimeError, match="not a slice"):
        run(runner, torch.randn(2, 4))


def test_a_lone_base_request_with_many_rows_is_left_untouched():
    """One base request's prompt logits: index [-1] for all rows must not pick the last slot."""
    inputs, weights = torch.randn(5, 4), torch.randn(2, 1, 8, 4)
    output = torch.ones(5, 8)
    upstream = getattr(lora_ops.bgmv_expand, "__wrapped__", lora_ops.bgmv_expand)
    _skip_rows_without_lora(upstream)(inputs, weights, output, torch.tensor([-1]), add_inputs=True)
    assert torch.equal(output, torch.ones(5, 8))
    adapter_rows = torch.ones(5, 8)  # a lone adapter request: broadcast, as upstream
    _skip_rows_without_lora(upstream)(inputs, weights, adapter_rows, torch.tensor([1]))
    assert torch.allclose(adapter_rows, 1 + inputs @ weights[1, 0].T)
