"""The trainer end to end on the tiny base: real trl, peft and bitsandbytes, no mocks of training.

The task (examples/colors) is a made-up fact per animal asked with five phrasings; every
held-out prompt uses a phrasing its animal was never trained with, so scores on them measure
learning, not recall of a string. Runs are short (60-120 steps, seconds each on 2 cores).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from evalsuite.behaviour import behaviour
from evalsuite.decisions import decide, policy_checks
from evalsuite.policy import parse_policy
from gateway.client import AdapterClient, Client
from gateway.contract import base_fingerprint, folder_digest
from tests.support.cli import run_loraplex
from tests.support.training import EXAMPLES, TrainableSnapshot, config_for
from trainer.modeling import load_reward_model, reward_scores
from trainer.rewards import RewardModelScore, mean_sampled_reward
from trainer.run import RunError, TrainResult, run_training

HELD_OUT = [json.loads(line) for line in (EXAMPLES / "colors_eval.jsonl").open()]
HELD_OUT_PAIRS = [json.loads(line) for line in (EXAMPLES / "pairs_eval.jsonl").open()]
# Bounds sit well inside what 10 seeds gave (benchmarks/learning_spread.py, benchmarks/README.md
# "learning spread"), not at one run's result.
LOSS_DROP = 2.0  # nats, held-out eval loss (from ~6.9, random init); measured drops 3.4-4.6
MIN_EXACT_MATCH = 0.5  # greedy, on the 12 held-out prompts; measured 0.58-1.0 (SFT), 0.83-1.0
MIN_EM_GAIN = 0.5  # over the base's exact match (which is 0 for a random-init base)
MIN_PREFERENCE_ACCURACY = 0.8  # DPO / reward model, 24 held-out pairs; measured 0.92-1.0
# DPO continuing an SFT adapter starts from a policy that already ranks most pairs; its held-out
# accuracy was 0.67-0.92 and its margin 0.10-0.65: better than chance and a positive margin.
MIN_CONTINUED_DPO_ACCURACY = 0.55
# RL (examples/colors/rl.yaml): mean reward-model score of 16 sampled answers per held-out prompt
# (temperature 0.5), RL adapter minus its SFT start; and the largest KL trl logged. Over 5 seeds
# the gain was 0.23-2.27 (median 1.36) and the largest KL 0.01-0.71 (median 0.15).
RL_SAMPLES = 16
MIN_RL_REWARD_GAIN = 0.1
MAX_RL_KL = 1.5


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def exact_match(answers: list[str], rows: list[dict]) -> float:
    hits = [a.strip() == r["completion"].strip() for a, r in zip(answers, rows, strict=True)]
    return sum(hits) / len(hits)


def load_base(base: Path):
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory) -> tuple[TrainResult, TrainableSnapshot]:
    """LoRA SFT on colors mixed 2:1 with sounds (examples/colors/sft.yaml), trained once."""
    snapshot = TrainableSnapshot()
    out = tmp_path_factory.mktemp("sft")
    config = config_for("sft", "sft", tiny_model.base, out)
    return run_training(config, callbacks=[snapshot], echo=lambda _: None), snapshot


def test_sft_lowers_held_out_loss_and_writes_a_complete_manifest(sft_run, tiny_model):
    result, _ = sft_run
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    before = manifest["metrics"]["initial_eval"]["eval_loss"]
    after = manifest["metrics"]["eval"]["eval_loss"]
    assert after < before - LOSS_DROP, (before, after)

    from gateway.contract import base_fingerprint

    assert manifest["base_fingerprint"] == base_fingerprint(tiny_model.base)
    assert manifest["method"] == "sft" and manifest["seed"] == 0 and manifest["steps"] == 120
    assert manifest["config"]["training"]["learning_rate"] == 3e-3
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(manifest["versions"])
    files = {Path(f["path"]).name: f for f in manifest["data"]["files"]}
    assert (
        files["colors_train.jsonl"]["examples"] == 48
        and files["colors_eval.jsonl"]["role"] == "eval"
    )
    assert len(files["colors_train.jsonl"]["sha256"]) == 64
    # Mixed by weight 2:1 and interleaved: both sources in the mix.
    mix = {Path(k).name: v for k, v in manifest["data"]["mix"].items()}
    assert mix["colors_train.jsonl"] > mix["sounds_train.jsonl"] > 0
    assert manifest["wall_time_s"] > 0


def test_sft_changes_only_the_lora_weights(sft_run, tiny_model):
    result, snapshot = sft_run
    model = result.trainer.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), snapshot.before[n])]
    assert len(moved) == len(trainable), "every LoRA matrix should have been updated"

    original = load_base(tiny_model.base).state_dict()
    trained = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if "lora_" not in n
    }
    assert set(original) == set(trained)
    changed = [n for n, p in original.items() if not torch.equal(p, trained[n].detach())]
    assert changed == []


def test_sft_adapter_beats_the_base_on_held_out_exact_match(sft_run, tiny_model):
    result, _ = sft_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    prompts = [r["prompt"] for r in HELD_OUT]
    base_em = exact_match(greedy_answers(load_base(tiny_model.base), tokenizer, prompts), HELD_OUT)
    tuned = PeftModel.from_pretrained(load_base(tiny_model.base), result.adapter_dir).eval()
    tuned_em = exact_match(greedy_answers(tuned, tokenizer, prompts), HELD_OUT)
    assert tuned_em >= MIN_EXACT_MATCH and tuned_em >= base_em + MIN_EM_GAIN, (base_em, tuned_em)


def test_qlora_trains_4bit_layers_and_learns(tiny_model, tmp_path):
    snapshot = TrainableSnapshot()
    config = config_for("sft", "qlora", tiny_model.base, tmp_path)
    result = run_training(config, callbacks=[snapshot], echo=lambda _: None)

    layers = [
        m for m in result.trainer.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert layers and all(isinstance(m, peft.tuners.lora.bnb.Linear4bit) for m in layers)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    weights = {m.base_layer.weight.quant_state.quant_type for m in layers}
    assert weights == {"nf4"}
    assert all(m.base_layer.weight.quant_state.nested for m in layers)  # double quantization
    assert all(m.base_layer.weight.dtype == torch.uint8 for m in layers)  # packed 4-bit

    metrics = result.manifest["metrics"]
    assert metrics["eval"]["eval_loss"] < metrics["initial_eval"]["eval_loss"] - LOSS_DROP
    assert result.manifest["quantization"] == "bnb-4bit"
    # Served on a full-precision (or differently quantized) copy of the base, it still answers.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    tuned = PeftModel.from_pretrained(load_base(tiny_model.base), result.adapter_dir).eval()
    answers = greedy_answers(tuned, tokenizer, [r["prompt"] for r in HELD_OUT])
    assert exact_match(answers, HELD_OUT) >= MIN_EXACT_MATCH


def test_dpo_raises_held_out_preference_accuracy_and_margin(tiny_model, tmp_path):
    config = config_for("dpo", "dpo", tiny_model.base, tmp_path)
    result = run_training(config, echo=lambda _: None)
    before, after = result.manifest["metrics"]["initial_eval"], result.manifest["metrics"]["eval"]
    # The reference is the base with the adapter disabled: at the start policy == reference.
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval_rewards/accuracies"] >= MIN_PREFERENCE_ACCURACY
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.3
    assert "ref" not in result.trainer.model.peft_config


def test_dpo_continues_an_sft_adapter_which_is_its_reference(sft_run, tiny_model, tmp_path):
    sft_result, _ = sft_run
    config = config_for(
        "dpo", "dpo", tiny_model.base, tmp_path, f"lora.init_from={sft_result.adapter_dir}"
    )
    result = run_training(config, echo=lambda _: None)
    model = result.trainer.model
    assert set(model.peft_config) == {"default", "ref"}  # trl's frozen copy of the SFT adapter
    sft_weights = load_file(sft_result.adapter_dir / "adapter_model.safetensors")
    ref = {n.replace(".ref.", "."): p for n, p in model.named_parameters() if ".ref." in n}
    assert set(ref) == set(sft_weights)
    assert all(torch.equal(p.detach(), sft_weights[n]) for n, p in ref.items())
    before, after = result.manifest["metrics"]["initial_eval"], result.manifest["metrics"]["eval"]
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert after["eval_rewards/accuracies"] >= MIN_CONTINUED_DPO_ACCURACY, after
    assert after["eval_rewards/margins"] > 0, after
    assert after["eval_loss"] < before["eval_loss"], (before, after)  # below ln 2
    # Only the trained adapter is saved, not the reference copy.
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved and not any(".ref." in k for k in saved)
    assert result.manifest["init_from"] == str(sft_result.adapter_dir)


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory) -> TrainResult:
    """A reward model on the colors pairs (examples/colors/reward.yaml), trained once."""
    config = config_for("reward", "reward", tiny_model.base, tmp_path_factory.mktemp("reward"))
    return run_training(config, echo=lambda _: None)


def test_reward_model_ranks_chosen_above_rejected_on_held_out_pairs(reward_run, tiny_model):
    result = reward_run
    assert result.manifest["task"] == "reward-model"
    model, tokenizer = load_reward_model(result.adapter_dir, tiny_model.base)
    prompts = [p["prompt"] for p in HELD_OUT_PAIRS]
    chosen = reward_scores(model, tokenizer, prompts, [p["chosen"] for p in HELD_OUT_PAIRS])
    rejected = reward_scores(model, tokenizer, prompts, [p["rejected"] for p in HELD_OUT_PAIRS])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(prompts)
    assert accuracy >= MIN_PREFERENCE_ACCURACY


def test_rl_raises_the_reward_of_sampled_answers_and_stays_near_the_sft_policy(
    sft_run, reward_run, tiny_model, tmp_path
):
    """trl's GRPO from the SFT adapter against the reward model (examples/colors/rl.yaml): the
    held-out prompts' sampled answers score higher, the KL to the SFT reference stays small,
    only the LoRA weights move, and the manifest says what it was trained against."""
    sft, _ = sft_run
    snapshot = TrainableSnapshot()
    config = config_for(
        "rl", "rl", tiny_model.base, tmp_path,
        f"lora.init_from={sft.adapter_dir}",
        f"rl.rewards=[{{reward_model: {reward_run.adapter_dir}}}]",
    )  # fmt: skip
    result = run_training(config, callbacks=[snapshot], echo=lambda _: None)
    scorer = RewardModelScore(reward_run.adapter_dir, "float32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    prompts = [r["prompt"] for r in HELD_OUT]

    def sampled(adapter: Path) -> float:
        policy = PeftModel.from_pretrained(load_base(tiny_model.base), adapter).eval()
        return mean_sampled_reward(
            policy, tokenizer, scorer, prompts, RL_SAMPLES, config.rl.max_completion_length,
            config.rl.temperature,
        )  # fmt: skip

    before, after = sampled(sft.adapter_dir), sampled(result.adapter_dir)
    assert after >= before + MIN_RL_REWARD_GAIN, (before, after)
    record = result.manifest["rl"]
    assert max(c["kl"] for c in record["curves"]) < MAX_RL_KL, record["curves"]
    assert (record["algorithm"], record["beta"], record["reference"]) == (
        "grpo", 0.04, str(sft.adapter_dir),
    )  # fmt: skip
    assert record["rewards"] == [
        {
            "reward_model": str(reward_run.adapter_dir),
            "sha256": folder_digest(reward_run.adapter_dir),
            "base_fingerprint": base_fingerprint(tiny_model.base),
            "weight": 1.0,
        }
    ]
    assert [c["step"] for c in record["curves"]] == [10, 20, 30, 40, 50, 60]
    assert all({"reward", "kl", "completions/mean_length"} <= set(c) for c in record["curves"])
    model = result.trainer.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    assert all(not torch.equal(p.detach(), snapshot.before[n]) for n, p in trainable.items())
    original = load_base(tiny_model.base).state_dict()
    frozen = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if "lora_" not in n
    }
    assert all(torch.equal(p, frozen[n].detach()) for n, p in original.items())
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved and not any(".ref." in k for k in saved)  # trl's frozen reference copy


# A reward that pays for length only (tests/support/rewards.py), from the SFT adapter: over seeds
# 0-2 (40 steps, ~7 s) every held-out greedy answer became 8 words ("white white ..."), a length
# ratio of 8.0 against the SFT start's 1-word answers and a distinct-1 ratio of 0.01-0.05.
MIN_HACKED_LENGTH_RATIO = 3.0


def test_rl_on_a_length_only_reward_is_caught_by_the_gates_length_check(
    sft_run, tiny_model, tmp_path
):
    """The reward hack the gate's policy checks exist for: the policy learns to pad."""
    sft, _ = sft_run
    config = config_for(
        "rl", "rl", tiny_model.base, tmp_path,
        f"lora.init_from={sft.adapter_dir}",
        "rl.rewards=[{function: 'tests.support.rewards:pays_for_length'}]",
        "rl.max_completion_length=8", "training.learning_rate=1e-3", "training.max_steps=40",
        "training.save_steps=1000",
    )  # fmt: skip
    result = run_training(config, echo=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    prompts = [r["prompt"] for r in HELD_OUT]

    def answers(adapter: Path) -> list[str]:
        policy = PeftModel.from_pretrained(load_base(tiny_model.base), adapter).eval()
        return greedy_answers(policy, tokenizer, prompts, max_new_tokens=8)

    pairs = [
        {"candidate": c, "baseline": b}
        for c, b in zip(answers(result.adapter_dir), answers(sft.adapter_dir), strict=True)
    ]
    stats = behaviour(pairs, n=1)
    assert stats["length_ratio"] >= MIN_HACKED_LENGTH_RATIO, stats
    policy = parse_policy(
        {"preference": {"prompts": "p.jsonl", "min_win_rate_lower_bound": 0.0,
                        "max_length_ratio": 1.5, "min_distinct_ratio": 0.8, "distinct_n": 1}}
    )  # fmt: skip
    judged_even = {"ci_low": 0.5, "ci_high": 0.5, "win_rate": 0.5, "confidence": 0.95,
                   "sign_test_p": 1.0, "wins": 0, "ties": 12, "losses": 0}  # fmt: skip
    verdict, failed = decide(policy_checks(policy, {}, {}, judged_even, stats))
    assert verdict == "fail" and "length_ratio" in [c.kind for c in failed]
    [record] = result.manifest["rl"]["rewards"]
    assert record["function"] == "tests.support.rewards:pays_for_length"
    assert record["module_sha256"]  # which code paid the reward, by content


def test_rl_trains_on_a_4bit_base_too(sft_run, tiny_model, tmp_path):
    """QLoRA for RL: the SFT adapter's policy over the NF4 base, its LoRA weights moving."""
    sft, _ = sft_run
    snapshot = TrainableSnapshot()
    config = config_for(
        "rl", "rl", tiny_model.base, tmp_path, f"lora.init_from={sft.adapter_dir}",
        "rl.rewards=[{function: 'tests.support.rewards:pays_for_length'}]",
        "rl.max_completion_length=4", "training.max_steps=6", "training.save_steps=1000",
        "quantization={bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true, "
        "bnb_4bit_compute_dtype: float32}",
    )  # fmt: skip
    result = run_training(config, callbacks=[snapshot], echo=lambda _: None)
    layers = [
        m for m in result.trainer.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    assert result.manifest["quantization"] == "bnb-4bit"
    assert result.manifest["rl"]["reference"] == str(sft.adapter_dir)
    trainable = {n: p for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and any(
        not torch.equal(p.detach(), snapshot.before[n]) for n, p in trainable.items()
    )


# ---------------------------------------------------------------- determinism and resume

SHORT = ("training.max_steps=20", "training.save_steps=10", "data.eval_file=null")


class InterruptAt(TrainerCallback):
    """Sends this process a real SIGINT (Ctrl-C) at the end of a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def _adapter_bytes(result: TrainResult) -> tuple[bytes, bytes]:
    folder = result.adapter_dir
    return (
        (folder / "adapter_model.safetensors").read_bytes(),
        (folder / "adapter_config.json").read_bytes(),
    )


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory) -> TrainResult:
    config = config_for("sft", "sft", tiny_model.base, tmp_path_factory.mktemp("ref"), *SHORT)
    return run_training(config, echo=lambda _: None)


def test_same_config_data_and_seed_give_a_byte_identical_adapter(
    reference_run, tiny_model, tmp_path
):
    config = config_for("sft", "sft", tiny_model.base, tmp_path, *SHORT)
    again = run_training(config, echo=lambda _: None)
    assert _adapter_bytes(again) == _adapter_bytes(reference_run)
    other = run_training(
        config.model_copy(
            update={
                "output_dir": tmp_path / "seed1",
                "training": config.training.model_copy(update={"seed": 1}),
            }
        ),
        echo=lambda _: None,
    )
    assert _adapter_bytes(other)[0] != _adapter_bytes(reference_run)[0]


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_uninterrupted_result(
    reference_run, tiny_model, tmp_path
):
    config = config_for("sft", "sft", tiny_model.base, tmp_path, *SHORT)
    before = signal.getsignal(signal.SIGINT)
    stopped = run_training(config, callbacks=[InterruptAt(7)], echo=lambda _: None)
    assert stopped.interrupted and stopped.adapter_dir is None
    # The flag is seen at the next step boundary, where the checkpoint is written.
    assert stopped.global_step == 8
    assert (stopped.checkpoint_dir / "checkpoint-8").is_dir()
    assert not (tmp_path / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored

    with pytest.raises(RunError, match="pass --resume"):
        run_training(config, echo=lambda _: None)
    resumed = run_training(config, resume=True, echo=lambda _: None)
    assert resumed.global_step == 20
    # Bit-for-bit: optimizer, scheduler, RNG and data order are all restored from the checkpoint.
    assert _adapter_bytes(resumed) == _adapter_bytes(reference_run)


def test_resume_without_a_checkpoint_is_refused(tiny_model, tmp_path):
    config = config_for("sft", "sft", tiny_model.base, tmp_path)
    with pytest.raises(RunError, match="no checkpoint"):
        run_training(config, resume=True)


# ---------------------------------------------------------------- the command and the gateway


def test_cli_refuses_a_bad_config_and_bad_data_before_loading_a_model(tmp_path):
    typo = run_loraplex(
        "train", "sft", "--config", str(EXAMPLES / "sft.yaml"), "--set", "training.learning_rat=1"
    )
    assert typo.returncode == 2, typo.stderr
    assert "training.learning_rat: unknown key; did you mean 'learning_rate'?" in typo.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "completion": ""}\n{"prompt": "Q2"}\n')
    result = run_loraplex(
        "train",
        "sft",
        "--config",
        str(EXAMPLES / "sft.yaml"),
        "--set",
        f"data.train=[{{path: {bad}}}]",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        "model.path=/nonexistent/base",  # never reached: the data check comes first
    )
    assert result.returncode == 2, result.stderr
    assert f"{bad}: line 1: 'completion' is empty" in result.stderr
    assert f"{bad}: line 2: missing key 'completion'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_stops_on_fatal_contamination_before_loading_a_model(tmp_path):
    """The gate's prompts leaked into training: exit 2, naming the training line and the prompt."""
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(
        (EXAMPLES / "colors_train.jsonl").read_text()
        + json.dumps({"prompt": "Q: What color is the bee?\nA:", "completion": " blue"})
        + "\n"
    )
    result = run_loraplex(
        "train",
        "sft",
        "--config",
        str(EXAMPLES / "sft.yaml"),
        "--set",
        f"data.train=[{{path: {leaked}}}]",
        "--set",
        f"data.contamination={{against: [{EXAMPLES / 'prompts.jsonl'}], fatal: true}}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        "model.path=/nonexistent/base",  # never reached: the contamination check comes first
    )
    assert result.returncode == 2, result.stderr
    assert f"{leaked}: line 49: contaminated: holds eval text prompts.jsonl:line 1 (id q0)" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_cli_trains_registers_a_candidate_that_the_gateway_serves(gateway, tiny_model, tmp_path):
    """`loraplex train sft --register`: the adapter becomes colors@candidate and vLLM serves it."""
    result = run_loraplex(
        "train",
        "sft",
        "--config",
        str(EXAMPLES / "sft.yaml"),
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        f"model.path={tiny_model.base}",
        "--register",
        "--target",
        gateway.target,
        "--name",
        "colors",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered colors@v1 as candidate" in result.stdout
    with AdapterClient(gateway.target) as registry:
        adapter = registry.get("colors")
    assert adapter.aliases["candidate"] == 1
    prompts = [r["prompt"] for r in HELD_OUT]
    with Client(gateway.target) as client:
        served = [
            client.generate(p, "colors@candidate", max_tokens=4, temperature=0.0).text
            for p in prompts
        ]
        base = [client.generate(p, "", max_tokens=4, temperature=0.0).text for p in prompts]
    assert served != base
    assert exact_match(served, HELD_OUT) >= MIN_EXACT_MATCH
    # The gateway's vLLM gives what HF + peft gives for the same adapter (float32 base).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    tuned = PeftModel.from_pretrained(load_base(tiny_model.base), tmp_path / "adapter").eval()
    assert [a.strip() for a in served] == [
        a.strip() for a in greedy_answers(tuned, tokenizer, prompts)
    ]


def test_chat_data_on_a_base_without_template_needs_a_named_one(tiny_model, tmp_path):
    """messages data: the base's chat template, or `model.chat_template` when it has none;
    loss on assistant turns only (the {% generation %} mask)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model.base, base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    chat = (
        "data.train=[{path: colors_chat.jsonl}]",
        "data.eval_file=null",
        "training.max_steps=10",
    )
    from trainer.config import ConfigError

    config = config_for("sft", "sft", base, tmp_path / "no-template", *chat)
    with pytest.raises(ConfigError, match=r"set model\.chat_template"):
        run_training(config, echo=lambda _: None)
    assert not (tmp_path / "no-template").exists()  # refused before anything was written

    config = config_for("sft", "sft", base, tmp_path / "plain", *chat, "model.chat_template=plain")
    result = run_training(config, echo=lambda _: None)
    batch = next(iter(result.trainer.get_train_dataloader()))
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(base)
    trained_on = tokenizer.decode(ids[labels != -100])
    assert "User:" not in trained_on and trained_on.strip().endswith(tokenizer.eos_token)
    assert (labels == -100).sum() > (labels != -100).sum()  # the user turn is masked


def test_qlora_on_a_prequantized_4bit_base(tiny_model, tmp_path):
    """`loraplex train quantize-base` once, then QLoRA loads the 4-bit copy directly; the
    registry's fingerprint of the copy is the base's, so its adapters register for the base."""
    from gateway.contract import base_fingerprint
    from trainer.config import ConfigError

    nf4 = tmp_path / "base-nf4"
    done = run_loraplex(
        "train", "quantize-base", "--model", str(tiny_model.base), "--out", str(nf4),
        "--dtype", "float32", "--compute-dtype", "float32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert base_fingerprint(nf4) == base_fingerprint(tiny_model.base)
    stored = json.loads((nf4 / "config.json").read_text())["quantization_config"]
    assert stored["bnb_4bit_quant_type"] == "nf4" and stored["bnb_4bit_use_double_quant"]

    short = ("training.max_steps=10", "data.eval_file=null")
    with pytest.raises(ConfigError, match="training on it is QLoRA"):
        run_training(config_for("sft", "sft", nf4, tmp_path / "lora", *short))
    mismatch = config_for("sft", "qlora", nf4, tmp_path / "fp4", *short)
    mismatch = mismatch.model_copy(
        update={
            "quantization": mismatch.quantization.model_copy(update={"bnb_4bit_quant_type": "fp4"})
        }
    )
    with pytest.raises(ConfigError, match="differs from the settings"):
        run_training(mismatch)

    result = run_training(
        config_for("sft", "qlora", nf4, tmp_path / "qlora", *short), echo=lambda _: None
    )
    layers = [m for m in result.trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert result.manifest["base_fingerprint"] == base_fingerprint(tiny_model.base)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_early_stopping_keeps_the_best_checkpoints_adapter(tiny_model, tmp_path):
    """A learning rate that overshoots: eval loss stops improving after a few steps; training
    stops there (patience 1) and the adapter is the best evaluated checkpoint's, not the last."""
    config = config_for(
        "sft",
        "sft",
        tiny_model.base,
        tmp_path,
        "training.learning_rate=3e-2",
        "training.max_steps=60",
        "training.eval_steps=5",
        "training.save_steps=5",
        "training.early_stopping_patience=1",
        "training.early_stopping_threshold=0.05",
        "training.load_best_at_end=true",
    )
    result = run_training(config, echo=lambda _: None)

    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    best = manifest["best"]
    assert best["stopped_early"] and best["stopped_at_step"] == manifest["steps"] < 60
    assert best["metric"] == "eval_loss" and best["adapter_is_best_checkpoint"]
    evals = {
        e["step"]: e["eval_loss"]
        for e in result.trainer.state.log_history
        if "eval_loss" in e and e["step"] % 5 == 0 and "eval_runtime" in e
    }
    assert best["value"] == min(evals.values()) and evals[best["step"]] == best["value"]
    assert best["checkpoint"] == f"checkpoint-{best['step']}"
    # The final evaluation is of the best checkpoint's weights.
    assert manifest["metrics"]["eval"]["eval_loss"] == pytest.approx(best["value"], abs=1e-6)

    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    checkpoint = load_file(result.checkpoint_dir / best["checkpoint"] / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys()
    assert all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    last = result.checkpoint_dir / f"checkpoint-{manifest['steps']}"
    if best["step"] != manifest["steps"]:  # the last step's weights were not kept
        final = load_file(last / "adapter_model.safetensors")
        assert any(not torch.equal(saved[k], final[k]) for k in saved)
