"""Two gateway replicas vs one: aggregate throughput, and promotion propagation across replicas.

`throughput`: the gateway benchmark's streaming workload sent to one replica, then to two
replicas (each with its own vLLM engine) behind a client-side round-robin, same total
concurrency. On a 2-core machine two engines share the same two cores, so the aggregate is not
expected to double: the figure shows what a second replica costs or gains when it has no
hardware of its own (on real deployments each replica has its own GPU).

`propagation`: two replicas in registry mode on one PostgreSQL and one artifact directory.
Through replica A, an alias is moved back and forth between two versions N times; after each
move, replica B is polled (Generate, 1 token) until it serves the new version. The delay is
bounded by B's registry poll interval (`registry_poll_interval_s`, 0.5 s by default).

    .venv/bin/python benchmarks/replicas_bench.py                 # both, 50 promotions
    .venv/bin/python benchmarks/replicas_bench.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import uvloop
import yaml
from gateway_throughput import (  # the script's folder is on sys.path
    DEFAULT_WORKDIR,
    FULL,
    QUICK,
    Item,
    StreamFn,
    Workload,
    gateway_system,
    percentile,
    run_workload,
    summarize,
)
from rich.console import Console

from gateway.config import GatewayConfig
from gateway.process import free_port
from trainer.tiny import TinyModel, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "replicas_bench.json"


@contextlib.asynccontextmanager
async def replicas(
    configs: list[GatewayConfig], model: TinyModel, logs: Path
) -> AsyncIterator[list[StreamFn]]:
    """Start one gateway per config, concurrently; each logs into its own folder."""
    async with contextlib.AsyncExitStack() as stack:
        folders = [logs / f"replica-{i}" for i in range(len(configs))]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        streams = await asyncio.gather(
            *(
                stack.enter_async_context(gateway_system(config, model, folder))
                for config, folder in zip(configs, folders, strict=True)
            )
        )
        yield list(streams)


def round_robin(streams: list[StreamFn]) -> StreamFn:
    turn = itertools.cycle(streams)

    def stream(item: Item) -> AsyncIterator:
        return next(turn)(item)

    return stream


async def measure_throughput(
    n: int, config: GatewayConfig, model: TinyModel, workload: Workload, logs: Path
) -> dict:
    configs = [config.model_copy(update={"metrics_port": free_port()}) for _ in range(n)]
    async with replicas(configs, model, logs) as streams:
        stream = round_robin(streams)
        await run_workload(stream, workload.warmup_items(), workload.concurrency)
        runs = []
        for _ in range(workload.repeats):
            results, wall = await run_workload(stream, workload.items(), workload.concurrency)
            runs.append(summarize(results, wall))
    runs.sort(key=lambda r: r["tokens_per_s"])
    median = runs[len(runs) // 2]
    median["tokens_per_s_repeats"] = [r["tokens_per_s"] for r in runs]
    return median


async def measure_propagation(
    config: GatewayConfig, model: TinyModel, promotions: int, logs: Path
) -> dict:
    """Promote through replica A, time until replica B serves the new version."""
    sys.path.insert(0, str(REPO))  # tests.support.postgres: the throwaway PostgreSQL of the tests
    from gateway.client import AdapterClient, AsyncClient
    from tests.support.postgres import PostgresServer

    with PostgresServer() as postgres:
        shared = {
            "adapters_dir": None,
            "data_dir": logs / "replica-data",
            "registry_url": postgres.create_database("propagation"),
        }
        configs = [
            config.model_copy(update={**shared, "metrics_port": free_port()}) for _ in range(2)
        ]
        async with replicas(configs, model, logs):
            ports = [  # gateway_system picks the ports and writes them to each config file
                yaml.safe_load((logs / f"replica-{i}" / "gateway.yaml").read_text())["port"]
                for i in range(2)
            ]
            a, b = (f"127.0.0.1:{port}" for port in ports)
            with AdapterClient(a, actor="bench") as registry:
                for source in ("alpha", "beta"):
                    registry.register("moving", model.adapters[source])
                registry.set_alias("moving", "production", 1, force=True, reason="bench")
            delays = []
            async with AsyncClient(b) as reader:

                async def served() -> int:
                    try:
                        reply = await reader.generate("Once upon", "moving", max_tokens=1)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.NOT_FOUND:  # not seen by B yet
                            return 0
                        raise
                    return reply.adapter.version

                while await served() != 1:
                    await asyncio.sleep(0.05)
                # B polls on its own clock: a random pause before each promotion keeps the
                # promotions from falling in step with B's polls (which would always wait a
                # whole interval, or none).
                jitter = random.Random(0)
                with AdapterClient(a, actor="bench") as registry:
                    for i in range(promotions):
                        await asyncio.sleep(jitter.uniform(0, config.registry_poll_interval_s))
                        target, current = (2, 1) if i % 2 == 0 else (1, 2)
                        await asyncio.to_thread(
                            registry.set_alias, "moving", "production", target, current,
                            "bench", True,
                        )  # fmt: skip
                        moved = time.perf_counter()
                        while await served() != target:
                            await asyncio.sleep(0.01)  # light polling: B is what we measure
                        delays.append(time.perf_counter() - moved)
    return {
        "promotions": promotions,
        "poll_interval_s": config.registry_poll_interval_s,
        "p50_ms": round(1000 * percentile(delays, 50), 1),
        "p99_ms": round(1000 * percentile(delays, 99), 1),
        "max_ms": round(1000 * max(delays), 1),
        "mean_ms": round(1000 * statistics.mean(delays), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--promotions", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["throughput", "propagation"], default=None)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    console = Console() if sys.stdout.isatty() else Console(width=120)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    model = build_tiny_model(args.workdir / "tiny", adapters=8)
    logs = args.workdir / "logs-replicas"
    logs.mkdir(parents=True, exist_ok=True)
    config = GatewayConfig(
        model=str(model.base),
        adapters_dir=model.base.parent / "adapters",
        dtype="bfloat16",
        max_loras=8,
        max_model_len=512,
        kv_cache_space_gib=1,
    )
    workload = Workload(
        requests=shape["requests"],
        concurrency=shape["concurrency"],
        max_tokens=shape["max_tokens"],
        adapters=tuple(sorted(model.adapters)),
        include_base=False,
        warmup_per_adapter=2,
        repeats=args.repeats,
    )
    report: dict = {
        "benchmark": "replicas",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count()},
        "workload": workload.__dict__,
    }
    if args.only in (None, "throughput"):
        one = uvloop.run(measure_throughput(1, config, model, workload, logs / "one"))
        two = uvloop.run(measure_throughput(2, config, model, workload, logs / "two"))
        ratio = round(two["tokens_per_s"] / one["tokens_per_s"], 3)
        report["throughput"] = {"one_replica": one, "two_replicas": two, "ratio": ratio}
        console.print(
            f"throughput: one replica {one['tokens_per_s']:.0f} tok/s "
            f"(repeats {one['tokens_per_s_repeats']}), two replicas round-robin "
            f"{two['tokens_per_s']:.0f} tok/s (repeats {two['tokens_per_s_repeats']}): "
            f"ratio {ratio:.3f} on {os.cpu_count()} cores"
        )
    if args.only in (None, "propagation"):
        promotions = 10 if args.quick else args.promotions
        prop = uvloop.run(measure_propagation(config, model, promotions, logs / "propagation"))
        report["propagation"] = prop
        console.print(
            f"propagation over {prop['promotions']} promotions (poll interval "
            f"{prop['poll_interval_s']} s): p50 {prop['p50_ms']} ms, p99 {prop['p99_ms']} ms, "
            f"max {prop['max_ms']} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
