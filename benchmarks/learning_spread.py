"""How much do the trainer tests' learning outcomes depend on the seed? Trains them over seeds.

tests/integration/test_trainer.py asserts that SFT, QLoRA, DPO, reward-model and RL runs on
the tiny base learn (examples/colors). A bound set from one lucky run flips on the next machine, so
this runs the same trainings with `training.seed` = 0..N-1 (the tiny base is fixed, as in the
tests) and prints each metric's spread; the tests' bounds sit well inside it
(benchmarks/README.md, "learning spread").

    .venv/bin/python benchmarks/learning_spread.py --seeds 10 --json build/learning_spread.json
    .venv/bin/python benchmarks/learning_spread.py --seeds 6 --only-rl   # the RL rows alone
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import load_config
from trainer.modeling import load_reward_model, reward_scores
from trainer.rewards import RewardModelScore, mean_sampled_reward
from trainer.run import run_training
from trainer.tiny import build_tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colors"
HELD_OUT = [json.loads(line) for line in (EXAMPLES / "colors_eval.jsonl").open()]
HELD_OUT_PAIRS = [json.loads(line) for line in (EXAMPLES / "pairs_eval.jsonl").open()]
RL_SAMPLES = 16  # sampled answers per held-out prompt when measuring a policy's mean reward


def train(method: str, yaml_name: str, base: Path, out: Path, seed: int, *overrides: str):
    config = load_config(
        method,
        EXAMPLES / f"{yaml_name}.yaml",
        [f"output_dir={out}", f"model.path={base}", f"training.seed={seed}", *overrides],
    )
    return run_training(config, echo=lambda _: None)


def held_out_exact_match(base: Path, adapter: Path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    hits = 0
    for row in HELD_OUT:
        ids = tokenizer(row["prompt"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += answer.strip() == row["completion"].strip()
    return hits / len(HELD_OUT)


def loss_drop(result) -> float:
    metrics = result.manifest["metrics"]
    return metrics["initial_eval"]["eval_loss"] - metrics["eval"]["eval_loss"]


def rl_outcomes(base: Path, sft, reward, tmp: Path, seed: int) -> dict[str, float]:
    """RL (examples/colors/rl.yaml) from the SFT adapter against the reward model: the mean
    reward of sampled held-out answers before and after, the largest logged KL, greedy EM."""
    config = load_config("rl", EXAMPLES / "rl.yaml")
    rl = train(
        "rl", "rl", base, tmp / f"rl{seed}", seed,
        f"lora.init_from={sft.adapter_dir}", f"rl.rewards=[{{reward_model: {reward.adapter_dir}}}]",
    )  # fmt: skip
    scorer = RewardModelScore(reward.adapter_dir, "float32")
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [row["prompt"] for row in HELD_OUT]

    def sampled(adapter: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        policy = PeftModel.from_pretrained(model, adapter).eval()
        return mean_sampled_reward(
            policy, tokenizer, scorer, prompts, RL_SAMPLES, config.rl.max_completion_length,
            config.rl.temperature,
        )  # fmt: skip

    before, after = sampled(sft.adapter_dir), sampled(rl.adapter_dir)
    return {
        "rl_reward_before": before,
        "rl_reward_gain": after - before,
        "rl_max_kl": max(c["kl"] for c in rl.manifest["rl"]["curves"]),
        "rl_exact_match": held_out_exact_match(base, rl.adapter_dir),
    }


def one_seed(base: Path, tmp: Path, seed: int, only_rl: bool) -> dict[str, float]:
    row: dict[str, float] = {}
    sft = train("sft", "sft", base, tmp / f"sft{seed}", seed)
    row["sft_loss_drop"] = loss_drop(sft)
    row["sft_exact_match"] = held_out_exact_match(base, sft.adapter_dir)
    if only_rl:
        reward = train("reward", "reward", base, tmp / f"reward{seed}", seed)
        return row | rl_outcomes(base, sft, reward, tmp, seed)
    qlora = train("sft", "qlora", base, tmp / f"qlora{seed}", seed)
    row["qlora_loss_drop"] = loss_drop(qlora)
    row["qlora_exact_match"] = held_out_exact_match(base, qlora.adapter_dir)
    for name, extra in (("dpo", ()), ("dpo_from_sft", (f"lora.init_from={sft.adapter_dir}",))):
        dpo = train("dpo", "dpo", base, tmp / f"{name}{seed}", seed, *extra)
        after = dpo.manifest["metrics"]["eval"]
        row[f"{name}_accuracy"] = after["eval_rewards/accuracies"]
        row[f"{name}_margin"] = after["eval_rewards/margins"]
        row[f"{name}_eval_loss"] = after["eval_loss"]
    reward = train("reward", "reward", base, tmp / f"reward{seed}", seed)
    model, tokenizer = load_reward_model(reward.adapter_dir, base)
    prompts = [p["prompt"] for p in HELD_OUT_PAIRS]
    chosen = reward_scores(model, tokenizer, prompts, [p["chosen"] for p in HELD_OUT_PAIRS])
    rejected = reward_scores(model, tokenizer, prompts, [p["rejected"] for p in HELD_OUT_PAIRS])
    row["reward_accuracy"] = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(
        prompts
    )
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    row["reward_mean_margin"] = statistics.mean(margins)
    return row | rl_outcomes(base, sft, reward, tmp, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the per-seed results here")
    parser.add_argument("--only-rl", action="store_true", help="SFT, reward model and RL only")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "tiny").base
        for seed in range(args.seeds):
            row = one_seed(base, Path(tmp), seed, args.only_rl)
            rows.append(row)
            print(json.dumps({"seed": seed, **row}), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=1))
    print(f"{'metric':24} {'min':>8} {'median':>8} {'max':>8} {'stdev':>8}  (n={len(rows)})")
    for key in rows[0]:
        values = sorted(r[key] for r in rows)
        print(
            f"{key:24} {values[0]:8.4f} {statistics.median(values):8.4f} {values[-1]:8.4f} "
            f"{statistics.stdev(values):8.4f}"
        )


if __name__ == "__main__":
    main()
