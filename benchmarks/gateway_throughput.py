"""Gateway throughput vs vLLM itself: in-process AsyncLLM, the loraplex gateway, `vllm serve`.

The gateway adds gRPC, a process hop and its own request pipeline on top of vLLM's AsyncLLM;
this measures what that costs (vs AsyncLLM driven in-process, target >= 0.90) and how it
compares with vLLM's own OpenAI-compatible server (target >= 1.0). All three serve the same
tiny model and adapters with the same engine settings and get the same workload (greedy,
ignore_eos, fixed max_tokens, so every system generates exactly the same number of tokens).
By default they run one after another, never two engines at once. With `--interleave` all
start at once and take turns, one timed run each per round, and each ratio is the median of
the rounds' ratios: runs seconds apart compare like with like on a machine whose speed drifts
over minutes. That needs engines that block between steps (the gateway's default on CPU): a
spinning engine is woken by periodic messages while it waits its turn, then spins a second.

    .venv/bin/python benchmarks/gateway_throughput.py            # 256 requests, concurrency 32
    .venv/bin/python benchmarks/gateway_throughput.py --quick    # smoke run
    .venv/bin/python benchmarks/gateway_throughput.py --interleave --repeats 9
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
import yaml
from rich.console import Console
from rich.table import Table

from gateway.config import GatewayConfig
from gateway.engine import engine_environment
from gateway.process import free_port, spawn, stop
from trainer.tiny import CORPUS, TinyModel, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gateway_throughput.json"
DEFAULT_WORKDIR = REPO / "build" / "bench"
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 90.0
PROMPT_WORDS = 24
TARGET_VS_INPROCESS = 0.90
TARGET_VS_VLLM_SERVE = 1.0
FULL = {"requests": 256, "concurrency": 32, "max_tokens": 64}
QUICK = {"requests": 32, "concurrency": 8, "max_tokens": 16}


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Item:
    """One request of the workload; `adapter` "" means the base model."""

    index: int
    adapter: str
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """The one workload definition every system gets (timed items and warm-up items)."""

    requests: int
    concurrency: int
    max_tokens: int
    adapters: tuple[str, ...]
    include_base: bool
    warmup_per_adapter: int
    repeats: int = 1

    @property
    def targets(self) -> tuple[str, ...]:
        """Round-robin order of adapters ("" = base, only with --include-base)."""
        return (*self.adapters, "") if self.include_base else self.adapters

    def items(self) -> list[Item]:
        """Timed requests: distinct prompts of similar length, adapters round-robin."""
        return [self._item(i, "Request", i) for i in range(self.requests)]

    def warmup_items(self) -> list[Item]:
        """Untimed requests, a few per adapter, with prompts the timed run never sends."""
        count = self.warmup_per_adapter * len(self.targets)
        return [self._item(i, "Warm-up", self.requests + i) for i in range(count)]

    def _item(self, index: int, tag: str, seed: int) -> Item:
        words = _corpus_words()
        start = (seed * 37) % (len(words) - PROMPT_WORDS)
        prompt = f"{tag} {index}: " + " ".join(words[start : start + PROMPT_WORDS])
        adapter = self.targets[index % len(self.targets)]
        return Item(index, adapter, prompt, self.max_tokens)


@functools.cache
def _corpus_words() -> list[str]:
    return CORPUS.read_text().split()


# --------------------------------------------------------------------------- measuring


@dataclass
class Delta:
    """What a driver yields per streamed message, whatever the system."""

    token_ids: list[int]
    prompt_tokens: int | None = None
    finish_reason: str | None = None


StreamFn = Callable[[Item], AsyncIterator[Delta]]


@dataclass
class RequestResult:
    """Timings (seconds) and output of one request."""

    ttft: float
    itl: float | None  # mean time between tokens after the first: (last - first) / (n - 1)
    latency: float
    token_ids: list[int]
    prompt_tokens: int | None
    finish_reason: str | None


async def timed_request(stream: StreamFn, item: Item) -> RequestResult:
    """Send one request and time its first and last token."""
    sent = time.perf_counter()
    first = last = None
    token_ids: list[int] = []
    prompt_tokens = finish_reason = None
    async for delta in stream(item):
        if delta.token_ids:
            last = time.perf_counter()
            first = first or last
            token_ids.extend(delta.token_ids)
        prompt_tokens = delta.prompt_tokens if delta.prompt_tokens is not None else prompt_tokens
        finish_reason = delta.finish_reason or finish_reason
    done = time.perf_counter()
    itl = (last - first) / (len(token_ids) - 1) if first and last and len(token_ids) > 1 else None
    return RequestResult(
        ttft=(first or done) - sent,
        itl=itl,
        latency=done - sent,
        token_ids=token_ids,
        prompt_tokens=prompt_tokens,
        finish_reason=finish_reason,
    )


async def run_workload(
    stream: StreamFn, items: list[Item], concurrency: int
) -> tuple[list[RequestResult], float]:
    """Closed loop: `concurrency` workers, each sends its next request when one finishes."""
    pending = iter(items)
    results: dict[int, RequestResult] = {}

    async def worker() -> None:
        for item in pending:  # shared iterator: each item is taken by exactly one worker
            results[item.index] = await timed_request(stream, item)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    wall = time.perf_counter() - started
    return [results[i] for i in sorted(results)], wall


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def summarize(results: list[RequestResult], wall: float) -> dict[str, Any]:
    """The one set of statistics reported for every system."""
    ttft = [r.ttft for r in results]
    itl = [r.itl for r in results if r.itl is not None]
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "requests": len(results),
        "generated_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99))},
        "itl_ms": {"p50": _ms(percentile(itl, 50)), "p99": _ms(percentile(itl, 99))},
        "latency_ms": {"p50": _ms(percentile([r.latency for r in results], 50))},
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in results)),
    }


# --------------------------------------------------------------------------- the systems


class InProcessEngine:
    """AsyncLLM driven directly, with the requests the gateway's engine would make."""

    def __init__(self, llm: Any, model: TinyModel) -> None:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        self.llm = llm
        self.sampling_params, self.delta_kind = SamplingParams, RequestOutputKind.DELTA
        self.loras = {
            name: LoRARequest(name, engine_id, str(path))
            for engine_id, (name, path) in enumerate(sorted(model.adapters.items()), start=1)
        }

    async def load_adapters(self) -> None:
        """The gateway pre-loads its adapters at start the same way."""
        for lora in self.loras.values():
            await self.llm.add_lora(lora)

    async def stream(self, item: Item) -> AsyncIterator[Delta]:
        """One request as DELTA outputs (what the gateway's streaming call uses)."""
        params = self.sampling_params(
            temperature=0.0,
            max_tokens=item.max_tokens,
            ignore_eos=True,
            output_kind=self.delta_kind,
        )
        lora = self.loras.get(item.adapter)
        outputs = self.llm.generate(item.prompt, params, uuid.uuid4().hex, lora_request=lora)
        async for output in outputs:
            completion = output.outputs[0]
            yield Delta(
                list(completion.token_ids),
                len(output.prompt_token_ids or []) if output.finished else None,
                completion.finish_reason,
            )

    def close(self) -> None:
        """Stop the engine core and drop the AsyncLLM.

        vLLM's lazy imports keep a traceback that pins the importing frame, so a lingering
        reference would keep the AsyncLLM until interpreter exit, where its __del__ fails.
        """
        self.llm.shutdown()
        self.llm = None


@asynccontextmanager
async def inprocess_system(
    config: GatewayConfig, model: TinyModel, logs: Path
) -> AsyncIterator[StreamFn]:
    """vLLM's AsyncLLM in this process, built from the gateway's own engine arguments."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from gateway.engine import _engine_args

    args = _engine_args(config, enable_lora=True)
    engine = InProcessEngine(await asyncio.to_thread(AsyncLLM.from_engine_args, args), model)
    try:
        await engine.load_adapters()
        yield engine.stream
    finally:
        engine.close()


@asynccontextmanager
async def gateway_system(
    config: GatewayConfig, model: TinyModel, logs: Path
) -> AsyncIterator[StreamFn]:
    """`loraplex serve` in a subprocess, configured from the same GatewayConfig (YAML file)."""
    from gateway.client import AsyncClient, wait_until_serving
    from loraplex.v1 import generation_pb2 as pb

    port = free_port()
    config_file = logs / "gateway.yaml"
    settings = config.model_copy(update={"port": port}).model_dump(mode="json", exclude_none=True)
    settings["metrics_port"] = config.metrics_port  # null (metrics off) must reach the gateway
    config_file.write_text(yaml.safe_dump(settings))
    # LORAPLEX_* variables would override the file; the gateway must see exactly `config`.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_file)]
    proc = spawn(command, logs / "gateway.log", env)
    target = f"127.0.0.1:{port}"
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        await asyncio.to_thread(wait_until_serving, target, STARTUP_TIMEOUT_S, alive)
        async with AsyncClient(target) as client:

            async def stream(item: Item) -> AsyncIterator[Delta]:
                async for delta in client.stream(
                    item.prompt,
                    item.adapter,
                    temperature=0.0,
                    max_tokens=item.max_tokens,
                    ignore_eos=True,
                ):
                    finish = delta.finish_reason
                    yield Delta(
                        list(delta.token_ids),
                        delta.usage.prompt_tokens if delta.HasField("usage") else None,
                        pb.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
                        if finish
                        else None,
                    )

            stream.target = target  # type: ignore[attr-defined]  # for other clients of it
            yield stream
    finally:
        stop(proc, STOP_TIMEOUT_S)


def vllm_server_command(config: GatewayConfig, model: TinyModel, port: int) -> list[str]:
    """vLLM's OpenAI server with the engine settings the gateway derives from `config`."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model,
        "--dtype",
        config.dtype,
        "--max-model-len",
        str(config.max_model_len),
        "--enable-lora",
        "--max-loras",
        str(config.max_loras),
        "--max-lora-rank",
        str(config.max_lora_rank),
        "--max-logprobs",
        str(config.max_logprobs),
        "--gpu-memory-utilization",
        str(config.gpu_memory_utilization),
        "--seed",
        str(config.seed),
        "--lora-modules",
        *(f"{name}={path}" for name, path in sorted(model.adapters.items())),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",  # the gateway logs nothing per request either
    ]
    optional = {
        "--quantization": config.quantization,
        "--max-cpu-loras": config.max_cpu_loras,
        "--max-num-seqs": config.max_num_seqs,
        "--distributed-executor-backend": config.distributed_executor_backend,
    }
    for flag, value in optional.items():
        if value is not None:
            command += [flag, str(value)]
    if config.enforce_eager:
        command.append("--enforce-eager")
    return command


async def wait_for_health(session: Any, url: str, proc: subprocess.Popen) -> None:
    """Poll GET /health until 200; fail early if the server process died."""
    import aiohttp

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm server exited with {proc.returncode} before it was healthy")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"vllm server not healthy after {STARTUP_TIMEOUT_S:.0f}s")


@asynccontextmanager
async def vllm_serve_system(
    config: GatewayConfig, model: TinyModel, logs: Path
) -> AsyncIterator[StreamFn]:
    """vLLM's OpenAI-compatible server in a subprocess, streaming /v1/completions (aiohttp)."""
    import aiohttp

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = spawn(vllm_server_command(config, model, port), logs / "vllm_serve.log")
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await wait_for_health(session, f"{base_url}/health", proc)

            async def stream(item: Item) -> AsyncIterator[Delta]:
                body = {
                    "model": item.adapter or config.model,
                    "prompt": item.prompt,
                    "max_tokens": item.max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "return_token_ids": True,  # token ids per chunk, as the gateway sends them
                }
                async with session.post(f"{base_url}/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for delta in _sse_deltas(resp.content):
                        yield delta

            yield stream
    finally:
        stop(proc, STOP_TIMEOUT_S)


async def _sse_deltas(lines: AsyncIterator[bytes]) -> AsyncIterator[Delta]:
    """Server-sent completion chunks -> Deltas (the usage chunk carries prompt_tokens)."""
    async for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line.removeprefix(b"data:"))
        for choice in event.get("choices") or ():
            yield Delta(choice.get("token_ids") or [], None, choice.get("finish_reason"))
        if event.get("usage"):
            yield Delta([], event["usage"]["prompt_tokens"])


System = Callable[[GatewayConfig, TinyModel, Path], AbstractAsyncContextManager[StreamFn]]
# Run in this order, one at a time: (key, label, system).
SYSTEMS: list[tuple[str, str, System]] = [
    ("inprocess", "AsyncLLM in-process", inprocess_system),
    ("gateway", "loraplex gateway gRPC", gateway_system),
    ("vllm_serve", "vllm serve HTTP", vllm_serve_system),
]


@dataclass
class SystemRun:
    """One system's measured run, or the error that stopped it."""

    results: list[RequestResult] = field(default_factory=list)  # the median repeat
    wall: float = 0.0
    repeat_tokens_per_s: list[float] = field(default_factory=list)  # every repeat, sorted
    startup_s: float = 0.0
    warmup_s: float = 0.0
    error: str | None = None


async def bench_system(
    system: System, config: GatewayConfig, model: TinyModel, workload: Workload, logs: Path
) -> SystemRun:
    """Start a system, warm it up (adapters loaded, untimed), time the workload, stop it.

    The timed workload runs `repeats` times on the warm engine; the median repeat (by tokens/s)
    is the one reported, since one run of a few seconds on 2 shared cores is noisy.
    """
    run = SystemRun()
    started = time.perf_counter()
    async with system(config, model, logs) as stream:
        run.startup_s = time.perf_counter() - started
        warmup_started = time.perf_counter()
        await run_workload(stream, workload.warmup_items(), workload.concurrency)
        run.warmup_s = time.perf_counter() - warmup_started
        measured = []
        for _ in range(workload.repeats):
            results, wall = await run_workload(stream, workload.items(), workload.concurrency)
            measured.append((sum(len(r.token_ids) for r in results) / wall, results, wall))
    _median_repeat(run, measured)
    return run


INTERLEAVE_PAUSE_S = 1.5  # > vLLM's 1 s busy window after the last step: each run starts quiet


def _median_repeat(
    run: SystemRun, measured: list[tuple[float, list[RequestResult], float]]
) -> None:
    measured = sorted(measured, key=lambda m: m[0])
    _, run.results, run.wall = measured[len(measured) // 2]
    run.repeat_tokens_per_s = [round(m[0], 1) for m in measured]


RunHook = Callable[[str], AbstractContextManager]
"""Given a system's key, a context manager around each of its timed runs."""


async def bench_interleaved(
    systems: list[tuple[str, System, GatewayConfig]],
    model: TinyModel,
    workload: Workload,
    logs: Path,
    around_run: RunHook | None = None,
    after_rounds: Callable[[dict[str, StreamFn]], Awaitable[None]] | None = None,
) -> tuple[dict[str, SystemRun], list[dict[str, float]]]:
    """Start every system, warm each, then take turns: round r times each once, in rotated order.

    Runs seconds apart see the same machine; sequential runs minutes apart do not (this
    machine's speed drifts by 5-10% over minutes). Returns the runs and each round's tok/s.
    `after_rounds` gets the systems' stream functions while they are still up.
    """
    runs = {key: SystemRun() for key, _, _ in systems}
    streams: dict[str, StreamFn] = {}
    measured: dict[str, list] = {key: [] for key, _, _ in systems}
    rounds: list[dict[str, float]] = []
    hook = around_run or (lambda key: nullcontext())
    async with AsyncExitStack() as stack:
        for key, system, config in systems:
            folder = logs / key
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            streams[key] = await stack.enter_async_context(system(config, model, folder))
            runs[key].startup_s = time.perf_counter() - started
            started = time.perf_counter()
            await run_workload(streams[key], workload.warmup_items(), workload.concurrency)
            runs[key].warmup_s = time.perf_counter() - started
        keys = [key for key, _, _ in systems]
        for round_ in range(workload.repeats):
            shift = round_ % len(keys)
            rates = {}
            for key in keys[shift:] + keys[:shift]:
                await asyncio.sleep(INTERLEAVE_PAUSE_S)
                with hook(key):
                    results, wall = await run_workload(
                        streams[key], workload.items(), workload.concurrency
                    )
                rates[key] = sum(len(r.token_ids) for r in results) / wall
                measured[key].append((rates[key], results, wall))
            rounds.append(rates)
        if after_rounds is not None:
            await after_rounds(streams)
    for key in keys:
        _median_repeat(runs[key], measured[key])
    return runs, rounds


# --------------------------------------------------------------------------- reporting


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator["tokens_per_s"] / denominator["tokens_per_s"], 3)


def _same_outputs(runs: dict[str, SystemRun], key: str) -> float | None:
    """Share of requests whose token ids equal the in-process run's (informational)."""
    base, other = runs.get("inprocess"), runs.get(key)
    if not base or not other or base.error or other.error:
        return None
    same = sum(a.token_ids == b.token_ids for a, b in zip(base.results, other.results, strict=True))
    return round(same / len(base.results), 3)


def build_report(
    runs: dict[str, SystemRun],
    config: GatewayConfig,
    workload: Workload,
    rounds: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Everything the run measured, JSON-ready (with `rounds`: the interleaved rounds' ratios)."""
    systems: dict[str, Any] = {}
    for key, label, _ in SYSTEMS:
        run = runs.get(key)
        if run is None:
            continue
        entry: dict[str, Any] = {"label": label, "error": run.error}
        if run.error is None:
            entry |= summarize(run.results, run.wall)
            entry["tokens_per_s_repeats"] = run.repeat_tokens_per_s
            entry |= {"startup_s": round(run.startup_s, 1), "warmup_s": round(run.warmup_s, 1)}
            entry["same_outputs_as_inprocess"] = _same_outputs(runs, key)
        systems[key] = entry
    ok = {k: v for k, v in systems.items() if v["error"] is None}
    token_totals = {k: v["generated_tokens"] for k, v in ok.items()}
    expected = workload.requests * workload.max_tokens
    gateway = ok.get("gateway")
    ratios = {
        "gateway_vs_inprocess": _ratio(gateway, ok.get("inprocess")),
        "gateway_vs_vllm_serve": _ratio(gateway, ok.get("vllm_serve")),
    }
    per_round: dict[str, list[float]] = {}
    for key, other in (
        ("gateway_vs_inprocess", "inprocess"),
        ("gateway_vs_vllm_serve", "vllm_serve"),
    ):
        if rounds and all("gateway" in r and other in r for r in rounds):
            per_round[key] = [round(r["gateway"] / r[other], 3) for r in rounds]
            ratios[key] = round(statistics.median(per_round[key]), 3)  # the paired estimate
    return {
        "benchmark": "gateway_throughput",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": sys.version},
        "engine": config.model_dump(mode="json"),
        "env": engine_environment(config),
        "workload": asdict(workload),
        "systems": systems,
        "ratios": ratios,
        "interleaved": rounds is not None,
        "ratios_per_round": per_round,
        "targets": {
            "gateway_vs_inprocess": TARGET_VS_INPROCESS,
            "gateway_vs_vllm_serve": TARGET_VS_VLLM_SERVE,
        },
        "generated_tokens": {
            "expected": expected,
            "per_system": token_totals,
            "all_equal": len(ok) == len(systems) and set(token_totals.values()) == {expected},
        },
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """The side-by-side table plus the ratio and token-count verdicts."""
    w, e = report["workload"], report["engine"]
    title = (
        f"{w['requests']} requests, concurrency {w['concurrency']}, {len(w['adapters'])} adapters"
        f"{' + base' if w['include_base'] else ''}, {w['max_tokens']} tokens each; "
        f"{e['dtype']}, quantization {e['quantization'] or 'none'}"
    )
    table = Table(title=title)
    for column in ["system", "gen tokens", "wall s", "tok/s", "gateway ÷ this"]:
        table.add_column(column, justify="left" if column == "system" else "right")
    for column in ["TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "start s"]:
        table.add_column(column, justify="right")
    gateway = report["systems"].get("gateway")
    for entry in report["systems"].values():
        if entry["error"]:
            table.add_row(entry["label"], f"[red]failed: {entry['error']}[/]")
            continue
        table.add_row(
            entry["label"],
            str(entry["generated_tokens"]),
            _fmt(entry["wall_s"], 2),
            _fmt(entry["tokens_per_s"]),
            _fmt(_ratio(gateway if gateway and not gateway["error"] else None, entry), 3),
            _fmt(entry["ttft_ms"]["p50"]),
            _fmt(entry["ttft_ms"]["p99"]),
            _fmt(entry["itl_ms"]["p50"]),
            _fmt(entry["itl_ms"]["p99"]),
            _fmt(entry["startup_s"]),
        )
    console.print(table)
    for key, values in report["ratios_per_round"].items():
        console.print(f"{key} per round: {', '.join(f'{v:.3f}' for v in values)}")
    for key, target in report["targets"].items():
        ratio = report["ratios"][key]
        verdict = "n/a" if ratio is None else ("met" if ratio >= target else "NOT met")
        console.print(f"{key}: {_fmt(ratio, 3)} (target >= {target:.2f}: {verdict})")
    tokens = report["generated_tokens"]
    console.print(
        f"generated tokens per system: {tokens['per_system']} "
        f"(expected {tokens['expected']} each: {'equal' if tokens['all_equal'] else 'MISMATCH'})"
    )


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Workload and engine flags; unset workload flags take the --quick or full defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32 requests, c=8, 16 tokens")
    p.add_argument("--requests", type=int, help=f"timed requests (default {FULL['requests']})")
    p.add_argument("--concurrency", type=int, help=f"in flight (default {FULL['concurrency']})")
    p.add_argument("--max-tokens", type=int, help=f"per request (default {FULL['max_tokens']})")
    p.add_argument("--adapters", type=int, default=8, help="adapters, round-robin")
    p.add_argument("--include-base", action="store_true", help="also send requests to the base")
    p.add_argument("--warmup-per-adapter", type=int, default=2, help="untimed warm-up requests")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system; median kept")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start all systems at once and take turns, a run each per round; ratios are the "
        "median of the rounds' ratios (runs seconds apart: the machine's drift cancels)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", default=None, help="e.g. fp8_per_channel (all systems)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument(
        "--executor-backend", choices=["mp", "uni"], default=None, help="default: vLLM's"
    )
    p.add_argument(
        "--engine-spin-wait",
        choices=["on", "off"],
        default=None,
        help="engine processes spin between steps (default: the gateway's: off on CPU)",
    )
    p.add_argument(
        "--systems",
        default=",".join(key for key, _, _ in SYSTEMS),
        help="comma-separated subset of: " + ", ".join(key for key, _, _ in SYSTEMS),
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="tiny model + logs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = p.parse_args(argv)
    if args.interleave and args.engine_spin_wait == "on":
        # Measured (rounds' ratios 0.45-3.7): a spinning engine waiting its turn is not idle.
        # Any message (e.g. the gateway's residency poll) makes its readers spin for a second.
        p.error("--interleave needs engines that block between steps (not --engine-spin-wait on)")
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.systems.split(",")) - {key for key, _, _ in SYSTEMS}
    if unknown:
        p.error(f"unknown systems: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the model, run the systems (in turn or interleaved), print and save the report."""
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    model = build_tiny_model(args.workdir / "tiny", adapters=args.adapters)
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = GatewayConfig(
        model=str(model.base),
        adapters_dir=model.base.parent / "adapters",
        metrics_port=free_port(),  # metrics on, as in production
        quantization=args.quantization,
        dtype=args.dtype,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_space_gib=args.kv_cache_gib,
        distributed_executor_backend=args.executor_backend,
        engine_spin_wait=None if args.engine_spin_wait is None else args.engine_spin_wait == "on",
    )
    # What the gateway sets up for its engine, set for all: the engine processes of the
    # in-process AsyncLLM and of vllm serve (which loads loraplex's plugin too) inherit it.
    os.environ.update(engine_environment(config))
    workload = Workload(
        requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        adapters=tuple(sorted(model.adapters)),
        include_base=args.include_base,
        warmup_per_adapter=args.warmup_per_adapter,
        repeats=args.repeats,
    )
    chosen = args.systems.split(",")
    runs: dict[str, SystemRun] = {}
    rounds: list[dict[str, float]] | None = None
    if args.interleave:
        systems = [(key, system, config) for key, _, system in SYSTEMS if key in chosen]
        console.print(f"interleaved: {', '.join(k for k, _, _ in systems)} (logs in {logs})")
        runs, rounds = uvloop.run(bench_interleaved(systems, model, workload, logs))
    for key, label, system in SYSTEMS:
        if key not in chosen or args.interleave:
            continue
        console.print(f"[bold]{label}[/]: starting (logs in {logs})")
        try:
            # every driver on uvloop, as the gateway and vllm serve are
            runs[key] = uvloop.run(bench_system(system, config, model, workload, logs))
        except Exception as exc:  # noqa: BLE001 - one failed system must not lose the others
            runs[key] = SystemRun(error=f"{type(exc).__name__}: {exc}")
        console.print(f"[bold]{label}[/]: done{' (FAILED)' if runs[key].error else ''}")
    report = build_report(runs, config, workload, rounds)
    print_report(report, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.out}")
    return 0 if report["generated_tokens"]["all_equal"] else 1


if __name__ == "__main__":  # vLLM spawns processes: nothing may run at import time
    sys.exit(main())
