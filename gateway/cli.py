"""The `loraplex` command: its one composition root. Every subcommand group (adapters, keys,
train, eval) and every heavy module (vLLM, torch, trl, lm-eval) is imported when its command
runs, so `loraplex adapters list` never loads a trainer."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from google.protobuf.json_format import MessageToDict
from pydantic.fields import FieldInfo
from typer.core import TyperGroup

from gateway.config import GatewayConfig
from gateway.console import Target

SUBCOMMAND_GROUPS = {
    "adapters": "gateway.cli_adapters:adapters_app",
    "keys": "gateway.cli_keys:keys_app",
    "train": "trainer.cli:train_app",
    "eval": "evalsuite.cli:eval_app",
}
"""Subcommand groups, as `module:Typer app`, imported only when named."""


class _LazyGroups(TyperGroup):
    """The root command group: SUBCOMMAND_GROUPS are loaded when they are invoked (or listed)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted([*super().list_commands(ctx), *SUBCOMMAND_GROUPS])

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in SUBCOMMAND_GROUPS:
            return super().get_command(ctx, cmd_name)
        module, attribute = SUBCOMMAND_GROUPS[cmd_name].split(":")
        group = typer.main.get_command(getattr(importlib.import_module(module), attribute))
        group.name = cmd_name
        return group


app = typer.Typer(
    cls=_LazyGroups,
    help="loraplex: serve many LoRA adapters on one base model over gRPC, on vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """A `serve` flag from a GatewayConfig field: its type and its doc line as the help."""
    annotation: Any = field.annotation
    if not (get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)):
        annotation = annotation | None  # unset: the file's, the environment's or the default
    help_text = " ".join((field.description or "").split())
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[annotation, typer.Option(help=help_text)],
    )


def serve(config: Path | None, overrides: list[str] | None, **flags: Any) -> None:
    """Start the gateway (settings: config file < LORAPLEX_* env < --set < flags)."""
    from gateway.config import ConfigError, load_config

    try:
        settings = load_config(config, overrides, **flags)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _setup_logging(settings.log_level)
    from gateway.server import serve as run_server

    try:
        code = run_server(settings)
    except ConfigError as exc:  # settings that only the engine's platform can judge
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


# One flag per GatewayConfig field, generated with its doc line: no hand-written copy.
serve.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="YAML config file.")],
        ),
        inspect.Parameter(
            "overrides",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                list[str] | None,
                typer.Option(
                    "--set",
                    help="key=value (a YAML value) over the file and environment; repeatable.",
                ),
            ],
        ),
        *(_serve_option(name, field) for name, field in GatewayConfig.model_fields.items()),
    ]
)
app.command("serve")(serve)


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Option(help="Output folder (base/ and adapters/<name>/).")],
    adapters: Annotated[int, typer.Option(help="Number of LoRA adapters to build.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the base; adapters use seed+i+1.")] = 0,
) -> None:
    """Build a tiny Llama base and N LoRA adapters, offline and deterministically."""
    from trainer.tiny import build_tiny_model

    built = build_tiny_model(out, adapters=adapters, seed=seed)
    typer.echo(f"base: {built.base}")
    for name, path in built.adapters.items():
        typer.echo(f"adapter {name}: {path}")


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="Unquantized base model folder (HF format).")],
    out: Annotated[Path, typer.Option(help="Folder for the quantized copy (must not exist).")],
    scheme: Annotated[
        str, typer.Option(help="w8a8: int8 weights, dynamic int8 activations; w4a16: 4-bit.")
    ] = "w8a8",
    reuse: Annotated[
        bool, typer.Option(help="Keep OUT if it is already this scheme's copy of MODEL.")
    ] = False,
) -> None:
    """Write a compressed-tensors copy of a base (data-free) that vLLM serves fast with LoRA."""
    from trainer.quantize import QuantizeError, quantize_base

    try:
        quantize_base(model, out, scheme, echo=typer.echo, reuse=reuse)  # type: ignore[arg-type]
    except QuantizeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the tiny model, training runs, registry and reports go.")
    ] = Path("build/demo"),
    serve_base: Annotated[
        str, typer.Option(help="The served base: w8a8 or w4a16 (loraplex quantize), or bf16.")
    ] = "w8a8",
) -> None:
    """The lifecycle on a tiny base: train a good and a bad adapter, gate both, serve the winner."""
    from gateway.demo import run_demo

    if serve_base not in ("w8a8", "w4a16", "bf16"):
        typer.echo(f"error: --serve-base must be w8a8, w4a16 or bf16, not {serve_base!r}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_demo(workdir, serve_base))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    target: Target = "localhost:50051",
    adapter: Annotated[str, typer.Option(help="Adapter reference; empty = base.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    stream: Annotated[bool, typer.Option(help="Print deltas as they arrive.")] = False,
) -> None:
    """Send one generation request to a running gateway."""
    import grpc

    from gateway.client import Client

    with Client(target) as client:
        try:
            if stream:
                for delta in client.stream(
                    prompt, adapter, max_tokens=max_tokens, temperature=temperature
                ):
                    typer.echo(delta.text, nl=False)
                typer.echo()
            else:
                reply = client.generate(
                    prompt, adapter, max_tokens=max_tokens, temperature=temperature
                )
                typer.echo(reply.text)
        except grpc.RpcError as exc:
            typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from exc


@app.command("model-info")
def model_info(target: Target = "localhost:50051") -> None:
    """Print what a running gateway serves, as JSON."""
    import grpc

    from gateway.client import Client

    with Client(target) as client:
        try:
            info = client.model_info()
        except grpc.RpcError as exc:
            typer.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))


if __name__ == "__main__":
    app()
