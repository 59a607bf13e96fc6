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
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _skip_rows_without_lora(op: Callable[..., Any]) -> Callable[..., Any]:
    """Run `op` only on the rows whose LoRA index is >= 0 (as the GPU kernels do)."""

    @functools.wraps(op)
    def wrapper(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        if indices.shape[0] == 1 and inputs.shape[0] > 1:  # one request: its index, every row
            indices = indices.expand(inputs.shape[0])
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


# Hidden states of the batch whose prompt logprobs are being computed (one engine step at a
# time per worker process), so add_lora_logits can tell which batch rows it was given.
_prompt_batch_hidden_states: Any = None


def _with_batch_hidden_states(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap GPUModelRunner._get_prompt_logprobs_dict to expose the batch's hidden states."""

    @functools.wraps(original)
    def wrapper(self: Any, hidden_states: Any, *args: Any, **kw: Any) -> Any:
        global _prompt_batch_hidden_states
        _prompt_batch_hidden_states = hidden_states
        try:
            return original(self, hidden_states, *args, **kw)
        finally:
            _prompt_batch_hidden_states = None

    wrapper.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return wrapper


def _logits_lora_indices(punica: Any, rows: Any) -> Any:
    """Adapter index of each row given to the LoRA logits layer."""
    per_request = punica.sampler_indices
    if rows.shape[0] == per_request.shape[0] or per_request.shape[0] == 1:
        return per_request  # sampling logits: one row per request (or a lone request)
    batch = _prompt_batch_hidden_states
    if batch is None or rows.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr():
        raise RuntimeError("loraplex: cannot map prompt-logprob rows to their adapters")
    offset = (rows.storage_offset() - batch.storage_offset()) // batch.stride(0)
    return punica.token_lora_indices[offset : offset + rows.shape[0]]


def _add_lora_logits(self: Any, y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float,
                     *, buffer: Any = None, **kw: Any) -> None:  # fmt: skip
    """PunicaWrapperCPU.add_lora_logits with per-row adapter indices (y += x @ A @ B * scale)."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    y = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    indices = _logits_lora_indices(self, x)
    if buffer is None:
        buffer = torch.zeros((x.size(0), lora_b.size(-1)), dtype=torch.float32, device=x.device)
    lora_ops.bgmv_shrink(x, lora_a, buffer, indices, scale)
    lora_ops.bgmv_expand(buffer, lora_b, y, indices, add_inputs=True)


def register() -> None:
    """vLLM plugin entry point; safe to call more than once per process."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.v1.worker import gpu_model_runner
    except ImportError:  # a vLLM without these modules: nothing to fix
        return
    runner = gpu_model_runner.GPUModelRunner
    if not getattr(runner._get_prompt_logprobs_dict, "__loraplex_patched__", False):
        runner._get_prompt_logprobs_dict = _with_batch_hidden_states(
            runner._get_prompt_logprobs_dict
        )
        punica_cpu.PunicaWrapperCPU.add_lora_logits = _add_lora_logits
    for name in _PATCHED_OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "__loraplex_patched__", False):
            continue
        patched = _skip_rows_without_lora(original)
        setattr(lora_ops, name, patched)  # the sgmv_* ops look these up at call time
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, patched)  # imported by name into the CPU wrapper
    log.debug("loraplex: patched vLLM torch LoRA ops to skip tokens without an adapter")
