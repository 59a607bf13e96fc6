"""Gateway throughput with traffic capture on vs off (target ratio >= 0.98).

Same tiny model, adapters and streaming workload as `metrics_overhead.py`, metrics on in both.
"On" captures every request (rate 1.0, the worst case) with two redaction rules, into files
that rotate at 1 MiB within a 16 MiB folder bound, so rotation and deletion run too. Both
gateways run at once and take turns, round by round; the ratio is the median of the
per-round ratios (this machine's speed drifts more over minutes than the effect measured).

    .venv/bin/python benchmarks/capture_overhead.py            # 15 rounds, 256 requests, c=32
    .venv/bin/python benchmarks/capture_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

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

from gateway.capture import FILE_GLOB
from gateway.config import GatewayConfig
from gateway.process import free_port
from trainer.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "capture_overhead.json"
TARGET = 0.98
MODES = ("off", "on")
REDACT = [r"[\w.+-]+@[\w-]+\.[\w.]+", r"\b(?:\d[ -]?){13,16}\b"]  # e-mail, card-like numbers


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
    model = build_tiny_model(args.workdir / "tiny", adapters=args.adapters)
    capture_dir = args.workdir / "capture"
    for old in capture_dir.glob(FILE_GLOB):
        old.unlink()
    base = GatewayConfig(
        model=str(model.base),
        adapters_dir=model.base.parent / "adapters",
        dtype="bfloat16",
        max_loras=8,
        max_model_len=512,
        kv_cache_space_gib=1,
    )
    configs = {
        "off": base.model_copy(update={"metrics_port": free_port()}),
        "on": base.model_copy(
            update={
                "metrics_port": free_port(),
                "capture_dir": capture_dir,
                "capture_redact": REDACT,
                "capture_max_file_bytes": 1 << 20,
                "capture_max_total_bytes": 16 << 20,
            }
        ),
    }
    workload = Workload(
        requests=shape["requests"],
        concurrency=shape["concurrency"],
        max_tokens=shape["max_tokens"],
        adapters=tuple(sorted(model.adapters)),
        include_base=False,
        warmup_per_adapter=2,
        repeats=args.rounds,
    )
    systems = [(mode, gateway_system, configs[mode]) for mode in MODES]
    runs, rounds = uvloop.run(bench_interleaved(systems, model, workload, args.workdir / "logs"))
    rates = {mode: [r[mode] for r in rounds] for mode in MODES}
    per_round = [r["on"] / r["off"] for r in rounds]
    ratio = round(statistics.median(per_round), 3)
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    files = sorted(capture_dir.glob(FILE_GLOB))
    captured = {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "records_on_disk": sum(1 for f in files for _ in f.open()),
    }
    report = {
        "benchmark": "capture_overhead",
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
        "ratio_on_vs_off": ratio,
        "ratio_of_medians": round(medians["on"] / medians["off"], 3),
        "captured": captured,
        "target": TARGET,
    }
    title = (
        f"capture on vs off: {workload.requests} streaming requests, c={workload.concurrency}, "
        f"{workload.max_tokens} tokens, {len(workload.adapters)} adapters, {args.rounds} rounds"
    )
    table = Table(title=title)
    for column in ("capture", "tok/s per round", "median tok/s", "TTFT p50 ms (median run)"):
        table.add_column(column)
    for mode in MODES:
        table.add_row(
            mode,
            ", ".join(f"{v:.0f}" for v in rates[mode]),
            f"{medians[mode]:.0f}",
            f"{report['runs'][mode]['median_run']['ttft_ms']['p50']:.1f}",
        )
    console.print(table)
    console.print("on / off per round: " + ", ".join(f"{r:.3f}" for r in per_round))
    console.print(
        f"captured: {captured['records_on_disk']} records in {captured['files']} files, "
        f"{captured['bytes'] / 2**20:.1f} MiB (bound 16 MiB, rotation at 1 MiB)"
    )
    verdict = "meets" if ratio >= TARGET else "MISSES"
    console.print(
        f"on / off = {ratio:.3f}, median of rounds ({verdict} the {TARGET} target); "
        f"ratio of medians {report['ratio_of_medians']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
