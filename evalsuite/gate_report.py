"""The gate's report, typed: what was pinned, measured and decided, and what happened after.

It is the one place the verdict lives while the gate runs; `to_dict` is its JSON form, written
as report.json, rendered as report.html and summarized into the registry's evaluation record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from gateway.contract import Verdict

REGISTRY_SUMMARY_KEYS = (
    "verdict", "error", "candidate", "production", "baseline", "judge_adapter", "benchmarks",
    "checks",
)  # fmt: skip
"""What of the report the registry keeps with the verdict (the rest stays in the files)."""
PREFERENCE_SUMMARY_KEYS = ("judge", "candidate_version", "baseline_version", "summary")


@dataclass
class Promotion:
    """Whether the gate was asked to promote, whether it did, and why not."""

    requested: bool
    done: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"requested": self.requested, "done": self.done}
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass
class GateReport:
    """One gate run. Pins are JSON-ready dicts (`Pin.to_dict`), as are benchmarks and checks."""

    adapter: str
    policy: dict[str, Any]  # the policy as run (pydantic's JSON dump)
    started: str  # ISO 8601, UTC
    promotion: Promotion
    verdict: Verdict = "error"  # until a decision says otherwise: never a pass by default
    error: str | None = None
    candidate: dict[str, Any] | None = None
    production: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    judge_adapter: dict[str, Any] | None = None
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    preference: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    finished: str | None = None
    wall_seconds: float | None = None
    lineage: list[str] = field(default_factory=list)  # how the candidate was made (manifest)
    recorded: bool | None = None  # None: no version to record the verdict on
    record_error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateReport:
        """A report from its JSON form (a report.json read back); unknown keys are ignored."""
        known = {f.name for f in fields(cls)} - {"promotion"}
        values = {key: value for key, value in data.items() if key in known}
        values.setdefault("adapter", "")
        values.setdefault("policy", {})
        values.setdefault("started", "")
        return cls(**values, promotion=Promotion(**(data.get("promotion") or {"requested": False})))

    def pin(self, pins: dict[str, dict[str, Any] | None]) -> None:
        """Set the pinned versions (`GatePins.to_report`)."""
        self.candidate = pins["candidate"]
        self.production = pins["production"]
        self.baseline = pins["baseline"]
        self.judge_adapter = pins["judge_adapter"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every key always present, except what only some runs have."""
        data: dict[str, Any] = {
            "adapter": self.adapter,
            "candidate": self.candidate,
            "production": self.production,
            "baseline": self.baseline,
            "judge_adapter": self.judge_adapter,
            "verdict": self.verdict,
            "error": self.error,
            "started": self.started,
            "policy": self.policy,
            "benchmarks": self.benchmarks,
            "preference": self.preference,
            "checks": self.checks,
            "promotion": self.promotion.to_dict(),
        }
        optional = {
            "lineage": self.lineage or None,  # only for adapters with a trainer manifest
            "finished": self.finished,
            "wall_seconds": self.wall_seconds,
            "recorded": self.recorded,
            "record_error": self.record_error,
        }
        data |= {key: value for key, value in optional.items() if value is not None}
        return data

    def registry_summary(self, report_file: str | None) -> dict[str, Any]:
        """What the registry's evaluation record keeps, with where the full report is."""
        data = self.to_dict()
        summary = {key: data[key] for key in REGISTRY_SUMMARY_KEYS}
        if self.preference:
            summary["preference"] = {k: self.preference[k] for k in PREFERENCE_SUMMARY_KEYS}
        summary["report"] = report_file
        return summary
