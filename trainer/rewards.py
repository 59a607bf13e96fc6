"""The rewards of an RL run: each configured source as something trl's GRPO/RLOO trainers call,
and what the manifest records about it (which model, by content hash, and its weight).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gateway.contract import base_fingerprint, folder_digest
from trainer.config import ConfigError, DType, RewardSource
from trainer.modeling import load_reward_model, load_sequence_classifier, reward_scores


def _as_text(prompt: Any, completion: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """A (prompt, completion) pair as text: chat turns through the tokenizer's template."""
    if isinstance(prompt, list):
        whole = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
        start = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return start, whole[len(start) :]
    return prompt, completion


class RewardModelScore:
    """A `loraplex train reward` model (LoRA merged into its base) as a trl reward function:
    it scores prompt + completion + EOS, the text it was trained on."""

    def __init__(self, adapter_dir: Path, dtype: DType) -> None:
        model, tokenizer = load_reward_model(adapter_dir, dtype=dtype)
        self.model: PreTrainedModel = model.merge_and_unload().eval()
        self.tokenizer = tokenizer
        self.__name__ = f"reward_model_{adapter_dir.parent.name}"  # trl logs rewards by name

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        pairs = [_as_text(p, c, self.tokenizer) for p, c in zip(prompts, completions, strict=True)]
        return reward_scores(
            self.model, self.tokenizer, [p for p, _ in pairs], [c for _, c in pairs]
        )


def reward_model_folder(path: Path) -> Path:
    """The adapter folder of a reward run (the run folder or its adapter/)."""
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"rl.rewards: {path} is not a `loraplex train reward` run or adapter")
    return adapter


def import_function(spec: str) -> Callable[..., list[float]]:
    """`package.module:function` -> the function; a clear error for a bad name."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"rl.rewards: function {spec!r} must be `package.module:function`")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"rl.rewards: cannot import {spec!r}: {exc}") from None
    if not callable(function):
        raise ConfigError(f"rl.rewards: {spec!r} is not callable")
    return function


@dataclass
class Rewards:
    """What trl's trainers take (`reward_funcs`, `reward_processing_classes`, weights) and what
    the manifest records."""

    functions: list[Any] = field(default_factory=list)
    processing_classes: list[PreTrainedTokenizerBase | None] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


def _module_sha256(function: Callable[..., Any]) -> str | None:
    """sha256 of the file that defines a reward function (None for built-ins)."""
    try:
        source = inspect.getsourcefile(function)
    except TypeError:
        return None
    if source is None:
        return None
    with open(source, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_rewards(sources: list[RewardSource], dtype: DType) -> Rewards:
    """Every reward source loaded, with the record the manifest keeps of it."""
    rewards = Rewards()
    for source in sources:
        if source.reward_model is not None:
            adapter = reward_model_folder(source.reward_model)
            scorer = RewardModelScore(adapter, dtype)
            rewards.functions.append(scorer)
            rewards.processing_classes.append(None)
            manifest = adapter / "manifest.json"
            trained_on = json.loads(manifest.read_text()) if manifest.is_file() else {}
            record = {"reward_model": str(adapter), "sha256": folder_digest(adapter)}
            record["base_fingerprint"] = trained_on.get("base_fingerprint")
        elif source.classifier is not None:
            model, tokenizer = load_sequence_classifier(source.classifier, dtype)
            rewards.functions.append(model)
            rewards.processing_classes.append(tokenizer)
            record = {"classifier": str(source.classifier)}
            record["sha256"] = folder_digest(source.classifier)
            if any((source.classifier / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                record["base_fingerprint"] = base_fingerprint(source.classifier)
        else:
            assert source.function is not None
            function = import_function(source.function)
            rewards.functions.append(function)
            rewards.processing_classes.append(None)
            record = {"function": source.function, "module_sha256": _module_sha256(function)}
        rewards.weights.append(source.weight)
        rewards.records.append({**record, "weight": source.weight})
    return rewards


@torch.no_grad()
def mean_sampled_reward(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    score: Callable[[list[str], list[str]], list[float]],
    prompts: list[str],
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
) -> float:
    """The mean reward of a policy's sampled completions of plain-text prompts (what RL
    optimizes), with a fixed sampling seed so two policies are compared on equal terms."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        all_prompts: list[str] = []
        completions: list[str] = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.repeat(samples, 1)
            out = policy.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
            all_prompts += [prompt] * samples
            completions += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(generator_state)
    scores = score(all_prompts, completions)
    return sum(scores) / len(scores)
