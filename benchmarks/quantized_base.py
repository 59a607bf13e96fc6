"""What a quantized base costs and gains on this machine: speed and quality vs bfloat16.

For each size (the tiny test model, hidden 256; and the 190M model `train_memory.py` builds,
hidden 1024), the unquantized bf16 base and its `loraplex quantize` copies (w8a8, w4a16) are
served by one gateway each, all up at once and taking turns (`gateway_throughput.py`'s
interleaved rounds), with 8 LoRA adapters in directory mode. Reported per scheme: decode tok/s
and TTFT, and the median of the per-round ratios to bf16.

Quality, through the same gateways: full next-token distributions (prompt_logprobs over the
whole 1024-token vocabulary) on held-out text, for the base and for each adapter, give the
top-1 agreement with bf16 and the mean KL(bf16 || quantized) per position.

    .venv/bin/python benchmarks/quantized_base.py                 # both sizes, 5 rounds
    .venv/bin/python benchmarks/quantized_base.py --sizes tiny --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from gateway_throughput import (  # the script's folder is on sys.path
    DEFAULT_WORKDIR,
    Workload,
    bench_interleaved,
    gateway_system,
    summarize,
)
from train_memory import build_model

from gateway.client import AsyncClient
from gateway.config import GatewayConfig
from gateway.engine import engine_environment
from trainer.quantize import quantize_base
from trainer.tiny import CORPUS, TinyModel, build_adapter, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quantized_base.json"
SCHEMES = ("w8a8", "w4a16")
ADAPTERS = 8
VOCAB = 1024  # the tiny tokenizer's, shared by both sizes: prompt_logprobs = the whole vocab
# per size: (requests, concurrency, max_tokens); the 190M model decodes ~25x slower.
WORKLOADS = {"tiny": (256, 32, 64), "190m": (32, 8, 32)}
QUALITY_TEXTS = 8  # held-out corpus snippets scored per adapter (and the base)


def size_model(size: str, workdir: Path) -> TinyModel:
    """The base of a size with ADAPTERS random LoRAs (the tiny builder's shapes and ranks)."""
    if size == "tiny":
        return build_tiny_model(workdir / "tiny", adapters=ADAPTERS)
    import torch
    from transformers import AutoModelForCausalLM

    base = build_model(workdir / size / "base", size)
    adapters = {f"a{i}": workdir / size / "adapters" / f"a{i}" for i in range(ADAPTERS)}
    if not all((p / "adapter_config.json").is_file() for p in adapters.values()):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        for i, path in enumerate(adapters.values()):
            build_adapter(model, base, i, seed=0, out=path)
    return TinyModel(base=base, adapters=adapters)


def quantized_copy(base: Path, scheme: str) -> Path:
    out = base.with_name(f"{base.name}-{scheme}")
    if not (out / "config.json").is_file():
        quantize_base(base, out, scheme, echo=lambda _: None)  # type: ignore[arg-type]
    return out


def held_out_texts() -> list[str]:
    """Corpus lines from its end (the tokenizer saw them; the random-init weights did not)."""
    lines = [line for line in CORPUS.read_text().splitlines() if len(line.split()) >= 12]
    return [" ".join(line.split()[:40]) for line in lines[-QUALITY_TEXTS:]]


async def distributions(target: str, adapter: str, text: str) -> list[dict[int, float]]:
    """Next-token log-probabilities over the whole vocabulary at every prompt position."""
    async with AsyncClient(target) as client:
        reply = await client.generate(
            text, adapter, temperature=0.0, max_tokens=1, prompt_logprobs=VOCAB - 1
        )
    return [
        {t.token_id: t.logprob for t in position.top_logprobs}
        for position in reply.prompt_logprobs[1:]
    ]


def compare(reference: list[dict[int, float]], other: list[dict[int, float]]) -> tuple[int, float]:
    """(positions where the top token agrees, summed KL(reference || other) in nats)."""
    agree, kl = 0, 0.0
    for ref, oth in zip(reference, other, strict=True):
        agree += max(ref, key=ref.__getitem__) == max(oth, key=oth.__getitem__)
        floor = min(oth.values())  # ids outside the other's top list: at most its smallest
        kl += sum(math.exp(lp) * (lp - oth.get(t, floor)) for t, lp in ref.items())
    return agree, kl


async def quality(streams: dict, model: TinyModel) -> dict[str, dict[str, float]]:
    targets = {key: stream.target for key, stream in streams.items()}
    texts = held_out_texts()
    totals = {s: [0, 0.0, 0] for s in SCHEMES}  # agreements, KL, positions
    for adapter in ["", *sorted(model.adapters)]:
        for text in texts:
            reference = await distributions(targets["bf16"], adapter, text)
            for scheme in SCHEMES:
                agree, kl = compare(reference, await distributions(targets[scheme], adapter, text))
                totals[scheme][0] += agree
                totals[scheme][1] += kl
                totals[scheme][2] += len(reference)
    return {
        s: {"top1_agreement": round(a / n, 4), "mean_kl_nats": round(kl / n, 5), "positions": n}
        for s, (a, kl, n) in totals.items()
    }


def bench_size(size: str, rounds: int, workdir: Path) -> dict:
    model = size_model(size, workdir)
    bases = {"bf16": model.base, **{s: quantized_copy(model.base, s) for s in SCHEMES}}
    requests, concurrency, max_tokens = WORKLOADS[size]
    configs = {
        key: GatewayConfig(
            model=str(path),
            adapters_dir=model.adapters["a0" if size != "tiny" else "alpha"].parent,
            metrics_port=None,
            dtype="bfloat16",
            max_loras=ADAPTERS,
            max_lora_rank=16,
            max_model_len=512,
            max_logprobs=VOCAB - 1,
            kv_cache_space_gib=1,
        )
        for key, path in bases.items()
    }
    os.environ.update(engine_environment(configs["bf16"]))
    workload = Workload(
        requests=requests,
        concurrency=concurrency,
        max_tokens=max_tokens,
        adapters=tuple(sorted(model.adapters)),
        include_base=True,
        warmup_per_adapter=2,
        repeats=rounds,
    )
    systems = [(key, gateway_system, config) for key, config in configs.items()]
    measured: dict = {}

    async def after_rounds(streams: dict) -> None:
        measured["quality"] = await quality(streams, model)

    runs, per_round = uvloop.run(
        bench_interleaved(systems, model, workload, workdir / size / "logs", None, after_rounds)
    )
    report = {"workload": {**workload.__dict__, "adapters": len(workload.adapters)}, "runs": {}}
    for key, run in runs.items():
        report["runs"][key] = {
            "tokens_per_s_per_round": [round(r[key], 1) for r in per_round],
            "median_run": summarize(run.results, run.wall),
        }
    for scheme in SCHEMES:
        ratios = [r[scheme] / r["bf16"] for r in per_round]
        report["runs"][scheme]["ratio_vs_bf16_per_round"] = [round(x, 3) for x in ratios]
        report["runs"][scheme]["ratio_vs_bf16"] = round(statistics.median(ratios), 3)
    report["quality_vs_bf16"] = measured["quality"]
    return report


def print_size(size: str, report: dict) -> None:
    print(f"\n== {size}: {report['workload']}")
    print(f"{'base':8} {'tok/s':>8} {'TTFT p50/p99 ms':>17} {'÷ bf16':>7}  top-1 agree  mean KL")
    for key, run in report["runs"].items():
        median = run["median_run"]
        q = report["quality_vs_bf16"].get(key)
        scores = f"{q['top1_agreement']:11.4f}  {q['mean_kl_nats']:.5f}" if q else ""
        print(
            f"{key:8} {median['tokens_per_s']:8.1f} "
            f"{median['ttft_ms']['p50']:8.1f}/{median['ttft_ms']['p99']:<8.1f} "
            f"{run.get('ratio_vs_bf16', 1.0):7.3f}  " + scores
        )
        if "ratio_vs_bf16_per_round" in run:
            print(f"         per round: {run['ratio_vs_bf16_per_round']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,190m", help="comma-separated: tiny, 190m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "quantized")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    report: dict = {"benchmark": "quantized_base", "created": created}
    for size in args.sizes.split(","):
        report[size] = bench_size(size, args.rounds, args.workdir)
        print_size(size, report[size])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
