"""`loraplex train sft|dpo|reward|rl`: train an adapter from a YAML config, optionally register it.

Exit codes: 0 done, 2 bad config/data/arguments (nothing trained), 130 interrupted (a checkpoint
was saved: rerun with --resume); registry errors use `loraplex adapters`' codes.

Runs under `torchrun` / `accelerate launch` too (docs/training.md, "Distributed training"): every
process trains, the main one writes the adapter and registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter

from gateway.console import DEFAULT_TARGET, connect, fail, print_registered
from gateway.contract import CANDIDATE
from trainer.config import ConfigError, DType, Method, QuantizationSettings, load_config

train_app = typer.Typer(
    help="Train LoRA adapters with trl + peft (SFT, QLoRA, DPO, reward models, RL).",
    no_args_is_help=True,
)

ConfigFile = Annotated[
    Path, typer.Option("--config", "-c", help="Run config (YAML); see examples/colors/.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key, e.g. --set training.learning_rate=1e-4."),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from the run's latest checkpoint.")
]
Register = Annotated[
    bool,
    typer.Option(
        "--register", help="Upload the result to the gateway's registry, aliased candidate."
    ),
]
Target = Annotated[str, typer.Option("--target", help="Gateway address host:port.")]
Name = Annotated[str | None, typer.Option("--name", help="Adapter name to register under.")]
DTYPE_CHECK = TypeAdapter(DType)
EXIT_INTERRUPTED = 130


def _train(
    method: Method,
    config: Path,
    overrides: list[str] | None,
    resume: bool,
    register: bool,
    target: str,
    name: str | None,
) -> None:
    if register and not name:
        fail("--register needs --name", 2)
    if register and method == "reward":
        fail("reward models are judges for the eval suite, not served: drop --register", 2)
    try:
        run_config = load_config(method, config, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)

    from trainer.data import DataError  # torch, trl: only when training
    from trainer.run import RunError, run_training

    try:
        result = run_training(run_config, resume=resume, echo=typer.echo)
    except (ConfigError, DataError, RunError) as exc:
        fail(str(exc), 2)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not register or not result.is_main_process:  # several processes: one registers
        return
    assert result.adapter_dir is not None and name is not None
    typer.echo(f"registering {result.adapter_dir} as {name} ({CANDIDATE}) at {target}")
    with connect(target) as client:
        version = client.upload(
            name,
            result.adapter_dir,
            alias=CANDIDATE,
            source=f"loraplex train {method} --config {config.resolve()}",
            metadata={"method": method, "run": str(run_config.output_dir)},
        )
    print_registered(version)


@train_app.command()
def sft(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Resume = False,
    register: Register = False,
    target: Target = DEFAULT_TARGET,
    name: Name = None,
) -> None:
    """Supervised fine-tuning with LoRA, or QLoRA when the config has a quantization section."""
    _train("sft", config, overrides, resume, register, target, name)


@train_app.command()
def dpo(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Resume = False,
    register: Register = False,
    target: Target = DEFAULT_TARGET,
    name: Name = None,
) -> None:
    """Direct preference optimization on prompt/chosen/rejected pairs."""
    _train("dpo", config, overrides, resume, register, target, name)


@train_app.command()
def reward(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Resume = False,
) -> None:
    """A reward model (LoRA + score head) on preference pairs, for the eval suite's judge."""
    _train("reward", config, overrides, resume, False, DEFAULT_TARGET, None)


@train_app.command()
def rl(
    config: ConfigFile,
    overrides: Overrides = None,
    resume: Resume = False,
    register: Register = False,
    target: Target = DEFAULT_TARGET,
    name: Name = None,
) -> None:
    """RL against reward models and rules (trl GRPO or RLOO), from an SFT adapter, with a KL
    penalty towards it."""
    _train("rl", config, overrides, resume, register, target, name)


@train_app.command("quantize-base")
def quantize_base(
    model: Annotated[Path, typer.Option("--model", help="Full-precision base model folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the 4-bit copy.")],
    quant_type: Annotated[str, typer.Option(help="nf4 or fp4.")] = "nf4",
    double_quant: Annotated[bool, typer.Option(help="Double quantization.")] = True,
    compute_dtype: Annotated[str, typer.Option(help="Compute dtype of the 4-bit layers.")] = (
        "bfloat16"
    ),
    dtype: Annotated[str, typer.Option(help="Dtype of the layers left unquantized.")] = (
        "bfloat16"
    ),
) -> None:
    """Save a bitsandbytes 4-bit copy of a base, for QLoRA runs that load it directly.

    Loading a 4-bit copy reads a quarter of the bytes and never holds the full-precision
    weights; point model.path at it and keep the same quantization section.
    """
    if not (model / "config.json").is_file():
        fail(f"{model} is not a model folder (no config.json)", 2)
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty", 2)
    try:
        settings = QuantizationSettings(
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        DTYPE_CHECK.validate_python(dtype)
    except ValueError as exc:
        fail(str(exc), 2)

    from trainer.modeling import save_4bit_base

    save_4bit_base(model, out, settings, dtype)
    typer.echo(f"4-bit base: {out} ({settings.model_dump()})")
