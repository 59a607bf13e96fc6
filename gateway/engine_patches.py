"""Fixes to vLLM bugs that would reach users, loaded as a vLLM general plugin.

vLLM loads `vllm.general_plugins` entry points in every process it starts (engine core,
workers), so the fix is in place wherever the LoRA kernels run. Registered in pyproject.toml.

Bugs fixed here (vLLM 0.32, the PyTorch-native punica path used on CPU):

1. Base requests computed with an adapter (`vllm/lora/ops/torch_ops`): a token without an
   adapter has LoRA index -1, and the ops gather `weights[indices]`, so -1 wraps around to the
   LAST adapter slot. A base-model request batched with adapter requests was silently computed
   with whichever adapter sat in the last slot. The GPU (Triton) kernels skip index -1; the
   wrapped ops do the same: rows without an adapter are left untouched.

2. Prompt logprobs kill the engine (vLLM issues 16668 and 29955): prompt logits are computed
   per request from that request's slice of the batch's hidden states, but the LoRA logits
   layer indexes adapters per *request of the batch* (`sampler_indices`). With two or more
   requests in the batch the shapes disagree (einsum error in `add_lora_logits`) and the engine
   dies; reproduced here as soon as a prompt-logprob request joins a batch where anything else
   runs. The fix maps those rows to their own tokens' adapter indices (`token_lora_indices` at
   the slice's offset), which is exact, including for adapters with an lm_head LoRA.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
PLUGIN_NAME = "loraplex_lora_fixes"  # the entry point name in pyproject.toml


def _skip_rows_without_lora(op: Callable[..., Any]) -> Callable[..., Any]:
    """Run `op` only on the rows whose LoRA index is >= 0 (as the GPU kernels do)."""

    @functools.wraps(op)
    def wrapper(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        if indices.shape[0] == 1:  # one index broadcast over every row (a lone request)
            return (
                None if int(indices[0]) < 0 else op(inputs, weights, output, indices, *args, **kw)
            )
        has_lora = indices >= 0
        rows_match = inputs.shape[0] == output.shape[0] == indices.shape[0]
        if not rows_match or bool(has_lora.all()):
            return op(inputs, weights, output, indices, *args, **kw)
        rows = has_lora.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        selected = output[rows]
        op(inputs[rows], weights, selected, indices[rows], *args, **kw)
        output[rows] = selected
        return None

    wrapper.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return wrapper


# Set while one request's prompt logits are computed: (first row, row count) of its slice of
# the batch. A worker process runs one engine step at a time, so a module global suffices.
_prompt_rows: tuple[int, int] | None = None


def _row_offset(batch: Any, rows: Any) -> int:
    """Where a slice `batch[offset : offset + n]` starts (a view: same storage)."""
    if rows.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr():
        raise RuntimeError("loraplex: prompt logits input is not a slice of the batch")
    return (rows.storage_offset() - batch.storage_offset()) // batch.stride(0)


def _with_prompt_rows(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap GPUModelRunner._get_prompt_logprobs_dict: note each request's prompt rows.

    Upstream calls `self.model.compute_logits(hidden_states[offset : offset + n])` once per
    request with prompt logprobs; the wrapper sees that slice before anything copies it.
    """

    @functools.wraps(original)
    def wrapper(self: Any, hidden_states: Any, *args: Any, **kw: Any) -> Any:
        model = self.model
        compute_logits = model.compute_logits

        def compute_prompt_logits(rows: Any, *a: Any, **k: Any) -> Any:
            global _prompt_rows
            _prompt_rows = (_row_offset(hidden_states, rows), rows.shape[0])
            try:
                return compute_logits(rows, *a, **k)
            finally:
                _prompt_rows = None

        model.compute_logits = compute_prompt_logits
        try:
            return original(self, hidden_states, *args, **kw)
        finally:
            del model.compute_logits  # back to the class method

    wrapper.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return wrapper


def _logits_lora_indices(punica: Any, rows: Any) -> Any:
    """Adapter index for the rows given to the LoRA logits layer (one, or one per row)."""
    if _prompt_rows is None:
        return punica.sampler_indices  # sampling logits: one row per request
    offset, count = _prompt_rows
    if count != rows.shape[0]:
        raise RuntimeError("loraplex: prompt logits rows do not match the recorded slice")
    return punica.token_lora_indices[offset : offset + 1]  # one request: one adapter


def _add_lora_logits(self: Any, y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float,
                     *, buffer: Any = None, **kw: Any) -> None:  # fmt: skip
    """PunicaWrapperCPU.add_lora_logits with the right adapter rows (y += x @ A @ B * scale)."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    y = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    indices = _logits_lora_indices(self, x)
    if buffer is None:
        buffer = torch.zeros((x.size(0), lora_b.size(-1)), dtype=torch.float32, device=x.device)
    lora_ops.bgmv_shrink(x, lora_a, buffer, indices, scale)
    lora_ops.bgmv_expand(buffer, lora_b, y, indices, add_inputs=True)


def _patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Replace owner.name by make(original), once."""
    original = getattr(owner, name)
    if not getattr(original, "__loraplex_patched__", False):
        setattr(owner, name, make(original))


def register() -> None:
    """vLLM plugin entry point; safe to call more than once per process.

    Each fix is applied on its own, and a failure is logged, never silent.
    """
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu

        for name in _PATCHED_OPS:
            _patch(lora_ops, name, _skip_rows_without_lora)  # sgmv_* look these up at call time
            patched = getattr(lora_ops, name)
            if hasattr(punica_cpu, name):
                setattr(punica_cpu, name, patched)  # imported by name into the CPU wrapper
    except (ImportError, AttributeError) as exc:
        log.error("loraplex: cannot fix vLLM's LoRA ops for base requests: %s", exc)
    try:
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.v1.worker import gpu_model_runner

        runner = gpu_model_runner.GPUModelRunner
        _patch(runner, "_get_prompt_logprobs_dict", _with_prompt_rows)
        _add_lora_logits.__loraplex_patched__ = True  # type: ignore[attr-defined]
        punica_cpu.PunicaWrapperCPU.add_lora_logits = _add_lora_logits
    except (ImportError, AttributeError) as exc:
        log.error("loraplex: cannot fix vLLM's prompt logprobs with LoRA: %s", exc)


def plugin_enabled() -> bool:
    """True if vLLM will load this plugin in its processes (installed, not filtered out)."""
    from importlib.metadata import entry_points

    installed = any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins"))
    allowed = os.environ.get("VLLM_PLUGINS")
    return installed and (allowed is None or PLUGIN_NAME in allowed.split(","))
