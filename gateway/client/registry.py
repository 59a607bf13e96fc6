"""The adapter registry client (AdapterService): register, upload, aliases, evaluations.

Every call carries the `loraplex-actor` metadata (default `$USER@hostname`), which the registry
records as who made the change. Errors are raised as `grpc.RpcError`.
"""

from __future__ import annotations

import builtins
import getpass
import hashlib
import os
import socket
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from gateway.client.channel import Connection
from gateway.contract import VERDICT_TO_PB, VERDICTS
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc as apb_grpc

ACTOR_METADATA = "loraplex-actor"
MAX_CHUNK = (4 << 20) - (64 << 10)  # under gRPC's default 4 MiB message limit, with room


def default_actor() -> str:
    """`$USER@hostname`: who registry changes are recorded as by default."""
    user = os.environ.get("USER")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _struct(value: dict | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value or {})
    return message


def tar_folder(folder: Path, archive: Path) -> None:
    """Pack an adapter folder's plain files (flat, arcname = file name) into a .tar.gz."""
    entries = sorted(folder.iterdir())
    for path in entries:
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path}: only plain files can be uploaded (no folders or links)")
    with tarfile.open(archive, "w:gz") as tar:
        for path in entries:
            tar.add(path, arcname=path.name, recursive=False)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class AdapterClient(Connection):
    """Blocking client of the adapter registry (AdapterService); one channel for every call.

    Every call carries the `loraplex-actor` metadata (default `$USER@hostname`), which the
    registry records as who made the change. Errors are raised as `grpc.RpcError`.
    """

    stub_class = apb_grpc.AdapterServiceStub

    def __init__(
        self,
        target: str,
        actor: str | None = None,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.actor = actor or default_actor()
        super().__init__(target, credentials, api_key, timeout, ((ACTOR_METADATA, self.actor),))

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=self.timeout)

    def register(
        self,
        name: str,
        path: str | Path,
        description: str = "",
        owner: str = "",
        metadata: dict | None = None,
        source: str = "",
        alias: str = "",
    ) -> apb.AdapterVersion:
        """Register a folder on the gateway host as the adapter's next version."""
        request = apb.RegisterAdapterRequest(
            name=name,
            path=str(path),
            description=description,
            owner=owner,
            metadata=_struct(metadata),
            source=source,
            alias=alias,
        )
        return self._call(self.stub.RegisterAdapter, request).version

    def upload(
        self,
        name: str,
        archive_path_or_folder: str | Path,
        description: str = "",
        owner: str = "",
        metadata: dict | None = None,
        source: str = "",
        alias: str = "",
        chunk_size: int = 1 << 20,
    ) -> apb.AdapterVersion:
        """Stream a local .tar(.gz)/.zip archive, or a folder (tarred first), as a new version."""
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}")
        path = Path(archive_path_or_folder)
        if not path.is_dir():
            return self._upload(name, path, description, owner, metadata, source, alias, chunk_size)
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            archive = Path(tmp) / f"{path.name or 'adapter'}.tar.gz"
            tar_folder(path, archive)
            return self._upload(
                name, archive, description, owner, metadata, source, alias, chunk_size
            )

    def _upload(
        self,
        name: str,
        archive: Path,
        description: str,
        owner: str,
        metadata: dict | None,
        source: str,
        alias: str,
        chunk_size: int,
    ) -> apb.AdapterVersion:
        header = apb.UploadHeader(
            name=name,
            description=description,
            owner=owner,
            metadata=_struct(metadata),
            source=source,
            alias=alias,
            archive_sha256=_sha256(archive),
        )

        def messages() -> Iterator[apb.UploadAdapterRequest]:
            yield apb.UploadAdapterRequest(header=header)
            with archive.open("rb") as f:
                while chunk := f.read(chunk_size):
                    yield apb.UploadAdapterRequest(chunk=chunk)

        return self._call(self.stub.UploadAdapter, messages()).version

    def get(self, name: str) -> apb.Adapter:
        """One adapter with all its versions, evaluations and aliases."""
        return self._call(self.stub.GetAdapter, apb.GetAdapterRequest(name=name)).adapter

    def list(self, page_size: int = 100) -> Iterator[apb.Adapter]:
        """Every adapter in name order, fetched a page at a time."""
        token = ""
        while True:
            request = apb.ListAdaptersRequest(page_size=page_size, page_token=token)
            page = self._call(self.stub.ListAdapters, request)
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def versions(self, name: str) -> builtins.list[apb.AdapterVersion]:
        """The live versions, oldest first."""
        reply = self._call(self.stub.ListVersions, apb.ListVersionsRequest(adapter=name))
        return [*reply.versions]

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        expected: int | None = None,
        reason: str = "",
        force: bool = False,
    ) -> apb.AliasMove:
        """Point `alias` at `version`; with `expected` (0: no alias yet), compare-and-swap."""
        request = apb.SetAliasRequest(
            adapter=name,
            alias=alias,
            version=version,
            expected_version=expected,
            reason=reason,
            force=force,
        )
        return self._call(self.stub.SetAlias, request).move

    def history(self, name: str, alias: str = "", limit: int = 100) -> builtins.list[apb.AliasMove]:
        """Alias moves, newest first (all aliases when `alias` is empty)."""
        request = apb.GetAliasHistoryRequest(adapter=name, alias=alias, limit=limit)
        return [*self._call(self.stub.GetAliasHistory, request).moves]

    def delete(self, name: str, version: int, reason: str = "") -> bool:
        """Delete a version; returns whether its artifact files were removed too."""
        request = apb.DeleteVersionRequest(adapter=name, version=version, reason=reason)
        return self._call(self.stub.DeleteVersion, request).artifact_removed

    def record_evaluation(
        self, name: str, version: int, suite: str, verdict: str, report: dict | None = None
    ) -> apb.Evaluation:
        """Attach an evaluation report and its verdict ("pass", "fail" or "error") to a version."""
        if verdict not in VERDICT_TO_PB:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        request = apb.RecordEvaluationRequest(
            adapter=name,
            version=version,
            suite=suite,
            verdict=VERDICT_TO_PB[verdict],
            report=_struct(report),
        )
        return self._call(self.stub.RecordEvaluation, request).evaluation

    def audit(self, adapter: str = "", limit: int = 100) -> builtins.list[apb.AuditEvent]:
        """Registry mutations, newest first (all adapters when `adapter` is empty)."""
        request = apb.ListAuditEventsRequest(adapter=adapter, limit=limit)
        return [*self._call(self.stub.ListAuditEvents, request).events]
