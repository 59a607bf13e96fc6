"""`make demo`: tiny base + adapters, registered, served fp8-quantized, queried over gRPC.

Shows that adapters are registered as immutable versions and served by name, that requests
for different adapters run together, that each adapter changes the output, and that a
promotion and a rollback switch what a name serves. Exits non-zero if anything is off.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from gateway.client import AdapterClient, AsyncClient, Client, wait_until_serving
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


def _register_all(target: str, model: object, names: list[str]) -> None:
    """Each tiny adapter becomes v1 of its name, forced to production (no eval suite here)."""
    with AdapterClient(target, actor="demo") as registry:
        for name in names:
            registry.register(name, model.adapters[name], owner="demo")  # type: ignore[attr-defined]
            registry.set_alias(name, "production", 1, expected=0, force=True, reason="demo")


def _promote_and_roll_back(target: str, model: object, console: Console) -> bool:
    """`assistant` v1 (alpha's weights) in production; v2 (beta's) passes a gate and is
    promoted; then rolled back. Returns whether each step served what it should."""
    prompt = PROMPTS[0]
    steps: list[tuple[str, int, str]] = []
    with AdapterClient(target, actor="demo") as registry, Client(target) as client:

        def ask(step: str) -> None:
            reply = client.generate(prompt, "assistant", temperature=0.0, max_tokens=MAX_TOKENS)
            steps.append((step, reply.adapter.version, reply.text))

        adapters = model.adapters  # type: ignore[attr-defined]
        registry.register("assistant", adapters["alpha"], description="demo assistant")
        registry.register("assistant", adapters["beta"], alias="candidate")
        registry.set_alias("assistant", "production", 1, expected=0, force=True, reason="v1")
        ask("v1 in production")
        registry.record_evaluation("assistant", 2, "demo-gate", True, {"score": 1.0})
        registry.set_alias("assistant", "production", 2, expected=1, reason="passed demo-gate")
        ask("v2 promoted")
        # v1 never passed an evaluation: rolling back to it is forced, with the reason kept
        registry.set_alias("assistant", "production", 1, expected=2, reason="rollback", force=True)
        ask("rolled back")
    table = Table(title=f"'assistant' in production, prompt {prompt!r}")
    for column in ("step", "served version", "output"):
        table.add_column(column)
    for step, version, text in steps:
        table.add_row(step, f"v{version}", repr(text))
    console.print(table)
    (_, v1, first), (_, v2, second), (_, back, third) = steps
    return (v1, v2, back) == (1, 2, 1) and first == third != second


def _print_request_counts(metrics_port: int, console: Console) -> None:
    """What Prometheus would scrape: the gateway's per-adapter request counters."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        console.print(f"[yellow]metrics not readable at {url}: {exc}[/]")
        return
    lines = [line for line in text.splitlines() if line.startswith("loraplex_requests_total{")]
    console.print(f"per-adapter metrics at {url} (loraplex_requests_total):")
    for line in sorted(lines):
        console.print(f"  {line}")


def run_demo(workdir: Path, n_adapters: int) -> int:
    """The whole demo; returns the process exit code."""
    from trainer.tiny import build_tiny_model

    console = Console()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(workdir / "tiny", adapters=n_adapters)
    names = sorted(model.adapters)
    console.print(f"[bold]tiny model[/] {model.base} with adapters {', '.join(names)}")
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log_path = workdir / "gateway.log"
    registry_dir = workdir / "registry"
    shutil.rmtree(registry_dir, ignore_errors=True)  # a fresh registry every run
    proc = start_gateway(
        [
            "--model",
            str(model.base),
            "--data-dir",
            str(registry_dir),
            "--quantization",
            "fp8_per_channel",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "512",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        log_path,
    )
    try:
        console.print(f"starting gateway on {target} (fp8 base; log: {log_path}) ...")
        wait_until_serving(target, timeout=240, alive=lambda: proc.poll() is None)
        console.print(f"gateway SERVING after {time.monotonic() - started:.0f}s")
        _register_all(target, model, names)
        console.print(f"registered {len(names)} adapters (v1 of each, in production)")
        sent = time.monotonic()
        results = asyncio.run(_query_all(target, names))
        elapsed = time.monotonic() - sent
        promoted_ok = _promote_and_roll_back(target, model, console)
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
    _print_request_counts(metrics_port, console)

    distinct = {tuple(results[(a, p)][0] for p in PROMPTS) for a in ["", *names]}
    served_ok = all(results[(a, p)][1] == (a or "base") for a in ["", *names] for p in PROMPTS)
    code = stop(proc, timeout=60)
    console.print(
        f"gateway exited with {code} after SIGTERM; total {time.monotonic() - started:.0f}s"
    )
    if len(distinct) != len(names) + 1 or not served_ok or code != 0:
        console.print("[red]FAILED[/]: adapters must differ from the base and each other")
        return 1
    if not promoted_ok:
        console.print("[red]FAILED[/]: promotion / rollback did not switch the served version")
        return 1
    console.print("[green]OK[/]: every adapter answered differently from the base and the others;")
    console.print("[green]OK[/]: the promotion served v2 at once, the rollback v1 again")
    return 0
