"""A small client for the loraplex gateway: sync (`Client`) and asyncio (`AsyncClient`).

    with Client("localhost:50051") as c:
        print(c.generate("Once upon a time", adapter="alpha", max_tokens=32).text)

Keyword arguments are the fields of SamplingParams and StoppingCriteria (temperature, top_p,
max_tokens, stop, ...) plus logprobs / prompt_logprobs / request_id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

_SAMPLING = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_STOPPING = set(pb.StoppingCriteria.DESCRIPTOR.fields_by_name)
_TOP_LEVEL = {"request_id", "logprobs", "prompt_logprobs"}

Request = TypeVar("Request", pb.GenerateRequest, pb.GenerateStreamRequest)


def build_request(
    message: type[Request], prompt: str | Sequence[int], adapter: str = "", **options: Any
) -> Request:
    """A GenerateRequest / GenerateStreamRequest from a prompt (text or ids) and keyword options."""
    unknown = set(options) - _SAMPLING - _STOPPING - _TOP_LEVEL
    if unknown:
        raise TypeError(f"unknown generation options: {sorted(unknown)}")
    request = message(
        adapter=adapter,
        sampling=pb.SamplingParams(**{k: v for k, v in options.items() if k in _SAMPLING}),
        stopping=pb.StoppingCriteria(**{k: v for k, v in options.items() if k in _STOPPING}),
        **{k: v for k, v in options.items() if k in _TOP_LEVEL},
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


class Client:
    """Blocking client; one channel, reused for every call."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return self.stub.Generate(request, timeout=timeout)

    def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; `.cancel()` on the result aborts the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        return self.stub.GenerateStream(request, timeout=timeout)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        )

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); create it inside the running event loop."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials
            else grpc.aio.insecure_channel(target)
        )
        self.stub = pb_grpc.GenerationServiceStub(self.channel)

    async def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return await self.stub.Generate(request, timeout=timeout)

    async def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; leaving the loop early cancels the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        call = self.stub.GenerateStream(request, timeout=timeout)
        try:
            async for delta in call:
                yield delta
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        )

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest())

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def wait_until_serving(
    target: str, timeout: float = 300.0, alive: Callable[[], bool] | None = None
) -> None:
    """Block until the gateway's health service reports SERVING (engine loaded).

    `alive` (e.g. ``lambda: proc.poll() is None``) stops the wait early if the server died.
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if alive is not None and not alive():
                raise RuntimeError(f"gateway at {target} exited before it was SERVING")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway at {target} not SERVING after {timeout:.0f}s")
            time.sleep(0.5)
