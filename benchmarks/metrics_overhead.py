"""Gateway throughput with metrics enabled vs disabled (target ratio >= 0.98).

Same tiny model, adapters and streaming workload as `gateway_throughput.py`. "Enabled" is the
production setting: the gateway's per-adapter metrics *and* vLLM's statistics (which feed
them), with /metrics scraped every 5 seconds (3x Prometheus's default rate) while the workload
runs. "Disabled" is `metrics_port: null`, which also turns vLLM's statistics off. The two
gateways alternate, one engine at a time, for several rounds; each run keeps the median of its
repeats, and the ratio is median(enabled) / median(disabled).

    .venv/bin/python benchmarks/metrics_overhead.py            # 4 rounds, 256 requests, c=32
    .venv/bin/python benchmarks/metrics_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from gateway_throughput import (  # the script's folder is on sys.path
    DEFAULT_WORKDIR,
    FULL,
    QUICK,
    Workload,
    bench_system,
    gateway_system,
    summarize,
)
from rich.console import Console
from rich.table import Table

from gateway.config import GatewayConfig
from gateway.process import free_port
from trainer.tiny import TinyModel, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "metrics_overhead.json"
TARGET = 0.98
SCRAPE_INTERVAL_S = 5.0  # 3x the rate of Prometheus's default 15 s


class Scraper:
    """Fetches /metrics every SCRAPE_INTERVAL_S in a thread, as Prometheus would."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.bytes += len(response.read())
                    self.scrapes += 1
            except OSError:
                pass  # not up yet

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_once(config: GatewayConfig, model: TinyModel, workload: Workload, logs: Path) -> dict:
    """One gateway start, warm-up and timed repeats; scraped when metrics are on."""
    if config.metrics_port is None:
        run = uvloop.run(bench_system(gateway_system, config, model, workload, logs))
        scraped = None
    else:
        with Scraper(config.metrics_port) as scraper:
            run = uvloop.run(bench_system(gateway_system, config, model, workload, logs))
        scraped = {
            "scrapes": scraper.scrapes,
            "mean_bytes": scraper.bytes // max(1, scraper.scrapes),
        }
    return {
        "tokens_per_s": statistics.median(run.repeat_tokens_per_s),
        "repeats": run.repeat_tokens_per_s,
        "summary": summarize(run.results, run.wall),
        "scraped": scraped,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32 requests, c=8, 16 tokens")
    p.add_argument("--rounds", type=int, default=4, help="disabled/enabled pairs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per gateway start")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    console = Console() if sys.stdout.isatty() else Console(width=120)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    model = build_tiny_model(args.workdir / "tiny", adapters=args.adapters)
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = GatewayConfig(
        model=str(model.base),
        adapters_dir=model.base.parent / "adapters",
        dtype="bfloat16",
        max_loras=8,
        max_model_len=512,
        kv_cache_space_gib=1.0,
        metrics_port=None,
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
    runs: dict[str, list[dict]] = {"disabled": [], "enabled": []}
    for round_ in range(args.rounds):
        for mode in ("disabled", "enabled"):
            config = (
                base
                if mode == "disabled"
                else base.model_copy(update={"metrics_port": free_port()})
            )
            console.print(f"round {round_ + 1}/{args.rounds}: metrics {mode}")
            runs[mode].append(run_once(config, model, workload, logs))
    medians = {mode: statistics.median(r["tokens_per_s"] for r in rs) for mode, rs in runs.items()}
    ratio = round(medians["enabled"] / medians["disabled"], 3)
    report = {
        "benchmark": "metrics_overhead",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count()},
        "workload": workload.__dict__,
        "runs": runs,
        "median_tokens_per_s": medians,
        "ratio_enabled_vs_disabled": ratio,
        "target": TARGET,
    }
    title = (
        f"metrics on vs off: {workload.requests} streaming requests, c={workload.concurrency}, "
        f"{workload.max_tokens} tokens, {len(workload.adapters)} adapters"
    )
    table = Table(title=title)
    for column in ("metrics", "tok/s per round (median of repeats)", "median tok/s", "TTFT p50 ms"):
        table.add_column(column)
    for mode, rs in runs.items():
        table.add_row(
            mode,
            ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs),
            f"{medians[mode]:.0f}",
            ", ".join(str(r["summary"]["ttft_ms"]["p50"]) for r in rs),
        )
    console.print(table)
    verdict = "meets" if ratio >= TARGET else "MISSES"
    console.print(f"enabled / disabled = {ratio:.3f} ({verdict} the {TARGET} target)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
