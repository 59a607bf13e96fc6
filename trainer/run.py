"""One training run: check the data, load the model, let trl train, save adapter + manifest.

No training loop of our own: the config becomes trl's `SFTConfig` / `DPOConfig` /
`RewardConfig` / `GRPOConfig` / `RLOOConfig`, and trl's trainers do the work. The run folder
holds `checkpoints/` (for `--resume`) and, once training finished, `adapter/` (peft format +
manifest.json), which is written to a temporary folder and renamed, so a failed run never
leaves a half-written adapter.

Under `torchrun` / `accelerate launch` every process runs this same function (DDP): each checks
the output folder before any writes, trains its share of every global batch, and only the main
process writes the adapter and manifest (HF Trainer writes the checkpoints from it too); the
others wait for it, so every process returns the finished adapter.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

from trainer.callbacks import LossProgressBar, SaveOnInterrupt
from trainer.config import (
    ConfigError,
    DpoRunConfig,
    RewardRunConfig,
    RlRunConfig,
    RunConfig,
    SftRunConfig,
)
from trainer.contamination import check_contamination
from trainer.data import MESSAGES, PreparedData, prepare_data, trl_format, validate_files
from trainer.manifest import build_manifest, write_manifest
from trainer.modeling import attach_adapter, check_base_quantization, load_base, load_tokenizer
from trainer.rewards import load_rewards

log = logging.getLogger(__name__)
DDP_TIMEOUT_S = 1800  # transformers' default ddp_timeout, passed to both places that may use it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RunError(RuntimeError):
    """The run cannot start or continue (e.g. output folder in use, nothing to resume)."""


@dataclass
class TrainResult:
    """What a run produced."""

    adapter_dir: Path | None  # None when interrupted
    checkpoint_dir: Path
    interrupted: bool
    global_step: int
    manifest: dict[str, Any] | None
    trainer: Any  # the trl trainer (tests inspect its model)
    is_main_process: bool = True  # under several processes, the one that wrote (and registers)


def run_dirs(config: RunConfig) -> tuple[Path, Path]:
    """(checkpoints folder, final adapter folder) of a run."""
    return config.output_dir / "checkpoints", config.output_dir / "adapter"


def _check_output(config: RunConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to mix a new run into an old run's folder."""
    checkpoints, adapter_dir = run_dirs(config)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        if last is None:
            raise RunError(f"--resume: no checkpoint in {checkpoints}")
        return Path(last)
    if last is not None or adapter_dir.exists():
        raise RunError(
            f"{config.output_dir} holds an earlier run; pass --resume to continue it, "
            "or set another output_dir"
        )
    return None


def _use_cpu() -> bool:
    return not torch.cuda.is_available()


def _process_state() -> PartialState:
    """accelerate's view of this process among those torchrun / accelerate launch started (one
    when run plainly), set up the way TrainingArguments sets it up later (it keeps the process
    group), so the folder check and the writes can be ordered across processes before the
    trainer exists. On CPU that is DDP over gloo."""
    if _use_cpu():
        return PartialState(cpu=True)
    return PartialState(timeout=timedelta(seconds=DDP_TIMEOUT_S))


def _check_chat_template(config: RunConfig, tokenizer: PreTrainedTokenizerBase, fmt: str) -> None:
    conversational = trl_format(fmt) == MESSAGES
    if conversational and not tokenizer.chat_template:
        raise ConfigError(
            "chat data needs a chat template: the base tokenizer has none; "
            "set model.chat_template (e.g. plain, chatml)"
        )
    if (
        isinstance(config, SftRunConfig)
        and conversational
        and config.sft.assistant_only_loss
        and "generation" not in tokenizer.chat_template
    ):
        raise ConfigError(
            "sft.assistant_only_loss needs a chat template with {% generation %} markers; "
            "set model.chat_template (e.g. plain, chatml) or sft.assistant_only_loss: false"
        )


def _training_args(config: RunConfig, checkpoints: Path, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every method shares."""
    t = config.training
    evaluate_during = has_eval and t.eval_steps is not None
    return {
        "output_dir": str(checkpoints),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "optim": t.optim,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "gradient_checkpointing": t.gradient_checkpointing,
        "bf16": t.bf16,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "eval_strategy": "steps" if evaluate_during else "no",
        "eval_steps": t.eval_steps if evaluate_during else None,
        "seed": t.seed,
        "data_seed": t.seed,
        "report_to": "none",
        "disable_tqdm": True,  # LossProgressBar replaces transformers' bar
        "use_cpu": _use_cpu(),  # several CPU processes: accelerate's MULTI_CPU, DDP over gloo
        "ddp_timeout": DDP_TIMEOUT_S,
        # The loss is the mean over the global batch's tokens, not the mean of each process's
        # means: N processes of batch b train like one of batch N*b (transformers' default).
        "average_tokens_across_devices": True,
        # Every LoRA weight takes part in every forward: DDP need not search for unused ones.
        "ddp_find_unused_parameters": False,
        "max_length": config.data.max_length,
        **_best_args(config, evaluate_during),
    }


def _best_args(config: RunConfig, evaluate_during: bool) -> dict[str, Any]:
    """transformers' best-checkpoint tracking (config.py made sure eval and save steps agree)."""
    t = config.training
    if not (t.tracks_best and evaluate_during):
        return {}
    return {
        "load_best_model_at_end": t.load_best_at_end,
        "metric_for_best_model": t.best_metric_name,
        "greater_is_better": t.greater_is_better,  # None: transformers' rule (not ...loss)
        # Not restore_callback_states_from_checkpoint: it would also restore the checkpoint's
        # TrainerControl (a Ctrl-C checkpoint's says "stop"). A resumed run keeps the best
        # metric and step (trainer state); early stopping's patience count starts again.
    }


def _best_record(config: RunConfig, trainer: Any, early: EarlyStoppingCallback | None) -> Any:
    """What the manifest keeps of best-checkpoint tracking (None when it was off)."""
    t = config.training
    if not t.tracks_best:
        return None
    state = trainer.state
    stopped_early = (
        early is not None
        and early.early_stopping_patience_counter >= early.early_stopping_patience
        and state.global_step < state.max_steps
    )
    best = state.best_model_checkpoint
    return {
        "metric": t.best_metric_name,
        "greater_is_better": bool(trainer.args.greater_is_better),
        "value": state.best_metric,
        "step": state.best_global_step or None,
        "checkpoint": Path(best).name if best else None,
        "adapter_is_best_checkpoint": bool(t.load_best_at_end and best),
        "early_stopping_patience": t.early_stopping_patience,
        "early_stopping_threshold": t.early_stopping_threshold,
        "stopped_early": stopped_early,
        "stopped_at_step": state.global_step if stopped_early else None,
    }


def build_trainer(
    config: RunConfig,
    model: PreTrainedModel,
    peft_config: Any,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    fmt: str,
) -> Any:
    """The trl trainer for the config's method."""
    checkpoints, _ = run_dirs(config)
    common = _training_args(config, checkpoints, data.eval is not None)
    datasets = {"train_dataset": data.train, "eval_dataset": data.eval}
    if isinstance(config, SftRunConfig):
        args = SFTConfig(
            **common,
            completion_only_loss=config.sft.completion_only_loss,
            assistant_only_loss=config.sft.assistant_only_loss and trl_format(fmt) == MESSAGES,
            packing=config.sft.packing,
        )
        return SFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            **datasets,
        )
    if isinstance(config, DpoRunConfig):
        args = DPOConfig(
            **common,
            beta=config.dpo.beta,
            loss_type=[config.dpo.loss_type],
            label_smoothing=config.dpo.label_smoothing,
        )
        return DPOTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            **datasets,
        )
    if isinstance(config, RlRunConfig):
        return _rl_trainer(config, model, peft_config, tokenizer, data, common)
    assert isinstance(config, RewardRunConfig)
    args = RewardConfig(
        **common, center_rewards_coefficient=config.reward.center_rewards_coefficient
    )
    return RewardTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config, **datasets
    )


RL_CURVES = ("reward", "reward_std", "kl", "completions/mean_length", "loss")
"""What trl logs per logging step of an RL run that the manifest keeps as curves."""


def _rl_trainer(
    config: RlRunConfig,
    model: PreTrainedModel,
    peft_config: Any,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    common: dict[str, Any],
) -> Any:
    """trl's GRPO or RLOO trainer; the rewards are loaded first (a bad source fails early)."""
    rl = config.rl
    rewards = load_rewards(rl.rewards, config.model.dtype)
    settings = {k: v for k, v in common.items() if k != "max_length"}  # prompts: data checks
    settings |= {
        "beta": rl.beta,
        "num_generations": rl.num_generations,
        "max_completion_length": rl.max_completion_length,
        "temperature": rl.temperature,
        "reward_weights": rewards.weights,
    }
    config_class, trainer_class = {
        "grpo": (GRPOConfig, GRPOTrainer),
        "rloo": (RLOOConfig, RLOOTrainer),
    }[rl.algorithm]
    trainer = trainer_class(
        model=model,
        reward_funcs=rewards.functions,
        args=config_class(**settings),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        reward_processing_classes=rewards.processing_classes,
        peft_config=peft_config,
    )
    trainer.loraplex_rewards = rewards.records  # for the manifest
    return trainer


def _rl_record(config: RlRunConfig, trainer: Any) -> dict[str, Any]:
    """What the manifest keeps of an RL run: algorithm, beta, rewards, curves per log step."""
    curves = [
        {"step": entry["step"], **{k: entry[k] for k in RL_CURVES if k in entry}}
        for entry in trainer.state.log_history
        if "reward" in entry
    ]
    return {
        "algorithm": config.rl.algorithm,
        "beta": config.rl.beta,
        "reference": str(config.lora.init_from) if config.lora.init_from else "base",
        "rewards": trainer.loraplex_rewards,
        "curves": curves,
    }


def _save_adapter(
    trainer: Any, adapter_dir: Path, manifest: dict[str, Any], state_dict: dict[str, Any]
) -> None:
    """Write the trained adapter (only it: not trl's frozen DPO reference) and its manifest."""
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(partial, selected_adapters=["default"], state_dict=state_dict)
    (partial / "README.md").unlink(
        missing_ok=True
    )  # peft's empty model card; the manifest says more
    missing = [name for name in ADAPTER_FILES if not (partial / name).is_file()]
    if missing:
        raise RunError(f"peft did not write {', '.join(missing)} to {partial}")
    write_manifest(partial, manifest)
    partial.rename(adapter_dir)


def run_training(
    config: RunConfig,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train per `config`; data and output folder are checked before any model is loaded.

    Under several processes (torchrun, accelerate launch) only the main one echoes, writes the
    adapter and is the one to register it (`TrainResult.is_main_process`)."""
    started = time.perf_counter()
    checkpoints, adapter_dir = run_dirs(config)
    processes = _process_state()
    if not processes.is_main_process:
        echo = _silent
        datasets.disable_progress_bars()  # the main process shows them once
        transformers.logging.disable_progress_bar()
    resume_from = _check_output(config, resume)
    # Every process has looked at the folder before any of them can write to it.
    processes.wait_for_everyone()
    validated = validate_files(config.data, config.method)
    fmt = validated[0][0][1]
    contamination = check_contamination(config.data)  # fatal: raises before any model loads
    check_base_quantization(config)
    tokenizer = load_tokenizer(config)
    _check_chat_template(config, tokenizer, fmt)
    data = prepare_data(config.data, config.method, tokenizer, config.training.seed, validated)
    if contamination is not None:
        data.report.contamination = contamination.as_dict()
    if config.training.tracks_best and data.eval is None:
        raise ConfigError(
            "training.early_stopping_patience / load_best_at_end: no evaluation examples "
            "(data.eval_fraction held none out: each file needs 2 or more examples)"
        )
    for line in data.report.summary():
        echo(line)

    set_seed(config.training.seed)  # before the model: a reward model's score head is random
    model, peft_config = attach_adapter(config, load_base(config, tokenizer))
    trainer = build_trainer(config, model, peft_config, tokenizer, data, fmt)
    accelerator = trainer.accelerator
    trainer.remove_callback(PrinterCallback)
    interrupt = SaveOnInterrupt(accelerator)
    early = None
    if config.training.early_stopping_patience is not None and data.eval is not None:
        early = EarlyStoppingCallback(
            config.training.early_stopping_patience, config.training.early_stopping_threshold
        )
    for callback in (LossProgressBar(), interrupt, *([early] if early else []), *callbacks):
        trainer.add_callback(callback)

    metrics: dict[str, dict[str, float]] = {}
    if data.eval is not None and resume_from is None:
        metrics["initial_eval"] = dict(trainer.evaluate())  # the baseline the run improves on
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    step = trainer.state.global_step
    main = accelerator.is_main_process
    if interrupt.stopped:
        echo(f"interrupted: checkpoint at step {step} in {checkpoints}; continue with --resume")
        return TrainResult(None, checkpoints, True, step, None, trainer, main)

    metrics["train"] = dict(output.metrics)
    if data.eval is not None:
        metrics["eval"] = dict(trainer.evaluate())
    manifest = build_manifest(config, data.report, metrics, time.perf_counter() - started, step)
    manifest["processes"] = accelerator.num_processes  # global batch: per device x this x accum
    if isinstance(config, RlRunConfig):
        manifest["rl"] = _rl_record(config, trainer)
    best = _best_record(config, trainer, early)
    if best is not None:
        manifest["best"] = best
        if best["stopped_early"]:
            echo(
                f"stopped early at step {step}: no better {best['metric']} in the last evaluations"
            )
        if best["adapter_is_best_checkpoint"]:
            value = f"{best['metric']} {best['value']:.4g}"
            echo(f"adapter: the best checkpoint's, step {best['step']} ({value})")
    # Every process takes part: under FSDP / DeepSpeed ZeRO-3 this gathers the sharded weights
    # (for DDP and one process it is the model's own state dict).
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    try:
        if main:
            _save_adapter(trainer, adapter_dir, manifest, state_dict)
    finally:
        accelerator.wait_for_everyone()  # (also when the main process failed: no one hangs)
    if not (adapter_dir / "manifest.json").is_file():
        raise RunError(f"the main process did not write {adapter_dir}")
    echo(f"adapter: {adapter_dir}")
    return TrainResult(adapter_dir, checkpoints, False, step, manifest, trainer, main)


def _silent(_: str) -> None:
    """The echo of the processes other than the main one."""
