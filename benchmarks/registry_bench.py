"""Registry benchmarks: does request resolution stay flat as the registry grows, and how soon
after RegisterAdapter returns can the new version serve its first token?

`resolution` (no engine): two SQLite registries filled through `RegistryStore` (10 adapters x
10 versions, and 1,000 x 10 = 10,000 versions). For each: `RegistryView.resolve` latency on
random `name` / `name@candidate` / `name@vN` references, snapshot refresh time, and
ListAdapters / GetAdapter latency over real gRPC (the in-process registry server of the unit
tests, fake engine, in a child process). Reports LARGE / SMALL ratios (target: near 1).

`warmup` (real vLLM engine): a `loraplex serve` gateway in registry mode; a warm production
adapter, then rounds of RegisterAdapter with a new artifact (perturbed weights) followed at
once by a request on `name@vN`; first-token time of that request vs the warm adapter's.

    .venv/bin/python benchmarks/registry_bench.py resolution   # no engine, about 1 min
    .venv/bin/python benchmarks/registry_bench.py warmup       # starts one vLLM gateway
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.contract import PRODUCTION, base_fingerprint
from gateway.registry.records import NewVersion
from gateway.registry.store import RegistryStore
from gateway.registry.validate import WEIGHTS_FILE, AdapterFacts
from gateway.registry.view import RegistryView

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORKDIR = REPO / "build" / "bench" / "registry"
TINY_ADAPTERS = 3  # one tiny model (base + 3 adapters) serves both subcommands
ACTOR = "registry-bench"
CANDIDATE = "candidate"
SERVER_START_TIMEOUT_S = 120.0
GATEWAY_START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 300.0
# (rank, target modules), cycled over the fake versions (the tiny model's adapter shapes).
SHAPES: list[tuple[int, tuple[str, ...]]] = [
    (8, ("q_proj", "v_proj")),
    (16, ("k_proj", "o_proj", "q_proj", "v_proj")),
    (4, ("down_proj", "gate_proj", "up_proj")),
]
# Short enough for the fake engine's 64-token context (one token per character) too.
PROMPT = "Once upon a time, the little gateway"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def stats(values: list[float], scale: float, digits: int = 3) -> dict[str, Any]:
    """p50 / p99 / max of `values` multiplied by `scale` (e.g. 1e3 for seconds -> ms)."""

    def scaled(value: float | None) -> float | None:
        return None if value is None else round(value * scale, digits)

    return {
        "n": len(values),
        "p50": scaled(percentile(values, 50)),
        "p99": scaled(percentile(values, 99)),
        "max": scaled(max(values) if values else None),
    }


def host_info(load_at_start: tuple[float, ...]) -> dict[str, Any]:
    """The host, with its load average at the start and end (others' work shows up here)."""
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version,
        "loadavg_1m_start": round(load_at_start[0], 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def console_for_output() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=140)


def build_model(workdir: Path) -> Any:
    """The tiny base + adapters (trainer.tiny is imported here: it pulls in torch)."""
    from trainer.tiny import build_tiny_model

    return build_tiny_model(workdir / "tiny", adapters=TINY_ADAPTERS)


# --------------------------------------------------------------------------- the registry server


def _registry_server_module() -> Any:
    """tests.support.registry_server (the repository root is not on sys.path for a script)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("tests.support.registry_server")


async def _serve_until_told(base_dir: Path, data_dir: Path, conn: Connection) -> None:
    server = await _registry_server_module().start_registry_server(base_dir, data_dir)
    try:
        conn.send(server.target)
        await asyncio.to_thread(conn.recv)  # anything (or EOF) means stop
    except EOFError:
        pass
    finally:
        await server.stop()


def _server_main(base_dir: str, data_dir: str, conn: Connection) -> None:
    asyncio.run(_serve_until_told(Path(base_dir), Path(data_dir), conn))


@contextmanager
def registry_server(base_dir: Path, data_dir: Path) -> Iterator[str]:
    """The unit tests' in-process gateway (real gRPC + registry, fake engine) in a child
    process, so the client's work does not share this process's interpreter and GIL."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_server_main, args=(str(base_dir), str(data_dir), child), daemon=True
    )
    process.start()
    child.close()
    try:
        if not parent.poll(SERVER_START_TIMEOUT_S):
            raise RuntimeError("the registry server did not start in time")
        try:
            target = parent.recv()
        except EOFError:
            raise RuntimeError(f"the registry server exited ({process.exitcode})") from None
        yield target
    finally:
        with suppress(OSError):
            parent.send("stop")
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()


# --------------------------------------------------------------------------- resolution


def adapter_names(count: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(count)]


def populate(url: str, adapters: int, versions: int, fingerprint: str, seed: int) -> list[str]:
    """Fill a registry through RegistryStore, one transaction per change as in production.

    Every version gets its own (fake) sha256; `candidate` holds the latest version, and
    `production` a random earlier one that has a passing evaluation. Returns the names, sorted.
    """
    rng = random.Random(seed)
    names = adapter_names(adapters)
    store = RegistryStore(url)
    try:
        for index, name in enumerate(names):
            for number in range(1, versions + 1):
                rank, modules = SHAPES[(index + number) % len(SHAPES)]
                facts = AdapterFacts(
                    rank=rank,
                    alpha=2.0 * rank,
                    target_modules=modules,
                    size_bytes=rank * len(modules) * 2 * 256 * 4 * 2,
                    base_fingerprint=fingerprint,
                    base_rule="fingerprint",
                    manifest={},
                )
                new = NewVersion(
                    facts=facts,
                    sha256=hashlib.sha256(f"{name}@v{number}".encode()).hexdigest(),
                    source=f"/bench/runs/{name}/{number}",
                    metadata={"run": number, "dataset": "bench"},
                    description=f"benchmark adapter {index}",
                    owner="bench",
                    alias=CANDIDATE if number == versions else "",
                )
                store.add_version(name, new, ACTOR)
            held = rng.randint(1, max(1, versions - 1))
            store.record_evaluation(name, held, "bench-suite", True, {"score": 0.9}, ACTOR)
            store.set_alias(name, PRODUCTION, held, ACTOR, expected=0, reason="benchmark")
    finally:
        store.close()
    return names


def random_refs(names: list[str], versions: int, count: int, rng: random.Random) -> list[str]:
    """`count` references, a third of each form; fresh string objects (a request's reference
    comes from a freshly parsed message, so its hash is never cached)."""
    refs = []
    for _ in range(count):
        name = rng.choice(names)
        form = rng.randrange(3)
        if form == 0:
            ref = name
        elif form == 1:
            ref = f"{name}@{CANDIDATE}"
        else:
            ref = f"{name}@v{rng.randint(1, versions)}"
        refs.append(ref.encode().decode())
    return refs


def time_resolve(view: RegistryView, refs: list[str], batch: int) -> tuple[list[int], list[float]]:
    """Per-call times (ns, perf_counter_ns around each call) of the first half of `refs`, and
    mean ns per lookup of `batch`-sized batches over the second half. GC is off while timing."""
    clock = time.perf_counter_ns
    resolve = view.resolve
    half = len(refs) // 2
    per_call = [0] * half
    batches: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for i in range(half):
            ref = refs[i]
            start = clock()
            resolve(ref)
            per_call[i] = clock() - start
        for i in range(half, len(refs) - batch + 1, batch):
            chunk = refs[i : i + batch]
            start = clock()
            for ref in chunk:
                resolve(ref)
            batches.append((clock() - start) / batch)
    finally:
        gc.enable()
    return per_call, batches


def timer_overhead_ns(samples: int = 100_000) -> float:
    """Median of two back-to-back perf_counter_ns calls: included in every per-call time."""
    clock = time.perf_counter_ns
    values = []
    for _ in range(samples):
        start = clock()
        values.append(clock() - start)
    return statistics.median(values)


async def longest_stall(work: Awaitable[Any], tick_s: float = 0.001) -> float:
    """Await `work` while a task wakes every `tick_s`; returns the longest gap between wake-ups
    (how long the event loop, which serves every token stream, was blocked)."""
    done = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(tick_s)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker start
    try:
        await work
    finally:
        done.set()
        await task
    return max(gaps, default=0.0)


async def time_refresh(
    store: RegistryStore, artifacts: Path, repeats: int
) -> tuple[RegistryView, dict[str, Any]]:
    """A fresh RegistryView; forced refreshes (what every registration and promotion does),
    the longest event-loop stall during one, `store.snapshot()` alone, the change poll (an
    unforced refresh: one generation read), and forced refreshes again after `gc.freeze()`.

    The heap of this process includes torch / transformers / peft (trainer.tiny is imported),
    as a gateway's includes vLLM's, so garbage collections during a refresh cost what they
    would in a gateway; `gc.freeze()` moves the objects alive now out of the collector's way.
    """
    view = RegistryView(store, lambda sha256: artifacts / sha256)
    forced, stalls, snapshots, polls, frozen = [], [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        await view.refresh(force=True)
        forced.append(time.perf_counter() - start)
    for _ in range(repeats):
        stalls.append(await longest_stall(view.refresh(force=True)))
    for _ in range(repeats):
        start = time.perf_counter()
        await asyncio.to_thread(store.snapshot)
        snapshots.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        changed = await view.refresh()
        polls.append(time.perf_counter() - start)
        assert not changed, "the registry changed during the benchmark"
    tracked = len(gc.get_objects())
    gc.collect()
    gc.freeze()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            await view.refresh(force=True)
            frozen.append(time.perf_counter() - start)
    finally:
        gc.unfreeze()
    return view, {
        "refresh_forced_ms": stats(forced, 1e3),
        "refresh_loop_stall_ms": stats(stalls, 1e3),
        "snapshot_read_ms": stats(snapshots, 1e3),
        "poll_ms": stats(polls, 1e3),
        "refresh_forced_gc_frozen_ms": stats(frozen, 1e3),
        "gc_tracked_objects": tracked,
    }


def time_calls(call: Callable[[], int], count: int, warmup: int) -> tuple[list[float], set[int]]:
    """Seconds per call of `count` calls after `warmup` untimed ones; and the sizes returned."""
    for _ in range(warmup):
        call()
    times, sizes = [], set()
    for _ in range(count):
        start = time.perf_counter()
        sizes.add(call())
        times.append(time.perf_counter() - start)
    return times, sizes


def time_rpcs(target: str, names: list[str], calls: int, rng: random.Random) -> dict[str, Any]:
    """ListAdapters and GetAdapter over gRPC, one call at a time, from this process."""
    import grpc

    from loraplex.v1 import adapters_pb2 as apb
    from loraplex.v1 import adapters_pb2_grpc

    warmup = max(10, calls // 10)
    results: dict[str, Any] = {}
    with grpc.insecure_channel(target) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)

        def listing(page_size: int, first_page_only: bool) -> Callable[[], int]:
            # page tokens from which a full page follows ("" is the first page)
            tokens = [""] if first_page_only else ["", *names[: max(0, len(names) - page_size)]]

            def call() -> int:
                request = apb.ListAdaptersRequest(
                    page_size=page_size, page_token=rng.choice(tokens)
                )
                return len(stub.ListAdapters(request, timeout=60).adapters)

            return call

        def get_adapter() -> int:
            request = apb.GetAdapterRequest(name=rng.choice(names))
            return len(stub.GetAdapter(request, timeout=60).adapter.versions)

        def list_all() -> int:
            token, count = "", 0
            while True:
                request = apb.ListAdaptersRequest(page_size=100, page_token=token)
                page = stub.ListAdapters(request, timeout=60)
                count += len(page.adapters)
                token = page.next_page_token
                if not token:
                    return count

        cases: dict[str, tuple[Callable[[], int], int]] = {
            "list_page10_first_ms": (listing(10, True), calls),
            "list_page10_random_ms": (listing(10, False), calls),
            "list_page100_random_ms": (listing(100, False), calls),
            "get_adapter_ms": (get_adapter, calls),
            "list_all_ms": (list_all, max(5, calls // 30)),
        }
        for key, (call, count) in cases.items():
            times, sizes = time_calls(call, count, warmup if key != "list_all_ms" else 2)
            results[key] = {**stats(times, 1e3), "returned": sorted(sizes)}
    return results


def bench_size(
    adapters: int, args: argparse.Namespace, base_dir: Path, fingerprint: str, console: Console
) -> dict[str, Any]:
    """Everything measured at one registry size."""
    data_dir = args.workdir / "resolution" / f"{adapters}x{args.versions}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    url = f"sqlite:///{data_dir / 'registry.db'}"
    rng = random.Random(args.seed)
    started = time.perf_counter()
    names = populate(url, adapters, args.versions, fingerprint, args.seed)
    populate_s = time.perf_counter() - started
    console.print(f"  {adapters} x {args.versions} versions registered in {populate_s:.1f}s")
    store = RegistryStore(url)
    try:
        view, refresh = asyncio.run(
            time_refresh(store, data_dir / "artifacts" / "objects", args.refreshes)
        )
        refs = random_refs(names, args.versions, 2 * args.lookups, rng)
        per_call, batches = time_resolve(view, refs, args.batch)
        references = len(view._refs)  # the size of the lookup table, for the report
    finally:
        store.close()
    console.print(
        f"  resolve and refresh timed; ListAdapters / GetAdapter over gRPC ({args.calls})"
    )
    with registry_server(base_dir, data_dir) as target:
        rpcs = time_rpcs(target, names, args.calls, rng)
    return {
        "adapters": adapters,
        "versions": adapters * args.versions,
        "references": references,
        "populate_s": round(populate_s, 2),
        "resolve_per_call_us": stats([float(v) for v in per_call], 1e-3, 4),
        "resolve_batched_ns": stats(batches, 1.0, 1),
        **refresh,
        **rpcs,
    }


# (key, label) of the rows of the resolution table; values are p50 / p99.
RESOLUTION_ROWS = [
    ("resolve_per_call_us", "resolve, per call (µs)"),
    ("resolve_batched_ns", "resolve, batched (ns per lookup)"),
    ("list_page10_first_ms", "ListAdapters page 10, first page (ms)"),
    ("list_page10_random_ms", "ListAdapters page 10, random full page (ms)"),
    ("list_page100_random_ms", "ListAdapters page 100, random page (ms)"),
    ("get_adapter_ms", "GetAdapter, 10 versions (ms)"),
    ("refresh_forced_ms", "snapshot refresh, forced (ms)"),
    ("snapshot_read_ms", "  store.snapshot() alone (ms)"),
    ("refresh_loop_stall_ms", "  longest event-loop stall in one (ms)"),
    ("refresh_forced_gc_frozen_ms", "  forced, after gc.freeze() (ms)"),
    ("poll_ms", "change poll, unforced refresh (ms)"),
    ("list_all_ms", "list every adapter, pages of 100 (ms)"),
]


def _ratio(large: float | None, small: float | None) -> float | None:
    return None if large is None or not small else round(large / small, 2)


def build_resolution_report(
    sizes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    overhead_ns: float,
    load: tuple[float, ...],
) -> dict[str, Any]:
    small, large = sizes["small"], sizes["large"]
    ratios = {
        key: {q: _ratio(large[key][q], small[key][q]) for q in ("p50", "p99")}
        for key, _ in RESOLUTION_ROWS
    }
    return {
        "benchmark": "registry_resolution",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host_info(load),
        "settings": {
            "versions_per_adapter": args.versions,
            "lookups": args.lookups,
            "batch": args.batch,
            "calls": args.calls,
            "refreshes": args.refreshes,
            "seed": args.seed,
            "database": "SQLite (WAL, synchronous=FULL), one file per size",
        },
        "method": {
            "resolve_per_call": "perf_counter_ns around each RegistryView.resolve call; includes "
            f"the timer's own cost (median {overhead_ns:.0f} ns); GC off while timing",
            "resolve_batched": f"mean ns per lookup over batches of {args.batch} lookups",
            "references": "random name / name@candidate / name@vN (a third each), fresh str "
            "objects (uncached hashes)",
            "rpcs": "sync grpc client in this process; server (tests.support.registry_server: real "
            "gRPC + registry, fake engine) in a child process; one call at a time",
            "list_page100_random": "the small registry has only 10 adapters: it returns 10 per "
            "page where the large one returns 100",
            "list_all": "walks every page: grows with the number of adapters by design",
            "refresh": "RegistryView.refresh(force=True) on a view of its own in this process "
            "(heap includes torch/transformers/peft, GC on); loop stall: the longest gap "
            "between 1 ms ticks of a task on the same loop during one forced refresh; "
            "gc_frozen: the same refresh after gc.collect(); gc.freeze()",
        },
        "timer_overhead_ns": overhead_ns,
        "sizes": sizes,
        "ratios_large_vs_small": ratios,
    }


def _pair(entry: dict[str, Any], digits: int = 3) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return f"{fmt(entry['p50'])} / {fmt(entry['p99'])}"


def print_resolution(report: dict[str, Any], console: Console) -> None:
    small, large = report["sizes"]["small"], report["sizes"]["large"]
    table = Table(title="Registry resolution and listing: p50 / p99")
    table.add_column("measure")
    for size in (small, large):
        table.add_column(
            f"{size['adapters']} adapters, {size['versions']} versions", justify="right"
        )
    table.add_column("large ÷ small", justify="right")
    for key, label in RESOLUTION_ROWS:
        digits = 1 if key == "resolve_batched_ns" else 3
        ratio = report["ratios_large_vs_small"][key]
        table.add_row(label, _pair(small[key], digits), _pair(large[key], digits), _pair(ratio, 2))
    console.print(table)
    console.print(
        f"per-call resolve times include perf_counter_ns itself (median "
        f"{report['timer_overhead_ns']:.0f} ns); references in the lookup table: "
        f"{small['references']} vs {large['references']}; objects tracked by the GC during the "
        f"refreshes: {large['gc_tracked_objects']}; registration of all versions took "
        f"{small['populate_s']}s vs {large['populate_s']}s"
    )


def cmd_resolution(args: argparse.Namespace) -> int:
    load = os.getloadavg()
    console = console_for_output()
    model = build_model(args.workdir)
    fingerprint = base_fingerprint(model.base)
    overhead = timer_overhead_ns()
    sizes = {}
    for label, adapters in (("small", args.small), ("large", args.large)):
        console.print(f"[bold]{label}[/]: {adapters} adapters x {args.versions} versions")
        sizes[label] = bench_size(adapters, args, model.base, fingerprint, console)
    report = build_resolution_report(sizes, args, overhead, load)
    print_resolution(report, console)
    out = args.out or RESULTS / "registry_resolution.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {out}")
    return 0


# --------------------------------------------------------------------------- warm-up


def make_variants(source: Path, out: Path, count: int, noise: float) -> list[Path]:
    """`count` copies of an adapter with noise added to every weight (noise x the tensor's
    std): new artifacts (new sha256) of the same shape, made for the same base."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / WEIGHTS_FILE)
    folders = []
    for k in range(1, count + 1):
        folder = out / f"variant-{k}"
        folder.mkdir(parents=True)
        for path in source.iterdir():
            if path.is_file() and path.name not in (WEIGHTS_FILE, "README.md"):
                shutil.copy(path, folder / path.name)
        generator = torch.Generator().manual_seed(k)
        noisy = {}
        for name, tensor in tensors.items():
            value = tensor.float()
            scale = noise * (float(value.std()) if value.numel() > 1 else 1.0)
            delta = torch.randn(value.shape, generator=generator) * scale
            noisy[name] = (value + delta).to(tensor.dtype).contiguous()
        save_file(noisy, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        folders.append(folder)
    return folders


@dataclass
class FirstToken:
    """One streamed request: seconds from `start` to its first message and first token."""

    message_s: float
    token_s: float
    adapter: str
    version: int
    tokens: int


def first_token(client: Any, ref: str, max_tokens: int, start: float | None = None) -> FirstToken:
    """Stream `PROMPT` on `ref` to the end; time from `start` (default: now) to the first
    message and to the first message carrying tokens."""
    begin = time.perf_counter() if start is None else start
    first_message = first_tok = None
    adapter, version, tokens = "", 0, 0
    stream = client.stream(
        PROMPT,
        ref,
        timeout=REQUEST_TIMEOUT_S,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
    )
    for message in stream:
        now = time.perf_counter()
        if first_message is None:
            first_message = now
            adapter, version = message.adapter.name, message.adapter.version
        if message.token_ids and first_tok is None:
            first_tok = now
        tokens += len(message.token_ids)
    if first_message is None:
        raise RuntimeError(f"{ref}: the stream ended without a message")
    return FirstToken(
        message_s=first_message - begin,
        token_s=(first_tok or first_message) - begin,
        adapter=adapter,
        version=version,
        tokens=tokens,
    )


@contextmanager
def real_gateway(model: Any, data_dir: Path, args: argparse.Namespace, log: Path) -> Iterator[str]:
    """`loraplex serve` in registry mode (no --adapters-dir) on a fresh data dir."""
    from gateway.client import wait_until_serving
    from gateway.process import free_port, kill, start_gateway, stop

    port = free_port()
    flags = [
        "--model", str(model.base),
        "--data-dir", str(data_dir),
        "--port", str(port),
        "--dtype", args.dtype,
        "--max-model-len", str(args.max_model_len),
        "--max-loras", str(args.max_loras),
        "--max-lora-rank", str(args.max_lora_rank),
        "--kv-cache-space-gib", f"{args.kv_cache_gib:g}",
    ]  # fmt: skip
    if args.max_cpu_loras is not None:
        flags += ["--max-cpu-loras", str(args.max_cpu_loras)]
    if args.quantization:
        flags += ["--quantization", args.quantization]
    # LORAPLEX_* variables would override the flags (a data dir, a registry URL, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    process = start_gateway(flags, log, env)
    target = f"127.0.0.1:{port}"
    try:
        alive = lambda: process.poll() is None  # noqa: E731
        wait_until_serving(target, GATEWAY_START_TIMEOUT_S, alive)
    except (TimeoutError, RuntimeError) as exc:
        kill(process)
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"gateway did not start ({exc}); log:\n{tail}") from None
    try:
        yield target
    finally:
        code = stop(process, STOP_TIMEOUT_S)
        if code != 0:
            print(f"warning: the gateway exited {code}; log: {log}", file=sys.stderr)


def measure_warmup(
    target: str, warm_source: Path, variants: list[Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Warm adapter first; then per round: a request on it, RegisterAdapter of a new version,
    at once a request on `name@vN` (timed from Register returning), and a second one."""
    from gateway.client import AdapterClient, Client

    warm, fresh = "bench-warm", "bench-new"
    rounds = []
    with (
        AdapterClient(target, actor=ACTOR, timeout=REQUEST_TIMEOUT_S) as registry,
        Client(target) as client,
    ):
        version = registry.register(warm, warm_source, source="registry_bench warm").version
        registry.set_alias(warm, PRODUCTION, version, force=True, reason="benchmark baseline")
        for _ in range(args.warm_requests):
            served = first_token(client, warm, args.max_tokens)
            if (served.adapter, served.version) != (warm, version):
                raise RuntimeError(f"{warm} served by {served.adapter}@v{served.version}")
        for k, folder in enumerate(variants, start=1):
            baseline = first_token(client, warm, args.max_tokens)
            started = time.perf_counter()
            number = registry.register(fresh, folder, source=f"registry_bench round {k}").version
            registered = time.perf_counter()
            ref = f"{fresh}@v{number}"
            first = first_token(client, ref, args.max_tokens, start=registered)
            second = first_token(client, ref, args.max_tokens)
            if (first.adapter, first.version) != (fresh, number):
                raise RuntimeError(f"{ref} served by {first.adapter}@v{first.version}")
            rounds.append(
                {
                    "round": k,
                    "ref": ref,
                    "register_ms": round((registered - started) * 1e3, 2),
                    "new_first_ms": round(first.token_s * 1e3, 2),
                    "new_first_message_ms": round(first.message_s * 1e3, 2),
                    "new_second_ms": round(second.token_s * 1e3, 2),
                    "warm_ms": round(baseline.token_s * 1e3, 2),
                    "new_tokens": first.tokens,
                }
            )
    return rounds


def build_warmup_report(
    rounds: list[dict[str, Any]], args: argparse.Namespace, load: tuple[float, ...]
) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 2)

    medians = {
        key: median(key) for key in ("register_ms", "new_first_ms", "new_second_ms", "warm_ms")
    }
    engine: str | dict[str, Any] = {
        "dtype": args.dtype,
        "quantization": args.quantization,
        "max_model_len": args.max_model_len,
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "max_lora_rank": args.max_lora_rank,
        "kv_cache_gib": args.kv_cache_gib,
    }
    if args.fake_engine:
        engine = "fake (tests.support.fakes.FakeEngine): smoke test only, timings mean nothing"
    return {
        "benchmark": "registry_warmup",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host_info(load),
        "engine": engine,
        "settings": {
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "warm_requests": args.warm_requests,
            "noise": args.noise,
            "prompt": PROMPT,
        },
        "method": "new_first: from RegisterAdapter returning (client side) to the first streamed "
        "message with tokens of a GenerateStream on name@vN; warm: the same request on the "
        "warm production adapter, sent just before the registration in each round; "
        "new_second: a second request on name@vN right after the first",
        "medians": medians,
        "ratio_new_vs_warm": round(medians["new_first_ms"] / medians["warm_ms"], 2),
        "rounds": rounds,
    }


def print_warmup(report: dict[str, Any], console: Console) -> None:
    table = Table(title="First token after RegisterAdapter vs a warm adapter (ms)")
    columns = ["round", "register", "new: 1st request", "new: 2nd request", "warm", "new ÷ warm"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in report["rounds"]:
        table.add_row(
            str(r["round"]),
            f"{r['register_ms']:.1f}",
            f"{r['new_first_ms']:.1f}",
            f"{r['new_second_ms']:.1f}",
            f"{r['warm_ms']:.1f}",
            f"{r['new_first_ms'] / r['warm_ms']:.2f}",
        )
    m = report["medians"]
    table.add_row(
        "median",
        f"{m['register_ms']:.1f}",
        f"{m['new_first_ms']:.1f}",
        f"{m['new_second_ms']:.1f}",
        f"{m['warm_ms']:.1f}",
        f"{report['ratio_new_vs_warm']:.2f}",
    )
    console.print(table)
    if isinstance(report["engine"], str):  # the fake engine
        console.print(f"[yellow]{report['engine']}[/]")


def cmd_warmup(args: argparse.Namespace) -> int:
    load = os.getloadavg()
    console = console_for_output()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"  # the child inherits it
    model = build_model(args.workdir)
    work = args.workdir / "warmup"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = model.adapters[args.adapter]
    variants = make_variants(source, work / "variants", args.rounds, args.noise)
    data_dir = work / "data"
    if args.fake_engine:
        gateway = registry_server(model.base, data_dir)
        console.print("[bold]fake engine[/]: in-process registry server (smoke test only)")
    else:
        gateway = real_gateway(model, data_dir, args, work / "gateway.log")
        console.print(f"[bold]loraplex serve[/] (registry mode): starting, log {work}/gateway.log")
    with gateway as target:
        rounds = measure_warmup(target, source, variants, args)
    report = build_warmup_report(rounds, args, load)
    print_warmup(report, console)
    default = "registry_warmup_fake.json" if args.fake_engine else "registry_warmup.json"
    out = args.out or RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {out}")
    return 0


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)

    r = commands.add_parser(
        "resolution", help="registry size vs resolve / list latency (no engine)"
    )
    r.add_argument("--small", type=int, default=10, help="adapters in the small registry")
    r.add_argument("--large", type=int, default=1000, help="adapters in the large registry")
    r.add_argument("--versions", type=int, default=10, help="versions per adapter")
    r.add_argument("--lookups", type=int, default=200_000, help="timed resolves per method")
    r.add_argument("--batch", type=int, default=1000, help="lookups per batch (batched timing)")
    r.add_argument("--calls", type=int, default=300, help="timed gRPC calls per measure")
    r.add_argument("--refreshes", type=int, default=20, help="timed snapshot refreshes")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(run=cmd_resolution)

    w = commands.add_parser("warmup", help="first token after RegisterAdapter (real engine)")
    w.add_argument("--rounds", type=int, default=5, help="new versions registered and timed")
    w.add_argument("--warm-requests", type=int, default=3, help="untimed requests on the warm one")
    w.add_argument("--max-tokens", type=int, default=1, help="tokens per request")
    w.add_argument("--adapter", default="alpha", help="tiny adapter the versions are made from")
    w.add_argument("--noise", type=float, default=0.01, help="weight noise, x each tensor's std")
    w.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    w.add_argument("--quantization", default=None, help="e.g. fp8_per_channel")
    w.add_argument("--max-model-len", type=int, default=512)
    w.add_argument("--max-loras", type=int, default=4, help="the gateway's default")
    w.add_argument("--max-cpu-loras", type=int, default=None, help="default: max-loras")
    w.add_argument("--max-lora-rank", type=int, default=16)
    w.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    w.add_argument(
        "--fake-engine",
        action="store_true",
        help="run the same steps against the in-process server with a fake engine (checks the "
        "script without vLLM; its timings mean nothing)",
    )
    w.set_defaults(run=cmd_warmup)

    for sub in (r, w):
        sub.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="models + data")
        sub.add_argument("--out", type=Path, default=None, help="JSON results path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # the registry server runs in a spawned child: nothing at import time
    sys.exit(main())
