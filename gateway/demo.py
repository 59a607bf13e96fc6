"""`make demo`: tiny base + adapters, served fp8-quantized, queried concurrently over gRPC.

Shows that every request names its adapter, that requests for different adapters run
together, and that each adapter changes the output. Exits non-zero if anything is off.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from gateway.client import AsyncClient, wait_until_serving
from gateway.process import free_port, kill, start_gateway, stop

PROMPTS = ["The weather today is", "My favourite food is", "Once upon a time"]
MAX_TOKENS = 12


async def _query_all(target: str, adapters: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
    async with AsyncClient(target) as client:
        jobs = {
            (adapter, prompt): client.generate(
                prompt, adapter, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True
            )
            for adapter in ["", *adapters]
            for prompt in PROMPTS
        }
        replies = await asyncio.gather(*jobs.values())
    return {
        key: (reply.text, reply.adapter.name or "base")
        for key, reply in zip(jobs, replies, strict=True)
    }


def run_demo(workdir: Path, n_adapters: int) -> int:
    """The whole demo; returns the process exit code."""
    from trainer.tiny import build_tiny_model

    console = Console()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(workdir / "tiny", adapters=n_adapters)
    names = sorted(model.adapters)
    console.print(f"[bold]tiny model[/] {model.base} with adapters {', '.join(names)}")
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = workdir / "gateway.log"
    proc = start_gateway(
        [
            "--model",
            str(model.base),
            "--adapters-dir",
            str(model.base.parent / "adapters"),
            "--quantization",
            "fp8_per_channel",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "512",
            "--port",
            str(port),
        ],
        log_path,
    )
    try:
        console.print(f"starting gateway on {target} (fp8 base; log: {log_path}) ...")
        wait_until_serving(target, timeout=240, alive=lambda: proc.poll() is None)
        console.print(f"gateway SERVING after {time.monotonic() - started:.0f}s")
        sent = time.monotonic()
        results = asyncio.run(_query_all(target, names))
        elapsed = time.monotonic() - sent
    except (OSError, RuntimeError, TimeoutError, grpc.RpcError) as exc:
        console.print(f"[red]demo failed:[/] {exc}; gateway log: {log_path}")
        kill(proc)
        return 1

    table = Table(title=f"{len(results)} concurrent requests over gRPC in {elapsed:.2f}s")
    table.add_column("prompt")
    for adapter in ["base", *names]:
        table.add_column(adapter)
    for prompt in PROMPTS:
        row = [results[(a, prompt)][0] for a in ["", *names]]
        table.add_row(prompt, *[repr(text) for text in row])
    console.print(table)

    distinct = {tuple(results[(a, p)][0] for p in PROMPTS) for a in ["", *names]}
    served_ok = all(results[(a, p)][1] == (a or "base") for a in ["", *names] for p in PROMPTS)
    code = stop(proc, timeout=60)
    console.print(
        f"gateway exited with {code} after SIGTERM; total {time.monotonic() - started:.0f}s"
    )
    if len(distinct) != len(names) + 1 or not served_ok or code != 0:
        console.print("[red]FAILED[/]: adapters must differ from the base and each other")
        return 1
    console.print("[green]OK[/]: every adapter answered differently from the base and the others")
    return 0
