"""Content-addressed, immutable adapter folders: `objects/<sha256>/`.

A folder is copied into `tmp/` first, hashed from the copy, made read-only, fsynced and then
renamed into place in one step, so a crash leaves either nothing or a complete object; leftover
`tmp/` copies and unreferenced objects are removed by `sweep` at start-up. The same content
always lands at the same path, so registering identical files twice stores them once.

Registrations hold a shared `flock` on `store.lock` from copying files in until their database
row is committed; `sweep` and object removal take it exclusively. So a sweep never removes the
object of a registration still in progress (in this or another process on the same volume),
and a killed registrar's lock is released by the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import folder_digest

PAUSE_ENV = "LORAPLEX_TEST_PAUSE_AT"


def failpoint(name: str) -> None:
    """Crash tests park a registration here and SIGKILL it; a no-op unless PAUSE_ENV names it."""
    if os.environ.get(PAUSE_ENV) == name:
        Path(os.environ[PAUSE_ENV + "_MARKER"]).write_text(name)
        while True:  # until killed
            signal.pause()


@dataclass(frozen=True)
class Artifact:
    """A stored adapter folder."""

    sha256: str
    path: Path
    created: bool  # False when identical content was already stored


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Immutable adapter folders under `root`, addressed by the sha256 of their content."""

    def __init__(self, root: Path) -> None:
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lock_file = root / "store.lock"
        self.lock_file.touch()

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        fd = os.open(self.lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held by a registration from `put` until its version row is committed."""
        return self._locked(fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while removing objects: no registration is between `put` and commit."""
        return self._locked(fcntl.LOCK_EX)

    def path(self, sha256: str) -> Path:
        return self.objects / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_dir()

    def put(self, folder: Path) -> Artifact:
        """Copy a validated folder in; returns where it lives (atomic, idempotent)."""
        staging = self.tmp / uuid.uuid4().hex
        shutil.copytree(folder, staging, symlinks=False)
        for path in staging.iterdir():
            path.chmod(0o444)
            _fsync(path)
        failpoint("before_rename")
        sha256 = folder_digest(staging)
        target = self.path(sha256)
        if target.is_dir() and self._intact(target):
            shutil.rmtree(staging)
            return Artifact(sha256, target, created=False)
        if target.is_dir():  # damaged after it was stored: this good copy replaces it
            with contextlib.suppress(FileNotFoundError):  # a concurrent put replaced it first
                self.remove(sha256)
        try:
            staging.rename(target)
        except OSError:  # a concurrent put of the same content won the rename
            shutil.rmtree(staging)
            if not target.is_dir():
                raise
            return Artifact(sha256, target, created=False)
        _fsync(self.objects)
        return Artifact(sha256, target, created=True)

    @staticmethod
    def _intact(target: Path) -> bool:
        try:
            return folder_digest(target) == target.name
        except OSError:
            return False

    def remove(self, sha256: str) -> None:
        """Delete an object (the caller knows no version references it)."""
        target = self.path(sha256)
        if target.is_dir():
            doomed = self.tmp / f"removing-{uuid.uuid4().hex}"
            target.rename(doomed)  # atomic: never a half-removed object under objects/
            for path in doomed.iterdir():
                path.chmod(0o644)
            shutil.rmtree(doomed)

    def sweep(self, referenced: set[str]) -> list[str]:
        """Remove crash leftovers: every tmp/ copy and every object nothing references.

        Call under `exclusive()`, with `referenced` read after taking it.
        """
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        orphans = [p.name for p in self.objects.iterdir() if p.name not in referenced]
        for sha256 in orphans:
            self.remove(sha256)
        return orphans
