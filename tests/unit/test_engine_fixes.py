"""Which vLLM fixes go where, what each worker reports, and what the gateway then refuses."""

from __future__ import annotations

import pytest

from gateway import engine_fixes, engine_patches
from gateway.domain import ResolvedAdapter
from gateway.engine import adapter_stats_of
from gateway.engine_fixes import (
    CPU_LORA_OPS,
    CPU_PROMPT_LOGPROBS,
    FIX_NAMES,
    INT8_LORA_DEVICE,
    NO_SPIN_WAIT,
    ONE_CALL_PER_STEP,
    EngineFixReport,
    fixes_to_install,
    lora_safety,
    vocab_lora_in,
)
from gateway.errors import AdapterUnavailable

CPU_FIXES = (CPU_LORA_OPS, CPU_PROMPT_LOGPROBS, ONE_CALL_PER_STEP, INT8_LORA_DEVICE)


@pytest.mark.parametrize(
    ("platform", "version", "spin_wait", "expected"),
    [
        ("cpu", "0.32.0", False, FIX_NAMES),
        ("cpu", "0.32.0+cpu", True, CPU_FIXES),  # the build tag is not another source
        ("cuda", "0.32.0", True, ()),  # nothing of the CPU fixes on a GPU
        ("cuda", "0.32.0", False, (NO_SPIN_WAIT,)),  # only when the operator asks for it
        ("rocm", "0.32.0", True, ()),
        ("cpu", "0.33.0", False, ()),  # an unverified vLLM runs as shipped
        ("cpu", "0.32.1rc1", False, ()),
    ],
)
def test_fixes_go_only_where_their_bug_is(platform, version, spin_wait, expected):
    assert fixes_to_install(platform, version, spin_wait) == expected


def _report(platform="cpu", runner="v1", version="0.32.0", applied=FIX_NAMES):
    return EngineFixReport(platform, runner, version, tuple(applied))


def test_cpu_with_the_prompt_logprob_fix_serves_everything():
    safety = lora_safety([_report(), _report()], lora_enabled=True)
    assert safety.prompt_logprobs_refusal == "" and safety.vocab_lora_refusal == ""


@pytest.mark.parametrize(
    "reports",
    [
        [_report(applied=())],  # CPU with the plugin off (VLLM_PLUGINS="")
        [_report(runner="v2", applied=(CPU_LORA_OPS, ONE_CALL_PER_STEP))],  # V2 CPU runner
        [_report(), _report(applied=(CPU_LORA_OPS,))],  # one rank of two without the fix
        [_report("cuda", "v2", "0.33.0", ())],  # a GPU on an unverified vLLM
        [_report("rocm", "v1", "0.32.0", ())],  # not the CUDA path 51594 describes
    ],
)
def test_prompt_logprobs_with_lora_are_refused_where_not_known_safe(reports):
    safety = lora_safety(reports, lora_enabled=True)
    assert "16668" in safety.prompt_logprobs_refusal and safety.vocab_lora_refusal == ""
    assert reports[0].platform in safety.prompt_logprobs_refusal


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_cuda_serves_prompt_logprobs_and_refuses_vocab_lora_adapters(runner):
    reports = [_report("cuda", runner, "0.32.0", ()), _report("cuda", runner, "0.32.0", ())]
    safety = lora_safety(reports, lora_enabled=True)
    assert safety.prompt_logprobs_refusal == ""
    assert "51594" in safety.vocab_lora_refusal and "lm_head" in safety.vocab_lora_refusal


def test_without_lora_nothing_is_refused():
    assert lora_safety([_report(applied=())], lora_enabled=False) == engine_fixes.LoraSafety()


def test_vocab_lora_is_read_from_the_weights(tiny_model):
    found = {name: vocab_lora_in(path) for name, path in tiny_model.adapters.items()}
    assert [m.rsplit(".", 1)[-1] for m in found["epsilon"]] == ["lm_head"]  # ADAPTER_SHAPES[4]
    assert all(found[name] == [] for name in ("alpha", "beta", "gamma", "delta"))


def test_a_vocab_module_is_matched_on_its_last_name_part():
    modules = ["model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj", "x.lm_heads"]
    assert engine_fixes.vocab_lora_modules(modules) == ["lm_head", "model.embed_tokens"]


# -- the plugin in this (CPU) process ---------------------------------------------------------


def test_the_cpu_fixes_patch_cpu_classes_and_leave_the_gpu_ones():
    from vllm.v1.worker import cpu_model_runner, cpu_worker, gpu_model_runner, gpu_worker

    engine_patches.register()
    assert set(CPU_FIXES) <= engine_patches.INSTALLED
    assert cpu_worker.CPUWorker.execute_model.__loraplex_patched__
    assert cpu_model_runner.CPUModelRunner._get_prompt_logprobs_dict.__loraplex_patched__
    assert not hasattr(gpu_worker.Worker.execute_model, "__loraplex_patched__")
    runner = gpu_model_runner.GPUModelRunner
    assert not hasattr(runner._get_prompt_logprobs_dict, "__loraplex_patched__")


def test_register_on_a_gpu_installs_no_cpu_fix(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "cuda")
    monkeypatch.setattr(engine_patches, "INSTALLED", set())
    monkeypatch.setenv(engine_patches.SPIN_WAIT_ENV, "1")
    engine_patches.register()
    assert set() == engine_patches.INSTALLED


def test_register_on_an_unverified_vllm_installs_nothing(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.setattr(engine_patches, "INSTALLED", set())
    engine_patches.register()
    assert set() == engine_patches.INSTALLED


class _V2Runner:
    """vLLM's V2 model runner computes prompt logprobs elsewhere: no method the fix patches."""


def test_a_worker_reports_only_the_fixes_in_its_code_paths():
    from vllm.v1.worker import cpu_model_runner, cpu_worker

    engine_patches.register()
    v1 = type("Worker", (cpu_worker.CPUWorker,), {})
    worker = v1.__new__(v1)  # no engine: only the attributes worker_report reads
    worker.model_runner = cpu_model_runner.CPUModelRunner.__new__(cpu_model_runner.CPUModelRunner)
    worker.use_v2_model_runner = False
    report = EngineFixReport.from_worker(engine_patches.worker_report(worker))
    assert report.platform == "cpu" and report.model_runner == "v1"
    assert set(CPU_FIXES) <= set(report.applied)

    worker.model_runner, worker.use_v2_model_runner = _V2Runner(), True
    report = EngineFixReport.from_worker(engine_patches.worker_report(worker))
    assert report.model_runner == "v2" and CPU_PROMPT_LOGPROBS not in report.applied
    assert lora_safety([report], lora_enabled=True).prompt_logprobs_refusal


# -- tensor / pipeline parallelism: one engine, several ranks ---------------------------------


def _rank_stats():
    return {
        "active": [1, 2],
        "cached": [1, 2, 3],
        "loads": [(3, 0.25)],
        "load_failures": [],
        "evictions": [(4, "slot", 1)],
        "lookups": [(1, "slot", 2), (3, "disk", 1)],
    }


def test_adapter_stats_of_several_ranks_count_each_event_once():
    one = adapter_stats_of([_rank_stats()])
    two = adapter_stats_of([_rank_stats(), _rank_stats()])
    assert two == one
    assert one.active == {1, 2} and one.cached == {3} and one.loads == [(3, 0.25)]
    assert one.lookups == {(1, "slot"): 2, (3, "disk"): 1} and one.evictions == {(4, "slot"): 1}


# -- the engine's refusal, on a fake CUDA report -----------------------------------------------


class _LLM:
    """The one AsyncLLM call add_adapter makes."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    async def add_lora(self, request) -> bool:
        self.loaded.append(request.lora_int_id)
        return True


def _engine_on(reports: list[EngineFixReport]):
    from gateway.engine import VllmEngine

    engine = VllmEngine.__new__(VllmEngine)  # no vLLM engine: the state add_adapter uses
    engine._llm, engine._lora_enabled, engine._loaded_adapters = _LLM(), True, set()
    engine.safety, engine._vocab_lora = lora_safety(reports, lora_enabled=True), {}
    return engine


def _resolved(tiny_model, name: str, engine_id: int) -> ResolvedAdapter:
    return ResolvedAdapter(name, 1, engine_id, tiny_model.adapters[name], 8, ())


async def test_a_cuda_engine_refuses_an_lm_head_adapter_before_vllm_loads_it(tiny_model):
    engine = _engine_on([_report("cuda", "v2", "0.32.0", ())])
    with pytest.raises(AdapterUnavailable, match=r"'epsilon' has LoRA weights on .*lm_head.*51594"):
        await engine.add_adapter(_resolved(tiny_model, "epsilon", 5))
    assert engine._llm.loaded == []  # refused before vLLM saw it: registration stores nothing
    await engine.add_adapter(_resolved(tiny_model, "alpha", 1))
    assert engine._llm.loaded == [1]


async def test_a_cpu_engine_with_the_fix_serves_the_lm_head_adapter(tiny_model):
    engine = _engine_on([_report()])
    await engine.add_adapter(_resolved(tiny_model, "epsilon", 5))
    assert engine._llm.loaded == [5]
