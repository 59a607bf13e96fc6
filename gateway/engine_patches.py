"""Fixes to vLLM bugs and slow paths that would reach users, loaded as a vLLM general plugin.

vLLM loads `vllm.general_plugins` entry points in every process it starts (engine core,
workers), so the fix is in place wherever the LoRA kernels run. Registered in pyproject.toml.
Each fix is installed only where its bug is (gateway/engine_fixes.py decides: platform, vLLM
version), patches the CPU subclass rather than the GPU class it inherits from, and each worker
reports what it applied (`worker_report`). What each fixes and how it is tested:
docs/vllm-issues.md; what each measured: benchmarks/.

1. cpu_lora_ops: base rows computed with an adapter in vLLM's PyTorch-native LoRA ops (CPU):
   index -1 wrapped to the last slot, and every token's weights copied. The replacements
   (gateway/cpu_lora.py) leave rows without an adapter alone and batch all adapters of a step.
2. cpu_prompt_logprobs_lora: prompt logprobs with LoRA kill the engine (vLLM issues 16668,
   29955): the logits layer indexed adapters per request of the batch; the fix uses the
   slice's own token indices (V1 CPU model runner).
3. no_spin_wait: engine processes spin between steps (`SpinCondition.wait`), taking the cores
   of a CPU host; with LORAPLEX_ENGINE_SPIN_WAIT=0 a reader blocks on the queue's notification.
4. one_call_per_step: two process round trips per step (`execute_model`, then
   `sample_tokens`): the CPU worker samples at once when no structured-output request needs
   the bitmask.
5. int8_lora_device: LoRA on an int8 (oneDNN) base: the kernel sets `layer.weight = None`,
   and vLLM's `_get_lora_device` reads it; the fix returns the weight scale's device.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq  # vLLM's own dependency: its engine processes talk over ZMQ

from gateway import cpu_lora, engine_fixes

log = logging.getLogger(__name__)

SPIN_WAIT_ENV = "LORAPLEX_ENGINE_SPIN_WAIT"  # config engine_spin_wait's variable; "0": fix 3
BUSY_POLL_MS = 1  # fix 3: longest a busy reader blocks without a notification


# Drop-in replacements for vllm.lora.ops.torch_ops.lora_ops (same signatures), used where an
# index tensor is given per call (prompt logits, full-linear adapters): one matmul per adapter.
def bgmv_shrink(inputs: Any, weights: Any, output: Any, indices: Any, scaling: float = 1.0) -> None:
    cpu_lora.shrink(output, inputs, weights, cpu_lora.row_groups(indices, inputs.shape[0]), scaling)


def bgmv_expand(
    inputs: Any, weights: Any, output: Any, indices: Any, add_inputs: bool = True
) -> None:
    groups = cpu_lora.row_groups(indices, inputs.shape[0])
    cpu_lora.expand(output, inputs, weights, groups, 0, output.shape[1], add_inputs)


def bgmv_expand_slice(
    inputs: Any, weights: Any, output: Any, indices: Any, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
) -> None:  # fmt: skip
    groups = cpu_lora.row_groups(indices, inputs.shape[0])
    cpu_lora.expand(output, inputs, weights, groups, slice_offset, slice_size, add_inputs)


_REPLACED_OPS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
                 "bgmv_expand_slice": bgmv_expand_slice}  # fmt: skip


# PunicaWrapperCPU's methods on the step's plans (gateway/cpu_lora.py), made once per step.
def _update_metadata_with_plans(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        result = original(self, *args, **kw)
        self.loraplex_plans = cpu_lora.StepPlans(self.token_lora_indices, self.sampler_indices)
        return result

    wrapper.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return wrapper


def _add_lora_linear(self: Any, y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float,
                     output_slices: tuple[int, ...], *, buffer: Any = None,
                     **kw: Any) -> None:  # fmt: skip
    """PunicaWrapperCPU.add_lora_linear: every slice of every adapter in a few batched matmuls."""
    y = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    cpu_lora.add_lora(self.loraplex_plans.tokens, y, x, lora_a, lora_b, scale, output_slices)


def _add_lora_embedding(self: Any, y: Any, x: Any, lora_b: Any, add_inputs: bool = True,
                        **kw: Any) -> None:  # fmt: skip
    """PunicaWrapperCPU.add_lora_embedding: y += x @ B[slot].T, all adapters at once."""
    if not add_inputs:  # not a call vLLM makes; the per-adapter path handles it
        cpu_lora.expand(y, x, lora_b, self.loraplex_plans.token_groups, 0, y.shape[1], False)
        return
    cpu_lora.add_expand(self.loraplex_plans.tokens, y, x, lora_b)


def _wrapper_shrink(self: Any, y: Any, x: Any, w_t_all: Any, scale: float) -> None:
    cpu_lora.shrink(y, x, w_t_all, self.loraplex_plans.token_groups, scale)


def _wrapper_expand(self: Any, y: Any, x: Any, w_t_all: Any, add_inputs: bool) -> None:
    cpu_lora.expand(y, x, w_t_all, self.loraplex_plans.token_groups, 0, y.shape[1], add_inputs)


def _wrapper_expand_slice(
    self: Any, y: Any, x: Any, w_t_all: Any, y_offset: int, y_slice_size: int, add_inputs: bool
) -> None:
    groups = self.loraplex_plans.token_groups
    cpu_lora.expand(y, x, w_t_all, groups, y_offset, y_slice_size, add_inputs)


_WRAPPER_METHODS = {
    "add_lora_linear": _add_lora_linear,
    "add_lora_embedding": _add_lora_embedding,
    "_shrink_prefill": _wrapper_shrink,
    "_shrink_decode": _wrapper_shrink,
    "_expand_prefill": _wrapper_expand,
    "_expand_decode": _wrapper_expand,
    "_expand_slice_prefill": _wrapper_expand_slice,
    "_expand_slice_decode": _wrapper_expand_slice,
}


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
    if _prompt_rows is None:  # sampling logits: one row per request, batched over adapters
        cpu_lora.add_lora_rows(self.loraplex_plans.sampler, y, x, lora_a, lora_b, scale)
        return
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


def _blocking_wait(self, timeout_ms: int | None = None) -> None:  # noqa: ANN001
    """`SpinCondition.wait` without the spin: block until notified (fix 3)."""
    if time.monotonic() <= self.last_read + self.busy_loop_s:  # busy: the next read is near
        timeout_ms = BUSY_POLL_MS if timeout_ms is None else min(timeout_ms, BUSY_POLL_MS)
    events = dict(self.poller.poll(timeout=timeout_ms))
    if self.local_notify_socket in events:  # CONFLATE keeps one: consume it
        self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)


def _sample_in_same_call(original: Callable[..., Any]) -> Callable[..., Any]:
    """`Worker.execute_model` that samples too when the engine core has nothing to add (fix 4)."""

    @functools.wraps(original)
    def execute_model(self: Any, scheduler_output: Any) -> Any:
        output = original(self, scheduler_output)
        if (
            output is None  # the forward pass ran; sampling waits for `sample_tokens`
            and not scheduler_output.has_structured_output_requests  # no grammar bitmask
            and self.vllm_config.max_concurrent_batches == 1  # the engine core's plain `step`
            and getattr(self.model_runner, "execute_model_state", None) is not None
        ):
            return self.sample_tokens(None)
        return output

    execute_model.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return execute_model


def _device_of_released_weight(original: Callable[..., Any]) -> Callable[..., Any]:
    """`_get_lora_device` that also knows layers whose kernel released `weight` (fix 5)."""

    @functools.wraps(original)
    def get_lora_device(base_layer: Any) -> Any:
        if getattr(base_layer, "weight", 0) is None and hasattr(base_layer, "weight_scale"):
            return base_layer.weight_scale.device
        return original(base_layer)

    get_lora_device.__loraplex_patched__ = True  # type: ignore[attr-defined]
    return get_lora_device


INSTALLED: set[str] = set()
"""The fixes `register` installed in this process (names from gateway/engine_fixes.py)."""


def _install_cpu_lora_ops() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name, op in _REPLACED_OPS.items():
        setattr(lora_ops, name, op)  # sgmv_* look these up at call time
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, op)  # imported by name into the CPU wrapper
    wrapper = punica_cpu.PunicaWrapperCPU
    _patch(wrapper, "update_metadata", _update_metadata_with_plans)
    for name, method in _WRAPPER_METHODS.items():
        getattr(wrapper, name)  # fail here, not mid-step, if upstream renamed one
        setattr(wrapper, name, method)


def _install_cpu_prompt_logprobs() -> None:
    """On vLLM's V1 CPU model runner only (the subclass, not the GPU runner it inherits)."""
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.v1.worker import cpu_model_runner

    if not getattr(punica_cpu.PunicaWrapperCPU.update_metadata, "__loraplex_patched__", False):
        raise AttributeError("needs the CPU LoRA ops' step plans (cpu_lora_ops)")
    _patch(cpu_model_runner.CPUModelRunner, "_get_prompt_logprobs_dict", _with_prompt_rows)
    _add_lora_logits.__loraplex_patched__ = True  # type: ignore[attr-defined]
    setattr(punica_cpu.PunicaWrapperCPU, "add_lora_logits", _add_lora_logits)  # noqa: B010


def _install_one_call_per_step() -> None:
    """On vLLM's CPU worker only (the subclass, not the GPU worker it inherits from)."""
    from vllm.v1.worker import cpu_worker

    _patch(cpu_worker.CPUWorker, "execute_model", _sample_in_same_call)


def _install_int8_lora_device() -> None:
    from vllm.lora.layers import base_linear, fused_moe, utils

    _patch(utils, "_get_lora_device", _device_of_released_weight)
    patched = getattr(utils, "_get_lora_device")  # noqa: B009
    for module in (base_linear, fused_moe):  # imported there by name
        setattr(module, "_get_lora_device", patched)  # noqa: B010


def _install_no_spin_wait() -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    _blocking_wait.__loraplex_patched__ = True  # type: ignore[attr-defined]
    setattr(shm_broadcast.SpinCondition, "wait", _blocking_wait)  # noqa: B010


_INSTALLERS: dict[str, Callable[[], None]] = {
    engine_fixes.CPU_LORA_OPS: _install_cpu_lora_ops,
    engine_fixes.CPU_PROMPT_LOGPROBS: _install_cpu_prompt_logprobs,
    engine_fixes.ONE_CALL_PER_STEP: _install_one_call_per_step,
    engine_fixes.INT8_LORA_DEVICE: _install_int8_lora_device,
    engine_fixes.NO_SPIN_WAIT: _install_no_spin_wait,
}


def register() -> None:
    """vLLM plugin entry point; safe to call more than once per process.

    Installs the fixes `engine_fixes.fixes_to_install` selects for this process's platform
    and vLLM version, each on its own; a failure is logged, never silent, and leaves that fix
    out of `INSTALLED` (so out of the engine's report).
    """
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    spin_wait = os.environ.get(SPIN_WAIT_ENV) != "0"
    selected = engine_fixes.fixes_to_install(current_platform.device_type, vllm_version, spin_wait)
    if not selected and engine_fixes.release(vllm_version) != engine_fixes.VERIFIED_VLLM:
        log.warning(
            "loraplex: vLLM %s is not the verified %s; no engine fix installed",
            vllm_version,
            engine_fixes.VERIFIED_VLLM,
        )
    for name in selected:  # in FIXES order: the prompt-logprob fix after the ops it uses
        try:
            _INSTALLERS[name]()
        except (ImportError, AttributeError) as exc:
            log.error("loraplex: cannot install engine fix %s: %s", name, exc)
            continue
        INSTALLED.add(name)


def _patched(owner: type, name: str) -> bool:
    return bool(getattr(getattr(owner, name, None), "__loraplex_patched__", False))


def worker_report(worker: Any) -> dict[str, Any]:
    """What a vLLM worker runs on and which installed fixes are in its code paths.

    A fix counts only where the worker would call it: the prompt-logprob fix on vLLM's V1 CPU
    model runner (the V2 runner has no such method), the one-call step on a CPU worker.
    """
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    runner = getattr(worker, "model_runner", None)
    reachable = {
        engine_fixes.CPU_PROMPT_LOGPROBS: _patched(type(runner), "_get_prompt_logprobs_dict"),
        engine_fixes.ONE_CALL_PER_STEP: _patched(type(worker), "execute_model"),
    }
    return {
        "platform": current_platform.device_type,
        "model_runner": "v2" if getattr(worker, "use_v2_model_runner", False) else "v1",
        "vllm_version": vllm_version,
        "applied": [n for n in engine_fixes.FIX_NAMES if n in INSTALLED and reachable.get(n, True)],
    }
