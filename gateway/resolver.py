"""Adapter references -> exact adapter versions the engine can load.

`AdapterResolver` is the seam the registry plugs into. `DirectoryResolver` serves every
sub-folder of a directory that holds an `adapter_config.json`, named after the folder, once its
weights pass the registry's checks against the base's layers (shapes included).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.domain import ResolvedAdapter
from gateway.errors import AdapterNotFound, AdapterUnavailable, InvalidAdapter
from gateway.registry.base_model import BaseLayers
from gateway.registry.validate import (
    LEGACY_WEIGHTS_FILE,
    WEIGHTS_FILE,
    check_lora_weights,
    lora_modules,
    read_lora_config,
)

log = logging.getLogger(__name__)

WEIGHT_FILES = (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE)


class AdapterResolver(Protocol):
    """Turns the adapter reference of a request into one immutable adapter version."""

    def resolve(self, reference: str) -> ResolvedAdapter:
        """The adapter version for a non-empty reference; raises AdapterNotFound."""
        ...

    def servable(self) -> list[ResolvedAdapter]:
        """Adapters that can be requested now."""
        ...

    def knows(self, name: str) -> bool:
        """Whether an adapter of this name exists (servable or not)."""
        ...

    def aliases(self) -> list[tuple[str, str, int]]:
        """(adapter name, alias, version) of every alias."""
        ...


@dataclass(frozen=True)
class _Entry:
    adapter: ResolvedAdapter | None
    problem: str | None
    fingerprint: tuple[int, int]


class DirectoryResolver:
    """Serves the adapters found in a directory; rescans on an unknown name (at most 1/s).

    Each (name, file fingerprint) gets its own engine id, so an adapter whose files change is
    loaded under a new id instead of silently reusing weights cached under the old one.
    """

    def __init__(
        self,
        root: Path,
        max_lora_rank: int,
        base: BaseLayers,
        rescan_interval_s: float = 1.0,
    ) -> None:
        self.root = root
        self.max_lora_rank = max_lora_rank
        self.base = base
        self.rescan_interval_s = rescan_interval_s
        self._entries: dict[str, _Entry] = {}
        self._ids: dict[tuple[str, tuple[int, int]], int] = {}
        self._last_scan = 0.0
        self._lock = threading.Lock()
        self.scan()

    def _weights(self, folder: Path) -> Path:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
        raise ValueError(f"no adapter weights ({' or '.join(WEIGHT_FILES)})")

    def _fingerprint(self, folder: Path) -> tuple[int, int]:
        stat = self._weights(folder).stat()
        return stat.st_size, stat.st_mtime_ns

    def _engine_id(self, name: str, fingerprint: tuple[int, int]) -> int:
        key = (name, fingerprint)
        if key not in self._ids:
            self._ids[key] = len(self._ids) + 1
        return self._ids[key]

    def _load_entry(self, folder: Path) -> _Entry:
        try:
            fingerprint = self._fingerprint(folder)
            config, _, modules = read_lora_config(folder)
        except (OSError, ValueError, InvalidAdapter) as exc:
            return _Entry(None, f"adapter {folder.name!r} is unreadable: {exc}", (0, 0))
        try:
            lora = lora_modules(self._weights(folder))
            rank = check_lora_weights(config, lora, self.base, self.max_lora_rank)
        except (OSError, ValueError, InvalidAdapter) as exc:
            return _Entry(None, f"adapter {folder.name!r} cannot be served: {exc}", fingerprint)
        engine_id = self._engine_id(folder.name, fingerprint)
        adapter = ResolvedAdapter(folder.name, 0, engine_id, folder.resolve(), rank, modules)
        return _Entry(adapter, None, fingerprint)

    def scan(self) -> None:
        """Re-read the directory: new adapters appear, removed ones disappear."""
        with self._lock:
            entries = {}
            for folder in sorted(self.root.iterdir()):
                if (folder / "adapter_config.json").is_file():
                    entry = self._load_entry(folder)
                    if entry.problem and folder.name not in self._entries:
                        log.warning("%s; it will not be served", entry.problem)
                    entries[folder.name] = entry
            self._entries = entries
            self._last_scan = time.monotonic()

    def _changed(self, name: str, entry: _Entry) -> bool:
        """The weights on disk are not the ones this entry was made from (one stat call)."""
        try:
            return self._fingerprint(self.root / name) != entry.fingerprint
        except (OSError, ValueError):
            return True

    def resolve(self, reference: str) -> ResolvedAdapter:
        entry = self._entries.get(reference)
        if entry is not None and self._changed(reference, entry):
            self.scan()  # new weights get a new engine id; vanished ones are not found
            entry = self._entries.get(reference)
        elif entry is None and time.monotonic() - self._last_scan >= self.rescan_interval_s:
            self.scan()
            entry = self._entries.get(reference)
        if entry is None:
            raise AdapterNotFound(reference)
        if entry.adapter is None:
            raise AdapterUnavailable(entry.problem)
        return entry.adapter

    def servable(self) -> list[ResolvedAdapter]:
        return [e.adapter for e in self._entries.values() if e.adapter is not None]

    def knows(self, name: str) -> bool:
        return name in self._entries

    def aliases(self) -> list[tuple[str, str, int]]:
        return []  # directory mode has no versions or aliases
