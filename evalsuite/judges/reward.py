"""A local reward model (the trainer's `reward` method: base + LoRA + score head) as the judge.

It runs on this machine, not through the gateway: a reward model is a sequence classifier, which
the gateway does not serve. The systems being compared are still measured as served."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalsuite.errors import EvalInputError
from evalsuite.judges.base import TIE, Judge, Judgement, outcome_from_scores
from gateway.contract import folder_digest

if TYPE_CHECKING:
    from evalsuite.compare import Pair


class RewardModelJudge(Judge):
    """Higher reward wins; rewards within `tolerance` tie, identical answers always tie.

    path: the adapter folder the trainer's `reward` method saved (base: its base folder, default
    the one recorded in the adapter's config), or any local HF sequence-classification model
    folder with one output. The model loads on first use, in a thread."""

    name = "reward_model"

    def __init__(
        self,
        path: str | Path,
        base: str | Path | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
        tolerance: float = 1e-6,
    ) -> None:
        self.path = Path(path)
        self.base = Path(base) if base is not None else None
        self.is_adapter = (self.path / "adapter_config.json").is_file()
        if not self.is_adapter and not (self.path / "config.json").is_file():
            raise EvalInputError(
                f"reward_model: {self.path} is neither a reward adapter folder nor a model folder"
            )
        if self.base is not None and not (self.base / "config.json").is_file():
            raise EvalInputError(f"reward_model: {self.base} is not a model folder")
        if batch_size < 1 or tolerance < 0:
            raise EvalInputError("reward_model: batch_size must be >= 1 and tolerance >= 0")
        self.dtype, self.batch_size, self.tolerance = dtype, int(batch_size), float(tolerance)
        self._loaded: tuple[Any, Any] | None = None

    def scores(self, prompts: list[str], answers: list[str]) -> list[float]:
        """Rewards of (prompt, answer) pairs, as the trainer's RewardTrainer scored them."""
        from trainer.modeling import load_reward_model, load_sequence_classifier, reward_scores

        if self._loaded is None:
            self._loaded = (
                load_reward_model(self.path, self.base, self.dtype)
                if self.is_adapter
                else load_sequence_classifier(self.path, self.dtype)
            )
        model, tokenizer = self._loaded
        return reward_scores(model, tokenizer, prompts, answers, batch_size=self.batch_size)

    def _judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        prompts = [p.prompt for p in pairs]
        answers = [p.candidate for p in pairs] + [p.baseline for p in pairs]
        rewards = self.scores(prompts + prompts, answers) if pairs else []
        judgements = []
        n = len(pairs)
        for pair, cand, base in zip(pairs, rewards[:n], rewards[n:], strict=True):
            identical = pair.candidate == pair.baseline
            outcome = TIE if identical else outcome_from_scores(cand, base, self.tolerance)
            detail = {"candidate_reward": cand, "baseline_reward": base, "identical": identical}
            judgements.append(Judgement(outcome, detail))
        return judgements

    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        return await asyncio.to_thread(self._judge, list(pairs))

    def model_digests(self) -> list[str]:
        return [folder_digest(self.path)]

    def config(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "base": str(self.base) if self.base else None,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
        }
