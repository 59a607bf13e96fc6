"""Generation clients: blocking (`Client`) and asyncio (`AsyncClient`).

Keyword arguments of the calls are the fields of SamplingParams and StoppingCriteria
(temperature, top_p, max_tokens, stop, ...) plus logprobs / prompt_logprobs /
logprob_token_ids / request_id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

from gateway.client.channel import AioConnection, Connection
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
"""Keyword options of the generation calls that go into SamplingParams."""
_STOPPING = set(pb.StoppingCriteria.DESCRIPTOR.fields_by_name)
_TOP_LEVEL = {"request_id", "logprobs", "prompt_logprobs", "logprob_token_ids"}

Request = TypeVar("Request", pb.GenerateRequest, pb.GenerateStreamRequest)


def build_request(
    message: type[Request], prompt: str | Sequence[int], adapter: str = "", **options: Any
) -> Request:
    """A GenerateRequest / GenerateStreamRequest from a prompt (text or ids) and keyword options."""
    unknown = set(options) - SAMPLING_FIELDS - _STOPPING - _TOP_LEVEL
    if unknown:
        raise TypeError(f"unknown generation options: {sorted(unknown)}")
    request = message(
        adapter=adapter,
        sampling=pb.SamplingParams(**{k: v for k, v in options.items() if k in SAMPLING_FIELDS}),
        stopping=pb.StoppingCriteria(**{k: v for k, v in options.items() if k in _STOPPING}),
        **{k: v for k, v in options.items() if k in _TOP_LEVEL},
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


class Client(Connection):
    """Blocking client; one channel, reused for every call."""

    stub_class = pb_grpc.GenerationServiceStub

    def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; `.cancel()` on the result aborts the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=self.metadata,
        )

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)


class AsyncClient(AioConnection):
    """asyncio client (grpc.aio); create it inside the running event loop."""

    stub_class = pb_grpc.GenerationServiceStub

    async def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return await self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; leaving the loop early cancels the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        call = self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)
        try:
            async for delta in call:
                yield delta
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=self.metadata,
        )

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)
