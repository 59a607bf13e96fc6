"""HF transformers + peft as the reference the served outputs must match (float32)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.tiny import TinyModel


@dataclass
class Reference:
    """Greedy continuation and logprobs of one prompt under one model."""

    tokens: list[int]
    token_logprobs: list[float]
    prompt_logprobs: list[float]  # for prompt positions 1..n-1
    top_ids: list[list[int]]  # top-k alternatives per generated position


class HFReference:
    """Loads the base once; `model(adapter)` swaps in a peft adapter (or none)."""

    def __init__(self, tiny: TinyModel) -> None:
        self.tiny = tiny
        self.tokenizer = AutoTokenizer.from_pretrained(tiny.base)
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, adapter: str) -> torch.nn.Module:
        if adapter not in self._models:
            base = AutoModelForCausalLM.from_pretrained(self.tiny.base, dtype=torch.float32)
            model = (
                PeftModel.from_pretrained(base, self.tiny.adapters[adapter]) if adapter else base
            )
            self._models[adapter] = model.eval()
        return self._models[adapter]

    @torch.no_grad()
    def next_logprobs(self, adapter: str, context: list[int]) -> list[float]:
        """The next token's log-probabilities over the whole vocabulary."""
        logits = self.model(adapter)(torch.tensor([context])).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1).tolist()

    @torch.no_grad()
    def greedy(self, adapter: str, prompt_ids: list[int], steps: int, top_k: int = 3) -> Reference:
        """Plain argmax decoding (no EOS handling), like the engine with ignore_eos."""
        model = self.model(adapter)
        ids = torch.tensor([prompt_ids])
        logits = model(ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        prompt_lp = [logprobs[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
        tokens, token_lps, tops = [], [], []
        for _ in range(steps):
            step_lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            token = int(step_lp.argmax())
            tokens.append(token)
            token_lps.append(step_lp[token].item())
            tops.append(step_lp.topk(top_k).indices.tolist())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return Reference(tokens, token_lps, prompt_lp, tops)


@contextmanager
def hf_reference(tiny: TinyModel) -> Iterator[HFReference]:
    """An HFReference computing on one thread while it lives: the engine's worker is pinned to
    a core and busy while it serves, and two OpenMP threads here would wait on each other across
    that core (measured 10x slower). The thread count is restored afterwards, so later tests
    (training) compute as they do alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield HFReference(tiny)
    finally:
        torch.set_num_threads(threads)
