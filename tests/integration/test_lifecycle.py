"""A second real gateway, fp8-quantized like the demo: adapters still differ; SIGTERM drains."""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import pytest

from gateway.client import AsyncClient
from gateway.process import kill
from loraplex.v1 import generation_pb2 as pb
from tests.conftest import launch_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fp8_gateway(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("fp8") / "gateway.log"
    running = launch_gateway(
        tiny_model, log, "--quantization", "fp8_per_channel", "--dtype", "bfloat16",
        "--grace-period-s", "30",
    )  # fmt: skip
    yield running
    if running.process.poll() is None:
        kill(running.process)


async def test_fp8_base_serves_distinct_adapters(fp8_gateway, tiny_model):
    async with AsyncClient(fp8_gateway.target) as client:
        info = await client.model_info()
        assert info.quantization == "fp8_per_channel" and info.dtype == "bfloat16"
        names = ["", *sorted(tiny_model.adapters)]
        replies = await asyncio.gather(
            *[client.generate("The weather today is", a, temperature=0.0, max_tokens=12,
                              ignore_eos=True) for a in names]
        )  # fmt: skip
    assert [r.adapter.name for r in replies] == names
    assert len({tuple(r.token_ids) for r in replies}) == len(names)


def test_broken_adapter_in_a_directory_fails_cleanly_and_the_engine_keeps_serving(
    fp8_gateway, tiny_model
):
    """Weights that do not load: FAILED_PRECONDITION for that adapter, nobody else affected."""
    folder = tiny_model.base.parent / "adapters" / "zz-broken"
    shutil.copytree(tiny_model.adapters["alpha"], folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    time.sleep(1.1)  # new folders are picked up by a rescan, at most once a second
    try:
        with fp8_gateway.client() as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hello", "zz-broken", max_tokens=4)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "zz-broken" in err.value.details()
            served = client.generate("Hello", "alpha", max_tokens=4, temperature=0.0)
            assert len(served.token_ids) == 4 and served.adapter.name == "alpha"
    finally:
        shutil.rmtree(folder)
    assert fp8_gateway.process.poll() is None


async def test_sigterm_finishes_in_flight_refuses_new_and_exits_zero(fp8_gateway):
    async with AsyncClient(fp8_gateway.target) as client:
        calls = [
            client.stub.GenerateStream(
                pb.GenerateStreamRequest(
                    text=f"Story number {i}:", adapter="alpha" if i % 2 else "",
                    stopping=pb.StoppingCriteria(max_tokens=96, ignore_eos=True),
                )
            )
            for i in range(8)
        ]  # fmt: skip
        received = []
        for call in calls:  # every stream is running in the engine before the signal
            received.append(len((await call.read()).token_ids))
        fp8_gateway.process.terminate()
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
    assert all(tokens == 96 for tokens, _ in results)
    assert await asyncio.to_thread(fp8_gateway.process.wait, 60) == 0
