"""Gateway throughput with metrics enabled vs disabled (target ratio >= 0.98).

Same tiny model, adapters and streaming workload as `gateway_throughput.py`. "Enabled" is the
production setting: the gateway's per-adapter metrics *and* vLLM's statistics (which feed
them), with /metrics scraped every 5 seconds (3x Prometheus's default rate) while it runs.
"Disabled" is `metrics_port: null`, which also turns vLLM's statistics off.

Both gateways run at once and take turns: a round times the workload on one, then on the
other (the order alternates), so each pair of runs is seconds apart. This machine's speed
drifts by several percent over minutes, more than the effect measured; pairing cancels it.
An idle gateway costs next to nothing (its engine processes block between steps on CPU): the
script measures what the idle one used during the other's runs and reports it. The ratio is
the median of the per-round ratios.

    .venv/bin/python benchmarks/metrics_overhead.py            # 15 rounds, 256 requests, c=32
    .venv/bin/python benchmarks/metrics_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil
import uvloop
from gateway_throughput import (  # the script's folder is on sys.path
    DEFAULT_WORKDIR,
    FULL,
    QUICK,
    Workload,
    bench_interleaved,
    gateway_system,
    summarize,
)
from rich.console import Console
from rich.table import Table

from gateway.config import GatewayConfig
from gateway.process import free_port
from trainer.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "metrics_overhead.json"
TARGET = 0.98
MODES = ("disabled", "enabled")
SCRAPE_INTERVAL_S = 5.0  # 3x the rate of Prometheus's default 15 s


class Scraper:
    """Fetches /metrics every SCRAPE_INTERVAL_S in a thread while `active`, as Prometheus would.

    Paused during the other gateway's runs, so its cost is not charged to them.
    """

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self.bytes = 0
        self.active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_S):
            if not self.active.is_set():
                continue
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


def _process_tree(config_file: Path) -> list[psutil.Process]:
    """The gateway started with `config_file` (gateway_system's) and its engine processes."""
    for process in psutil.Process().children(recursive=True):
        if str(config_file) in process.cmdline():
            return [process, *process.children(recursive=True)]
    raise LookupError(f"no gateway process runs {config_file}")


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class RunWatcher:
    """Around each timed run: scrapes the enabled gateway only while it runs, and measures the
    CPU the other (idle) gateway uses meanwhile, as a share of one core."""

    def __init__(self, scraper: Scraper, logs: Path) -> None:
        self.scraper = scraper
        self.logs = logs
        self.idle_share: dict[str, list[float]] = {mode: [] for mode in MODES}

    @contextmanager
    def __call__(self, mode: str) -> Iterator[None]:
        (idle,) = (m for m in MODES if m != mode)
        tree = _process_tree(self.logs / idle / "gateway.yaml")
        cpu, started = _cpu_seconds(tree), time.perf_counter()
        if mode == "enabled":
            self.scraper.active.set()
        try:
            yield
        finally:
            self.scraper.active.clear()
        share = (_cpu_seconds(tree) - cpu) / (time.perf_counter() - started)
        self.idle_share[mode].append(round(share, 4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32 requests, c=8, 16 tokens")
    p.add_argument("--rounds", type=int, default=15, help="timed runs per gateway, alternating")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    console = Console() if sys.stdout.isatty() else Console(width=120)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    model = build_tiny_model(args.workdir / "tiny", adapters=args.adapters)
    base = GatewayConfig(
        model=str(model.base),
        adapters_dir=model.base.parent / "adapters",
        dtype="bfloat16",
        max_loras=8,
        max_model_len=512,
        kv_cache_space_gib=1,
        metrics_port=None,
    )
    workload = Workload(
        requests=shape["requests"],
        concurrency=shape["concurrency"],
        max_tokens=shape["max_tokens"],
        adapters=tuple(sorted(model.adapters)),
        include_base=False,
        warmup_per_adapter=2,
        repeats=args.rounds,
    )
    configs = {
        "disabled": base,
        "enabled": base.model_copy(update={"metrics_port": free_port()}),
    }
    logs = args.workdir / "logs"
    systems = [(mode, gateway_system, configs[mode]) for mode in MODES]
    with Scraper(configs["enabled"].metrics_port) as scraper:
        watcher = RunWatcher(scraper, logs)
        runs, rounds = uvloop.run(bench_interleaved(systems, model, workload, logs, watcher))
    rates = {mode: [r[mode] for r in rounds] for mode in MODES}
    per_round = [r["enabled"] / r["disabled"] for r in rounds]
    ratio = round(statistics.median(per_round), 3)
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    idle_share = {mode: statistics.median(v) for mode, v in watcher.idle_share.items()}
    scraped = {"scrapes": scraper.scrapes, "mean_bytes": scraper.bytes // max(1, scraper.scrapes)}
    report = {
        "benchmark": "metrics_overhead",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count()},
        "workload": workload.__dict__,
        "runs": {
            mode: {
                "tokens_per_s_per_round": rates[mode],
                "median_run": summarize(r.results, r.wall),
            }
            for mode, r in runs.items()
        },
        "median_tokens_per_s": medians,
        "ratio_per_round": [round(r, 3) for r in per_round],
        "ratio_enabled_vs_disabled": ratio,
        "ratio_of_medians": round(medians["enabled"] / medians["disabled"], 3),
        "idle_other_gateway_cpu_share": idle_share,
        "scraped": scraped,
        "target": TARGET,
    }
    title = (
        f"metrics on vs off: {workload.requests} streaming requests, c={workload.concurrency}, "
        f"{workload.max_tokens} tokens, {len(workload.adapters)} adapters, {args.rounds} rounds"
    )
    table = Table(title=title)
    for column in ("metrics", "tok/s per round", "median tok/s", "TTFT p50 ms (median run)"):
        table.add_column(column)
    for mode in MODES:
        table.add_row(
            mode,
            ", ".join(f"{v:.0f}" for v in rates[mode]),
            f"{medians[mode]:.0f}",
            f"{report['runs'][mode]['median_run']['ttft_ms']['p50']:.1f}",
        )
    console.print(table)
    console.print("enabled / disabled per round: " + ", ".join(f"{r:.3f}" for r in per_round))
    console.print(
        f"the idle gateway used {idle_share['enabled']:.2%} of a core during the enabled runs "
        f"(disabled idle), {idle_share['disabled']:.2%} during the disabled runs (enabled idle)"
    )
    verdict = "meets" if ratio >= TARGET else "MISSES"
    console.print(
        f"enabled / disabled = {ratio:.3f}, median of rounds ({verdict} the {TARGET} target); "
        f"ratio of medians {report['ratio_of_medians']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
