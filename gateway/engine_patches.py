"""Fixes to vLLM bugs that would reach users, loaded as a vLLM general plugin.

vLLM loads `vllm.general_plugins` entry points in every process it starts (engine core,
workers), so the fix is in place wherever the LoRA kernels run. Registered in pyproject.toml.

Bug fixed here (vLLM 0.32, PyTorch-native punica ops used on CPU, `vllm/lora/ops/torch_ops`):
a token without an adapter has LoRA index -1, and the ops gather `weights[indices]`, so -1
wraps around to the LAST adapter slot. A base-model request batched together with adapter
requests was silently computed with whichever adapter sat in the last slot. The GPU (Triton)
kernels skip index -1; these wrappers do the same: rows without an adapter are left untouched.
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


def register() -> None:
    """vLLM plugin entry point; safe to call more than once per process."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return
    for name in _PATCHED_OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "__loraplex_patched__", False):
            continue
        patched = _skip_rows_without_lora(original)
        setattr(lora_ops, name, patched)  # the sgmv_* ops look these up at call time
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, patched)  # imported by name into the CPU wrapper
    log.debug("loraplex: patched vLLM torch LoRA ops to skip tokens without an adapter")
