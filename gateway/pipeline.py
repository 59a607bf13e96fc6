"""From a client's GenerationRequest to engine output: resolve, tokenize, validate, generate.

Validation errors name the request field (as spelled in the proto) so clients can fix them.
"""

from __future__ import annotations

import collections
import contextlib
import math
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from gateway.contract import MAX_SCORED_TOKEN_IDS
from gateway.domain import (
    Engine,
    EngineRequest,
    GenerationChunk,
    GenerationRequest,
    ResolvedAdapter,
    Sampling,
    Stopping,
)
from gateway.errors import InvalidRequest
from gateway.resolver import AdapterResolver

MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
MAX_TEMPERATURE = 2.0  # vLLM refuses more


@dataclass(frozen=True)
class RequestLimits:
    """Operator limits on requests (GatewayConfig's fields of the same names)."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256


def _check_range(
    field: str, value: float | None, low: float, high: float, low_open: bool = False
) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidRequest(field, f"must be in {bracket}{low}, {high}], got {value}")


def validate_sampling(s: Sampling) -> None:
    """Range checks of the sampling parameters (the engine's own checks are a second line)."""
    _check_range("sampling.temperature", s.temperature, 0.0, MAX_TEMPERATURE)
    _check_range("sampling.top_p", s.top_p, 0.0, 1.0, low_open=True)
    if s.top_k is not None and s.top_k < -1:
        raise InvalidRequest("sampling.top_k", f"must be -1, 0 (off) or positive, got {s.top_k}")
    _check_range("sampling.min_p", s.min_p, 0.0, 1.0)
    _check_range("sampling.repetition_penalty", s.repetition_penalty, 0.0, 100.0, low_open=True)
    _check_range("sampling.presence_penalty", s.presence_penalty, -2.0, 2.0)
    _check_range("sampling.frequency_penalty", s.frequency_penalty, -2.0, 2.0)


def validate_stopping(stop: Stopping, vocab_size: int, limits: RequestLimits) -> None:
    """Checks of the stopping criteria that need no prompt."""
    if stop.max_tokens is not None and stop.max_tokens < 1:
        raise InvalidRequest("stopping.max_tokens", f"must be >= 1, got {stop.max_tokens}")
    if stop.min_tokens < 0:
        raise InvalidRequest("stopping.min_tokens", f"must be >= 0, got {stop.min_tokens}")
    if stop.max_tokens is not None and stop.min_tokens > stop.max_tokens:
        raise InvalidRequest(
            "stopping.min_tokens",
            f"({stop.min_tokens}) must not exceed stopping.max_tokens ({stop.max_tokens})",
        )
    if len(stop.stop) > limits.max_stop_strings:
        raise InvalidRequest("stopping.stop", f"at most {limits.max_stop_strings} stop strings")
    if any(not s or len(s) > limits.max_stop_string_chars for s in stop.stop):
        raise InvalidRequest(
            "stopping.stop",
            f"stop strings must have 1 to {limits.max_stop_string_chars} characters",
        )
    if limits.max_new_tokens is not None and (stop.max_tokens or 0) > limits.max_new_tokens:
        raise InvalidRequest(
            "stopping.max_tokens", f"must be <= {limits.max_new_tokens} (max_new_tokens)"
        )
    if len(stop.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("stopping.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    bad = [t for t in stop.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(
            "stopping.stop_token_ids", f"ids {bad} outside vocabulary 0..{vocab_size - 1}"
        )


def _check_logprobs(field: str, value: int | None, limit: int) -> None:
    if value is not None and not 0 <= value <= limit:
        raise InvalidRequest(field, f"must be in [0, {limit}], got {value}")


def validate_logprob_token_ids(request: GenerationRequest, vocab_size: int) -> None:
    """Scored ids: distinct, in the vocabulary, at most MAX_SCORED_TOKEN_IDS, no top-N."""
    ids = request.logprob_token_ids
    if not ids:
        return
    field = "logprob_token_ids"
    if len(ids) > MAX_SCORED_TOKEN_IDS:
        raise InvalidRequest(field, f"at most {MAX_SCORED_TOKEN_IDS} ids, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise InvalidRequest(field, "ids must be distinct")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(field, f"ids {bad[:8]} outside vocabulary 0..{vocab_size - 1}")
    if request.logprobs:
        raise InvalidRequest(field, "cannot be combined with logprobs > 0 (top-N alternatives)")


class GenerationPipeline:
    """Turns client requests into engine requests and runs them."""

    def __init__(
        self,
        engine: Engine,
        resolver: AdapterResolver,
        limits: RequestLimits | None = None,
        file_check: Callable[[ResolvedAdapter], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.resolver = resolver
        self.limits = limits or RequestLimits()
        self.file_check = file_check
        self.in_flight: collections.Counter[tuple[str, int]] = collections.Counter()

    def resolve(self, reference: str) -> ResolvedAdapter | None:
        """The adapter version a reference names; None for the base model."""
        return self.resolver.resolve(reference) if reference else None

    def prepare(self, request: GenerationRequest) -> EngineRequest:
        """Validate and tokenize a request; raises InvalidRequest / AdapterNotFound."""
        info = self.engine.info
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
        validate_sampling(request.sampling)
        validate_stopping(request.stopping, info.vocab_size, self.limits)
        _check_logprobs("logprobs", request.logprobs, info.max_logprobs)
        _check_logprobs("prompt_logprobs", request.prompt_logprobs, info.max_logprobs)
        validate_logprob_token_ids(request, info.vocab_size)
        adapter = self.resolve(request.adapter)
        if request.prompt_token_ids is not None:
            prompt_ids = request.prompt_token_ids
            bad = [t for t in prompt_ids if not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidRequest(
                    "token_ids", f"ids {bad[:8]} outside vocabulary 0..{info.vocab_size - 1}"
                )
        else:
            if not request.prompt_text:
                raise InvalidRequest("prompt", "the prompt is empty")
            prompt_ids = tuple(self.engine.tokenize(request.prompt_text))
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        if self.limits.max_prompt_tokens and len(prompt_ids) > self.limits.max_prompt_tokens:
            raise InvalidRequest(
                "prompt",
                f"{len(prompt_ids)} prompt tokens; at most {self.limits.max_prompt_tokens} "
                "(max_prompt_tokens)",
            )
        room = info.max_context_length - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                "prompt",
                f"{len(prompt_ids)} prompt tokens leave no room in the context of "
                f"{info.max_context_length} tokens",
            )
        max_tokens = request.stopping.max_tokens or min(room, self.limits.max_new_tokens or room)
        if max_tokens > room:
            raise InvalidRequest(
                "stopping.max_tokens",
                f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the context "
                f"length {info.max_context_length}",
            )
        if request.stopping.min_tokens > max_tokens:
            raise InvalidRequest(
                "stopping.min_tokens",
                f"({request.stopping.min_tokens}) exceeds the {max_tokens} tokens that fit",
            )
        return EngineRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_token_ids=tuple(prompt_ids),
            sampling=request.sampling,
            stopping=request.stopping,
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
            adapter=adapter,
            logprob_token_ids=request.logprob_token_ids,
        )

    async def check_files(self, request: EngineRequest) -> None:
        """Registry mode: the adapter's stored files are still the registered ones."""
        if request.adapter is not None and self.file_check is not None:
            await self.file_check(request.adapter)

    @contextlib.contextmanager
    def running(self, adapter: ResolvedAdapter | None) -> Iterator[None]:
        """Counts requests per adapter version (a version in use cannot be deleted)."""
        key = (adapter.name, adapter.version) if adapter else ("", 0)
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]

    def stream(self, request: EngineRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Deltas of a prepared request (run it inside `running`)."""
        return self.engine.generate(request, stream=True)

    async def complete(
        self, request: EngineRequest, progress: Callable[[int], None] | None = None
    ) -> GenerationChunk:
        """The whole completion of a prepared request (run it inside `running`).

        `progress` hears the tokens of each engine output as it arrives (admission's refunds).
        """
        result = GenerationChunk()
        async with contextlib.aclosing(self.engine.generate(request, stream=False)) as chunks:
            async for chunk in chunks:
                if progress is not None:
                    progress(len(chunk.token_ids))
                result.text += chunk.text
                result.token_ids.extend(chunk.token_ids)
                result.logprobs.extend(chunk.logprobs)
                result.prompt_logprobs.extend(chunk.prompt_logprobs)
                result.finish_reason = chunk.finish_reason or result.finish_reason
                result.usage = chunk.usage or result.usage
                result.timing = chunk.timing or result.timing
        return result
