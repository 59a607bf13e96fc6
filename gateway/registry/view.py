"""The gateway's in-memory view of the registry: what request resolution reads.

Resolving `name`, `name@alias` or `name@vN` is one dict lookup in an immutable snapshot. The
snapshot is rebuilt only when the registry's generation counter moves (polled; and right
after this gateway's own changes), so another replica's promotion is seen within one poll
interval. Before a new snapshot is published, versions that aliases newly point to are
pre-warmed in the engine, so the first request after a promotion pays no adapter load;
requests already running keep the version they resolved.

Engine LoRA ids are assigned per artifact sha256: the same id always means the same weights,
so nothing can ever be served with weights cached under a reused id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.contract import PRODUCTION
from gateway.domain import ResolvedAdapter
from gateway.errors import AdapterNotFound
from gateway.registry.records import Snapshot
from gateway.registry.store import RegistryStore

log = logging.getLogger(__name__)

Prewarm = Callable[[ResolvedAdapter], Awaitable[None]]


class RegistryView:
    """Resolves adapter references against the latest registry snapshot (AdapterResolver)."""

    def __init__(self, store: RegistryStore, artifact_path: Callable[[str], Path]) -> None:
        self.store = store
        self._artifact_path = artifact_path
        self._engine_ids: dict[str, int] = {}
        self._ids_lock = threading.Lock()
        self._refs: dict[str, ResolvedAdapter] = {}
        self._versions: dict[tuple[str, int], ResolvedAdapter] = {}
        # (name, version) -> a version an alias holds; two names may share one artifact
        self._aliased: dict[tuple[str, int], ResolvedAdapter] = {}
        self._names: frozenset[str] = frozenset()
        self._aliases: list[tuple[str, str, int]] = []
        self.generation = -1
        self._refresh_lock = asyncio.Lock()
        self.prewarm: Prewarm | None = None  # set once the engine is up

    def engine_id(self, sha256: str) -> int:
        """A stable engine LoRA id for an artifact (ids start at 1; vLLM reserves 0)."""
        with self._ids_lock:
            return self._engine_ids.setdefault(sha256, len(self._engine_ids) + 1)

    def adapter(
        self, name: str, number: int, sha256: str, rank: int, modules: tuple[str, ...]
    ) -> ResolvedAdapter:
        return ResolvedAdapter(
            name, number, self.engine_id(sha256), self._artifact_path(sha256), rank, modules
        )

    # -- AdapterResolver

    def resolve(self, reference: str) -> ResolvedAdapter:
        adapter = self._refs.get(reference)
        if adapter is None:
            raise AdapterNotFound(reference)
        return adapter

    def servable(self) -> list[ResolvedAdapter]:
        """Every version an alias points to (what clients are expected to request)."""
        return list(self._aliased.values())

    def knows(self, name: str) -> bool:
        return name in self._names

    def aliases(self) -> list[tuple[str, str, int]]:
        return self._aliases

    def version(self, name: str, number: int) -> ResolvedAdapter:
        """A live version, from the current snapshot."""
        adapter = self._versions.get((name, number))
        if adapter is None:
            raise AdapterNotFound(f"{name}@v{number}")
        return adapter

    # -- refreshing

    def _build(self, snapshot: Snapshot) -> tuple[dict, dict, dict]:
        """The lookup tables of a snapshot. Versions are immutable, so the previous
        snapshot's objects are reused and only new versions cost an allocation."""
        previous = self._versions
        versions = {}
        for name, number, sha, rank, modules in snapshot.versions:
            adapter = previous.get((name, number))
            versions[(name, number)] = adapter or self.adapter(name, number, sha, rank, modules)
        refs = {f"{name}@v{number}": adapter for (name, number), adapter in versions.items()}
        aliased = {}
        for name, alias, number in snapshot.aliases:
            adapter = versions.get((name, number))
            if adapter is None:  # cannot happen with the store's locking; never stop serving
                log.error("alias %s@%s points to missing version v%d", name, alias, number)
                continue
            refs[f"{name}@{alias}"] = adapter
            aliased[(name, number)] = adapter
            if alias == PRODUCTION:
                refs[name] = adapter
        return refs, versions, aliased

    async def refresh(self, force: bool = False) -> bool:
        """Publish a new snapshot if the registry changed; returns whether it did.

        Versions that aliases newly point to are pre-warmed first (when the engine is up).
        """
        prewarm = self.prewarm
        async with self._refresh_lock:
            if not force and await asyncio.to_thread(self.store.generation) == self.generation:
                return False
            snapshot = await asyncio.to_thread(self.store.snapshot)
            # built off the event loop: 10,000 versions take tens of ms (benchmarks/)
            refs, versions, aliased = await asyncio.to_thread(self._build, snapshot)
            if prewarm is not None:  # once per weights: names sharing an artifact share its id
                warm = {a.engine_id for a in self._aliased.values()}
                for adapter in aliased.values():
                    if adapter.engine_id not in warm:
                        warm.add(adapter.engine_id)
                        await self._prewarm(prewarm, adapter)
            self._refs, self._versions, self._aliased = refs, versions, aliased
            self._names = frozenset(name for name, _ in versions)
            self._aliases = list(snapshot.aliases)
            self.generation = snapshot.generation
            return True

    @staticmethod
    async def _prewarm(prewarm: Prewarm, adapter: ResolvedAdapter) -> None:
        try:
            await prewarm(adapter)
        except Exception as exc:  # noqa: BLE001 - still served; it loads (or fails) on use
            log.warning("pre-warming %s@v%d failed: %s", adapter.name, adapter.version, exc)

    async def follow(self, interval_s: float, stop: asyncio.Event) -> None:
        """Poll the registry for changes made by other replicas until `stop` is set."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop serving
                log.warning("registry refresh failed (serving the last snapshot): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
