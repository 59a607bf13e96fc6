"""The promotion gate's report: the decision record as JSON, and one self-contained HTML page.

The page has to survive being opened from disk, attached to a ticket or archived for years, so it
holds no external URLs, no JavaScript and no web fonts: inline CSS and inline SVG charts only.
Prompts, answers and judge details are untrusted model output, so every string taken from the
report goes through `html.escape` before it reaches the page.

    json_path, html_path = write_report(report, Path("reports/colors-v3"))
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evalsuite.gate_report import GateReport
from evalsuite.stats import OUTCOME_LOSS, OUTCOME_TIE, OUTCOME_WIN
from gateway.contract import VERDICTS

MAX_EXAMPLES = 5  # per side (wins, losses): enough to see a pattern, short enough to read
MAX_TEXT_CHARS = 4000  # longer prompts/answers are cut on the page; report.json keeps them whole

# Bars per benchmark, in this order; any other score names follow in a neutral colour.
_SERIES_COLORS = {"candidate": "#2563eb", "production": "#f59e0b", "base": "#9ca3af"}
_OTHER_COLOR = "#6b7280"
_WIN_COLOR, _TIE_COLOR, _LOSS_COLOR = "#16a34a", "#9ca3af", "#dc2626"
_THRESHOLD_COLOR = "#7c3aed"

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: #111827; background: #f9fafb; margin: 0; line-height: 1.45; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 32px 0 12px; border-bottom: 1px solid #e5e7eb;
     padding-bottom: 4px; }
h3 { font-size: 1rem; margin: 0 0 6px; }
header { display: flex; gap: 24px; align-items: flex-start; justify-content: space-between;
         flex-wrap: wrap; }
.meta { color: #4b5563; font-size: 0.92rem; margin: 2px 0; }
.badge { font-size: 2rem; font-weight: 700; letter-spacing: 0.06em; color: #fff;
         padding: 10px 28px; border-radius: 10px; text-align: center; }
.badge-pass { background: #16a34a; }
.badge-fail { background: #dc2626; }
.badge-error, .badge-unknown { background: #6b7280; }
.error-box { background: #f3f4f6; border-left: 4px solid #6b7280; padding: 10px 14px;
             margin: 16px 0; white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular,
             Menlo, Consolas, monospace; font-size: 0.88rem; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 0.9rem; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #e5e7eb;
         vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed-required td { background: #fee2e2; }
tr.failed-required td:first-child { border-left: 4px solid #dc2626; }
tr.failed-optional td { background: #fef3c7; }
.status { font-weight: 700; white-space: nowrap; }
.status-pass { color: #15803d; }
.status-fail { color: #b91c1c; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr));
          gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #e5e7eb; border-radius: 8px;
         padding: 12px; }
figcaption { font-size: 0.85rem; color: #4b5563; margin-top: 4px; }
svg { display: block; width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
.direction { font-size: 0.78rem; font-weight: 600; color: #92400e; background: #fef3c7;
             border-radius: 4px; padding: 1px 6px; margin-left: 6px; }
.legend span { display: inline-block; margin-right: 14px; font-size: 0.85rem; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
          margin-right: 4px; vertical-align: baseline; }
.example { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 10px 14px;
           margin: 10px 0; }
.example-win { border-left: 4px solid #16a34a; }
.example-loss { border-left: 4px solid #dc2626; }
.example dt { font-weight: 600; font-size: 0.82rem; color: #4b5563; margin-top: 8px; }
.example dd { margin: 2px 0 0; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; background: #f9fafb;
      padding: 6px 8px; border-radius: 4px; font-family: ui-monospace, SFMono-Regular, Menlo,
      Consolas, monospace; font-size: 0.84rem; }
details > summary { cursor: pointer; font-weight: 600; }
footer { margin-top: 40px; color: #9ca3af; font-size: 0.8rem; }
"""


# --- small helpers -----------------------------------------------------------------------------


def _esc(value: Any) -> str:
    """Any report value as escaped text (None as empty): nothing from the report is trusted."""
    return "" if value is None else html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite number, or None: charts must not choke on strings, bools, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    """A score for humans: 4 significant digits, whole numbers past 1000 (perplexities)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _json(value: Any) -> str:
    """Pretty JSON for <pre> blocks; default=str so odd values never stop the page."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _clip(text: Any) -> str:
    """Long model output is cut on the page (report.json keeps it whole)."""
    text = "" if text is None else str(text)
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return f"{text[:MAX_TEXT_CHARS]}\n… (cut: {len(text)} characters in total, see report.json)"


def _ref(side: Any) -> str:
    """A side of the comparison ({"ref", "version"} or a bare string) as plain text."""
    if isinstance(side, dict):
        ref = side.get("ref")
        version = side.get("version")
        # "colors@v3" already says version 3; an alias such as "colors@candidate" does not.
        if ref is not None and version is not None and not str(ref).endswith(f"v{version}"):
            return f"{ref} (version {version})"
        return str(ref if ref is not None else version if version is not None else "?")
    return "?" if side is None else str(side)


def _svg(width: int, height: int, label: str, body: Iterable[str]) -> str:
    """An inline SVG (no xmlns: HTML5 does not need it, and the page holds no URLs at all)."""
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_esc(label)}"><title>{_esc(label)}</title>{"".join(body)}</svg>'
    )


def _text(x: float, y: float, text: str, anchor: str = "start", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12"{extra}>'
        f"{_esc(text)}</text>"
    )


# --- header, verdict, checks -------------------------------------------------------------------


def _header(report: dict) -> str:
    adapter = report.get("adapter")
    production = report.get("production")
    versus = _ref(production) if production else "no production version yet"
    timing = []
    if report.get("started"):
        timing.append(f"started {_esc(report['started'])}")
    if report.get("finished"):
        timing.append(f"finished {_esc(report['finished'])}")
    wall = _num(report.get("wall_seconds"))
    if wall is not None:
        timing.append(f"{wall:.1f} s")
    verdict = str(report.get("verdict") or "unknown")
    kind = verdict if verdict in VERDICTS else "unknown"
    parts = [
        "<header><div>",
        f"<h1>Promotion gate: {_esc(adapter if adapter is not None else '?')}</h1>",
        f'<p class="meta">candidate <strong>{_esc(_ref(report.get("candidate")))}</strong>'
        f" vs production <strong>{_esc(versus)}</strong></p>",
    ]
    if timing:
        parts.append(f'<p class="meta">{" · ".join(timing)}</p>')
    steps = [str(step) for step in _list(report.get("lineage"))]
    if steps:
        parts.append(f'<p class="meta" id="lineage">lineage: {_esc(" → ".join(steps))}</p>')
    parts.append(
        f'</div><div class="badge badge-{kind}" id="verdict">{_esc(verdict.upper())}</div></header>'
    )
    if report.get("error") is not None or verdict == "error":
        message = report.get("error") or "(no error message recorded)"
        parts.append(f'<div class="error-box"><strong>Error:</strong> {_esc(message)}</div>')
    return "".join(parts)


def _check_rank(check: dict) -> int:
    """Failed required checks decide the verdict, so they come first; then other failures."""
    if check.get("passed"):
        return 2
    return 0 if check.get("required", True) else 1


def _checks(report: dict) -> str:
    checks = [c for c in _list(report.get("checks")) if isinstance(c, dict)]
    if not checks:
        return "<h2>Checks</h2><p>No checks were evaluated.</p>"
    rows = []
    for check in sorted(checks, key=_check_rank):  # sorted() is stable: policy order kept
        rank = _check_rank(check)
        css = ("failed-required", "failed-optional", "passed")[rank]
        status = "PASS" if rank == 2 else "FAIL"
        rows.append(
            f'<tr class="{css}"><td class="status status-{status.lower()}">{status}</td>'
            f"<td>{_esc(check.get('name'))}</td><td>{_esc(check.get('kind'))}</td>"
            f"<td>{'required' if check.get('required', True) else 'advisory'}</td>"
            f'<td class="num">{_esc(_fmt(check.get("value")))}</td>'
            f'<td class="num">{_esc(_fmt(check.get("threshold")))}</td>'
            f"<td>{_esc(check.get('detail'))}</td></tr>"
        )
    failed = sum(1 for c in checks if _check_rank(c) == 0)
    summary = (
        f"{failed} required check{'s' if failed != 1 else ''} failed"
        if failed
        else "all required checks passed"
    )
    return (
        f'<h2>Checks</h2><p class="meta">{len(checks)} checks; {summary}.</p>'
        "<table><thead><tr><th>Status</th><th>Check</th><th>Kind</th><th>Required</th>"
        "<th>Value</th><th>Threshold</th><th>Reason</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# --- benchmarks --------------------------------------------------------------------------------


def _benchmark_chart_svg(benchmark: dict) -> str:
    """Horizontal grouped bars (candidate / production / base) scaled to this benchmark's own
    range, so a perplexity of 40 and an accuracy of 0.8 both fill their charts."""
    scores = _dict(benchmark.get("scores"))
    names = [n for n in _SERIES_COLORS if n in scores]
    names += [n for n in scores if n not in _SERIES_COLORS]
    values = [_num(scores[n]) for n in names]
    finite = [v for v in values if v is not None]
    lo = min([0.0, *finite])
    hi = max([0.0, *finite])
    if hi == lo:
        hi = lo + 1.0
    width, label_w, value_w, row_h, bar_h, top = 440, 92, 64, 28, 18, 6
    plot_w = width - label_w - value_w
    height = top * 2 + row_h * max(len(names), 1)

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    zero = x(0.0)
    body = []
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        y = top + i * row_h
        mid = y + row_h / 2 + 4
        body.append(_text(label_w - 8, mid, name, "end", fill="#374151"))
        if value is None:
            body.append(_text(zero + 4, mid, f"n/a ({scores[name]!r})"[:40], fill="#6b7280"))
            continue
        left, right = sorted((zero, x(value)))
        color = _SERIES_COLORS.get(name, _OTHER_COLOR)
        body.append(
            f'<rect x="{left:.1f}" y="{y + (row_h - bar_h) / 2:.1f}" width="{right - left:.1f}" '
            f'height="{bar_h}" fill="{color}" rx="2"><title>{_esc(name)}: {_esc(_fmt(value))}'
            "</title></rect>"
        )
        body.append(_text((right if value >= 0 else zero) + 4, mid, _fmt(value), fill="#111827"))
    if not names:
        body.append(_text(label_w, top + row_h / 2 + 4, "no scores recorded", fill="#6b7280"))
    body.append(
        f'<line x1="{zero:.1f}" y1="{top}" x2="{zero:.1f}" y2="{height - top}" '
        'stroke="#374151" stroke-width="1"/>'
    )
    task, metric = benchmark.get("task", "?"), benchmark.get("metric", "?")
    return _svg(width, height, f"{task} {metric}", body)


def _delta_note(benchmark: dict) -> str:
    """Candidate minus production/base, worded by the metric's direction."""
    scores = _dict(benchmark.get("scores"))
    candidate = _num(scores.get("candidate"))
    if candidate is None:
        return ""
    higher = benchmark.get("higher_is_better", True) is not False
    notes = []
    for other in ("production", "base"):
        value = _num(scores.get(other))
        if value is None:
            continue
        delta = candidate - value
        better = delta > 0 if higher else delta < 0
        word = "same as" if delta == 0 else "better than" if better else "worse than"
        notes.append(f"{word} {other} ({'+' if delta >= 0 else ''}{_fmt(delta)})")
    return "candidate: " + "; ".join(notes) if notes else ""


def _benchmarks(report: dict) -> str:
    benchmarks = [b for b in _list(report.get("benchmarks")) if isinstance(b, dict)]
    if not benchmarks:
        return ""
    figures = []
    for bench in benchmarks:
        direction = (
            '<span class="direction">lower is better</span>'
            if bench.get("higher_is_better") is False
            else ""
        )
        note = _delta_note(bench)
        figures.append(
            f"<figure><h3>{_esc(bench.get('task', '?'))} · {_esc(bench.get('metric', '?'))}"
            f"{direction}</h3>{_benchmark_chart_svg(bench)}"
            + (f"<figcaption>{_esc(note)}</figcaption>" if note else "")
            + "</figure>"
        )
    legend = "".join(
        f'<span><i class="swatch" style="background:{color}"></i>{name}</span>'
        for name, color in _SERIES_COLORS.items()
    )
    return (
        f'<h2>Benchmarks</h2><p class="legend">{legend}</p>'
        f'<div class="charts">{"".join(figures)}</div>'
    )


# --- preference --------------------------------------------------------------------------------


def _counts(preference: dict) -> dict:
    """The summary, or one rebuilt from the pairs' outcomes when the summary is missing."""
    summary = _dict(preference.get("summary"))
    if summary:
        return summary
    outcomes = [_num(_dict(p).get("outcome")) for p in _list(preference.get("pairs"))]
    wins = outcomes.count(OUTCOME_WIN)
    ties = outcomes.count(OUTCOME_TIE)
    losses = outcomes.count(OUTCOME_LOSS)
    n = wins + ties + losses
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": (wins + ties / 2) / n if n else None,
    }


def _outcome_bar_svg(summary: dict) -> str:
    """Wins / ties / losses as one stacked bar, counts written on segments wide enough."""
    counts = [
        ("wins", int(_num(summary.get("wins")) or 0), _WIN_COLOR),
        ("ties", int(_num(summary.get("ties")) or 0), _TIE_COLOR),
        ("losses", int(_num(summary.get("losses")) or 0), _LOSS_COLOR),
    ]
    total = sum(c for _, c, _ in counts)
    width, height, pad = 600, 40, 2
    body = []
    if total <= 0:
        body.append(_text(width / 2, 24, "no judged pairs", "middle", fill="#6b7280"))
        return _svg(width, height, "wins, ties and losses", body)
    x = float(pad)
    span = width - 2 * pad
    for name, count, color in counts:
        if count <= 0:
            continue
        w = count / total * span
        body.append(
            f'<rect x="{x:.1f}" y="4" width="{w:.1f}" height="{height - 8}" fill="{color}">'
            f"<title>{count} {name}</title></rect>"
        )
        if w >= 56:
            body.append(_text(x + w / 2, 24, f"{count} {name}", "middle", fill="#fff"))
        elif w >= 14:
            body.append(_text(x + w / 2, 24, str(count), "middle", fill="#fff"))
        x += w
    return _svg(
        width, height, f"{counts[0][1]} wins, {counts[1][1]} ties, {counts[2][1]} losses", body
    )


def _win_rate_svg(summary: dict, threshold: float | None) -> str:
    """The win rate as a point with its confidence interval on a 0..1 axis; dashed lines at 0.5
    (no preference) and at the policy's threshold, so "clears the bar" is visible at a glance."""
    width, height, x0, x1 = 600, 82, 24.0, 576.0
    y_thr, y_val, y_ci, y_axis, y_tick = 11, 25, 38, 56, 72

    def x(v: float) -> float:
        return x0 + min(max(v, 0.0), 1.0) * (x1 - x0)

    body = [f'<line x1="{x0}" y1="{y_axis}" x2="{x1}" y2="{y_axis}" stroke="#374151"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        body.append(
            f'<line x1="{x(tick):.1f}" y1="{y_axis}" x2="{x(tick):.1f}" y2="{y_axis + 5}" '
            'stroke="#374151"/>'
        )
        body.append(_text(x(tick), y_tick, f"{tick:g}", "middle", fill="#4b5563"))
    body.append(
        f'<line x1="{x(0.5):.1f}" y1="{y_thr + 4}" x2="{x(0.5):.1f}" y2="{y_axis}" '
        'stroke="#6b7280" stroke-dasharray="4 3"/>'
    )
    if threshold is not None:
        tx = x(threshold)
        anchor = "end" if threshold > 0.8 else "start"
        body.append(
            f'<line x1="{tx:.1f}" y1="{y_thr + 4}" x2="{tx:.1f}" y2="{y_axis}" '
            f'stroke="{_THRESHOLD_COLOR}" stroke-width="1.5" stroke-dasharray="6 3"/>'
        )
        body.append(
            _text(
                tx + (-4 if anchor == "end" else 4),
                y_thr + 2,
                f"policy threshold {_fmt(threshold)}",
                anchor,
                fill=_THRESHOLD_COLOR,
            )
        )
    low, high = _num(summary.get("ci_low")), _num(summary.get("ci_high"))
    if low is not None and high is not None:
        a, b = x(min(low, high)), x(max(low, high))
        body.append(
            f'<line x1="{a:.1f}" y1="{y_ci}" x2="{b:.1f}" y2="{y_ci}" stroke="#1f2937" '
            'stroke-width="2"/>'
        )
        for end in (a, b):
            body.append(
                f'<line x1="{end:.1f}" y1="{y_ci - 6}" x2="{end:.1f}" y2="{y_ci + 6}" '
                'stroke="#1f2937" stroke-width="2"/>'
            )
    rate = _num(summary.get("win_rate"))
    if rate is not None:
        body.append(
            f'<circle cx="{x(rate):.1f}" cy="{y_ci}" r="5.5" fill="#2563eb" stroke="#fff" '
            f'stroke-width="1.5"><title>win rate {_esc(_fmt(rate))}</title></circle>'
        )
        body.append(_text(x(rate), y_val, _fmt(rate), "middle", fill="#111827", font_weight="600"))
    else:
        body.append(_text(x(0.5), y_val, "no win rate", "middle", fill="#6b7280"))
    return _svg(width, height, "win rate with confidence interval", body)


def _preference_threshold(report: dict) -> float | None:
    """The threshold of the first "preference" check, if the policy set one."""
    for check in _list(report.get("checks")):
        if isinstance(check, dict) and check.get("kind") == "preference":
            threshold = _num(check.get("threshold"))
            if threshold is not None:
                return threshold
    return None


def _example(pair: dict, kind: str) -> str:
    detail = pair.get("detail", pair.get("judge"))  # compare.py's to_dict() names it "judge"
    fields = [("Prompt", pair.get("prompt"))]
    if pair.get("reference") is not None:
        fields.append(("Reference", pair.get("reference")))
    fields += [
        ("Candidate answer", pair.get("candidate")),
        ("Baseline answer", pair.get("baseline")),
    ]
    items = "".join(f"<dt>{label}</dt><dd><pre>{_esc(_clip(v))}</pre></dd>" for label, v in fields)
    if detail is not None:
        shown = detail if isinstance(detail, str) else _json(detail)
        items += f"<dt>Judge detail</dt><dd><pre>{_esc(_clip(shown))}</pre></dd>"
    return (
        f'<div class="example example-{kind}"><h3>{kind} · prompt {_esc(pair.get("id", "?"))}</h3>'
        f"<dl>{items}</dl></div>"
    )


def _examples(pairs: list) -> str:
    pairs = [p for p in pairs if isinstance(p, dict)]
    wins = [p for p in pairs if _num(p.get("outcome")) == OUTCOME_WIN][:MAX_EXAMPLES]
    losses = [p for p in pairs if _num(p.get("outcome")) == OUTCOME_LOSS][:MAX_EXAMPLES]
    if not wins and not losses:
        return ""
    parts = []
    for title, chosen, kind in (("Wins", wins, "win"), ("Losses", losses, "loss")):
        if chosen:
            parts.append(f"<h3>{title} (first {len(chosen)})</h3>")
            parts.extend(_example(p, kind) for p in chosen)
    return "".join(parts)


def _preference(report: dict) -> str:
    preference = _dict(report.get("preference"))
    if not preference:
        return ""
    summary = _counts(preference)
    threshold = _preference_threshold(report)
    confidence = _num(summary.get("confidence"))
    low, high = _num(summary.get("ci_low")), _num(summary.get("ci_high"))
    facts = [f"n = {_fmt(summary.get('n'))}", f"win rate {_fmt(summary.get('win_rate'))}"]
    if low is not None and high is not None:
        level = f"{confidence:.0%} " if confidence is not None else ""
        facts.append(f"{level}CI {_fmt(low)} – {_fmt(high)}")
    if summary.get("sign_test_p") is not None:
        facts.append(f"sign test p = {_fmt(summary.get('sign_test_p'))}")
    if threshold is not None:
        facts.append(f"policy threshold {_fmt(threshold)}")
    legend = "".join(
        f'<span><i class="swatch" style="background:{color}"></i>{name}</span>'
        for name, color in (("win", _WIN_COLOR), ("tie", _TIE_COLOR), ("loss", _LOSS_COLOR))
    )
    return (
        "<h2>Preference comparison</h2>"
        f'<p class="meta">candidate <strong>{_esc(preference.get("candidate", "?"))}</strong> vs '
        f"baseline <strong>{_esc(preference.get('baseline', '?'))}</strong>, judged by "
        f"<strong>{_esc(preference.get('judge', '?'))}</strong> (ties count as half a win)</p>"
        f"<figure>{_outcome_bar_svg(summary)}"
        f'<figcaption class="legend">{legend}</figcaption></figure>'
        f'<figure style="margin-top:12px">{_win_rate_svg(summary, threshold)}'
        f"<figcaption>{_esc('; '.join(facts))}</figcaption></figure>"
        f"{_behaviour(preference)}"
        f"{_examples(_list(preference.get('pairs')))}"
    )


def _behaviour(preference: dict) -> str:
    """Response length and diversity of both systems, and whether the judge is independent."""
    stats = _dict(preference.get("behaviour"))
    lines = []
    if stats:
        n = _num(stats.get("distinct_n")) or 2
        key = f"distinct_{n:g}"
        candidate, baseline = _dict(stats.get("candidate")), _dict(stats.get("baseline"))
        lines.append(
            f"mean words {_fmt(candidate.get('mean_words'))} vs {_fmt(baseline.get('mean_words'))}"
            f" (ratio {_fmt(stats.get('length_ratio'))}); distinct-{n:g} "
            f"{_fmt(candidate.get(key))} vs {_fmt(baseline.get(key))} "
            f"(ratio {_fmt(stats.get('distinct_ratio'))}), candidate vs baseline"
        )
    independence = preference.get("judge_independence")
    if isinstance(independence, str) and independence != "independent":
        lines.append(f"not independent: {independence}")
    return "".join(f'<p class="meta">{_esc(line)}</p>' for line in lines)


def _policy(report: dict) -> str:
    if report.get("policy") is None:
        return ""
    return (
        f"<h2>Policy</h2><details><summary>Policy as applied</summary>"
        f"<pre>{_esc(_json(report['policy']))}</pre></details>"
    )


# --- public API --------------------------------------------------------------------------------


def render_html(report: dict) -> str:
    """A report's JSON form (`GateReport.to_dict`, or a report.json read back) as one
    self-contained HTML page; missing optional parts are simply left out."""
    title = f"{report.get('adapter', '?')}: {str(report.get('verdict') or 'unknown').upper()}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Promotion gate · {_esc(title)}</title><style>{_CSS}</style></head><body><main>"
        f"{_header(report)}{_checks(report)}{_benchmarks(report)}{_preference(report)}"
        f"{_policy(report)}"
        "<footer>loraplex eval suite · promotion gate report · full data in report.json</footer>"
        "</main></body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory + os.replace: readers see the old file or the new one,
    never half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: GateReport, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/report.json and out_dir/report.html (both rendered before either is written,
    so a rendering error leaves the previous pair intact); returns (json_path, html_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    json_text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    html_text = render_html(data)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _write_atomic(json_path, json_text)
    _write_atomic(html_path, html_text)
    return json_path, html_path
