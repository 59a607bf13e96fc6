"""`loraplex train sft|dpo|reward`: train an adapter from a YAML config, optionally register it.

Exit codes: 0 done, 2 bad config/data/arguments (nothing trained), 130 interrupted (a checkpoint
was saved: rerun with --resume); registry errors use `loraplex adapters`' codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli_adapters import DEFAULT_TARGET, _connect, _fail, _print_registered
from trainer.config import ConfigError, Method, load_config

train_app = typer.Typer(
    help="Train LoRA adapters with trl + peft (SFT, QLoRA, DPO, reward models).",
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
CANDIDATE = "candidate"
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
        _fail("--register needs --name", 2)
    if register and method == "reward":
        _fail("reward models are judges for the eval suite, not served: drop --register", 2)
    try:
        run_config = load_config(method, config, overrides)
    except ConfigError as exc:
        _fail(str(exc), 2)

    from trainer.data import DataError  # torch, trl: only when training
    from trainer.run import RunError, run_training

    try:
        result = run_training(run_config, resume=resume, echo=typer.echo)
    except (ConfigError, DataError, RunError) as exc:
        _fail(str(exc), 2)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not register:
        return
    assert result.adapter_dir is not None and name is not None
    typer.echo(f"registering {result.adapter_dir} as {name} ({CANDIDATE}) at {target}")
    with _connect(target) as client:
        version = client.upload(
            name,
            result.adapter_dir,
            alias=CANDIDATE,
            source=f"loraplex train {method} --config {config.resolve()}",
            metadata={"method": method, "run": str(run_config.output_dir)},
        )
    _print_registered(version)


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
