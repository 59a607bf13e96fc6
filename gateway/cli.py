"""The `loraplex` command. Heavy modules (vLLM, torch, trainer) are imported lazily per command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict

from evalsuite.cli import eval_app
from gateway.cli_adapters import adapters_app
from gateway.cli_keys import keys_app
from trainer.cli import train_app

app = typer.Typer(
    help="loraplex: serve many LoRA adapters on one base model over gRPC, on vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")

Target = Annotated[str, typer.Option("--target", help="Gateway address host:port.")]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model folder.")] = None,
    adapters_dir: Annotated[
        Path | None, typer.Option(help="Directory mode: a folder of adapter folders.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Registry mode: registry database and artifacts.")
    ] = None,
    registry_url: Annotated[
        str | None, typer.Option(help="Registry database URL (default SQLite in data-dir).")
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(help="vLLM quantization method; unset: what the checkpoint declares."),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port.")] = None,
    max_loras: Annotated[int | None, typer.Option(help="Adapters per batch.")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(help="Adapters cached on CPU.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest LoRA rank.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length.")] = None,
    kv_cache_space_gib: Annotated[float | None, typer.Option(help="CPU KV cache GiB.")] = None,
    cpu_reserved_cores: Annotated[
        int | None, typer.Option(help="CPU cores kept free of compute threads (0: none).")
    ] = None,
    engine_spin_wait: Annotated[
        bool | None, typer.Option(help="Engine processes busy-wait between steps.")
    ] = None,
    enforce_eager: Annotated[bool | None, typer.Option(help="Skip compilation.")] = None,
    grace_period_s: Annotated[float | None, typer.Option(help="Drain time on SIGTERM.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Start the gateway (settings: config file < LORAPLEX_* env < flags)."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    from gateway.config import ConfigError, load_config

    try:
        settings = load_config(config, **flags)
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
