"""`make demo`: the whole adapter lifecycle on a tiny local base, in a few minutes on a CPU.

1. train a good adapter (QLoRA SFT on the colors task) and a deliberately bad one (the same
   questions with the answers shuffled across animals), in-process with trl + peft;
2. serve the base quantized (a `loraplex quantize` int8 W8A8 copy, by default) behind one
   gateway in registry mode, upload both as `colors`
   candidates, and run the promotion gate (examples/colors/gate.yaml) on each: the good one
   passes and is promoted to production, the bad one is blocked with the reasons;
3. ask `colors` (production) the held-out prompts over gRPC, next to the blocked version and the
   base, and show the registry's record and where the gate's reports are;
4. close the loop: a scripted rater (labelled as such) compares production with the blocked
   version, `eval pairs` turns that into preference pairs, a reward model is trained on them,
   RL (GRPO) from the production SFT adapter against it makes a candidate, and the gate
   (examples/colors/gate_rl.yaml: an independent judge, reward-hacking checks) promotes or
   blocks it, its report showing the lineage SFT -> reward model -> RL.

Finished training runs are reused when their config and inputs did not change, so a second run
skips training. Exits non-zero if anything is off.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.client import AdapterClient, AsyncClient, wait_until_serving
from gateway.console import format_aliases, format_size, format_verdicts
from gateway.contract import CANDIDATE, PRODUCTION
from gateway.process import free_port, kill, start_gateway, stop

# The repository's examples/, or where an image put them (deploy/docker sets LORAPLEX_EXAMPLES).
EXAMPLES = (
    Path(os.environ.get("LORAPLEX_EXAMPLES") or Path(__file__).resolve().parents[1] / "examples")
    / "colors"
)
NAME = "colors"
ACTOR = "demo"
# The same sampling as the gate's preference comparison (examples/colors/gate.yaml).
SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 4, "stop": ["\n"]}


@dataclass(frozen=True)
class Run:
    """One of the demo's training runs."""

    label: str  # good | bad | reward | rl
    config: Path  # an examples/colors/*.yaml run config
    what: str
    expect: str  # the gate verdict it must get ("" for the reward model, any for RL)
    method: Literal["sft", "dpo", "reward", "rl"] = "sft"
    overrides: tuple[str, ...] = ()  # --set overrides (paths known only at run time)


RUNS = (
    Run("good", EXAMPLES / "qlora.yaml", "QLoRA SFT on the colors task (NF4 base)", "pass"),
    Run("bad", EXAMPLES / "shuffled.yaml", "LoRA SFT on shuffled answers", "fail"),
)


# ---------------------------------------------------------------- training


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(config: Any) -> dict[str, Any]:
    """What a run's result depends on besides its config: the base weights, the data, and the
    adapter it starts from and the reward models it is trained against (by content)."""
    from gateway.contract import folder_digest

    files = [f.path for f in config.data.train]
    if config.data.eval_file is not None:
        files.append(config.data.eval_file)
    weights = sorted(Path(config.model.path).glob("*.safetensors"))
    models = [config.lora.init_from] if config.lora.init_from else []
    rl = getattr(config, "rl", None)
    models += [r.reward_model for r in (rl.rewards if rl else []) if r.reward_model]
    return {
        "base": {p.name: _sha256(p) for p in weights},
        "data": {str(p): _sha256(Path(p)) for p in files},
        "models": {str(m): folder_digest(_adapter_folder(Path(m))) for m in models},
    }


def _adapter_folder(path: Path) -> Path:
    """A run folder's adapter/, or the adapter folder itself."""
    return path / "adapter" if (path / "adapter").is_dir() else path


def _reusable(config: Any, adapter_dir: Path, stamp: Path) -> bool:
    """A finished run of exactly this config, on the same base and data."""
    from gateway.contract import base_fingerprint
    from trainer.run import ADAPTER_FILES

    if not all((adapter_dir / name).is_file() for name in (*ADAPTER_FILES, "manifest.json")):
        return False
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text())
        inputs = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("config") == config.model_dump(mode="json")
        and manifest.get("base_fingerprint") == base_fingerprint(Path(config.model.path))
        and inputs == _inputs(config)
    )


def train_adapter(run: Run, base: Path, runs_dir: Path, echo: Callable[[str], None]) -> Path:
    """The run's adapter folder: reused if it is up to date, trained otherwise."""
    from trainer.config import load_config
    from trainer.run import run_dirs, run_training

    out = runs_dir / run.label
    overrides = [f"model.path={base}", f"output_dir={out}", *run.overrides]
    config = load_config(run.method, run.config, overrides=overrides)
    _, adapter_dir = run_dirs(config)
    stamp = out / "demo-inputs.json"
    if _reusable(config, adapter_dir, stamp):
        echo(f"reusing the finished run {out} (same config, base and data)")
        return adapter_dir
    shutil.rmtree(out, ignore_errors=True)  # a stale or interrupted run: start over
    started = time.monotonic()
    result = run_training(config, echo=echo)
    if result.adapter_dir is None:
        raise RuntimeError(f"training of the {run.label} adapter was interrupted")
    stamp.write_text(json.dumps(_inputs(config), indent=2) + "\n")
    seconds = time.monotonic() - started
    echo(f"trained the {run.label} adapter in {seconds:.0f}s ({result.global_step} steps)")
    return result.adapter_dir


# ---------------------------------------------------------------- printing


def _short(path: Path | str) -> str:
    """A path relative to the working directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_gate(console: Console, run: Run, result: Any) -> None:
    report = result.report
    ref = (report.candidate or {}).get("ref", NAME)
    table = Table(title=f"gate on {ref} ({run.label}: {run.what})", title_justify="left")
    for column in ("", "check", "detail"):
        table.add_column(column)
    for check in report.checks:
        mark = (
            "[green]✓[/]"
            if check["passed"]
            else ("[red]✗[/]" if check["required"] else "[yellow]![/]")
        )
        name = check["name"] + ("" if check["required"] else " (optional)")
        table.add_row(mark, Text(name), Text(check["detail"]))
    console.print(table)
    colour = {"pass": "green", "fail": "red"}.get(result.verdict, "yellow")
    promoted = "promoted to production" if result.promoted else "not promoted"
    console.print(f"verdict: [bold {colour}]{result.verdict.upper()}[/], {promoted}")
    if report.error:
        console.print(Text(f"error: {report.error}", style="red"))
    if result.failed_checks:
        names = "; ".join(check.name for check in result.failed_checks)
        console.print(
            Text(f"blocked by {len(result.failed_checks)} failed required checks: {names}")
        )
    if result.report_paths:
        json_path, html_path = result.report_paths
        console.print(Text(f"reports: {_short(html_path)}, {_short(json_path)}"))


async def _ask(target: str, prompts: list[dict], systems: dict[str, str]) -> dict[tuple, Any]:
    """Every prompt to every system at once: one batch, several adapters."""
    async with AsyncClient(target) as client:
        jobs = {
            (label, row["id"]): client.generate(row["prompt"], reference, **SAMPLING)
            for label, reference in systems.items()
            for row in prompts
        }
        replies = await asyncio.gather(*jobs.values())
    return dict(zip(jobs, replies, strict=True))


def _served(reply: Any) -> str:
    return f"{reply.adapter.name}@v{reply.adapter.version}" if reply.adapter.name else "base"


def _print_answers(
    console: Console, prompts: list[dict], systems: dict[str, str], replies: dict, elapsed: float
) -> None:
    table = Table(
        title=f"held-out prompts, {len(replies)} concurrent requests over gRPC in {elapsed:.2f}s",
        title_justify="left",
    )
    table.add_column("prompt")
    table.add_column("reference")
    for label in systems:
        table.add_column(label, no_wrap=True, overflow="ellipsis", max_width=24)
    for row in prompts:
        question = row["prompt"].removeprefix("Q: ").removesuffix("\nA:")
        cells = [Text(question), Text(row["reference"])]
        for label in systems:
            answer = replies[(label, row["id"])].text.strip()
            ok = answer.lower() == row["reference"].strip().lower()
            cells.append(Text(f"{'✓' if ok else '✗'} {answer}", style="green" if ok else "red"))
        table.add_row(*cells)
    scores = []
    for label in systems:
        right = sum(
            replies[(label, r["id"])].text.strip().lower() == r["reference"].strip().lower()
            for r in prompts
        )
        served = sorted({_served(replies[(label, r["id"])]) for r in prompts})
        scores.append(f"{label}: {right}/{len(prompts)} right, served by {', '.join(served)}")
    console.print(table)
    for line in scores:
        console.print(Text(f"  {line}"))


def _print_registry(console: Console, registry: AdapterClient) -> None:
    """The registry's record (`loraplex adapters show colors`), with the gate reports."""
    adapter = registry.get(NAME)
    table = Table(
        title=f"the registry's record of {NAME} (loraplex adapters show {NAME}); "
        f"aliases: {format_aliases(adapter.aliases)}",
        title_justify="left",
    )
    for column in ("version", "aliases", "evaluations", "gate report", "size", "sha256", "by"):
        table.add_column(column)
    for version in adapter.versions:
        reports = [str(dict(e.report).get("report") or "-") for e in version.evaluations]
        table.add_row(
            f"v{version.version}",
            ", ".join(version.aliases) or "-",
            format_verdicts(version),
            Text(", ".join(_short(r) for r in reports) or "-"),
            format_size(version.size_bytes),
            version.sha256[:12],
            version.actor,
        )
    console.print(table)
    for move in reversed(registry.history(NAME, PRODUCTION)):
        before = f"v{move.from_version}" if move.from_version else "(none)"
        console.print(
            Text(f"  {PRODUCTION}: {before} -> v{move.to_version} by {move.actor}: {move.reason}")
        )


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
        console.print(Text(f"  {line}"))


# ---------------------------------------------------------------- the demo


def _quiet_libraries() -> None:
    """Keep the console to the story: no dataset/weight-loading bars, no lm-eval chatter, no
    bitsandbytes hint about an optional CPU kernel package (it falls back to its own)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _lifecycle(
    target: str, adapters: dict[str, Path], policy: Any, reports: Path, console: Console
) -> tuple[list[str], int]:
    """Upload, gate and promote; then query production. Returns what went wrong and the
    blocked (bad) version."""
    from evalsuite.gate import run_gate

    problems: list[str] = []
    versions: dict[str, int] = {}
    with AdapterClient(target, actor=ACTOR) as registry:
        for run in RUNS:
            version = registry.upload(
                NAME,
                adapters[run.label],
                description="answers 'what color is the <animal>?' (demo)",
                owner=ACTOR,
                alias=CANDIDATE,
                source=f"loraplex demo: {run.config.name}",
                metadata={"demo_run": run.label, "config": str(run.config)},
            )
            versions[run.label] = version.version
            console.rule(f"{NAME}@v{version.version}: the {run.label} adapter, as candidate")
            console.print(
                Text(f"uploaded {adapters[run.label]} as {NAME}@v{version.version} (candidate)")
            )
            started = time.monotonic()
            result = run_gate(
                target,
                f"{NAME}@candidate",
                policy,
                out_dir=reports / f"{NAME}-v{version.version}",
                promote=True,
                actor=ACTOR,
            )
            console.print(f"gate ran in {time.monotonic() - started:.0f}s")
            _print_gate(console, run, result)
            gated = (result.report.candidate or {}).get("version")
            if gated != version.version:
                problems.append(f"the gate evaluated v{gated}, not the uploaded v{version.version}")
            if run.expect == "pass" and not (result.verdict == "pass" and result.promoted):
                problems.append(f"the {run.label} adapter was not passed and promoted")
            if run.expect == "fail" and not (result.verdict == "fail" and not result.promoted):
                problems.append(
                    f"the {run.label} adapter was not blocked (verdict {result.verdict})"
                )

        console.rule(f"{NAME} in production")
        production = registry.get(NAME).aliases.get(PRODUCTION)
        if production != versions["good"]:
            problems.append(f"production is v{production}, not the good v{versions['good']}")
        prompts = [
            json.loads(line)
            for line in (EXAMPLES / "prompts.jsonl").read_text().splitlines()
            if line.strip()
        ]
        systems = {
            f"{NAME} (production)": NAME,
            f"{NAME}@v{versions['bad']} (blocked)": f"{NAME}@v{versions['bad']}",
            "base": "",
        }
        sent = time.monotonic()
        replies = asyncio.run(_ask(target, prompts, systems))
        _print_answers(console, prompts, systems, replies, time.monotonic() - sent)
        served = {
            (r.adapter.name, r.adapter.version)
            for (label, _), r in replies.items()
            if label.endswith("(production)")
        }
        if served != {(NAME, versions["good"])}:
            problems.append(f"'{NAME}' was served by {sorted(served)}, not v{versions['good']}")
        _print_registry(console, registry)
    return problems, versions["bad"]


def _rated_prompts(folder: Path) -> Path:
    """The training questions with their answers as references: what the scripted rater knows."""
    rows = [
        json.loads(line)
        for line in (EXAMPLES / "colors_train.jsonl").read_text().splitlines()
        if line.strip()
    ]
    path = folder / "rated_prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "prompt": r["prompt"], "reference": r["completion"].strip()})
            + "\n"
            for i, r in enumerate(rows)
        )
    )
    return path


def _feedback_loop(
    target: str,
    good: Path,
    blocked: int,
    base: Path,
    workdir: Path,
    console: Console,
    echo: Callable[[str], None],
) -> list[str]:
    """Preference evidence -> pairs -> a reward model -> RL from the production SFT adapter ->
    the gate (an independent judge, reward-hacking checks). Returns what went wrong."""
    from evalsuite.compare import compare, load_prompts
    from evalsuite.gate import run_gate
    from evalsuite.judges import make_judge
    from evalsuite.pairs import build_pairs, write_pairs
    from evalsuite.policy import load_policy

    loop = workdir / "loop"
    loop.mkdir(parents=True, exist_ok=True)
    console.rule("feedback: a scripted rater compares production with the blocked version")
    console.print(
        Text(
            "the rater is scripted (labelled as such): it prefers the answer that matches the "
            "training answer (the exact_match judge with references); people's votes "
            "(`loraplex eval export` / `score-votes`) go the same way"
        )
    )
    prompts = load_prompts(_rated_prompts(loop))
    judged = asyncio.run(
        compare(target, NAME, f"{NAME}@v{blocked}", prompts, make_judge("exact_match"),
                SAMPLING, 32, progress=False)
    )  # fmt: skip
    comparison = loop / "comparison.json"
    comparison.write_text(json.dumps(judged.to_dict(), indent=1) + "\n")
    pairs = build_pairs([comparison])
    pairs_file, sidecar = write_pairs(pairs, loop / "pairs.jsonl", force=True)
    counts = next(iter(pairs.counts.values()))
    console.print(
        Text(f"loraplex eval pairs: {counts.describe()} -> {_short(pairs_file)} (provenance: "
             f"{_short(sidecar)})")
    )  # fmt: skip
    if len(pairs.rows) < 20:
        return [f"only {len(pairs.rows)} preference pairs from the comparison"]

    runs = workdir / "runs"
    reward = Run("reward", EXAMPLES / "reward.yaml", "a reward model on those pairs", "",
                 method="reward", overrides=(f"data.train=[{{path: {pairs_file}}}]",))  # fmt: skip
    console.rule(f"training {reward.what}")
    reward_dir = train_adapter(reward, base, runs, echo)
    against = f"rl.rewards=[{{reward_model: {reward_dir}}}]"
    rl = Run("rl", EXAMPLES / "rl.yaml", "RL (GRPO) from production against the reward model",
             "", method="rl", overrides=(f"lora.init_from={good}", against))  # fmt: skip
    console.rule(f"training {rl.what}")
    rl_dir = train_adapter(rl, base, runs, echo)

    with AdapterClient(target, actor=ACTOR) as registry:
        version = registry.upload(
            NAME, rl_dir, description="colors, RL against the reward model (demo)",
            owner=ACTOR, alias=CANDIDATE, source="loraplex demo: rl.yaml",
            metadata={"demo_run": rl.label, "config": str(rl.config)},
        )  # fmt: skip
    console.rule(f"{NAME}@v{version.version}: the RL adapter, as candidate")
    result = run_gate(
        target, f"{NAME}@candidate", load_policy(EXAMPLES / "gate_rl.yaml"),
        out_dir=workdir / "reports" / f"{NAME}-v{version.version}", promote=True, actor=ACTOR,
    )  # fmt: skip
    console.print(Text("lineage: " + " -> ".join(result.report.lineage)))
    _print_gate(console, rl, result)
    problems = []
    if result.verdict not in ("pass", "fail"):
        problems.append(f"the RL candidate's gate ended in {result.verdict}: {result.report.error}")
    if not any(step.startswith("reward: ") for step in result.report.lineage):
        problems.append("the RL candidate's report does not name its reward model")
    return problems


PROGRESS_EVERY_S = 8.0  # the demo never goes quiet for longer while it waits


def _alive_and_telling(
    proc: subprocess.Popen, log_path: Path, console: Console
) -> Callable[[], bool]:
    """`alive` for wait_until_serving that also prints the gateway log's last line now and then
    (loading the engine takes tens of seconds)."""
    started = last = time.monotonic()

    def alive() -> bool:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            lines = log_path.read_text(errors="replace").strip().splitlines() or [""]
            console.print(Text(f"  ... {last - started:.0f}s: {lines[-1][-100:]}", style="dim"))
        return proc.poll() is None

    return alive


def run_demo(workdir: Path, serve_base: str = "w8a8") -> int:
    """The whole demo; returns the process exit code. `serve_base`: w8a8, w4a16 or bf16."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a log file or pipe: rich's default 80 columns squeezes the tables
    started = time.monotonic()
    if not (EXAMPLES / "gate.yaml").is_file():
        console.print(f"[red]demo failed:[/] needs the repository's examples ({EXAMPLES})")
        return 1
    for module in ("torch", "transformers", "peft", "trl", "lm_eval"):  # ~15 s on 2 cores
        console.print(f"loading {module} ...")
        importlib.import_module(module)
    _quiet_libraries()
    from evalsuite.policy import load_policy
    from trainer.tiny import build_tiny_model

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.print("building the tiny base model (a BPE tokenizer and a 2-layer Llama) ...")
    model = build_tiny_model(workdir / "tiny")
    console.print(Text(f"tiny base model: {model.base}"))
    served = model.base
    if serve_base != "bf16":
        from trainer.quantize import quantize_base

        served = model.base.with_name(f"base-{serve_base}")
        quantize_base(model.base, served, serve_base, echo=lambda _: None, reuse=True)  # type: ignore[arg-type]
        console.print(Text(f"served base ({serve_base}, loraplex quantize): {served}"))

    def echo(line: str) -> None:
        console.print(Text(line))

    adapters: dict[str, Path] = {}
    try:
        policy = load_policy(EXAMPLES / "gate.yaml")
        for run in RUNS:
            console.rule(f"training the {run.label} adapter: {run.what}")
            adapters[run.label] = train_adapter(run, model.base, workdir / "runs", echo)
    except (OSError, RuntimeError, ValueError) as exc:  # config, data, policy, run errors
        console.print(Text(f"demo failed: {exc}", style="red"))
        return 1
    console.print(f"adapters ready after {time.monotonic() - started:.0f}s")

    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log_path = workdir / "gateway.log"
    registry_dir, reports = workdir / "registry", workdir / "reports"
    shutil.rmtree(registry_dir, ignore_errors=True)  # a fresh registry (and reports) every run
    shutil.rmtree(reports, ignore_errors=True)
    console.rule("serving")
    proc = start_gateway(
        [
            "--model",
            str(served),
            "--data-dir",
            str(registry_dir),
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
        console.print(
            Text(
                f"starting gateway on {target} ({serve_base} base, registry mode; "
                f"log: {log_path}) ..."
            )
        )
        wait_until_serving(target, timeout=300, alive=_alive_and_telling(proc, log_path, console))
        console.print(f"gateway SERVING after {time.monotonic() - started:.0f}s")
        problems, blocked = _lifecycle(target, adapters, policy, reports, console)
        if not problems:
            problems += _feedback_loop(
                target, adapters["good"], blocked, model.base, workdir, console, echo
            )
        _print_request_counts(metrics_port, console)
    except (OSError, RuntimeError, TimeoutError, ValueError, grpc.RpcError) as exc:
        console.print(Text(f"demo failed: {exc}; gateway log: {log_path}", style="red"))
        kill(proc)
        return 1
    except BaseException:
        kill(proc)  # never leave a gateway behind (Ctrl-C, bugs)
        raise

    code = stop(proc, timeout=60)
    console.print(
        f"gateway exited with {code} after SIGTERM; total {time.monotonic() - started:.0f}s"
    )
    if code != 0:
        problems.append(f"the gateway exited with {code}")
    if problems:
        for problem in problems:
            console.print(Text(f"FAILED: {problem}", style="red"))
        return 1
    console.print(
        "[green]OK[/]: the good adapter passed the gate and serves as production; "
        "the bad one was blocked with its reasons; the comparison became preference pairs, a "
        "reward model and an RL candidate, which the gate judged with an independent judge"
    )
    console.print(Text(f"gate reports: {_short(reports)}/{NAME}-v*/report.html (and report.json)"))
    return 0
