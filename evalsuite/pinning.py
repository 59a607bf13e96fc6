"""Every adapter reference of a gate run pinned to an exact version, read from the registry once
at the start: the candidate, production, the comparison's baseline and the LLM judge's model. A
gate takes long; an alias moved meanwhile must not change what a later request reaches, so every
request names NAME@vN. The base model ("") stays the base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from evalsuite.errors import EvalInputError
from evalsuite.policy import GatePolicy
from gateway.client import AdapterClient
from gateway.contract import PRODUCTION
from loraplex.v1 import adapters_pb2 as apb

_VERSION = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class Pin:
    """A reference as the caller gave it and the exact version it names now."""

    requested: str
    name: str = ""  # "": the base model
    version: int | None = None

    @property
    def ref(self) -> str:
        """What requests name: NAME@vN, or "" for the base model."""
        return f"{self.name}@v{self.version}" if self.name else ""

    def to_dict(self) -> dict[str, Any]:
        """For the report: {"requested", "ref" (NAME@vN or "base"), "version" (None: base)}."""
        return {"requested": self.requested, "ref": self.ref or "base", "version": self.version}


@dataclass(frozen=True)
class GatePins:
    """The versions a gate run evaluates and compares, fixed before it runs anything."""

    candidate: Pin
    production: Pin | None = None  # None: the adapter has no production version yet
    baseline: Pin | None = None  # the comparison's; None without one
    judge: Pin | None = None  # the served model the judge asks; None if it asks none

    def to_report(self) -> dict[str, Any]:
        pins = {
            "candidate": self.candidate,
            "production": self.production,
            "baseline": self.baseline,
            "judge_adapter": self.judge,
        }
        return {role: pin.to_dict() if pin else None for role, pin in pins.items()}


def split_reference(reference: str) -> tuple[str, str]:
    """("name", "alias" or "vN") of NAME@ALIAS / NAME@vN. A bare NAME is refused: the gateway
    reads it as production, a gate would mean the candidate; the caller must say which."""
    name, _, selector = reference.partition("@")
    if not name or not selector:
        raise EvalInputError(
            f"adapter reference {reference!r}: name the version to gate, e.g. NAME@candidate "
            "or NAME@v3"
        )
    return name, selector


class Pinner:
    """Pins references against one registry read per adapter name (made on first use)."""

    def __init__(self, registry: AdapterClient) -> None:
        self._registry = registry
        self._adapters: dict[str, apb.Adapter] = {}

    def _adapter(self, name: str) -> apb.Adapter:
        if name not in self._adapters:
            self._adapters[name] = self._registry.get(name)
        return self._adapters[name]

    def pin(self, reference: str) -> Pin:
        """ "" (the base), NAME (its production version, as the gateway reads it), NAME@ALIAS or
        NAME@vN (which must be live) -> the version it names now."""
        if not reference:
            return Pin(reference)
        name, _, selector = reference.partition("@")
        if not name:
            raise EvalInputError(f"adapter reference {reference!r} has no adapter name")
        selector = selector or PRODUCTION
        adapter = self._adapter(name)
        number = _VERSION.fullmatch(selector)
        if number is not None:
            version = int(number.group(1))
            live = sorted(v.version for v in adapter.versions)
            if version not in live:
                raise EvalInputError(f"{name} has no version {version} (live: {live})")
        elif selector in adapter.aliases:
            version = adapter.aliases[selector]
        else:
            raise EvalInputError(
                f"{name} has no alias {selector!r} (aliases: {dict(adapter.aliases) or 'none'})"
            )
        return Pin(reference, name, version)

    def manifest(self, pin: Pin) -> dict[str, Any]:
        """The pinned version's metadata: the trainer's manifest, for a trained adapter."""
        from google.protobuf.json_format import MessageToDict

        versions = self._adapter(pin.name).versions
        version = next((v for v in versions if v.version == pin.version), None)
        return MessageToDict(version.metadata) if version is not None else {}

    def candidate(self, reference: str) -> Pin:
        """The version to gate: NAME@ALIAS or NAME@vN, never a bare NAME (see split_reference)."""
        split_reference(reference)
        return self.pin(reference)

    def gate(self, candidate: Pin, policy: GatePolicy) -> GatePins:
        """Production, the comparison's baseline and the judge's model, next to `candidate`."""
        from evalsuite.judges import judge_adapter

        production = None
        if PRODUCTION in self._adapter(candidate.name).aliases:
            production = self.pin(f"{candidate.name}@{PRODUCTION}")
        pref = policy.preference
        if pref is None:
            return GatePins(candidate, production)
        if pref.baseline == PRODUCTION:  # the base while there is no production yet
            baseline = replace(production, requested=PRODUCTION) if production else Pin(PRODUCTION)
        elif pref.baseline == "base":
            baseline = Pin(pref.baseline)
        else:
            baseline = self.pin(pref.baseline)
        asks = judge_adapter(pref.judge, pref.judge_options)
        judge = self.pin(asks[1]) if asks is not None else None
        return GatePins(candidate, production, baseline, judge)
