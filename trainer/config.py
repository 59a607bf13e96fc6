"""Typed training configuration: one YAML file per run, validated before any model is loaded.

Field names follow trl / peft / transformers where one exists (learning_rate, lora_alpha,
bnb_4bit_quant_type, beta, ...), so a trl user can read a loraplex config at a glance. Each
method has its own top-level model (`SftRunConfig`, `DpoRunConfig`, `RewardRunConfig`), so a
key that belongs to another method is an unknown key, not a silently ignored one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.config_files import SettingsFileError, apply_overrides, read_mapping, validate

Method = Literal["sft", "dpo", "reward", "rl"]
DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message lists every problem."""


class _Section(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """The base model the adapter is trained on."""

    path: Path
    """Local Hugging Face model folder (config.json, weights, tokenizer); nothing is downloaded."""
    dtype: DType = "float32"
    """Dtype of the (unquantized) base weights while training."""
    chat_template: str | None = None
    """Named chat template (`trainer.templates`) for chat data when the base tokenizer has none."""


class QuantizationSettings(_Section):
    """QLoRA: the base is loaded in bitsandbytes 4-bit; present in the config = QLoRA."""

    load_in_4bit: Literal[True] = True
    """Always true here: the section's presence turns 4-bit loading on."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is QLoRA's."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (QLoRA's double quantization)."""
    bnb_4bit_compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit layers compute in."""


class LoraSettings(_Section):
    """The LoRA adapter (peft `LoraConfig` names)."""

    r: int = Field(16, gt=0)
    """Rank of the update matrices."""
    lora_alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the update is scaled by lora_alpha / r."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    init_from: Path | None = None
    """Continue training this adapter folder, not a fresh one (for DPO it is the reference)."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module")
        return value


class DatasetFile(_Section):
    """One data file and its share of the training mix."""

    path: Path
    """A .jsonl, .json (array of objects) or .parquet file."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight when several files are mixed."""


class ContaminationSettings(_Section):
    """Training data checked against evaluation texts before training (trainer.contamination)."""

    against: list[Path] = Field(min_length=1)
    """Prompt sets (.jsonl with `prompt`, as the gate's `prompts:`) and lm-eval task YAMLs or
    folders of them (documents from local files only)."""
    ngram: int = Field(8, gt=0)
    """Words per n-gram; an eval text shorter than this is matched as one whole word run."""
    threshold: float = Field(0.5, gt=0.0, le=1.0)
    """Share of an eval text's n-grams found in one training example that makes it contaminated."""
    fatal: bool = False
    """Stop before training (exit code 2) when any training example is contaminated."""


class DataSettings(_Section):
    """Where the examples come from and how they are prepared."""

    train: list[DatasetFile] = Field(min_length=1)
    """Training files, mixed by weight and interleaved (not trained one after another)."""
    eval_file: Path | None = None
    """A separate evaluation file (same format as the training files)."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Without eval_file: this fraction of each training file is held out for evaluation."""
    max_length: int = Field(1024, gt=0)
    """Maximum tokens per example (prompt + completion)."""
    over_length: Literal["truncate", "drop"] = "truncate"
    """What happens to longer examples: truncated to max_length, or dropped (both are reported)."""
    deduplicate: bool = True
    """Remove exact duplicates (same record) across the training files; the count is reported."""
    mix_stopping_strategy: Literal["all_exhausted", "first_exhausted"] = "all_exhausted"
    """When interleaving stops (datasets.interleave_datasets): after every file or the first."""
    contamination: ContaminationSettings | None = None
    """Check the training files against eval prompt sets / tasks; None skips the check."""

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSettings:
        if self.eval_file is not None and self.eval_fraction > 0:
            raise ValueError("set eval_file or eval_fraction, not both")
        return self


class TrainingSettings(_Section):
    """The optimization loop (transformers `TrainingArguments` names)."""

    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    num_train_epochs: float = Field(1.0, gt=0)
    """Epochs over the mixed training set (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; -1 trains for num_train_epochs."""
    per_device_train_batch_size: int = Field(8, gt=0)
    """Examples per training batch."""
    per_device_eval_batch_size: int = Field(8, gt=0)
    """Examples per evaluation batch."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Batches accumulated per optimizer step."""
    optim: str = "adamw_torch"
    """Optimizer name passed to transformers, e.g. paged_adamw_8bit (QLoRA's, on GPUs)."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule (transformers names)."""
    warmup_steps: float = Field(0.0, ge=0)
    """Warm-up: steps, or a fraction of the run when below 1."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs, or CPUs with native bf16)."""
    logging_steps: int = Field(10, gt=0)
    """Log (and update the progress bar's loss) every N steps."""
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N steps; None evaluates once, at the end."""
    save_steps: int = Field(100, gt=0)
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int | None = Field(2, gt=0)
    """Keep at most this many checkpoints."""
    seed: int = 42
    """Seed for initialization, data order and dropout: same seed, same adapter."""
    early_stopping_patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without improvement of best_metric; None never stops."""
    early_stopping_threshold: float = Field(0.0, ge=0)
    """How much best_metric must improve for an evaluation to count as an improvement."""
    load_best_at_end: bool = False
    """Save the best evaluated checkpoint's adapter, not the last step's."""
    best_metric: str | None = None
    """Metric that picks the best checkpoint (eval_ prefix optional); default eval_loss."""
    greater_is_better: bool | None = None
    """Direction of best_metric; default: lower is better for names ending in "loss"."""

    @property
    def tracks_best(self) -> bool:
        """Whether checkpoints are compared on best_metric (early stopping or load_best_at_end)."""
        return self.early_stopping_patience is not None or self.load_best_at_end

    @property
    def best_metric_name(self) -> str:
        """best_metric as transformers reports it (with the eval_ prefix)."""
        name = self.best_metric or "eval_loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    @model_validator(mode="after")
    def _best_needs_steps(self) -> TrainingSettings:
        if not self.tracks_best:
            unused = [
                k for k in ("best_metric", "greater_is_better") if getattr(self, k) is not None
            ]
            unused += ["early_stopping_threshold"] * (self.early_stopping_threshold > 0)
            if unused:
                raise ValueError(
                    f"{', '.join(unused)}: only used with early_stopping_patience or "
                    "load_best_at_end"
                )
            return self
        if self.eval_steps is None:
            raise ValueError(
                "early_stopping_patience / load_best_at_end need eval_steps: the best checkpoint "
                "is chosen among the evaluations made during training"
            )
        if self.save_steps != self.eval_steps:
            raise ValueError(
                f"early_stopping_patience / load_best_at_end need save_steps ({self.save_steps}) "
                f"equal to eval_steps ({self.eval_steps}): every evaluated step must have a "
                "checkpoint to return to"
            )
        return self


class SftSettings(_Section):
    """Supervised fine-tuning (trl `SFTConfig` names)."""

    completion_only_loss: bool = True
    """Prompt/completion data: loss on the completion only."""
    assistant_only_loss: bool = True
    """Chat data: loss on assistant turns only (needs a template with {% generation %})."""
    packing: bool = False
    """Pack several examples into one sequence."""


class DpoSettings(_Section):
    """Direct preference optimization (trl `DPOConfig` names)."""

    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference model."""
    loss_type: str = "sigmoid"
    """trl DPO loss (sigmoid = the DPO paper's; also ipo, hinge, robust, ...)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction of flipped preference labels (robust/cDPO)."""


class RewardSettings(_Section):
    """Reward-model training (trl `RewardConfig` names)."""

    center_rewards_coefficient: float | None = None
    """Pushes rewards towards zero mean (trl); None disables it."""


class RewardSource(_Section):
    """One reward signal of an RL run, and its weight in the total (trl `reward_weights`)."""

    reward_model: Path | None = None
    """A `loraplex train reward` run folder (or its adapter/): base + LoRA + score head,
    scored as it was trained (prompt + completion + EOS)."""
    classifier: Path | None = None
    """Any local one-output sequence-classification model folder (trl formats its input)."""
    function: str | None = None
    """`package.module:function`, called as f(prompts, completions, **columns) -> list[float]
    (trl's reward-function contract), e.g. a format or length rule."""
    weight: float = 1.0
    """Weight of this reward in the sum trl optimizes."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        given = [k for k in ("reward_model", "classifier", "function") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("set exactly one of reward_model, classifier, function")
        return self


class RlSettings(_Section):
    """Policy optimization against rewards (trl `GRPOConfig` / `RLOOConfig` names). trl 1.16
    has no PPOTrainer; GRPO and RLOO are its on-policy RL trainers."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    """trl's trainer: GRPO (group-normalized advantages) or RLOO (leave-one-out baseline)."""
    beta: float = Field(0.04, gt=0)
    """KL coefficient towards the reference (lora.init_from, else the base). Must be > 0:
    trl's GRPO default of 0 drops the KL anchor, and the policy may drift anywhere."""
    num_generations: int = Field(4, ge=2)
    """Completions sampled per prompt (the group an advantage is computed in)."""
    max_completion_length: int = Field(32, gt=0)
    """Most tokens per sampled completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions."""
    rewards: list[RewardSource] = Field(min_length=1)
    """The reward sources, summed with their weights."""


class RunConfig(_Section):
    """What every method shares."""

    output_dir: Path
    """Run folder: checkpoints/ (resumable) and adapter/ (the result, with manifest.json)."""
    model: ModelSettings
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings | None = None
    """Set for QLoRA (4-bit base); leave out for LoRA on the full-precision base."""
    data: DataSettings
    training: TrainingSettings = TrainingSettings()

    method: ClassVar[Method]
    """The command that trains with this config (not a YAML key)."""

    @model_validator(mode="after")
    def _best_needs_eval_data(self) -> RunConfig:
        if (
            self.training.tracks_best
            and self.data.eval_file is None
            and not self.data.eval_fraction
        ):
            raise ValueError(
                "training.early_stopping_patience / load_best_at_end need evaluation data: "
                "set data.eval_file or data.eval_fraction"
            )
        return self


class SftRunConfig(RunConfig):
    """`loraplex train sft`."""

    method: ClassVar[Method] = "sft"
    sft: SftSettings = SftSettings()


class DpoRunConfig(RunConfig):
    """`loraplex train dpo`: the reference is the base (adapter disabled) or lora.init_from."""

    method: ClassVar[Method] = "dpo"
    dpo: DpoSettings = DpoSettings()


class RewardRunConfig(RunConfig):
    """`loraplex train reward`: LoRA on a sequence-classification head over the base."""

    method: ClassVar[Method] = "reward"
    reward: RewardSettings = RewardSettings()

    @model_validator(mode="after")
    def _fresh_adapter(self) -> RewardRunConfig:
        if self.lora.init_from is not None:
            raise ValueError("lora.init_from: a reward model starts from a fresh adapter")
        return self


class RlRunConfig(RunConfig):
    """`loraplex train rl`: the policy starts from lora.init_from (an SFT adapter), which is also
    the KL reference, as in InstructGPT; without it, from a fresh adapter on the base."""

    method: ClassVar[Method] = "rl"
    rl: RlSettings

    @model_validator(mode="after")
    def _whole_groups(self) -> RlRunConfig:
        batch = self.training.per_device_train_batch_size
        if batch % self.rl.num_generations:
            raise ValueError(
                f"training.per_device_train_batch_size ({batch}) must be a multiple of "
                f"rl.num_generations ({self.rl.num_generations}): each batch holds whole groups"
            )
        return self


CONFIG_CLASSES: dict[str, type[RunConfig]] = {
    "sft": SftRunConfig,
    "dpo": DpoRunConfig,
    "reward": RewardRunConfig,
    "rl": RlRunConfig,
}


def parse_config(method: Method, data: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a raw mapping for `method`; relative paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (model:, data:, ...)")
    try:
        config = validate(CONFIG_CLASSES[method], data, f"{method} config")
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None
    return config if base_dir is None else _resolve_paths(config, base_dir)


def _resolve_paths(config: RunConfig, base_dir: Path) -> RunConfig:
    def resolve(path: Path | None) -> Path | None:
        return None if path is None else (base_dir / path).resolve()

    data = config.data.model_copy(
        update={
            "train": [f.model_copy(update={"path": resolve(f.path)}) for f in config.data.train],
            "eval_file": resolve(config.data.eval_file),
        }
    )
    if config.data.contamination is not None:
        check = config.data.contamination
        against = [(base_dir / p).resolve() for p in check.against]
        data = data.model_copy(
            update={"contamination": check.model_copy(update={"against": against})}
        )
    update: dict[str, Any] = {
        "output_dir": resolve(config.output_dir),
        "model": config.model.model_copy(update={"path": resolve(config.model.path)}),
        "lora": config.lora.model_copy(update={"init_from": resolve(config.lora.init_from)}),
        "data": data,
    }
    if isinstance(config, RlRunConfig):
        rewards = [
            source.model_copy(
                update={
                    "reward_model": resolve(source.reward_model),
                    "classifier": resolve(source.classifier),
                }
            )
            for source in config.rl.rewards
        ]
        update["rl"] = config.rl.model_copy(update={"rewards": rewards})
    return config.model_copy(update=update)


def load_config(method: Method, path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate; paths relative to the file."""
    try:
        data = apply_overrides(read_mapping(path, "config"), overrides or [])
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(method, data, Path(path).resolve().parent)
