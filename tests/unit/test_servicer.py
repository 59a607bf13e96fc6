"""The GenerationService over a real grpc.aio server, with a fake engine behind it."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from gateway.client import AsyncClient
from gateway.generation import GenerationServicer
from gateway.pipeline import GenerationPipeline
from gateway.resolver import DirectoryResolver
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from tests.support.fakes import FAKE_BASE, FakeEngine, make_adapter


@pytest.fixture
async def served(tmp_path):
    """(client, engine, state) for a gateway whose pipeline can be swapped out."""
    make_adapter(tmp_path, "alpha")
    make_adapter(tmp_path, "huge", rank=64)
    engine = FakeEngine()
    state = {"pipeline": GenerationPipeline(engine, DirectoryResolver(tmp_path, 16, FAKE_BASE))}
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(lambda: state["pipeline"]), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}")
    yield client, engine, state
    await client.close()
    await server.stop(0)


async def test_generate_and_stream_carry_adapter_and_usage(served):
    client, _, _ = served
    reply = await client.generate("hi", "alpha", max_tokens=3)
    assert list(reply.token_ids) == [1, 2, 3]
    assert reply.adapter.name == "alpha" and reply.adapter.engine_id == 1
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 3
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH
    deltas = [d async for d in client.stream("hi", "alpha", max_tokens=3)]
    assert [list(d.token_ids) for d in deltas] == [[1], [2], [3]]
    assert deltas[0].adapter.name == "alpha" and not deltas[1].HasField("adapter")
    assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_max_tokens_defaults_to_the_room_left_in_context(served):
    client, engine, _ = served
    await client.generate([5] * 60)
    assert engine.seen[-1].max_tokens == 64 - 60


async def test_sampling_fields_reach_the_engine_and_unset_stay_default(served):
    client, engine, _ = served
    await client.generate("x", temperature=0.0, top_k=5, seed=7, stop=["."], max_tokens=2)
    sent = engine.seen[-1]
    assert sent.sampling.temperature == 0.0 and sent.sampling.top_k == 5
    assert sent.sampling.seed == 7 and sent.sampling.top_p is None
    assert sent.stopping.stop == (".",) and sent.max_tokens == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logprob_token_ids": [5, 5]}, "distinct"),
        ({"logprob_token_ids": [100]}, "outside vocabulary"),
        ({"logprob_token_ids": list(range(129))}, "at most 128"),
        ({"logprob_token_ids": [5], "logprobs": 1}, "logprobs > 0"),
    ],
)
async def test_scored_token_ids_are_checked(served, options, message):
    client, engine, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate("x", **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprob_token_ids" in err.value.details() and message in err.value.details()
    await client.generate("x", logprob_token_ids=[9, 3], logprobs=0)
    assert engine.seen[-1].logprob_token_ids == (9, 3)  # request order kept


@pytest.mark.parametrize(
    ("adapter", "code", "named"),
    [
        ("nope", grpc.StatusCode.NOT_FOUND, "nope"),
        ("huge", grpc.StatusCode.FAILED_PRECONDITION, "max_lora_rank"),
    ],
)
async def test_adapter_errors(served, adapter, code, named):
    client, _, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate("hi", adapter)
    assert err.value.code() == code and named in err.value.details()


async def test_engine_dead_or_starting_is_unavailable(served):
    client, engine, state = served
    engine.healthy = False
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate("hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    state["pipeline"] = None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.tokenize("hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "starting" in err.value.details()


async def test_a_bug_is_internal_without_leaking_details(served):
    client, engine, _ = served
    engine.fail_with = KeyError("secret-internal-detail")
    for call in (client.generate("hi"), _drain(client.stream("hi"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret-internal-detail" not in err.value.details()


async def _drain(stream):
    return [d async for d in stream]


async def test_model_info_lists_servable_adapters_only(served):
    client, _, _ = served
    info = await client.model_info()
    assert [a.name for a in info.adapters] == ["alpha"]
    assert info.adapters[0].rank == 8
    assert info.max_context_length == 64 and info.engine == "fake 0"
    assert (info.bos_token.id, info.bos_token.text, info.eos_token.id) == (1, "<s>", 2)
    tokens = await client.tokenize("ab", add_special_tokens=False)
    assert list(tokens.token_ids) == [97, 98] and list(tokens.tokens) == ["<97>", "<98>"]
    assert list(info.engine_fixes) == [] and info.prompt_logprobs_unsupported == ""


async def test_model_info_says_what_the_engine_refuses_and_why(served):
    client, engine, _ = served
    engine.info = dataclasses.replace(
        engine.info,
        engine_fixes=("no_spin_wait",),
        vocab_lora_refusal="not on this engine (vLLM issue 51594)",
    )
    info = await client.model_info()
    assert list(info.engine_fixes) == ["no_spin_wait"]
    assert info.vocab_lora_unsupported == "not on this engine (vLLM issue 51594)"
    assert info.prompt_logprobs_unsupported == ""
