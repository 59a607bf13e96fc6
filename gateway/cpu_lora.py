"""Multi-adapter LoRA on CPU: a few batched matmuls per layer, however many adapters a step mixes.

vLLM's PyTorch-native ops copy each token's adapter weights (a gather per token and layer),
and a loop over adapters pays several small kernels per adapter, slice and layer. Here the
tokens of a step are laid out once (`plan_step`) in a padded grid, one block of rows per
adapter slot, and each LoRA layer is one `bmm` that shrinks all its slices, one `bmm` per
slice that expands (on views of vLLM's stacked weights), and one gather back into the rows.
Tokens without an adapter never enter the grid: their rows are left exactly as they were.
The grid spans the slots from the lowest to the highest in use, as deep as the largest
adapter's token count. An adapter with far more tokens than the others (a prompt being
prefilled while the rest decode) takes its own matmul on its rows instead of deepening the
grid for all; so does every adapter of a step that would still be mostly padding.

Pure PyTorch, no vLLM import: `engine_patches.py` installs these into vLLM's CPU wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass

import torch

# The grid is used while its rows <= this x the tokens with an adapter: measured, a grid with
# 4x padding still ran 2-4x faster than one matmul per adapter (benchmarks/README.md).
MAX_PADDING = 8.0
# An adapter with over this x the mean tokens per adapter in the step (a prompt being
# prefilled among decoding requests) gets its own matmul on its rows, out of the grid.
HEAVY_GROUP = 2.0

Rows = slice | torch.Tensor  # a slice (contiguous rows: views, no copies) or row numbers


def row_groups(indices: torch.Tensor, rows: int) -> list[tuple[int, Rows]]:
    """(adapter slot, its rows) for each adapter in the batch; index -1 (no adapter) skipped.

    One index for a batch of several rows (a lone request) applies to all of them.
    """
    if indices.numel() == 1:
        slot = int(indices[0])
        return [] if slot < 0 else [(slot, slice(0, rows))]
    slots, counts = torch.unique_consecutive(indices, return_counts=True)
    spans: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        if slot >= 0:
            spans.setdefault(slot, []).append((start, start + count))
        start += count
    return [
        (slot, slice(*runs[0]) if len(runs) == 1 else torch.cat([torch.arange(*r) for r in runs]))
        for slot, runs in spans.items()
    ]


@dataclass(frozen=True)
class StepPlan:
    """How one step's tokens meet their adapters: a padded grid, or one group per adapter."""

    groups: list[tuple[int, Rows]]  # (slot, its rows): adapters that take their own matmul
    low: int = 0  # grid: the lowest slot in use
    slots: int = 0  # grid: slots low..low+slots-1 (all slots between the lowest and highest)
    depth: int = 0  # grid rows per slot: the largest adapter's token count
    gather: torch.Tensor | None = None  # [slots*depth] token in each grid row (padding: any)
    tokens: torch.Tensor | None = None  # tokens with an adapter; None: all, in batch order
    cells: torch.Tensor | None = None  # grid row of each of those tokens


def plan_step(indices: torch.Tensor, max_padding: float = MAX_PADDING) -> StepPlan:
    """Lay out one step's tokens by adapter slot (index -1: no adapter), once per step."""
    count = indices.shape[0]
    has_adapter = indices >= 0
    served = int(has_adapter.sum())
    if served == 0:
        return StepPlan(groups=[])
    if count == 1:
        return StepPlan(groups=row_groups(indices, 1))
    in_use = indices[has_adapter]
    low = int(in_use.min())
    per_slot = torch.bincount(in_use - low)
    cap = math.ceil(HEAVY_GROUP * served / int((per_slot > 0).sum()))
    heavy = torch.nonzero(per_slot > cap).flatten() + low
    if heavy.numel():  # their own matmuls; the others on the grid
        is_heavy = torch.isin(indices, heavy)
        own = row_groups(torch.where(is_heavy, indices, -1), count)
        rest = plan_step(torch.where(is_heavy, -1, indices), max_padding)
        return dataclasses.replace(rest, groups=own + rest.groups)
    slots, depth = per_slot.shape[0], int(per_slot.max())
    if slots * depth > max_padding * served:  # skewed: one adapter holds nearly every token
        return StepPlan(groups=row_groups(indices, count))
    # Tokens with an adapter sorted by slot (stable: batch order within a slot); rank within it.
    order = torch.argsort(torch.where(has_adapter, indices, low + slots), stable=True)[:served]
    slot_of = indices[order] - low
    starts = torch.cumsum(per_slot, 0) - per_slot
    cells = slot_of * depth + torch.arange(served) - starts[slot_of]
    gather = torch.full((slots * depth,), int(order[0]), dtype=torch.long)
    gather[cells] = order
    if served == count:  # every token: index the grid by batch row, no scatter needed
        by_row = torch.empty(count, dtype=torch.long)
        by_row[order] = cells
        return StepPlan([], low, slots, depth, gather, None, by_row)
    return StepPlan([], low, slots, depth, gather, order, cells)


def _slot_weights(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """One slot of vLLM's stacked LoRA weights, (out, in): [slot, 1, out, in] or [slot, out, in]."""
    w = weights[slot]
    return (w[0] if w.dim() == 3 else w).to(dtype)


def shrink(
    y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, groups: list[tuple[int, Rows]],
    scale: float,
) -> None:  # fmt: skip
    """y[rows, :r] = scale * x[rows] @ A[slot].T for each adapter's rows (the LoRA A step)."""
    for slot, rows in groups:
        a = _slot_weights(weights, slot, y.dtype)
        out = (x[rows].to(y.dtype) @ a.T).mul_(scale)
        target = y[:, : a.shape[0]]
        if isinstance(rows, slice):
            target[rows] = out
        else:
            target.index_copy_(0, rows, out)


def expand(
    y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, groups: list[tuple[int, Rows]],
    offset: int, size: int, add: bool,
) -> None:  # fmt: skip
    """y[rows, offset:offset+size] (+)= x[rows] @ B[slot].T per adapter (the LoRA B step)."""
    for slot, rows in groups:
        b = _slot_weights(weights, slot, y.dtype)
        width = min(size, b.shape[0])
        out = x[rows].to(y.dtype) @ b[:width].T
        target = y[:, offset : offset + width]
        if isinstance(rows, slice):
            if add:
                target[rows].add_(out)  # a view: in place, no write-back copy
            else:
                target[rows] = out
        elif add:
            target.index_add_(0, rows, out)
        else:
            target.index_copy_(0, rows, out)


def _add_from_grid(y: torch.Tensor, grid_out: torch.Tensor, plan: StepPlan) -> None:
    """y[token] += grid_out[cell of token] for the tokens with an adapter; others untouched."""
    assert plan.cells is not None
    delta = grid_out.view(-1, grid_out.shape[-1]).index_select(0, plan.cells)
    if delta.dtype != y.dtype:
        delta = delta.to(y.dtype)
    if plan.tokens is None:
        y.add_(delta)
    else:
        y.index_add_(0, plan.tokens, delta)


class _JoinedShrinks:
    """Each layer's A stacks joined along the rank, [max_loras, n*rank, in], for one bmm.

    A copy, remade when vLLM writes any of the stacks (loading or evicting an adapter bumps
    their version counters); steps between loads reuse it.
    """

    def __init__(self) -> None:
        # id of a layer's first A stack -> (that stack, the stacks' versions, the joined copy)
        self._joined: dict[int, tuple[weakref.ref, tuple[int, ...], torch.Tensor]] = {}

    def __call__(self, lora_a: tuple[torch.Tensor, ...]) -> torch.Tensor:
        first = lora_a[0]
        if len(lora_a) == 1:
            return first.view(first.shape[0], *first.shape[-2:])
        versions = tuple(a._version for a in lora_a)
        known = self._joined.get(id(first))
        if known is not None and known[0]() is first and known[1] == versions:
            return known[2]
        if known is None:  # forget the copy with the layer
            weakref.finalize(first, self._joined.pop, id(first), None)
        joined = torch.cat([a.view(a.shape[0], *a.shape[-2:]) for a in lora_a], dim=1)
        self._joined[id(first)] = (weakref.ref(first), versions, joined)
        return joined


joined_shrinks = _JoinedShrinks()


def add_lora(
    plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
) -> None:  # fmt: skip
    """y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T, each token with its own slot.

    `lora_a[i]` is vLLM's [max_loras, 1, rank, in] stack and `lora_b[i]` its
    [max_loras, 1, out_i, rank] stack; `output_slices[i]` is out_i, laid side by side in y.
    On the grid: one bmm shrinks all slices, one bmm per slice expands into one buffer, and
    one gather adds the buffer to the output rows.
    """
    if plan.groups:  # per adapter: shrink into an fp32 buffer, expand from it
        offset = 0
        for a, b, size in zip(lora_a, lora_b, output_slices, strict=True):
            buffer = torch.zeros((x.shape[0], a.shape[-2]), dtype=torch.float32)
            shrink(buffer, x, a, plan.groups, scale)
            expand(y, buffer, b, plan.groups, offset, size, add=True)
            offset += size
    if plan.gather is None:
        return
    span, rank = slice(plan.low, plan.low + plan.slots), lora_a[0].shape[-2]
    slots = plan.slots
    joined = joined_shrinks(lora_a)
    grid = x.index_select(0, plan.gather).view(slots, plan.depth, x.shape[-1])
    if grid.dtype != joined.dtype:
        grid = grid.to(joined.dtype)
    hidden = torch.bmm(grid, joined[span].transpose(1, 2))  # [slots, depth, n*rank]
    if scale != 1.0:
        hidden.mul_(scale)
    if hidden.dtype != lora_b[0].dtype:
        hidden = hidden.to(lora_b[0].dtype)
    b_t = [b.view(b.shape[0], *b.shape[-2:])[span, :size].transpose(1, 2)
           for b, size in zip(lora_b, output_slices, strict=True)]  # fmt: skip
    total = sum(output_slices)
    if len(b_t) == 1:
        out = torch.bmm(hidden, b_t[0])
    else:  # each slice's expand written into its columns of one buffer
        out = hidden.new_empty((slots, plan.depth, total))
        offset = 0
        for i, (b, size) in enumerate(zip(b_t, output_slices, strict=True)):
            part = hidden[:, :, i * rank : (i + 1) * rank]
            torch.bmm(part, b, out=out[:, :, offset : offset + size])
            offset += size
    _add_from_grid(y[:, :total], out, plan)


def add_expand(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor) -> None:
    """y += x @ B[slot].T per token: the embedding layer's LoRA (its A step is a lookup)."""
    if plan.groups:
        expand(y, x, lora_b, plan.groups, 0, y.shape[1], add=True)
    if plan.gather is None:
        return
    span = slice(plan.low, plan.low + plan.slots)
    b_t = lora_b.view(lora_b.shape[0], *lora_b.shape[-2:])[span].transpose(1, 2)
    grid = x.index_select(0, plan.gather).view(plan.slots, plan.depth, x.shape[-1])
    width = min(y.shape[1], b_t.shape[2])
    _add_from_grid(y[:, :width], torch.bmm(grid.to(b_t.dtype), b_t[:, :, :width]), plan)


def add_lora_rows(
    plan: StepPlan, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scale: float,
) -> None:  # fmt: skip
    """The logits layer's LoRA (one slice, the whole width of y), each row with its slot."""
    width = min(y.shape[-1], lora_b.shape[-2])  # y may be padded past the vocabulary
    add_lora(plan, y, x, (lora_a,), (lora_b,), scale, (width,))


class StepPlans:
    """One step's plans, each made on first use: vLLM's indices are set once per step."""

    def __init__(self, token_indices: torch.Tensor, sampler_indices: torch.Tensor) -> None:
        self._token_indices = token_indices  # one per token of the step
        self._sampler_indices = sampler_indices  # one per row of the logits (per request)

    @functools.cached_property
    def tokens(self) -> StepPlan:
        """For the LoRA linear layers: one row per token."""
        return plan_step(self._token_indices)

    @functools.cached_property
    def sampler(self) -> StepPlan:
        """For the LoRA logits layer: one row per sampled request."""
        return plan_step(self._sampler_indices)

    @functools.cached_property
    def token_groups(self) -> list[tuple[int, Rows]]:
        """Per-adapter rows, for the ops that take one weight stack at a time (embeddings)."""
        return row_groups(self._token_indices, self._token_indices.shape[0])
