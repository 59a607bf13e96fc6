"""Domain types of the gateway and the engine protocol.

Everything between the gRPC layer (generation.py) and vLLM (engine.py) speaks these types, so
the servicers and the pipeline can be unit-tested with a small fake engine.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class FinishReason(enum.Enum):
    """Why a generation ended (mirrors loraplex.v1.FinishReason)."""

    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None means the engine default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True)
class Stopping:
    """Stopping criteria; max_tokens None means up to the context length."""

    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One completion request as the client sent it (prompt not yet tokenized)."""

    request_id: str
    adapter: str = ""
    prompt_text: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stopping: Stopping = field(default_factory=Stopping)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ResolvedAdapter:
    """An exact, immutable adapter version the engine can load."""

    name: str
    version: int
    engine_id: int
    path: Path
    rank: int
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class EngineRequest:
    """A validated request ready for the engine: tokenized prompt, concrete limits."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    stopping: Stopping
    max_tokens: int
    logprobs: int | None
    prompt_logprobs: int | None
    adapter: ResolvedAdapter | None
    logprob_token_ids: tuple[int, ...] = ()  # scored at every generated position


@dataclass(frozen=True)
class TopLogprob:
    """An alternative token at a position."""

    token_id: int
    token: str
    logprob: float
    rank: int


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of the token actually at a position; None for the first prompt token."""

    token_id: int
    token: str
    logprob: float | None
    rank: int
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """When the engine produced tokens (on the final chunk; for metrics)."""

    first_token_at: float | None  # wall clock (time.time()), None if no token was produced
    mean_inter_token_s: float | None  # decode time / (tokens - 1); None below two tokens


@dataclass
class GenerationChunk:
    """Output of the engine: a delta when streaming, the whole completion otherwise."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: Timing | None = None


@dataclass
class AdapterStats:
    """What the engine's LoRA manager did since the last call, and where adapters live now.

    Engine ids throughout; tiers are `slot` (batch slot), `cpu` (CPU memory), `disk`.
    """

    active: set[int] = field(default_factory=set)  # in batch slots
    cached: set[int] = field(default_factory=set)  # in CPU memory only
    loads: list[tuple[int, float]] = field(default_factory=list)  # (id, seconds) from disk
    load_failures: list[int] = field(default_factory=list)
    evictions: dict[tuple[int, str], int] = field(default_factory=dict)  # (id, tier) -> n
    lookups: dict[tuple[int, str], int] = field(default_factory=dict)  # (id, found in) -> n


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves; static after start-up."""

    base_model: str
    quantization: str
    dtype: str
    max_context_length: int
    max_lora_rank: int
    max_loras: int
    max_logprobs: int
    vocab_size: int
    engine: str
    bos_token: tuple[int, str] | None = None
    """The tokenizer's BOS (id, text), if it has one."""
    eos_token: tuple[int, str] | None = None
    """The tokenizer's EOS (id, text), if it has one."""
    engine_fixes: tuple[str, ...] = ()
    """loraplex's vLLM fixes every engine worker applied (gateway/engine_fixes.py)."""
    prompt_logprobs_refusal: str = ""
    """Why prompt logprobs are refused with LoRA enabled; "" when they are served exactly."""
    vocab_lora_refusal: str = ""
    """Why adapters with LoRA on lm_head / embed_tokens are refused; "" when served."""


class Engine(Protocol):
    """The engine interface; only gateway/engine.py implements it with vLLM."""

    info: EngineInfo

    def generate(
        self, request: EngineRequest, stream: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Run one request; yields deltas when streaming, else one final chunk.

        Closing the iterator early (client cancel, deadline) aborts the request in the engine.
        """
        ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text in the base model's vocabulary."""
        ...

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The token string of each id."""
        ...

    async def add_adapter(self, adapter: ResolvedAdapter) -> None:
        """Load an adapter version into the engine ahead of its first request."""
        ...

    async def adapter_residency(self) -> tuple[set[int], set[int]]:
        """Engine ids of adapters (in batch slots, cached in CPU memory only)."""
        ...

    async def adapter_stats(self) -> AdapterStats:
        """Adapter cache activity since the last call, and current residency (metrics)."""
        ...

    def unfinished_requests(self) -> int:
        """Requests the engine holds (running or waiting)."""
        ...

    def is_healthy(self) -> bool:
        """False once the engine has died."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and its processes."""
        ...
