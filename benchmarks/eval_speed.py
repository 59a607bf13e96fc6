"""The same lm-eval tasks and adapter, side by side: through the gateway vs lm-eval's `hf`
backend with `peft=` (goal: the gateway path >= 3x faster), and the scores of both.

The tiny model (`trainer.tiny`) with an adapter trained once on examples/colors (`sft.yaml`,
reused if present); the tasks shipped in examples/colors/tasks: `colors_mc` (loglikelihood),
`heldout_ppl` (loglikelihood_rolling) and `colors_qa` (generate_until). One system at a time:

1. `lm_eval.simple_evaluate(model="hf", model_args="pretrained=BASE,peft=ADAPTER,
   dtype=float32,device=cpu", batch_size=32)`, timed from the call to its return (model load
   included), after one untimed eval with limit 1 (the process's one-time costs);
2. `loraplex serve` (float32, directory mode; `--cpu-reserved-cores 0`, so vLLM computes on
   both cores as hf does, where its default keeps one for the frontend) is started and warmed
   up with one request of each kind (both timed, reported apart), then
   `simple_evaluate(model="loraplex", model_args="target=...,adapter=colors")` is timed the
   same way.

The backend scores a question's one-token choices in one request (`logprob_token_ids`, no
prompt logprobs). Then, on the same gateway, the cost of prompt logprobs with LoRA: `colors_mc`
alone scored choice by choice with prompt logprobs (`group_choices=false`), with the adapter vs
with the base model (`adapter=""`), and grouped with the adapter, alternating; and the same texts
as direct 1-token requests with and without prompt logprobs (no lm-eval).

    .venv/bin/python benchmarks/eval_speed.py --repeats 5     # all three tasks
    .venv/bin/python benchmarks/eval_speed.py --limit 4       # smoke run, about 2 min
    .venv/bin/python benchmarks/eval_speed.py --base build/bench/llama-190m   # a bigger base
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "colors"
TASKS_DIR = EXAMPLES / "tasks"
SFT_CONFIG = EXAMPLES / "sft.yaml"
DEFAULT_WORKDIR = REPO / "build" / "bench" / "eval_speed"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "eval_speed.json"
ALL_TASKS = ("colors_mc", "heldout_ppl", "colors_qa")
LOGPROB_TASK = "colors_mc"  # loglikelihood: every request asks for prompt logprobs
ADAPTER = "colors"  # the trained adapter's name in the gateway's adapters directory
GOAL = 3.0  # hf time / gateway time
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr estimates, as evalsuite's gate (default 100k is slow)
REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 90.0
WARMUP_PROMPT = "Once upon a time, in a small town by the sea,"


# --------------------------------------------------------------------------- model and adapter


@dataclass
class Prepared:
    base: Path
    adapter: Path  # the adapter (peft folder), as hf's peft= loads it
    adapters_dir: Path  # the gateway's directory mode: adapters_dir/ADAPTER is a copy of it
    adapter_info: dict[str, Any]  # how the adapter was made


def random_adapter(base: Path, out: Path) -> dict[str, Any]:
    """A random LoRA for any base (r 16, all linear layers, B@A non-zero), made once."""
    if not (out / "adapter_model.safetensors").is_file():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.name_or_path = str(base)  # peft copies this into base_model_name_or_path
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
            lora_dropout=0.0,
            init_lora_weights=False,  # nn.Linear's init for A and B: the adapter changes outputs
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    return {"random_adapter": str(out), "r": 16, "target_modules": "all-linear"}


def with_adapters_dir(base: Path, adapter: Path, workdir: Path, info: dict[str, Any]) -> Prepared:
    """The gateway's adapters directory: a copy of `adapter` named ADAPTER."""
    adapters_dir = workdir / "adapters"
    shutil.rmtree(adapters_dir, ignore_errors=True)
    shutil.copytree(adapter, adapters_dir / ADAPTER)
    return Prepared(base, adapter, adapters_dir, info)


def prepare(workdir: Path, echo: Callable[[str], None], base: Path | None) -> Prepared:
    """The tiny base and the colors adapter trained on it once (reused when present); or, with
    `base`, that model and a random adapter made for it (scores then only show agreement)."""
    if base is not None:
        base = base.resolve()
        adapter = workdir / f"random-adapter-{base.name}"
        return with_adapters_dir(base, adapter, workdir, random_adapter(base, adapter))
    from trainer.tiny import build_tiny_model

    tiny = build_tiny_model(workdir / "tiny", adapters=0)
    run_dir = workdir / "colors-sft"
    adapter = run_dir / "adapter"
    training: dict[str, Any] = {"config": str(SFT_CONFIG.relative_to(REPO)), "reused": True}
    if not (adapter / "adapter_model.safetensors").is_file():
        from trainer.config import load_config
        from trainer.run import run_training

        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run's checkpoints
        config = load_config(
            "sft", SFT_CONFIG, overrides=[f"model.path={tiny.base}", f"output_dir={run_dir}"]
        )
        echo(f"training the {ADAPTER} adapter ({SFT_CONFIG.relative_to(REPO)}) ...")
        start = time.perf_counter()
        result = run_training(config, echo=lambda line: echo(f"  {line}"))
        training = {**training, "reused": False, "seconds": round(time.perf_counter() - start, 1)}
        if result.adapter_dir is None:
            raise RuntimeError("training was interrupted")
    manifest = adapter / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        training["wall_time_s"] = written.get("wall_time_s")
        training["eval_loss"] = written.get("metrics", {}).get("eval", {}).get("eval_loss")
    return with_adapters_dir(tiny.base, adapter, workdir, training)


# --------------------------------------------------------------------------- timed evaluations


class RequestTimer:
    """While active: times an LM class's construction and request methods, keeps instances."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.seconds: dict[str, float] = defaultdict(float)
        self.requests: dict[str, int] = defaultdict(int)  # lm-eval Instances per method
        self.instances: list[Any] = []
        self._saved: dict[str, Any] = {}

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(instance: Any, *args: Any, **kwargs: Any) -> Any:
            if name != "__init__" and args:
                self.requests[name] += len(args[0])
            start = time.perf_counter()
            try:
                return method(instance, *args, **kwargs)
            finally:
                self.seconds["load" if name == "__init__" else name] += time.perf_counter() - start
                if name == "__init__":
                    self.instances.append(instance)

        return timed

    def __enter__(self) -> RequestTimer:
        for name in ("__init__", *REQUEST_METHODS):
            self._saved[name] = self.cls.__dict__.get(name)  # None: inherited
            setattr(self.cls, name, self._wrap(name, getattr(self.cls, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(self.cls, name)
            else:
                setattr(self.cls, name, original)


@dataclass
class EvalRun:
    wall_s: float
    load_s: float  # constructing the LM (hf: loading base + adapter; loraplex: GetModelInfo)
    request_s: dict[str, float]  # time inside each request method (the model's work)
    metrics: dict[str, dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "load_s": round(self.load_s, 3),
            "request_s": {k: round(v, 3) for k, v in self.request_s.items()},
            "metrics": self.metrics,
            **self.info,
        }


def scores(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric,filter: value}} without stderr entries."""
    return {
        task: {
            key: float(value)
            for key, value in sorted(values.items())
            if "," in key and "_stderr" not in key and isinstance(value, int | float)
        }
        for task, values in sorted(output["results"].items())
    }


def evaluate(
    model: str,
    model_args: str,
    lm_class: type,
    tasks: list[str],
    manager: Any,
    limit: int | None,
    batch_size: int | str | None = None,
) -> EvalRun:
    """One timed `lm_eval.simple_evaluate` (the model is built inside it, from its name)."""
    import lm_eval

    with RequestTimer(lm_class) as timer:
        start = time.perf_counter()
        output = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            verbosity="WARNING",
        )
        wall = time.perf_counter() - start
    info: dict[str, Any] = {}
    for lm in timer.instances:
        if hasattr(lm, "served_versions"):  # loraplex: the adapter versions that answered
            info["served_versions"] = sorted(lm.served_versions)
        if hasattr(lm, "batch_size_per_gpu"):  # hf: the batch size (and any detected ones)
            info["batch_size"] = lm.batch_size_per_gpu
            if getattr(lm, "batch_sizes", None):
                info["detected_batch_sizes"] = dict(lm.batch_sizes)
    timer.instances.clear()
    info["requests"] = dict(timer.requests)
    run = EvalRun(
        wall,
        timer.seconds.get("load", 0.0),
        {k: v for k, v in timer.seconds.items() if k != "load"},
        scores(output),
        info,
    )
    del output
    gc.collect()  # the hf model goes before anything else runs
    return run


def median_run(runs: list[EvalRun]) -> EvalRun:
    """The run with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.wall_s)
    return ordered[(len(ordered) - 1) // 2]


# --------------------------------------------------------------------------- the gateway


@contextmanager
def running_gateway(
    prepared: Prepared, logs: Path, reserved_cores: int | None
) -> Iterator[tuple[str, float]]:
    """`loraplex serve` (float32, directory mode); yields (target, start-up seconds)."""
    from gateway.client import wait_until_serving
    from gateway.process import free_port, kill, start_gateway, stop

    port = free_port()
    args = [
        "--model", str(prepared.base),
        "--adapters-dir", str(prepared.adapters_dir),
        "--dtype", "float32",
        "--port", str(port),
        "--metrics-port", str(free_port()),
    ]  # fmt: skip
    if reserved_cores is not None:
        args += ["--cpu-reserved-cores", str(reserved_cores)]
    # LORAPLEX_* variables would add settings the report does not show.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    log = logs / "gateway.log"
    start = time.perf_counter()
    process = start_gateway(args, log, env)
    target = f"127.0.0.1:{port}"
    try:
        try:
            alive = lambda: process.poll() is None  # noqa: E731
            wait_until_serving(target, timeout=STARTUP_TIMEOUT_S, alive=alive)
        except (TimeoutError, RuntimeError):
            kill(process)
            raise RuntimeError(f"gateway did not start; log:\n{log.read_text()[-4000:]}") from None
        yield target, time.perf_counter() - start
    finally:
        code = stop(process, STOP_TIMEOUT_S)
        if code != 0:
            print(f"warning: the gateway exited {code}; log: {log}", file=sys.stderr)


def warm_up(target: str) -> dict[str, float]:
    """One request of each kind, one at a time, timed: what a cold gateway pays once (loading
    the adapter, the first prompt-logprob and generation steps), kept out of the eval time."""
    from gateway.client import Client

    steps = {
        "base": ("", {}),
        "adapter": (ADAPTER, {}),
        "adapter_prompt_logprobs": (ADAPTER, {"prompt_logprobs": 0}),
        "base_prompt_logprobs": ("", {"prompt_logprobs": 0}),
    }
    timings = {}
    with Client(target) as client:
        for name, (adapter, options) in steps.items():
            start = time.perf_counter()
            client.generate(WARMUP_PROMPT, adapter, timeout=300, max_tokens=1, temperature=0.0,
                            **options)  # fmt: skip
            timings[name] = round(time.perf_counter() - start, 3)
    return timings


def colors_mc_texts(limit: int | None) -> list[str]:
    """The strings colors_mc scores (each question followed by each color), from its loader."""
    spec = importlib.util.spec_from_file_location("colors_task_loaders", TASKS_DIR / "loaders.py")
    assert spec is not None and spec.loader is not None
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    docs = list(loaders.colors_mc()["test"])[:limit]
    return [f"{d['prompt']} {choice}" for d in docs for choice in d["choices"]]


def probe_once(
    target: str, texts: list[str], adapter: str, prompt_logprobs: bool, concurrency: int
) -> float:
    """Seconds for one burst of 1-token requests on `texts`, `concurrency` in flight."""
    from gateway.client import AsyncClient

    options: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0}
    if prompt_logprobs:
        options["prompt_logprobs"] = 0

    async def burst() -> float:
        limit = asyncio.Semaphore(concurrency)
        async with AsyncClient(target) as client:

            async def one(text: str) -> None:
                async with limit:
                    await client.generate(text, adapter, timeout=300, **options)

            start = time.perf_counter()
            await asyncio.gather(*(one(text) for text in texts))
            return time.perf_counter() - start

    return asyncio.run(burst())


def probe(target: str, texts: list[str], repeats: int, concurrency: int) -> dict[str, Any]:
    """The engine alone (no lm-eval): adapter vs base, with and without prompt logprobs, on the
    same texts. Separates what LoRA costs any request from what the prompt-logprob path adds."""
    conditions = {
        "adapter_prompt_logprobs": (ADAPTER, True),
        "base_prompt_logprobs": ("", True),
        "adapter_no_logprobs": (ADAPTER, False),
        "base_no_logprobs": ("", False),
    }
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(repeats):
        for name, (adapter, logprobs) in conditions.items():
            times[name].append(probe_once(target, texts, adapter, logprobs, concurrency))
    med = {name: statistics.median(values) for name, values in times.items()}
    return {
        "requests": len(texts),
        "seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "median_s": {name: round(v, 3) for name, v in med.items()},
        "adapter_vs_base_prompt_logprobs": ratio(
            med["adapter_prompt_logprobs"], med["base_prompt_logprobs"]
        ),
        "adapter_vs_base_no_logprobs": ratio(med["adapter_no_logprobs"], med["base_no_logprobs"]),
        "prompt_logprobs_vs_none_adapter": ratio(
            med["adapter_prompt_logprobs"], med["adapter_no_logprobs"]
        ),
        "prompt_logprobs_vs_none_base": ratio(med["base_prompt_logprobs"], med["base_no_logprobs"]),
    }


# --------------------------------------------------------------------------- report


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def host_info(load_at_start: tuple[float, ...]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "loadavg_1m_start": round(load_at_start[0], 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def score_rows(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """Every metric of both runs, with the absolute difference."""
    rows = []
    for task in sorted(set(a) | set(b)):
        for key in sorted(set(a.get(task, {})) | set(b.get(task, {}))):
            x, y = a.get(task, {}).get(key), b.get(task, {}).get(key)
            diff = abs(x - y) if x is not None and y is not None else None
            rows.append({"task": task, "metric": key, "hf": x, "gateway": y, "abs_diff": diff})
    return rows


def seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def print_report(console: Console, report: dict[str, Any]) -> None:
    hf, gw = report["hf"], report["gateway"]
    table = Table(title=f"{', '.join(report['tasks'])}; limit {report['limit']}")
    columns = ("system", "eval wall s (repeats)", "median", "load / start-up s", "requests s (n)")
    for column in columns:
        table.add_column(column)
    for label, system, extra in (
        (f"hf + peft (batch {report['settings']['hf_batch_size']})", hf, "load"),
        (f"gateway (concurrency {report['settings']['concurrency']})", gw, "startup"),
    ):
        median = system["median"]
        counts = median["requests"]
        requests = ", ".join(
            f"{k} {v:.2f} ({counts.get(k, 0)})" for k, v in median["request_s"].items()
        )
        first = (
            f"{median['load_s']:.2f}"
            if extra == "load"
            else f"{system['startup_s']:.1f} + {sum(system['warmup_s'].values()):.1f} warm-up"
        )
        table.add_row(
            label,
            seconds([r["wall_s"] for r in system["runs"]]),
            f"{median['wall_s']:.2f}",
            first,
            requests,
        )
    console.print(table)
    speed = report["speedup"]
    verdict = "met" if (speed["eval"] or 0) >= GOAL else "MISSED"
    console.print(
        f"hf ÷ gateway eval time = {speed['eval']} (goal >= {GOAL:g}: {verdict}); "
        f"including the gateway's start-up and warm-up: {speed['with_startup']}; "
        f"request time only: {speed['requests']}"
    )
    table = Table(title="scores")
    for column in ("task", "metric", "hf + peft", "gateway", "|diff|"):
        table.add_column(column)
    for row in report["scores"]:
        cells = [row["hf"], row["gateway"], row["abs_diff"]]
        table.add_row(
            row["task"], row["metric"], *("-" if c is None else f"{c:.6g}" for c in cells)
        )
    console.print(table)
    cost = report.get("prompt_logprobs_lora")
    if cost:
        table = Table(title=f"{LOGPROB_TASK} through the gateway, per choice and grouped")
        for column in ("adapter", "loglikelihood s (repeats)", "median", "eval wall median", "acc"):
            table.add_column(column)
        sides = (
            ("colors, per choice", cost["adapter"]),
            ("base, per choice", cost["base"]),
            ("colors, grouped", cost["adapter_grouped"]),
        )
        for label, side in sides:
            table.add_row(
                label,
                seconds(side["loglikelihood_s"]),
                f"{side['median_loglikelihood_s']:.2f}",
                f"{side['median_wall_s']:.2f}",
                f"{side['acc']:.3f}" if side["acc"] is not None else "-",
            )
        console.print(table)
        console.print(
            f"per choice, adapter ÷ base: loglikelihood time {cost['ratio_loglikelihood']}, "
            f"eval wall time {cost['ratio_wall']} ({cost['requests']} requests each); "
            f"grouped ÷ per choice (adapter): {cost['ratio_grouped_vs_per_choice']}"
        )
        direct = cost["direct"]
        table = Table(title=f"the same {direct['requests']} texts as direct 1-token requests")
        for column in ("", "prompt logprobs s (repeats)", "median", "none s (repeats)", "median"):
            table.add_column(column)
        for label, key in (("colors", "adapter"), ("base", "base")):
            with_lp, without = f"{key}_prompt_logprobs", f"{key}_no_logprobs"
            table.add_row(
                label,
                seconds(direct["seconds"][with_lp]),
                f"{direct['median_s'][with_lp]:.2f}",
                seconds(direct["seconds"][without]),
                f"{direct['median_s'][without]:.2f}",
            )
        console.print(table)
        console.print(
            f"adapter ÷ base: {direct['adapter_vs_base_prompt_logprobs']} with prompt logprobs, "
            f"{direct['adapter_vs_base_no_logprobs']} without; prompt logprobs ÷ none: "
            f"{direct['prompt_logprobs_vs_none_adapter']} (adapter), "
            f"{direct['prompt_logprobs_vs_none_base']} (base)"
        )


# --------------------------------------------------------------------------- main


def batch_size_arg(value: str) -> int | str:
    return value if value.startswith("auto") else int(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated lm-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="documents per task (smoke runs)")
    p.add_argument("--repeats", type=int, default=1, help="timed evals per system (median)")
    p.add_argument(
        "--logprob-repeats", type=int, default=3, help="adapter/base pairs of the logprob test"
    )
    p.add_argument("--hf-batch-size", type=batch_size_arg, default=32, help="int or auto")
    p.add_argument("--concurrency", type=int, default=32, help="loraplex backend requests")
    p.add_argument("--skip-logprob-cost", action="store_true")
    p.add_argument(
        "--cpu-reserved-cores",
        type=int,
        default=0,
        help="the gateway's cores without compute threads (default 0: the engine computes on "
        "every core, as hf does; -1: vLLM's default, one core kept for the frontend)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="another base model folder (with a random r=16 adapter) instead of the tiny model",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.logprob_repeats < 1:
        p.error("--repeats and --logprob-repeats must be >= 1")
    console = Console() if sys.stdout.isatty() else Console(width=140)
    load_at_start = os.getloadavg()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import evalsuite  # noqa: F401  (registers the `loraplex` lm-eval backend)
    from evalsuite.lm_eval_backend import LoraplexLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        p.error(f"unknown task(s) {unknown}")
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args.workdir, console.print, args.base)

    hf_args = f"pretrained={prepared.base},peft={prepared.adapter},dtype=float32,device=cpu"
    # Untimed: what any first eval in a process pays once (lazy imports, first forward passes).
    console.print("hf + peft: warm-up eval (limit 1, untimed in the ratio)")
    hf_warmup = evaluate("hf", hf_args, HFLM, tasks, manager, 1, args.hf_batch_size)
    hf_runs = []
    for i in range(args.repeats):
        console.print(f"hf + peft: eval {i + 1}/{args.repeats}")
        hf_runs.append(
            evaluate("hf", hf_args, HFLM, tasks, manager, args.limit, args.hf_batch_size)
        )

    gateway_runs: list[EvalRun] = []
    # per-choice prompt logprobs with the adapter and the base; grouped choices with the adapter
    logprob_sides = {
        "adapter": (ADAPTER, False),
        "base": ("", False),
        "adapter_grouped": (ADAPTER, True),
    }
    logprob_runs: dict[str, list[EvalRun]] = {side: [] for side in logprob_sides}
    reserved = None if args.cpu_reserved_cores < 0 else args.cpu_reserved_cores
    with running_gateway(prepared, logs, reserved) as (target, startup_s):
        console.print(f"gateway SERVING at {target} after {startup_s:.1f}s")
        warmup = warm_up(target)
        console.print(f"warm-up requests (s): {warmup}")
        for i in range(args.repeats):
            console.print(f"gateway: eval {i + 1}/{args.repeats}")
            gateway_args = f"target={target},adapter={ADAPTER},concurrency={args.concurrency}"
            gateway_runs.append(
                evaluate("loraplex", gateway_args, LoraplexLM, tasks, manager, args.limit)
            )
        if not args.skip_logprob_cost:
            for i in range(args.logprob_repeats):
                for side, (adapter, grouped) in logprob_sides.items():
                    console.print(f"{LOGPROB_TASK} ({side}): {i + 1}/{args.logprob_repeats}")
                    model_args = (
                        f"target={target},adapter={adapter},concurrency={args.concurrency},"
                        f"group_choices={grouped}"
                    )
                    logprob_runs[side].append(
                        evaluate(
                            "loraplex", model_args, LoraplexLM, [LOGPROB_TASK], manager, args.limit
                        )
                    )
            console.print("prompt logprobs: direct requests, without lm-eval")
            texts = colors_mc_texts(args.limit)
            direct = probe(target, texts, args.logprob_repeats, args.concurrency)

    hf_median, gw_median = median_run(hf_runs), median_run(gateway_runs)
    hf_requests, gw_requests = sum(hf_median.request_s.values()), sum(gw_median.request_s.values())
    report: dict[str, Any] = {
        "benchmark": "eval_speed",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host_info(load_at_start),
        "tasks": tasks,
        "limit": args.limit,
        "settings": {
            "hf_model_args": hf_args,
            "hf_batch_size": args.hf_batch_size,
            "gateway": "loraplex serve --dtype float32 --adapters-dir (directory mode)",
            "gateway_cpu_reserved_cores": "vLLM's default" if reserved is None else reserved,
            "adapter": ADAPTER,
            "concurrency": args.concurrency,
            "bootstrap_iters": BOOTSTRAP_ITERS,
            "repeats": args.repeats,
        },
        "base": str(prepared.base),
        "adapter": prepared.adapter_info,
        "hf": {
            "warmup_wall_s": round(hf_warmup.wall_s, 3),
            "runs": [r.to_dict() for r in hf_runs],
            "median": hf_median.to_dict(),
        },
        "gateway": {
            "startup_s": round(startup_s, 2),
            "warmup_s": warmup,
            "runs": [r.to_dict() for r in gateway_runs],
            "median": gw_median.to_dict(),
        },
        "speedup": {
            "eval": ratio(hf_median.wall_s, gw_median.wall_s),
            "with_startup": ratio(
                hf_median.wall_s, gw_median.wall_s + startup_s + sum(warmup.values())
            ),
            "requests": ratio(hf_requests, gw_requests),
            "goal": GOAL,
        },
        "scores": score_rows(hf_median.metrics, gw_median.metrics),
    }
    if logprob_runs["adapter"]:
        sides = {}
        for side, runs in logprob_runs.items():
            times = [r.request_s.get("loglikelihood", 0.0) for r in runs]
            sides[side] = {
                "loglikelihood_s": [round(t, 3) for t in times],
                "wall_s": [round(r.wall_s, 3) for r in runs],
                "median_loglikelihood_s": round(statistics.median(times), 3),
                "median_wall_s": round(statistics.median(r.wall_s for r in runs), 3),
                "acc": runs[0].metrics.get(LOGPROB_TASK, {}).get("acc,none"),
                "served_versions": runs[0].info.get("served_versions"),
            }
        report["prompt_logprobs_lora"] = {
            "task": LOGPROB_TASK,
            # The same requests on both sides: the gateway's tokenizer does not depend on the
            # adapter.
            "requests": logprob_runs["adapter"][0].info["requests"].get("loglikelihood"),
            **sides,
            "ratio_loglikelihood": ratio(
                sides["adapter"]["median_loglikelihood_s"], sides["base"]["median_loglikelihood_s"]
            ),
            "ratio_wall": ratio(sides["adapter"]["median_wall_s"], sides["base"]["median_wall_s"]),
            "ratio_grouped_vs_per_choice": ratio(
                sides["adapter_grouped"]["median_loglikelihood_s"],
                sides["adapter"]["median_loglikelihood_s"],
            ),
            "direct": direct,
        }
    print_report(console, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":  # the gateway runs in a child process; nothing runs at import time
    sys.exit(main())
