"""The vLLM CPU LoRA-op replacements: tokens without an adapter (index -1) are left untouched,
each adapter's rows are multiplied with that adapter's weights (one matmul per adapter), and
prompt-logit rows use their own request's adapter."""

from __future__ import annotations

import importlib
import threading
import time

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from gateway import engine_patches
from gateway.cpu_lora import row_groups
from gateway.engine_patches import (
    bgmv_expand,
    bgmv_expand_slice,
    bgmv_shrink,
    register,
)

# Mixed, non-contiguous adapters, with base rows (-1) in between: the general case.
INDICES = [1, 1, -1, 0, 0, 0, 1, -1, 2]


def _per_row(inputs, weights, indices):
    """Reference: row by row, weights[slot] (out, in) @ row, None for rows without adapter."""
    return [None if i < 0 else weights[i, 0] @ row for row, i in zip(inputs, indices, strict=True)]


def test_upstream_still_wraps_minus_one_to_the_last_slot():
    """Why the replacement exists; if this fails, upstream fixed it (keep the speed-up)."""
    upstream = importlib.reload(lora_ops)  # the module's own functions, not ours
    try:
        inputs, weights = torch.randn(3, 8), torch.randn(2, 1, 4, 8)
        buggy = torch.zeros(3, 4)
        upstream.bgmv_shrink(inputs, weights, buggy, torch.tensor([0, -1, 1]))
        assert buggy[1].abs().sum() > 0
    finally:
        register()


def test_row_groups_slices_for_runs_and_row_lists_otherwise():
    groups = dict(row_groups(torch.tensor(INDICES), len(INDICES)))
    assert groups[0] == slice(3, 6)
    assert groups[1].tolist() == [0, 1, 6] and groups[2] == slice(8, 9)
    assert -1 not in groups
    assert row_groups(torch.tensor([1]), 5) == [(1, slice(0, 5))]  # a lone request
    assert row_groups(torch.tensor([-1]), 5) == []


def test_shrink_and_expand_match_per_row_products_and_skip_base_rows():
    torch.manual_seed(0)
    rows, indices = len(INDICES), torch.tensor(INDICES)
    inputs, a = torch.randn(rows, 16), torch.randn(3, 1, 4, 16)  # 3 slots, rank 4
    shrunk = torch.full((rows, 4), 7.0)
    bgmv_shrink(inputs, a, shrunk, indices, 0.5)
    b = torch.randn(3, 1, 6, 4)
    expanded = torch.ones(rows, 10)
    bgmv_expand_slice(shrunk, b, expanded, indices, 3, 6, add_inputs=True)
    whole = torch.ones(rows, 6)
    bgmv_expand(shrunk, b, whole, indices, add_inputs=False)
    for row, (want_a, want_b) in enumerate(
        zip(_per_row(inputs, a, INDICES), _per_row(shrunk, b, INDICES), strict=True)
    ):
        if want_a is None:  # untouched
            assert torch.equal(shrunk[row], torch.full((4,), 7.0))
            assert torch.equal(expanded[row], torch.ones(10)) and torch.equal(
                whole[row], torch.ones(6)
            )
            continue
        assert torch.allclose(shrunk[row], 0.5 * want_a, atol=1e-5)
        assert torch.allclose(expanded[row, 3:9], 1 + want_b, atol=1e-5)
        assert torch.equal(expanded[row, :3], torch.ones(3)) and torch.equal(
            expanded[row, 9:], torch.ones(1)
        )
        assert torch.allclose(whole[row], want_b, atol=1e-5)


def test_cpu_punica_wrapper_applies_each_tokens_adapter():
    """vLLM's PunicaWrapperCPU end to end (metadata from a LoRAMapping, add_lora_linear)."""
    register()
    torch.manual_seed(1)
    lora_ids = [7, 8, 9]  # slot -> LoRA id
    tokens = [lora_ids[i] if i >= 0 else 0 for i in INDICES]
    punica = PunicaWrapperCPU(64, 8, "cpu")
    for is_prefill in (True, False):
        punica.update_metadata(
            LoRAMapping(tuple(tokens), tuple(tokens), is_prefill=is_prefill), lora_ids, 4, 32
        )
        x = torch.randn(len(tokens), 16)
        a = (torch.randn(4, 1, 4, 16), torch.randn(4, 1, 4, 16))
        b = (torch.randn(4, 1, 5, 4), torch.randn(4, 1, 3, 4))
        y = torch.zeros(len(tokens), 8)
        punica.add_lora_linear(y, x, a, b, 2.0, (5, 3))
        for row, slot in enumerate(INDICES):
            if slot < 0:
                assert torch.equal(y[row], torch.zeros(8))
                continue
            want = [2.0 * b[s][slot, 0] @ (a[s][slot, 0] @ x[row]) for s in (0, 1)]
            assert torch.allclose(y[row], torch.cat(want), atol=1e-4)


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


def test_a_lone_request_with_many_rows_uses_its_one_index():
    """One request's prompt logits: index [-1] (base) leaves every row alone, [1] applies slot 1."""
    inputs, weights = torch.randn(5, 4), torch.randn(2, 1, 8, 4)
    output = torch.ones(5, 8)
    bgmv_expand(inputs, weights, output, torch.tensor([-1]), add_inputs=True)
    assert torch.equal(output, torch.ones(5, 8))
    bgmv_expand(inputs, weights, output, torch.tensor([1]), add_inputs=True)
    assert torch.allclose(output, 1 + inputs @ weights[1, 0].T)


def _reader_cpu_while_waiting(wait) -> tuple[list[int], float]:
    """Three messages 0.2 s apart through vLLM's real shared-memory queue; returns what the
    reader got and the CPU time its thread used meanwhile, with `wait` as SpinCondition.wait."""
    from vllm.distributed.device_communicators import shm_broadcast

    original = shm_broadcast.SpinCondition.wait
    shm_broadcast.SpinCondition.wait = wait
    try:
        writer = shm_broadcast.MessageQueue(1, 1)
        reader = shm_broadcast.MessageQueue.create_from_handle(writer.export_handle(), 0)
        ready = threading.Thread(target=writer.wait_until_ready)
        ready.start()
        reader.wait_until_ready()
        ready.join()
        received, cpu = [], []

        def read() -> None:
            start = time.thread_time()
            received.extend(reader.dequeue() for _ in range(3))
            cpu.append(time.thread_time() - start)

        thread = threading.Thread(target=read)
        thread.start()
        for message in range(3):
            time.sleep(0.2)
            writer.enqueue(message)
        thread.join(10)
        return received, cpu[0]
    finally:
        shm_broadcast.SpinCondition.wait = original


def test_engine_processes_block_between_steps_instead_of_spinning():
    """Fix 3: a busy reader of vLLM's queue waits on the notification, not in a spin loop."""
    from vllm.distributed.device_communicators import shm_broadcast

    received, blocking = _reader_cpu_while_waiting(engine_patches._blocking_wait)
    assert received == [0, 1, 2]
    assert blocking < 0.1, blocking  # measured: a few ms
    received, spinning = _reader_cpu_while_waiting(shm_broadcast.SpinCondition.wait)
    assert received == [0, 1, 2]
    # vLLM's spin, the reason for the fix: most of the 0.6 s on an idle machine (it yields,
    # so under other load it gets less; still many times what blocking takes).
    assert spinning > max(10 * blocking, 0.05), (spinning, blocking)


def test_spin_wait_setting_selects_the_wait(monkeypatch):
    from vllm.distributed.device_communicators import shm_broadcast

    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", shm_broadcast.SpinCondition.wait)
    monkeypatch.setenv(engine_patches.SPIN_WAIT_ENV, "1")
    register()
    assert shm_broadcast.SpinCondition.wait is not engine_patches._blocking_wait
    monkeypatch.setenv(engine_patches.SPIN_WAIT_ENV, "0")
    register()
    assert shm_broadcast.SpinCondition.wait is engine_patches._blocking_wait


class _Worker:
    """The parts of vLLM's Worker that fix 4 uses; counts the calls the engine core would make."""

    def __init__(self, concurrent_batches: int = 1, forward_output: object = None) -> None:
        self.vllm_config = type("Config", (), {"max_concurrent_batches": concurrent_batches})()
        self.model_runner = type("Runner", (), {"execute_model_state": None})()
        self.forward_output = forward_output
        self.sampled: list[object] = []

    def execute_model(self, scheduler_output):
        if self.forward_output is None:
            self.model_runner.execute_model_state = ("logits", scheduler_output)
        return self.forward_output

    def sample_tokens(self, grammar_output):
        self.sampled.append(grammar_output)
        self.model_runner.execute_model_state = None
        return "sampled"


def _scheduled(structured: bool = False):
    return type("SchedulerOutput", (), {"has_structured_output_requests": structured})()


def test_the_worker_samples_in_the_model_call_when_nothing_comes_between():
    """Fix 4: one round trip per step; the engine core skips sample_tokens when given an output."""
    execute = engine_patches._sample_in_same_call(_Worker.execute_model)
    worker = _Worker()
    assert execute(worker, _scheduled()) == "sampled"
    assert worker.sampled == [None] and worker.model_runner.execute_model_state is None


@pytest.mark.parametrize(
    ("worker", "scheduled"),
    [
        (_Worker(), _scheduled(structured=True)),  # the bitmask comes with sample_tokens
        (_Worker(concurrent_batches=2), _scheduled()),  # async scheduling / PP: batch queue
        (_Worker(forward_output="no tokens scheduled"), _scheduled()),  # an output already
    ],
)
def test_the_worker_leaves_sampling_to_the_engine_core_otherwise(worker, scheduled):
    execute = engine_patches._sample_in_same_call(_Worker.execute_model)
    output = execute(worker, scheduled)
    assert output == worker.forward_output and worker.sampled == []


def test_the_plugin_patches_vllms_cpu_worker_once():
    from vllm.v1.worker import cpu_worker

    register()
    patched = cpu_worker.CPUWorker.execute_model
    assert patched.__loraplex_patched__ and patched.__wrapped__.__name__ == "execute_model"
    register()
    assert cpu_worker.CPUWorker.execute_model is patched


def test_lora_layers_find_the_device_of_a_base_whose_kernel_released_its_weight():
    """The int8 oneDNN kernel sets `weight = None` (fix 5); upstream then fails on `.device`."""
    from vllm.lora.layers import base_linear, utils

    int8_layer = torch.nn.Module()
    int8_layer.weight = None
    int8_layer.weight_scale = torch.nn.Parameter(torch.ones(4, 1), requires_grad=False)
    upstream = getattr(utils._get_lora_device, "__wrapped__", utils._get_lora_device)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'device'"):
        upstream(int8_layer)
    register()
    assert base_linear._get_lora_device is utils._get_lora_device  # the name LoRA layers call
    assert utils._get_lora_device(int8_layer) == torch.device("cpu")
    assert utils._get_lora_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    register()
    assert utils._get_lora_device.__wrapped__.__name__ == "_get_lora_device"  # wrapped once
