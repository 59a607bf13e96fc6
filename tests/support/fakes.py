"""A small fake engine: deterministic tokens, for fast tests of everything above the engine."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from pathlib import Path

from gateway.domain import (
    AdapterStats,
    EngineInfo,
    EngineRequest,
    FinishReason,
    GenerationChunk,
    ResolvedAdapter,
    Timing,
    Usage,
)
from gateway.errors import AdapterUnavailable
from gateway.registry.base_model import BaseLayers

INFO = EngineInfo(
    base_model="fake",
    quantization="none",
    dtype="float32",
    max_context_length=64,
    max_lora_rank=16,
    max_loras=4,
    max_logprobs=5,
    vocab_size=100,
    engine="fake 0",
    bos_token=(1, "<s>"),
    eos_token=(2, "</s>"),
)


class FakeEngine:
    """Echoes (adapter engine id + position) as tokens; can be made unhealthy or buggy."""

    def __init__(self) -> None:
        self.info = INFO
        self.healthy = True
        self.fail_with: Exception | None = None
        self.seen: list[EngineRequest] = []
        self.loaded: dict[int, ResolvedAdapter] = {}
        self.refuse_adapters: set[str] = set()  # names whose load fails, as vLLM's would

    async def generate(
        self, request: EngineRequest, stream: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        self.seen.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        offset = request.adapter.engine_id if request.adapter else 0
        tokens = [(offset + i) % INFO.vocab_size for i in range(request.max_tokens)]
        pieces = [[t] for t in tokens] if stream else [tokens]
        for n, piece in enumerate(pieces, start=1):
            done = n == len(pieces)
            yield GenerationChunk(
                text="".join(f"<{t}>" for t in piece),
                token_ids=piece,
                finish_reason=FinishReason.LENGTH if done else None,
                usage=Usage(len(request.prompt_token_ids), len(tokens)) if done else None,
                timing=Timing(time.time(), 0.001) if done else None,
            )

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) % INFO.vocab_size for c in text]
        return [1, *ids] if add_special_tokens else ids

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    async def add_adapter(self, adapter: ResolvedAdapter) -> None:
        if adapter.name in self.refuse_adapters:
            raise AdapterUnavailable(f"adapter {adapter.name!r} failed to load: refused by fake")
        self.loaded[adapter.engine_id] = adapter

    async def adapter_residency(self) -> tuple[set[int], set[int]]:
        return set(list(self.loaded)[-INFO.max_loras :]), set(list(self.loaded)[: -INFO.max_loras])

    async def adapter_stats(self) -> AdapterStats:
        active, cached = await self.adapter_residency()
        return AdapterStats(active=active, cached=cached)

    def unfinished_requests(self) -> int:
        return 0

    def is_healthy(self) -> bool:
        return self.healthy

    async def shutdown(self) -> None:
        return None


FAKE_HIDDEN = 32
FAKE_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
FAKE_BASE = BaseLayers(
    shapes={module: (FAKE_HIDDEN, FAKE_HIDDEN) for module in FAKE_MODULES},
    modules=frozenset(FAKE_MODULES),
)
"""The layers of the fake engine's base, which make_adapter's adapters fit."""


def write_lora_weights(folder: Path, rank: int, seed: int = 0) -> None:
    """Real LoRA matrices for FAKE_BASE's q_proj and v_proj, in peft's safetensors layout."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in FAKE_MODULES:
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, FAKE_HIDDEN, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(FAKE_HIDDEN, rank, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors")


def make_adapter(root: Path, name: str, rank: int = 8) -> None:
    """A small peft adapter folder that fits FAKE_BASE."""
    folder = root / name
    folder.mkdir()
    config = {"peft_type": "LORA", "r": rank, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_lora_weights(folder, rank)
