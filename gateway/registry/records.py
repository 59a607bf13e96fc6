"""What the registry's queries return and take: plain immutable records, no database rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from gateway.contract import Verdict
from gateway.registry.validate import AdapterFacts


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    suite: str
    verdict: Verdict
    report: dict
    actor: str
    created_at: dt.datetime


@dataclass(frozen=True)
class VersionRecord:
    adapter: str
    number: int
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_fingerprint: str
    base_rule: str
    source: str
    actor: str
    metadata: dict
    created_at: dt.datetime
    aliases: tuple[str, ...] = ()
    evaluations: tuple[EvaluationRecord, ...] = ()


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    description: str
    owner: str
    created_at: dt.datetime
    aliases: dict[str, int] = field(default_factory=dict)
    versions: tuple[VersionRecord, ...] = ()


@dataclass(frozen=True)
class AliasMove:
    adapter: str
    alias: str
    from_version: int
    to_version: int
    actor: str
    reason: str
    forced: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class AuditEvent:
    id: int
    created_at: dt.datetime
    actor: str
    action: str
    adapter: str
    version: int
    details: dict


@dataclass(frozen=True)
class Snapshot:
    """Everything request resolution needs, read in one transaction."""

    generation: int
    versions: list[tuple[str, int, str, int, tuple[str, ...]]]  # adapter, number, sha, rank, mods
    aliases: list[tuple[str, str, int]]  # adapter, alias, number


@dataclass(frozen=True)
class NewVersion:
    """A validated, stored adapter version about to be recorded."""

    facts: AdapterFacts
    sha256: str
    source: str
    metadata: dict
    description: str = ""
    owner: str = ""
    alias: str = ""
