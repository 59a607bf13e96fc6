"""RL steps/s and peak memory: trl's GRPO and RLOO, LoRA over a bf16 base and over its NF4 copy.

The ~190M random-init Llama of `train_memory.py` (built locally once), LoRA r=16 on all linear
layers, the same prompts, sampling and reward in every mode; each mode trains in its own fresh
process (peak RSS is that mode's alone), one after another. A step generates
`--prompts-per-step` x `--generations` completions of up to `--completion-tokens` tokens with
the policy itself (trl's generate: no vLLM on CPU), scores them, and takes one optimizer step
with the KL term against the reference (the adapter disabled). The reward is a cheap rule (the
completion's length in words), so the figures are the policy's own cost, not a reward model's.
The first step is warm-up; steps/s and generated tokens/s count the timed ones.

    .venv/bin/python benchmarks/rl_speed.py                     # 4 modes, ~10 min on 2 cores
    .venv/bin/python benchmarks/rl_speed.py --modes grpo-lora --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from train_memory import (  # the script's folder is on sys.path
    MMAP_THRESHOLD,
    QUANTIZATION,
    build_model,
    build_nf4_copy,
    nf4_dir,
    rss_kib,
    step_clock,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = ("grpo-lora", "grpo-qlora", "rloo-lora", "rloo-qlora")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rl_speed.json"


def reward_length(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """A rule reward: the completion's length in words (costs nothing next to the policy)."""
    return [float(len(str(c).split())) for c in completions]


def train_once(mode: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One mode, in this process; returns its figures."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trainer.modeling import prepare_4bit_base

    algorithm, base = mode.split("-")
    torch.set_num_threads(os.cpu_count() or 1)
    baseline = rss_kib("VmRSS")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        json.loads(line)["prompt"]
        for line in (ROOT / "examples" / "colors" / "rl_prompts.jsonl").read_text().splitlines()
        if line.strip()
    ]
    per_step = args.prompts_per_step
    rows = [{"prompt": prompts[i % len(prompts)]} for i in range(per_step * (args.steps + 1))]
    model = AutoModelForCausalLM.from_pretrained(
        nf4_dir(model_dir) if base == "qlora" else model_dir, dtype=torch.bfloat16
    )
    if base == "qlora":
        prepare_4bit_base(model)
    load_peak = rss_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the next peak is training's

    step_times: list[float] = []
    config_class, trainer_class = {
        "grpo": (GRPOConfig, GRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
    }[algorithm]
    config = config_class(
        output_dir=str(model_dir.parent / f"out-rl-{mode}"),
        max_steps=args.steps + 1,
        per_device_train_batch_size=per_step * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion_tokens,
        temperature=1.0,
        beta=0.04,
        learning_rate=1e-4,
        bf16=base == "lora",  # QLoRA computes in bf16 through bnb_4bit_compute_dtype
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
        seed=0,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_length,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[step_clock(step_times)],
    )
    trainer.train()
    timed = step_times[1:]
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history[1:] if
               "completions/mean_length" in e]  # fmt: skip
    completions = per_step * args.generations
    generated = sum(lengths) * completions
    train_peak = rss_kib("VmHWM")
    return {
        "mode": mode,
        "steps_timed": len(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "steps_per_s": len(timed) / sum(timed),
        "completions_per_step": completions,
        "mean_completion_tokens": sum(lengths) / len(lengths) if lengths else None,
        "generated_tokens_per_s": generated / sum(timed) if lengths else None,
        "peak_rss_mib": max(load_peak, train_peak) / 1024,
        "train_peak_above_baseline_mib": (train_peak - baseline) / 1024,
        "baseline_rss_mib": baseline / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (plus one warm-up)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--size", default="190m", help="train_memory.py's model size")
    parser.add_argument("--model-dir", type=Path, help="default: build/bench/llama-SIZE")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.model_dir or ROOT / "build" / "bench" / f"llama-{args.size}"
    if args.child:
        print(json.dumps(train_once(args.child, model_dir, args)))
        return
    build_model(model_dir, args.size)
    modes = args.modes.split(",")
    if any(m.endswith("qlora") for m in modes):
        build_nf4_copy(model_dir)
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    for mode in modes:
        command = [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir),
                   "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
                   "--generations", str(args.generations),
                   "--completion-tokens", str(args.completion_tokens)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{mode:11s} {result['seconds_per_step']:6.1f} s/step "
            f"({result['steps_per_s']:.3f} steps/s), {result['completions_per_step']} completions "
            f"of {result['mean_completion_tokens'] or 0:.1f} tokens, "
            f"{result['generated_tokens_per_s'] or 0:.1f} generated tok/s, peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB ({result['train_peak_above_baseline_mib']:.0f} "
            "MiB above the import baseline while training)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("steps", "prompts_per_step", "generations",
                                              "completion_tokens", "size")}  # fmt: skip
    args.out.write_text(json.dumps({"settings": settings, "quantization": QUANTIZATION.model_dump(),
                                    "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
