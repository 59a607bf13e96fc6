"""The promotion gate's report: self-contained, escaped, well-formed HTML, and atomic writes."""

from __future__ import annotations

import copy
import html
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evalsuite.gate_report import GateReport
from evalsuite.report import MAX_EXAMPLES, render_html, write_report

XSS = "<script>alert(1)</script>"


def _pair(i: int, outcome: float, prompt: str | None = None) -> dict:
    return {
        "id": str(i),
        "prompt": prompt or f"What colour is item {i}?",
        "reference": f"colour-{i}" if i % 2 else None,
        "candidate": f"candidate answer {i}",
        "baseline": f"baseline answer {i}",
        "outcome": outcome,
        "detail": {"candidate_score": outcome, "baseline_score": 1.0 - outcome},
    }


def _full_report() -> dict:
    pairs = [_pair(0, 1.0, prompt=f"Say {XSS} & 'quote' \"double\"")]
    pairs += [_pair(i, 1.0) for i in range(1, 8)]  # 8 wins
    pairs += [_pair(i, 0.5) for i in range(8, 10)]  # 2 ties
    pairs += [_pair(i, 0.0) for i in range(10, 12)]  # 2 losses
    return {
        "adapter": "colors",
        "candidate": {"ref": "colors@v3", "version": 3},
        "production": {"ref": "colors@v2", "version": 2},
        "verdict": "fail",
        "error": None,
        "started": "2026-11-23T16:00:00Z",
        "finished": "2026-11-23T16:00:12Z",
        "wall_seconds": 12.3,
        "policy": {"benchmarks": [{"task": "colors_qa", "min": 0.5}], "preference": {"min": 0.6}},
        "benchmarks": [
            {
                "task": "colors_qa",
                "metric": "exact_match",
                "higher_is_better": True,
                "scores": {"candidate": 0.83, "production": 0.5, "base": 0.0},
            },
            {
                "task": "wikitext",
                "metric": "word_perplexity",
                "higher_is_better": False,
                "scores": {"candidate": 41.7, "production": 39.2, "base": 1234.5},
            },
            {
                "task": "arc_easy",
                "metric": "acc",
                "higher_is_better": True,
                "scores": {"candidate": 0.61},  # no production, no base
            },
        ],
        "preference": {
            "judge": "exact_match",
            "candidate": "colors@v3",
            "baseline": "colors@v2",
            "summary": {
                "n": 12,
                "wins": 8,
                "ties": 2,
                "losses": 2,
                "win_rate": 0.75,
                "ci_low": 0.58,
                "ci_high": 0.9,
                "confidence": 0.95,
                "sign_test_p": 0.11,
            },
            "pairs": pairs,
        },
        "checks": [
            {
                "name": "colors_qa exact_match >= 0.5",
                "kind": "benchmark_min",
                "required": True,
                "passed": True,
                "value": 0.83,
                "threshold": 0.5,
                "detail": "0.83 >= 0.5",
            },
            {
                "name": "wikitext word_perplexity not worse than production",
                "kind": "benchmark_vs_production",
                "required": True,
                "passed": False,
                "value": 41.7,
                "threshold": 39.2,
                "detail": "41.7 > 39.2 (lower is better)",
            },
            {
                "name": "preference win rate >= 0.6",
                "kind": "preference",
                "required": True,
                "passed": True,
                "value": 0.75,
                "threshold": 0.6,
                "detail": "0.75 >= 0.6",
            },
        ],
    }


def _error_report() -> dict:
    return {
        "adapter": "colors",
        "candidate": {"ref": "colors@v3", "version": 3},
        "production": None,
        "verdict": "error",
        "error": "gateway unreachable: localhost:50051 <connection refused>",
        "benchmarks": [],
        "preference": None,
        "checks": [],
    }


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)


def test_full_report_renders() -> None:
    page = render_html(_full_report())
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert "colors@v3" in page and "colors@v2" in page
    assert "<details>" in page  # the policy, collapsed
    assert len(_svgs(page)) == 3 + 2  # one chart per benchmark, two for the preference


def test_self_contained_no_urls_no_scripts() -> None:
    page = render_html(_full_report())
    assert not re.search(r"https?://", page, flags=re.IGNORECASE)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page


def test_untrusted_text_is_escaped() -> None:
    report = _full_report()
    report["checks"][0]["detail"] = f"detail {XSS}"
    report["adapter"] = f"colors{XSS}"
    page = render_html(report)
    assert XSS not in page
    assert html.escape(XSS) in page
    assert "&amp; &#x27;quote&#x27; &quot;double&quot;" in page


def test_every_task_and_check_name_appears() -> None:
    report = _full_report()
    page = render_html(report)
    for bench in report["benchmarks"]:
        assert html.escape(bench["task"]) in page
        assert html.escape(bench["metric"]) in page
    for check in report["checks"]:
        assert html.escape(check["name"]) in page


@pytest.mark.parametrize(
    ("verdict", "text", "css"),
    [
        ("pass", "PASS", "badge-pass"),
        ("fail", "FAIL", "badge-fail"),
        ("error", "ERROR", "badge-error"),
    ],
)
def test_verdict_badge(verdict: str, text: str, css: str) -> None:
    report = _full_report()
    report["verdict"] = verdict
    page = render_html(report)
    assert re.search(rf'<div class="badge {css}"[^>]*>{text}</div>', page)


def test_failed_required_checks_come_first_and_are_highlighted() -> None:
    page = render_html(_full_report())
    rows = re.findall(r'<tr class="([^"]+)">', page)
    assert rows == ["failed-required", "passed", "passed"]
    failed = page.index("wikitext word_perplexity not worse than production")
    assert failed < page.index("colors_qa exact_match &gt;= 0.5")
    assert "41.7 &gt; 39.2 (lower is better)" in page  # the reason


def test_error_report_without_benchmarks_or_preference_renders() -> None:
    report = _error_report()
    page = render_html(report)
    assert ">ERROR</div>" in page
    assert html.escape(report["error"]) in page
    assert "no production version yet" in page
    assert "Preference comparison" not in page
    assert _svgs(page) == []


def test_minimal_report_tolerates_missing_parts() -> None:
    page = render_html({"adapter": "colors", "verdict": "error"})
    assert ">ERROR</div>" in page
    assert "no error message recorded" in page


def test_lower_is_better_is_labelled() -> None:
    report = _full_report()
    page = render_html(report)
    assert page.count("lower is better</span>") == 1
    perplexity = page.index("<h3>wikitext · word_perplexity")
    assert page.index("lower is better</span>", perplexity) < page.index("</figure>", perplexity)
    assert "candidate: worse than production" in page  # 41.7 > 39.2 when lower is better
    report["benchmarks"] = report["benchmarks"][:1]
    assert "lower is better</span>" not in render_html(report)


def test_each_chart_scaled_to_its_own_max() -> None:
    page = render_html(_full_report())
    widths = []
    for svg in _svgs(page)[:2]:  # accuracy chart, then perplexity chart
        bars = ET.fromstring(svg).findall("rect")
        widths.append(max(float(r.get("width")) for r in bars))
    assert widths[0] == pytest.approx(widths[1])  # both maxima fill the plot


def test_preference_section() -> None:
    page = render_html(_full_report())
    assert "8 wins" in page and "2 ties" in page and "2 losses" in page
    assert "sign test p = 0.11" in page
    assert "95% CI 0.58 – 0.9" in page
    assert "policy threshold 0.6" in page
    assert 'stroke-dasharray="6 3"' in page  # the threshold line, beside the 0.5 line
    assert page.count('class="example example-win"') == MAX_EXAMPLES
    assert page.count('class="example example-loss"') == 2
    assert "candidate answer 10" in page and "baseline answer 11" in page  # the losses
    assert "candidate answer 8" not in page  # ties are not examples
    assert "&quot;candidate_score&quot;" in page  # judge detail


def test_preference_without_threshold_or_summary() -> None:
    report = _full_report()
    report["checks"] = [c for c in report["checks"] if c["kind"] != "preference"]
    del report["preference"]["summary"]
    page = render_html(report)
    assert "policy threshold" not in page
    assert "8 wins" in page  # rebuilt from the pairs


def test_svg_is_well_formed() -> None:
    for report in (_full_report(), _error_report()):
        report["benchmarks"].append(
            {"task": "odd", "metric": "m", "scores": {"candidate": "n/a", "base": -2.5}}
        )
        for svg in _svgs(render_html(report)):
            root = ET.fromstring(svg)
            assert root.tag == "svg"
            assert root.find("title") is not None


def test_the_typed_report_round_trips_its_json_form() -> None:
    report = _full_report() | {
        "baseline": {"ref": "colors@v2", "version": 2},
        "judge_adapter": None,
        "promotion": {"requested": True, "done": False, "error": "FAILED_PRECONDITION: moved"},
        "recorded": True,
    }
    assert GateReport.from_dict(copy.deepcopy(report)).to_dict() == report


def test_write_report(tmp_path: Path) -> None:
    report = GateReport.from_dict(_full_report())
    original = copy.deepcopy(report)
    out_dir = tmp_path / "reports" / "colors-v3"
    json_path, html_path = write_report(report, out_dir)
    assert (json_path, html_path) == (out_dir / "report.json", out_dir / "report.html")
    assert json.loads(json_path.read_text(encoding="utf-8")) == original.to_dict()
    assert report == original  # not mutated
    assert html_path.read_text(encoding="utf-8") == render_html(report.to_dict())
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.json"]


def test_write_report_json_format_and_overwrite(tmp_path: Path) -> None:
    report = GateReport.from_dict(_error_report())
    report.error = "échec: модель недоступна"
    write_report(GateReport.from_dict(_full_report()), tmp_path)
    json_path, _ = write_report(report, tmp_path)
    text = json_path.read_text(encoding="utf-8")
    assert "échec: модель недоступна" in text  # ensure_ascii off
    assert text.startswith('{\n  "adapter": "colors",\n  "candidate"')  # indent 2, keys unsorted
    assert json.loads(text) == report.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]


def test_write_report_leaves_nothing_when_rendering_fails(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_report(GateReport.from_dict({"policy": {"bad": object()}}), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_alias_refs_show_their_version() -> None:
    report = _full_report()
    report["candidate"] = {"ref": "colors@candidate", "version": 13}
    page = render_html(report)
    assert "colors@candidate (version 13)" in page
    assert "colors@v2 (version" not in page


def test_response_statistics_and_a_judge_that_is_not_independent_are_shown() -> None:
    report = _full_report()
    report["preference"]["behaviour"] = {
        "candidate": {"mean_words": 40.0, "distinct_2": 0.2},
        "baseline": {"mean_words": 8.0, "distinct_2": 0.9},
        "distinct_n": 2,
        "length_ratio": 5.0,
        "distinct_ratio": 0.22,
    }
    report["preference"]["judge_independence"] = "judge 'reward_model' <b>shares</b> the model"
    page = render_html(report)
    assert "mean words 40 vs 8 (ratio 5)" in page and "distinct-2 0.2 vs 0.9" in page
    assert "not independent: judge &#x27;reward_model&#x27; &lt;b&gt;shares" in page
    report["preference"]["judge_independence"] = "independent"
    assert "not independent" not in render_html(report)


def test_the_candidates_lineage_is_shown_in_order() -> None:
    report = _full_report()
    report["lineage"] = ["started from the adapter sft/", "reward: rm/ <x>", "trained: rl"]
    assert "lineage: started from the adapter sft/ → reward: rm/ &lt;x&gt; → trained: rl" in (
        render_html(report)
    )
