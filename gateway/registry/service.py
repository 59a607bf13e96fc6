"""Registry operations end to end: validate, store, pre-warm in the engine, record, publish.

Registration order is what makes a crash harmless: the files are validated, copied into the
artifact store (atomic), loaded into the engine, and only then is the version row committed.
A crash before the commit leaves at most an unreferenced object, which `recover` removes at
the next start; a crash after it leaves a complete version. A failed registration removes
what it stored, so a refused adapter leaves no row and no files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import Verdict
from gateway.domain import ResolvedAdapter
from gateway.errors import AdapterUnavailable, InvalidAdapter, InvalidRequest, Overloaded
from gateway.registry.archive import extract_upload
from gateway.registry.artifacts import ArtifactStore, failpoint
from gateway.registry.base_model import BaseModelFacts
from gateway.registry.names import check_alias_move, check_registration
from gateway.registry.records import (
    AdapterRecord,
    AliasMove,
    AuditEvent,
    EvaluationRecord,
    NewVersion,
    VersionRecord,
)
from gateway.registry.store import RegistryStore
from gateway.registry.validate import AdapterFacts, inspect_adapter
from gateway.registry.view import Prewarm, RegistryView

log = logging.getLogger(__name__)

UPLOAD_MAX_AGE_S = 24 * 3600  # upload work folders older than this are crash leftovers


def _log_orphaned_failure(work: asyncio.Future) -> None:
    """A registration whose caller went away still reports its failure (in the log)."""
    if not work.cancelled() and work.exception() is not None:
        log.warning("registration failed after its caller left: %s", work.exception())


@dataclass(frozen=True)
class Registration:
    """What a caller asks to register, besides the files."""

    name: str
    description: str = ""
    owner: str = ""
    metadata: dict | None = None
    source: str = ""
    alias: str = ""


class Registry:
    """The adapter registry of one gateway: store, artifacts and the in-memory view."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        base: BaseModelFacts,
        max_rank: int,
        max_bytes: int,
        max_uploads: int = 2,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.max_uploads = max_uploads
        self._uploads_running = 0
        self.view = RegistryView(store, artifacts.path)
        # Not under artifacts/tmp: a replica starting on a shared data_dir sweeps that.
        self.uploads = artifacts.objects.parent / "uploads"
        self.uploads.mkdir(exist_ok=True)

    @classmethod
    def open(
        cls,
        url: str,
        data_dir: Path,
        base: BaseModelFacts,
        max_rank: int,
        max_bytes: int,
        max_uploads: int = 2,
    ) -> Registry:
        """Open (creating or upgrading) the registry and clean up after any crash."""
        data_dir.mkdir(parents=True, exist_ok=True)
        registry = cls(
            RegistryStore(url),
            ArtifactStore(data_dir / "artifacts"),
            base,
            max_rank,
            max_bytes,
            max_uploads,
        )
        registry.recover()
        return registry

    def close(self) -> None:
        self.store.close()

    def recover(self) -> list[str]:
        """Remove leftovers of interrupted registrations (waits for running ones to finish)."""
        with self.artifacts.exclusive():
            removed = self.artifacts.sweep(self.store.referenced_digests())
        if removed:
            log.info("removed %d unreferenced artifacts left by interrupted work", len(removed))
        now = time.time()
        for leftover in self.uploads.iterdir():
            if now - leftover.stat().st_mtime > UPLOAD_MAX_AGE_S:
                shutil.rmtree(leftover, ignore_errors=True)
        return removed

    def _remove_if_unreferenced(self, sha256: str) -> bool:
        with self.artifacts.exclusive():
            if sha256 in self.store.referenced_digests():
                return False
            self.artifacts.remove(sha256)
            return True

    async def register(
        self, folder: Path, request: Registration, actor: str, prewarm: Prewarm
    ) -> VersionRecord:
        """Validate, store, load into the engine, then record; nothing is left on failure."""
        check_registration(request.name, request.alias)
        facts = await asyncio.to_thread(
            inspect_adapter, folder, self.base, self.max_rank, self.max_bytes
        )
        # From here on the registration runs to its end even if the caller goes away: a
        # cancelled caller must not clean up files that a still-running commit references.
        work = asyncio.ensure_future(self._store_and_record(folder, facts, request, actor, prewarm))
        work.add_done_callback(_log_orphaned_failure)
        record = await asyncio.shield(work)
        await self._publish()
        return record

    async def _store_and_record(
        self,
        folder: Path,
        facts: AdapterFacts,
        request: Registration,
        actor: str,
        prewarm: Prewarm,
    ) -> VersionRecord:
        """Copy in, load, commit; on failure remove what was stored (nothing half-done)."""
        with self.artifacts.writing():
            artifact = await asyncio.to_thread(self.artifacts.put, folder)
            try:
                failpoint("after_artifact")
                adapter = self.view.adapter(
                    request.name, 0, artifact.sha256, facts.rank, facts.target_modules
                )
                try:
                    await prewarm(adapter)
                except AdapterUnavailable as exc:
                    raise InvalidAdapter(f"the engine could not load the adapter: {exc}") from exc
                new = NewVersion(
                    facts=facts,
                    sha256=artifact.sha256,
                    source=request.source or str(folder),
                    metadata={**facts.manifest, **(request.metadata or {})},
                    description=request.description,
                    owner=request.owner,
                    alias=request.alias,
                )
                record = await asyncio.to_thread(self.store.add_version, request.name, new, actor)
                failpoint("after_commit")
                failure: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - cleaned up below, then re-raised
                failure = exc
        if failure is not None:  # outside the shared lock: removal takes it exclusively
            if artifact.created:
                await asyncio.to_thread(self._remove_if_unreferenced, artifact.sha256)
            raise failure
        return record

    async def _publish(self) -> None:
        """Refresh the view after a committed change; a failure here must not turn the
        committed change into an error for the caller (the poll retries)."""
        try:
            await self.view.refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - logged; the follower refreshes later
            log.warning("registry view refresh after a change failed: %s", exc)

    async def upload(
        self,
        request: Registration,
        chunks: AsyncIterator[bytes],
        archive_sha256: str,
        actor: str,
        prewarm: Prewarm,
    ) -> VersionRecord:
        """Receive an archive (size-limited, optionally checksummed) and register it.

        At most `max_uploads` run at once: each may hold an archive and its unpacked copy on
        disk (up to max_bytes each), so past the bound a new one is refused before it sends.
        """
        if self._uploads_running >= self.max_uploads:
            raise Overloaded(
                f"{self.max_uploads} uploads are already running on this gateway; retry later",
                retry_after_s=1.0,
            )
        self._uploads_running += 1
        work = self.uploads / uuid.uuid4().hex
        try:
            work.mkdir()
            archive = work / "archive"
            digest = hashlib.sha256()
            size = 0
            with archive.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidAdapter(f"upload exceeds the limit of {self.max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise InvalidRequest("chunk", "the upload carried no archive bytes")
            if archive_sha256 and digest.hexdigest() != archive_sha256.lower():
                raise InvalidAdapter(
                    f"archive sha256 is {digest.hexdigest()}, not {archive_sha256} as declared"
                )
            folder = work / "adapter"
            await asyncio.to_thread(extract_upload, archive, folder, self.max_bytes)
            archive.unlink()  # only the unpacked copy is needed from here on
            named = dataclasses.replace(request, source=request.source or "upload")
            return await self.register(folder, named, actor, prewarm)
        finally:
            self._uploads_running -= 1
            shutil.rmtree(work, ignore_errors=True)

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        actor: str,
        prewarm: Prewarm,
        expected: int | None = None,
        reason: str = "",
        force: bool = False,
    ) -> AliasMove:
        """Pre-warm the target, then move the alias (compare-and-swap), then publish."""
        check_alias_move(alias, force, reason)
        await self.view.refresh()
        target: ResolvedAdapter = self.view.version(name, version)
        try:
            await prewarm(target)
        except AdapterUnavailable as exc:
            log.warning("pre-warming %s@v%d failed: %s", name, version, exc)
        move = await asyncio.to_thread(
            self.store.set_alias, name, alias, version, actor, expected, reason, force
        )
        await self._publish()
        return move

    async def delete_version(
        self, name: str, version: int, actor: str, reason: str, in_flight: Callable[[], int]
    ) -> bool:
        """Delete a version (refused while aliased or busy); returns whether files went too."""
        sha256, shared = await asyncio.to_thread(
            self.store.delete_version, name, version, actor, reason, in_flight
        )
        await self._publish()
        if shared:
            return False
        return await asyncio.to_thread(self._remove_if_unreferenced, sha256)

    async def get_adapter(self, name: str) -> AdapterRecord:
        return await asyncio.to_thread(self.store.get_adapter, name)

    async def list_adapters(self, limit: int, after: str = "") -> list[AdapterRecord]:
        return await asyncio.to_thread(self.store.list_adapters, limit, after)

    async def alias_history(self, name: str, alias: str, limit: int) -> list[AliasMove]:
        return await asyncio.to_thread(self.store.alias_history, name, alias, limit)

    async def audit_events(self, adapter: str, limit: int) -> list[AuditEvent]:
        return await asyncio.to_thread(self.store.audit_events, adapter, limit)

    async def record_evaluation(
        self, name: str, version: int, suite: str, verdict: Verdict, report: dict, actor: str
    ) -> EvaluationRecord:
        record = await asyncio.to_thread(
            self.store.record_evaluation, name, version, suite, verdict, report, actor
        )
        await self._publish()
        return record
