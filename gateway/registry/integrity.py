"""Notices stored adapter files that vanished or changed after registration.

Artifacts are immutable folders named by the sha256 of their content (artifacts.py). The first
request for a version in this process hashes its files (in a thread) against that name; later
requests compare one stat per file with what was verified, microseconds. A mismatch (files
deleted, truncated, rewritten) makes that version fail with FAILED_PRECONDITION, with a log line
and a metric naming the adapter, while every other adapter keeps serving. Restoring the files
or registering the adapter again (which replaces a damaged stored copy) heals it: the next
request verifies them anew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from gateway.contract import folder_digest
from gateway.domain import ResolvedAdapter
from gateway.errors import AdapterUnavailable

log = logging.getLogger(__name__)

Stamp = tuple[tuple[str, int, int], ...]
BrokenHook = Callable[[str, str], None]
"""Called with (adapter name, reason: missing / changed) when a version breaks."""


def stamp_of(folder: Path) -> Stamp | None:
    """(name, size, mtime) of each file; None when the folder or its files are gone."""
    try:
        stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    except OSError:
        return None
    if not stats:
        return None
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


class ArtifactCheck:
    """Verifies, per request, that a registry version's files are the registered ones."""

    def __init__(self, on_broken: BrokenHook | None = None) -> None:
        self.on_broken = on_broken
        self._verified: dict[Path, Stamp] = {}
        self._broken: dict[Path, tuple[Stamp | None, str]] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    async def check(self, adapter: ResolvedAdapter) -> None:
        """Return if the files are intact; raise AdapterUnavailable (FAILED_PRECONDITION) if not."""
        path = adapter.path
        stamp = stamp_of(path)
        if stamp is not None and self._verified.get(path) == stamp:
            return
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:  # one hash per version, however many requests arrive at once
            stamp = stamp_of(path)
            if stamp is not None and self._verified.get(path) == stamp:
                return
            broken = self._broken.get(path)
            if broken is not None and broken[0] == stamp:
                self._refuse(adapter, broken[1])  # unchanged since it broke: no re-hash
            if stamp is None:
                reason = "missing"
            else:
                try:
                    digest = await asyncio.to_thread(folder_digest, path)
                except OSError:  # vanished or unreadable while being hashed
                    digest = None
                reason = "" if digest == path.name else "changed" if digest else "missing"
            if not reason:
                self._verified[path] = stamp  # type: ignore[assignment]
                if self._broken.pop(path, None) is not None:
                    log.info("adapter %s@v%d: files intact again", adapter.name, adapter.version)
                return
            self._verified.pop(path, None)
            self._broken[path] = (stamp, reason)
            log.error(
                "adapter %s@v%d cannot be served: its stored files are %s (%s)",
                adapter.name,
                adapter.version,
                "missing" if reason == "missing" else "changed since registration",
                path,
            )
            if self.on_broken is not None:
                self.on_broken(adapter.name, reason)
            self._refuse(adapter, reason)

    @staticmethod
    def _refuse(adapter: ResolvedAdapter, reason: str) -> None:
        fix = (
            "are missing; register the adapter again to restore them"
            if reason == "missing"
            else "changed since registration; register the adapter again to restore them"
        )  # the path is in the gateway's log, not in answers to clients
        raise AdapterUnavailable(
            f"adapter {adapter.name}@v{adapter.version} cannot be served: its stored files {fix}"
        )
