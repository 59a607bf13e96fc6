"""How a candidate was made, from its trainer manifest (the registry keeps it as the version's
metadata), and whether the gate's judge is independent of it.

A candidate trained by RL against a reward model has learned to please that model; the same
model judging it against production measures that, not whether it is better. So a judge that
scores with a reward model the manifest names (same content hash) is refused, unless the policy
says otherwise, and then the report says the preference is not independent evidence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from evalsuite.errors import EvalInputError


def training_rewards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The reward sources an RL candidate was trained against (none for other methods)."""
    rl = manifest.get("rl")
    rewards = rl.get("rewards") if isinstance(rl, dict) else None
    return [r for r in rewards or [] if isinstance(r, dict)]


def lineage(manifest: dict[str, Any]) -> list[str]:
    """How the candidate was made, first step first, for the report: the adapter it started
    from, the reward models it was trained against, and its own training run."""
    steps = []
    if manifest.get("init_from"):
        steps.append(f"started from the adapter {manifest['init_from']}")
    for reward in training_rewards(manifest):
        source = reward.get("reward_model") or reward.get("classifier") or reward.get("function")
        digest = f" (sha256 {str(reward['sha256'])[:12]})" if reward.get("sha256") else ""
        steps.append(f"reward: {source}{digest}, weight {reward.get('weight', 1)}")
    method = manifest.get("method")
    if method:
        rl = manifest.get("rl") if isinstance(manifest.get("rl"), dict) else {}
        detail = f" ({rl.get('algorithm')}, KL beta {rl.get('beta')})" if rl else ""
        steps.append(f"trained: {method}{detail}, {manifest.get('steps', '?')} steps")
    return steps


def shared_reward_models(
    judge_digests: Iterable[str], manifest: dict[str, Any]
) -> list[dict[str, Any]]:
    """The training reward models (manifest records) the judge scores with, by sha256."""
    digests = set(judge_digests)
    return [r for r in training_rewards(manifest) if r.get("sha256") in digests]


def check_judge_independence(
    judge_name: str, judge_digests: Iterable[str], manifest: dict[str, Any], allowed: bool
) -> str | None:
    """None when the judge is independent of the candidate's training; else the note for the
    report (`allowed`), or EvalInputError before anything runs."""
    shared = shared_reward_models(judge_digests, manifest)
    if not shared:
        return None
    names = ", ".join(
        f"{r.get('reward_model') or r.get('classifier') or 'reward model'} "
        f"(sha256 {str(r['sha256'])[:12]})"
        for r in shared
    )
    note = (
        f"judge {judge_name!r} scores with the reward model the candidate was trained against "
        f"({names}): its preference is not independent evidence"
    )
    if not allowed:
        raise EvalInputError(
            f"{note}; judge with another model, or set preference.allow_training_judge: true "
            "to run it anyway (the report will say so)"
        )
    return note
