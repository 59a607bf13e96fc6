"""QLoRA vs LoRA vs full bf16 fine-tuning: peak memory (RSS) and tokens/s for the same steps.

A random-init Llama (the tiny model's tokenizer, bf16 weights on disk) is built locally once:
~190M parameters (`--size 190m`, the default) or ~1B (`--size 1b`). Each mode then trains in
its own fresh process (so peak RSS belongs to that mode alone), one after another, with trl's
SFTTrainer and identical data, sequence length, batch size, optimizer and steps:

- full: every weight trained, bf16 weights, AdamW (no peft);
- lora: LoRA r=16 on all linear layers over the bf16 base;
- qlora: the same LoRA over the base in bitsandbytes NF4 with double quantization, bf16
  compute, loaded from a 4-bit copy saved once (`loraplex train quantize-base`, i.e.
  trainer.modeling.save_4bit_base), so the full-precision weights are never in memory;
- qlora-load: the same, quantizing the bf16 checkpoint while loading (a `quantization` section
  over a full-precision base, the default path of `loraplex train`).

Every mode uses gradient checkpointing (QLoRA's recipe; `--no-gradient-checkpointing` turns it
off for all). Peak RSS is the process's high-water mark (VmHWM); "above baseline" subtracts the
RSS after the libraries are imported and before the model loads (~650 MiB of torch, transformers,
trl, bitsandbytes: the same in every mode). Tokens/s counts trained tokens over the timed steps
(the first step is warm-up).

    .venv/bin/python benchmarks/train_memory.py                                 # ~6 min
    .venv/bin/python benchmarks/train_memory.py --size 1b --batch 1 --steps 3   # ~8 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.config import QuantizationSettings

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "lora", "qlora", "qlora-load")
GOAL_QLORA_VS_LORA = 0.6
# glibc raises its mmap threshold after frees and then serves large tensors from heaps it keeps,
# so RSS tracked allocation history more than live memory (the same LoRA run peaked 1.5-2.5 GiB).
# A fixed threshold hands every block >= 256 KiB back on free; every mode runs with it.
MMAP_THRESHOLD = 256 * 1024
# NF4, double quantization, bf16 compute: QLoRA's settings.
QUANTIZATION = QuantizationSettings(bnb_4bit_compute_dtype="bfloat16")


def rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# Llama shapes: (hidden, intermediate, layers). 190m is the suggested range; 1b is the
# regime QLoRA is for, where the weights, not the activations, dominate memory.
SIZES = {"190m": (1024, 2816, 16), "1b": (2048, 5632, 22)}


def build_model(out: Path, size: str) -> Path:
    """A deterministic random-init Llama in bf16, with the tiny model's tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=SIZES[size][0],
        intermediate_size=SIZES[size][1],
        num_hidden_layers=SIZES[size][2],
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def nf4_dir(model_dir: Path) -> Path:
    """Where the model's 4-bit copy lives."""
    return model_dir.with_name(model_dir.name + "-nf4")


def build_nf4_copy(model_dir: Path) -> Path:
    """The 4-bit copy QLoRA loads (made once, as `loraplex train quantize-base` does)."""
    out = nf4_dir(model_dir)
    if not (out / "config.json").is_file():
        from trainer.modeling import save_4bit_base

        save_4bit_base(model_dir, out, QUANTIZATION)
    return out


def step_clock(step_times: list[float]) -> Any:
    """A trainer callback that appends each optimizer step's wall time to `step_times`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.start)

    return StepClock()


def train_once(
    mode: str, model_dir: Path, steps: int, seq_len: int, batch: int, checkpointing: bool
) -> dict:
    """One mode, in this process; returns its figures."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainer.modeling import bnb_config, prepare_4bit_base

    torch.set_num_threads(os.cpu_count() or 1)
    baseline = rss_kib("VmRSS")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = (ROOT / "trainer" / "assets" / "tiny_corpus.txt").read_text()
    ids = tokenizer(text)["input_ids"]
    rows = [
        {"input_ids": ids[i * seq_len : (i + 1) * seq_len]}
        for i in range(batch * (steps + 1))
        if len(ids) >= (i + 1) * seq_len
    ]
    assert len(rows) == batch * (steps + 1), "corpus too short for these settings"

    kwargs: dict = {"dtype": torch.bfloat16}
    if mode == "qlora-load":
        kwargs["quantization_config"] = bnb_config(QUANTIZATION)
    model = AutoModelForCausalLM.from_pretrained(
        nf4_dir(model_dir) if mode == "qlora" else model_dir, **kwargs
    )
    if mode.startswith("qlora"):
        prepare_4bit_base(model)
    loaded = rss_kib("VmRSS")
    load_peak = rss_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the next peak is training's
    peft_config = (
        None
        if mode == "full"
        else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )

    step_times: list[float] = []
    args = SFTConfig(
        output_dir=str(model_dir.parent / f"out-{mode}"),
        max_steps=steps + 1,
        gradient_checkpointing=checkpointing,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        optim="adamw_torch",
        bf16=not mode.startswith("qlora"),  # QLoRA computes in bf16 through bnb_4bit_compute_dtype
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        max_length=seq_len,
        seed=0,
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[step_clock(step_times)],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    timed = step_times[1:]
    train_peak = rss_kib("VmHWM")
    peak = max(load_peak, train_peak)
    return {
        "mode": mode,
        "steps_timed": len(timed),
        "tokens_per_s": batch * seq_len * len(timed) / sum(timed),
        "peak_rss_mib": peak / 1024,
        "peak_above_baseline_mib": (peak - baseline) / 1024,
        "load_peak_rss_mib": load_peak / 1024,
        "train_peak_rss_mib": train_peak / 1024,
        "train_peak_above_baseline_mib": (train_peak - baseline) / 1024,
        "rss_after_load_mib": loaded / 1024,
        "baseline_rss_mib": baseline / 1024,
        "trainable_params": trainable,
        "params": total,
        "final_loss": trainer.state.log_history[-2].get("loss"),
    }


def compare(qlora: dict, lora: dict) -> dict:
    """QLoRA over LoRA: peak RSS (the goal), memory above the import baseline, tokens/s."""
    ratios = {
        "peak_rss": qlora["peak_rss_mib"] / lora["peak_rss_mib"],
        "peak_above_baseline": qlora["peak_above_baseline_mib"] / lora["peak_above_baseline_mib"],
        "train_peak_above_baseline": qlora["train_peak_above_baseline_mib"]
        / lora["train_peak_above_baseline_mib"],
        "tokens_per_s": qlora["tokens_per_s"] / lora["tokens_per_s"],
    }
    verdict = "met" if ratios["peak_rss"] <= GOAL_QLORA_VS_LORA else "MISSED"
    print(
        f"{qlora['mode']}/lora peak RSS {ratios['peak_rss']:.3f} (goal <= {GOAL_QLORA_VS_LORA}: "
        f"{verdict}); above baseline {ratios['peak_above_baseline']:.3f}; training peak above "
        f"baseline {ratios['train_peak_above_baseline']:.3f}; tokens/s {ratios['tokens_per_s']:.3f}"
    )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (plus one warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", choices=SIZES, default="190m", help="model size")
    parser.add_argument("--model-dir", type=Path, help="default: build/bench/llama-SIZE")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for every mode (QLoRA's usual recipe)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_memory.json"
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_dir = args.model_dir or ROOT / "build" / "bench" / f"llama-{args.size}"
    if args.child:
        result = train_once(
            args.child,
            args.model_dir,
            args.steps,
            args.seq_len,
            args.batch,
            args.gradient_checkpointing,
        )
        print("RESULT " + json.dumps(result), flush=True)
        return

    build_model(args.model_dir, args.size)
    if "qlora" in args.modes.split(","):
        build_nf4_copy(args.model_dir)
    results = {}
    for mode in args.modes.split(","):
        command = [
            sys.executable, __file__, "--child", mode, "--model-dir", str(args.model_dir),
            "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        ]  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1].removeprefix("RESULT "))
        r = results[mode]
        print(
            f"{mode:6s} peak RSS {r['peak_rss_mib']:6.0f} MiB (load {r['load_peak_rss_mib']:6.0f}, "
            f"training {r['train_peak_rss_mib']:6.0f}; above the {r['baseline_rss_mib']:.0f} MiB "
            f"after imports: {r['peak_above_baseline_mib']:6.0f}) "
            f"{r['tokens_per_s']:7.1f} tok/s  trainable {r['trainable_params'] / 1e6:.1f}M "
            f"of {r['params'] / 1e6:.1f}M",
            flush=True,
        )
    results["ratios"] = {
        variant: compare(results[variant], results["lora"])
        for variant in ("qlora", "qlora-load")
        if {variant, "lora"} <= set(results)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
