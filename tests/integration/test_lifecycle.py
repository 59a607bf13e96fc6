"""A second real gateway on a `loraplex quantize` W8A8 base, as the demo serves: adapters still
differ, a broken adapter fails alone, SIGTERM drains."""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest

from gateway.client import AsyncClient
from gateway.process import kill
from loraplex.v1 import generation_pb2 as pb
from tests.support.gateway import launch_gateway
from trainer.quantize import quantize_base
from trainer.tiny import TinyModel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quantized_gateway(tiny_model, tmp_path_factory):
    # Beside base/, so the gateway's adapters folder (the base's sibling) is the tiny model's.
    quantized = tiny_model.base.with_name("base-w8a8")
    if not quantized.exists():
        quantize_base(tiny_model.base, quantized, "w8a8", echo=lambda _: None)
    log = tmp_path_factory.mktemp("w8a8") / "gateway.log"
    model = TinyModel(base=quantized, adapters=tiny_model.adapters)
    running = launch_gateway(
        model, log, "--dtype", "bfloat16", "--grace-period-s", str(GRACE_PERIOD_S)
    )
    yield running
    if running.process.poll() is None:
        kill(running.process)


async def test_quantized_base_serves_distinct_adapters(quantized_gateway, tiny_model):
    async with AsyncClient(quantized_gateway.target) as client:
        info = await client.model_info()
        assert info.quantization == "compressed-tensors" and info.dtype == "bfloat16"
        names = ["", *sorted(tiny_model.adapters)]
        replies = await asyncio.gather(
            *[client.generate("The weather today is", a, temperature=0.0, max_tokens=12,
                              ignore_eos=True) for a in names]
        )  # fmt: skip
    assert [r.adapter.name for r in replies] == names
    assert len({tuple(r.token_ids) for r in replies}) == len(names)


def test_broken_adapter_in_a_directory_fails_cleanly_and_the_engine_keeps_serving(
    quantized_gateway, tiny_model
):
    """Weights that do not load: FAILED_PRECONDITION for that adapter, nobody else affected."""
    folder = tiny_model.base.parent / "adapters" / "zz-broken"
    shutil.copytree(tiny_model.adapters["alpha"], folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    time.sleep(1.1)  # new folders are picked up by a rescan, at most once a second
    try:
        with quantized_gateway.client() as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hello", "zz-broken", max_tokens=4)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "zz-broken" in err.value.details()
            served = client.generate("Hello", "alpha", max_tokens=4, temperature=0.0)
            assert len(served.token_ids) == 4 and served.adapter.name == "alpha"
    finally:
        shutil.rmtree(folder)
    assert quantized_gateway.process.poll() is None


GRACE_PERIOD_S = 30
STREAMS = 8


async def _drain_tokens(client: AsyncClient) -> int:
    """Tokens per stream that STREAMS concurrent streams generate in a quarter of the grace
    period at the speed measured now, on this machine (16..96): the drain test then checks
    draining, not how fast the engine is."""
    probe = 16
    started = time.perf_counter()
    await asyncio.gather(
        *[client.generate(f"Warm-up {i}:", "alpha" if i % 2 else "", max_tokens=probe,
                          ignore_eos=True) for i in range(STREAMS)]
    )  # fmt: skip
    per_stream_rate = probe / (time.perf_counter() - started)
    return max(probe, min(96, int(per_stream_rate * GRACE_PERIOD_S / 4)))


async def test_sigterm_finishes_in_flight_refuses_new_and_exits_zero(quantized_gateway):
    async with AsyncClient(quantized_gateway.target) as client:
        max_tokens = await _drain_tokens(client)
        calls = [
            client.stub.GenerateStream(
                pb.GenerateStreamRequest(
                    text=f"Story number {i}:", adapter="alpha" if i % 2 else "",
                    stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
                )
            )
            for i in range(STREAMS)
        ]  # fmt: skip
        received = []
        for call in calls:  # every stream is running in the engine before the signal
            received.append(len((await call.read()).token_ids))
        quantized_gateway.process.terminate()
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate("too late", max_tokens=4, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async def finish(call, tokens: int) -> tuple[int, int]:
            last = None
            while (delta := await call.read()) != grpc.aio.EOF:
                tokens += len(delta.token_ids)
                last = delta
            return tokens, last.finish_reason

        results = await asyncio.gather(
            *[finish(c, n) for c, n in zip(calls, received, strict=True)]
        )
    assert all(reason == pb.FINISH_REASON_LENGTH for _, reason in results)
    assert all(tokens == max_tokens for tokens, _ in results)
    assert await asyncio.to_thread(quantized_gateway.process.wait, 60) == 0
