"""What multiplexing adapters costs: base-only requests vs mixes of N adapters, one gateway.

One gateway (max_loras 16, all 16 adapters resident after warm-up) gets the same workload
(greedy, ignore_eos, fixed max_tokens) as base-only requests and as mixes over the first N
adapters (N = 1, 4, 8, 16, and 8 adapters with 20% base requests). Each round alternates
base, mix, base, mix, ...; a mix's ratio is its tok/s over the mean of the base runs beside
it, so runs seconds apart are compared, and the median over rounds is reported. The same is
then measured on a second gateway with vLLM's stock LoRA ops: loraplex's vLLM plugin off
(VLLM_PLUGINS=""), which also turns off its other engine fixes. Two sizes: the tiny test
model (hidden 256) and the 190M Llama of train_memory.py (hidden 1024, 16 layers).

    .venv/bin/python benchmarks/adapter_mix.py --size tiny
    .venv/bin/python benchmarks/adapter_mix.py --size 190m
    .venv/bin/python benchmarks/adapter_mix.py --size tiny --quick        # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from gateway_throughput import (  # the script's folder is on sys.path
    PROMPT_WORDS,
    Item,
    _corpus_words,
    gateway_system,
    run_workload,
    summarize,
)
from rich.console import Console
from rich.table import Table
from train_memory import build_model

from gateway.config import GatewayConfig
from gateway.engine import engine_environment
from trainer.tiny import TinyModel, adapter_name, build_adapter, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
WORKDIR = REPO / "build" / "bench"
MAX_LORAS = 16
MIXES = [(1, 0.0), (4, 0.0), (8, 0.0), (16, 0.0), (8, 0.2)]  # (adapters, share of base requests)
SIZES = {  # requests, concurrency, max_tokens, rounds
    "tiny": {"requests": 256, "concurrency": 32, "max_tokens": 64, "rounds": 3},
    "190m": {"requests": 64, "concurrency": 32, "max_tokens": 32, "rounds": 3},
}
QUICK = {"requests": 32, "concurrency": 8, "max_tokens": 8, "rounds": 1}
TARGET = 0.8  # 8-adapter mix / base, the goal
VARIANTS = [("loraplex", "loraplex ops"), ("stock", "vLLM stock ops (plugin off)")]


def build(size: str) -> TinyModel:
    """The base and 16 LoRA adapters (the tiny model's mixed ranks and targets) of one size."""
    if size == "tiny":
        return build_tiny_model(WORKDIR / "tiny16", adapters=MAX_LORAS)
    import torch
    from transformers import AutoModelForCausalLM

    base = build_model(WORKDIR / "llama-190m", size)
    names = [adapter_name(i) for i in range(MAX_LORAS)]
    adapters = {n: base.parent / "llama-190m-adapters" / n for n in names}
    missing = [
        i for i, n in enumerate(names) if not (adapters[n] / "adapter_config.json").is_file()
    ]
    if missing:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        for i in missing:
            build_adapter(model, base, i, 0, adapters[names[i]])
    return TinyModel(base=base, adapters=adapters)


def mix_items(names: list[str], base_share: float, requests: int, max_tokens: int, tag: str):
    """Requests spread round-robin over `names`; every 1/base_share-th goes to the base."""
    words = _corpus_words()
    every = round(1 / base_share) if base_share else 0
    items, adapter_turn = [], 0
    for i in range(requests):
        start = (i * 37) % (len(words) - PROMPT_WORDS)
        prompt = f"{tag} {i}: " + " ".join(words[start : start + PROMPT_WORDS])
        if every and i % every == every - 1:
            adapter = ""
        else:
            adapter, adapter_turn = names[adapter_turn % len(names)], adapter_turn + 1
        items.append(Item(i, adapter, prompt, max_tokens))
    return items


def mix_key(adapters: int, base_share: float) -> str:
    return f"{adapters} adapters" + (f" + {base_share:.0%} base" if base_share else "")


async def measure(config: GatewayConfig, model: TinyModel, w: dict, logs: Path) -> dict:
    """One gateway: warm every adapter, then rounds of base/mix pairs; tok/s and TTFT each."""
    names = sorted(model.adapters)
    runs: dict[str, list[dict]] = {"base": []}
    ratios: dict[str, list[float]] = {}
    async with gateway_system(config, model, logs) as stream:
        warm = mix_items(names, 1 / 17, 2 * (MAX_LORAS + 1), 4, "Warm-up")  # each adapter, base
        await run_workload(stream, warm, MAX_LORAS + 1)

        async def run(names_: list[str], share: float, tag: str) -> dict:
            items = mix_items(names_, share, w["requests"], w["max_tokens"], tag)
            return summarize(*await run_workload(stream, items, w["concurrency"]))

        for r in range(w["rounds"]):
            before = await run([], 1.0, f"Base {r}.0")
            runs["base"].append(before)
            for j, (n, share) in enumerate(MIXES):
                mixed = await run(names[:n], share, f"Mix {r}.{j}")
                after = await run([], 1.0, f"Base {r}.{j + 1}")
                runs["base"].append(after)
                key = mix_key(n, share)
                runs.setdefault(key, []).append(mixed)
                base_rate = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
                ratios.setdefault(key, []).append(mixed["tokens_per_s"] / base_rate)
                rate = mixed["tokens_per_s"]
                print(f"round {r + 1}, {key}: {rate:.0f} tok/s, base {base_rate:.0f}", flush=True)
                before = after
    return {"runs": runs, "ratios": ratios}


def _median(runs: list[dict], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for part in path:
            value = value[part]
        values.append(value)
    return statistics.median(values)


def report(results: dict, console: Console) -> dict:
    """The table (median over rounds) and the JSON summary."""
    table = Table(title="Adapter mixes vs base-only, one gateway (median over rounds)")
    for column in ("ops", "requests", "tok/s", "TTFT p50 ms", "mix / base", "ratio range"):
        table.add_column(column, justify="left" if column in ("ops", "requests") else "right")
    summary: dict[str, dict] = {}
    for variant, label in VARIANTS:
        if variant not in results:
            continue
        runs, ratios = results[variant]["runs"], results[variant]["ratios"]
        summary[variant] = {}
        for key, measured in runs.items():
            row = {
                "tokens_per_s": round(_median(measured, "tokens_per_s"), 1),
                "ttft_p50_ms": round(_median(measured, "ttft_ms", "p50"), 1),
            }
            cells = [label, key, f"{row['tokens_per_s']:.0f}", f"{row['ttft_p50_ms']:.0f}", "", ""]
            if key in ratios:
                row["ratio"] = round(statistics.median(ratios[key]), 3)
                row["ratios"] = [round(x, 3) for x in ratios[key]]
                cells[4] = f"{row['ratio']:.2f}"
                cells[5] = f"{min(ratios[key]):.2f}-{max(ratios[key]):.2f}"
            summary[variant][key] = row
            table.add_row(*cells)
    console.print(table)
    if "loraplex" in summary:
        eight = summary["loraplex"][mix_key(8, 0.0)]["ratio"]
        verdict = "meets" if eight >= TARGET else "misses"
        console.print(f"8-adapter mix / base = {eight:.2f}: {verdict} the {TARGET} goal")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 requests, 1 round")
    p.add_argument("--variants", default="loraplex,stock", help="loraplex,stock or one of them")
    p.add_argument("--rounds", type=int, help="override the size's rounds")
    args = p.parse_args(argv)
    w = dict(QUICK if args.quick else SIZES[args.size])
    w["rounds"] = args.rounds or w["rounds"]
    console = Console() if sys.stdout.isatty() else Console(width=120)
    model = build(args.size)
    config = GatewayConfig(
        model=str(model.base),
        adapters_dir=next(iter(model.adapters.values())).parent,
        dtype="bfloat16",
        max_loras=MAX_LORAS,
        max_lora_rank=16,
        max_model_len=512,
        kv_cache_space_gib=2,
    )
    os.environ.update(engine_environment(config))
    results: dict[str, dict] = {}
    for variant, label in VARIANTS:
        if variant not in args.variants.split(","):
            continue
        logs = WORKDIR / "logs" / f"adapter_mix-{args.size}-{variant}"
        logs.mkdir(parents=True, exist_ok=True)
        plugins = os.environ.pop("VLLM_PLUGINS", None)
        if variant == "stock":
            os.environ["VLLM_PLUGINS"] = ""  # no general plugin: vLLM's own LoRA ops
        console.print(f"[bold]{label}[/]: {w} (logs in {logs})")
        try:
            results[variant] = uvloop.run(measure(config, model, w, logs))
        finally:
            os.environ.pop("VLLM_PLUGINS", None)
            if plugins is not None:
                os.environ["VLLM_PLUGINS"] = plugins
    summary = report(results, console)
    out = REPO / "benchmarks" / "results" / f"adapter_mix-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.is_file() else {}  # a run of one variant
    when = datetime.now(UTC).isoformat(timespec="seconds")  # keeps the other's figures
    saved.update({v: {"workload": w, "measured": when, "results": r} for v, r in summary.items()})
    out.write_text(json.dumps(saved, indent=2) + "\n")
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
