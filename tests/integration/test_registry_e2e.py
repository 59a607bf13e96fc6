"""The registry end to end through the real vLLM engine (the session gateway, registry mode)."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import pytest
from safetensors.torch import load_file, save_file

from gateway.client import AdapterClient, AsyncClient
from loraplex.v1 import adapters_pb2 as apb
from tests.support.foreign_adapters import FOREIGN, build_foreign_adapter
from tests.support.hf_reference import hf_reference

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time there was"
STEPS = 12
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def hf(tiny_model):
    with hf_reference(tiny_model) as reference:
        yield reference


@pytest.fixture(scope="module")
def registry(gateway):
    with AdapterClient(gateway.target, actor="e2e") as client:
        yield client


def expected(hf, adapter: str) -> list[int]:
    return hf.greedy(adapter, hf.tokenizer(PROMPT).input_ids, STEPS).tokens


async def test_promote_then_rollback_switches_the_served_version(gateway, registry, tiny_model, hf):
    v1 = registry.register("acme", tiny_model.adapters["alpha"], description="e2e")
    v2 = registry.register("acme", tiny_model.adapters["beta"])
    assert (v1.version, v2.version) == (1, 2)
    registry.set_alias("acme", "production", 1, expected=0, force=True, reason="first")
    alpha, beta = expected(hf, "alpha"), expected(hf, "beta")
    assert alpha != beta
    async with AsyncClient(gateway.target) as client:

        async def served() -> tuple[int, list[int]]:
            reply = await client.generate(PROMPT, "acme", max_tokens=STEPS, **GREEDY)
            return reply.adapter.version, list(reply.token_ids)

        assert await served() == (1, alpha)
        registry.record_evaluation("acme", 2, "e2e-gate", "pass", {"score": 1.0})
        registry.set_alias("acme", "production", 2, expected=1, reason="passed the gate")
        assert await served() == (2, beta)  # the very next request
        registry.set_alias("acme", "production", 1, expected=2, reason="rollback", force=True)
        assert await served() == (1, alpha)
        by_number = await client.generate(PROMPT, "acme@v2", max_tokens=STEPS, **GREEDY)
        assert (by_number.adapter.version, list(by_number.token_ids)) == (2, beta)
    moves = registry.history("acme", "production")
    assert [(m.from_version, m.to_version) for m in moves] == [(2, 1), (1, 2), (0, 1)]


async def test_a_running_request_finishes_on_the_version_it_started_with(
    gateway, registry, tiny_model, hf
):
    registry.register("story", tiny_model.adapters["gamma"])
    registry.register("story", tiny_model.adapters["delta"])
    registry.set_alias("story", "production", 1, expected=0, force=True, reason="start")
    long_steps = 200
    ids = hf.tokenizer(PROMPT).input_ids
    async with AsyncClient(gateway.target) as client:
        call = client.stub.GenerateStream(_stream_request(ids, "story", long_steps), timeout=120)
        first = await call.read()
        assert first.adapter.version == 1
        registry.set_alias("story", "production", 2, expected=1, force=True, reason="mid-stream")
        tokens = list(first.token_ids)
        while (delta := await call.read()) != grpc.aio.EOF:
            tokens.extend(delta.token_ids)
        after = await client.generate(ids, "story", max_tokens=8, **GREEDY)
    assert tokens == hf.greedy("gamma", ids, long_steps).tokens  # all of it from v1
    assert after.adapter.version == 2


def _stream_request(ids, adapter, steps):
    from loraplex.v1 import generation_pb2 as pb

    request = pb.GenerateStreamRequest(
        adapter=adapter,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_tokens=steps, ignore_eos=True),
    )
    request.token_ids.ids.extend(ids)
    return request


def test_registration_loads_the_version_and_refuses_what_vllm_cannot_load(
    gateway, registry, tiny_model, tmp_path
):
    # New weights (a new artifact): loaded into the engine before Register returns.
    fresh = tmp_path / "fresh"
    shutil.copytree(tiny_model.adapters["alpha"], fresh)
    tensors = load_file(fresh / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in tensors.items()}, fresh / "adapter_model.safetensors")
    version = registry.register("fresh", fresh)
    residency = {v.version: v.residency for v in registry.versions("fresh")}
    assert residency[version.version] in (apb.RESIDENCY_LOADED, apb.RESIDENCY_CPU_CACHED)
    # A LoRA on a norm: the module exists in the base, but its weight is a vector; refused by
    # the static checks, before the engine.
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model.adapters["alpha"], odd)
    tensors = load_file(odd / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.input_layernorm"
    tensors[f"{prefix}.lora_A.weight"] = tensors[next(k for k in tensors if "lora_A" in k)].clone()
    tensors[f"{prefix}.lora_B.weight"] = tensors[next(k for k in tensors if "lora_B" in k)].clone()
    save_file(tensors, odd / "adapter_model.safetensors")
    config = json.loads((odd / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "input_layernorm"]
    (odd / "adapter_config.json").write_text(json.dumps(config))
    before = [a.name for a in registry.list()]
    with pytest.raises(grpc.RpcError) as err:
        registry.register("odd", odd)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input_layernorm: the base layer's weight is a vector" in err.value.details()
    # Passes every static check, but asks for what vLLM does not serve (DoRA): the
    # registration fails at the engine load, and nothing is kept.
    dora = tmp_path / "dora"
    shutil.copytree(tiny_model.adapters["alpha"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(grpc.RpcError) as err:
        registry.register("dora", dora)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "engine could not load" in err.value.details()
    assert [a.name for a in registry.list()] == before
    with gateway.client() as client:  # the engine is fine
        assert len(client.generate("Hello", "alpha", max_tokens=4).token_ids) == 4


async def test_concurrent_traffic_across_registry_versions_shares_batches(gateway, registry, hf):
    """Many versions of one name, addressed by number, in flight together; each exact."""
    ids = hf.tokenizer(PROMPT).input_ids
    async with AsyncClient(gateway.target) as client:
        replies = await asyncio.gather(
            *[client.generate(ids, f"acme@v{n}", max_tokens=STEPS, **GREEDY) for n in (1, 2)] * 4
        )
    outputs = {r.adapter.version: list(r.token_ids) for r in replies}
    assert outputs == {1: expected(hf, "alpha"), 2: expected(hf, "beta")}


def test_an_adapter_for_another_base_never_reaches_the_engine(
    gateway, registry, tiny_model, tmp_path
):
    """vLLM would copy a narrower LoRA into slices of its slots and serve nonsense with OK:
    the real gateway refuses it at registration, whatever base it claims."""
    before = [(a.name, len(a.versions)) for a in registry.list()]
    for case in ("smaller hidden", "other vocab, lm_head LoRA"):
        changes, targets, message = FOREIGN[case]
        folder = build_foreign_adapter(tiny_model.base, tmp_path / case, changes, targets)
        with pytest.raises(grpc.RpcError) as err:
            registry.upload("foreign", folder)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        assert str(tmp_path) not in err.value.details()
    assert [(a.name, len(a.versions)) for a in registry.list()] == before
