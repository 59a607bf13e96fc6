"""Uploaded adapter archives, unpacked as a stream with every limit checked as bytes are written.

An archive is read member by member, through a decompressor that checks the stream's
checksum, and copied in `CHUNK_BYTES` pieces, so an upload holds one
chunk in memory whatever its members' sizes. The byte budget (the adapter size limit, and at
most `MAX_RATIO` times the archive's own size) is checked after every chunk: a compression
bomb stops at the chunk that crosses it, having written at most the budget.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, cast

from gateway.errors import InvalidAdapter
from gateway.registry.validate import ALLOWED_FILES

CHUNK_BYTES = 1 << 20
"""Memory one upload's extraction holds: one chunk being copied."""
MAX_RATIO = 20
"""Most bytes unpacked per archive byte. LoRA weights barely compress (an untrained adapter's
all-zero lora_B halves at best), so a legitimate archive stays far below it; an uncompressed
.tar never exceeds 1."""
MAX_MEMBERS = len(ALLOWED_FILES)
"""An adapter has at most one of each allowed file."""


def _safe_member_name(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or len(path.parts) != 1:
        raise InvalidAdapter(f"archive entry {name!r}: only plain file names are accepted")
    if path.name not in ALLOWED_FILES:
        raise InvalidAdapter(f"archive entry {name!r} is not an adapter file")
    return path.name


class _Extraction:
    """Writes members into `dest` within one byte budget."""

    def __init__(self, dest: Path, archive_bytes: int, max_bytes: int) -> None:
        self.dest = dest
        self.budget = min(max_bytes, MAX_RATIO * archive_bytes)
        self.reason = (
            f"over the adapter size limit of {max_bytes} bytes"
            if self.budget == max_bytes
            else f"over {MAX_RATIO} times the archive's size (a compression bomb? an "
            "uncompressed .tar is never refused for this)"
        )
        self.written = 0
        self.members: set[str] = set()

    def _refuse_size(self) -> InvalidAdapter:
        return InvalidAdapter(f"archive unpacks to {self.reason}")

    def member(self, name: str, declared_size: int, source: IO[bytes]) -> None:
        """Copy one member; its declared size is checked first, the bytes as they come."""
        file_name = _safe_member_name(name)
        if file_name in self.members:
            raise InvalidAdapter(f"archive entry {name!r} appears more than once")
        if len(self.members) >= MAX_MEMBERS:
            raise InvalidAdapter(f"archive has more than {MAX_MEMBERS} entries")
        self.members.add(file_name)
        if self.written + declared_size > self.budget:
            raise self._refuse_size()
        with (self.dest / file_name).open("xb") as out:
            while chunk := source.read(CHUNK_BYTES):
                self.written += len(chunk)
                if self.written > self.budget:  # the declared size lied (or zip's did)
                    raise self._refuse_size()
                out.write(chunk)

    def skip(self, size: int) -> None:
        """Bytes read but not written (after the last member) count against the budget too."""
        self.written += size
        if self.written > self.budget:
            raise self._refuse_size()


def extract_upload(archive: Path, dest: Path, max_bytes: int) -> int:
    """Unpack a .tar(.gz/.bz2/.xz) or .zip adapter archive into `dest`: plain adapter files
    only, within the byte budget; returns the bytes written. A damaged or truncated archive is
    the upload's fault (INVALID_ARGUMENT), never an internal error."""
    dest.mkdir(parents=True, exist_ok=False)
    extraction = _Extraction(dest, archive.stat().st_size, max_bytes)
    try:
        _extract(archive, extraction)
    except _DAMAGED as exc:
        raise InvalidAdapter(
            f"the archive is damaged or truncated ({type(exc).__name__}: {exc})"
        ) from exc
    return extraction.written


# What the decompressors and archive readers raise on bad bytes (gzip's is an OSError).
_DAMAGED = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    EOFError,
)


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The archive's bytes through the decompressor its magic number names (tarfile's own
    stream reader skips the gzip checksum), or as they are."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic.startswith(b"BZh"):
        return cast(BinaryIO, bz2.BZ2File(raw))
    if magic.startswith(b"\xfd7zXZ\x00"):
        return cast(BinaryIO, lzma.LZMAFile(raw))
    return raw


def _extract(archive: Path, extraction: _Extraction) -> None:
    if tarfile.is_tarfile(archive):
        with archive.open("rb") as raw, _decompressed(raw) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:  # a stream: each header is read after the previous member
                    if not member.isfile():
                        raise InvalidAdapter(f"archive entry {member.name!r} is not a regular file")
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has content
                    extraction.member(member.name, member.size, source)
            # Read on to the end, within the budget: the gzip, bz2 and xz readers check the
            # stream's checksums there, so a corrupted upload is refused, not half-read.
            while chunk := stream.read(CHUNK_BYTES):
                extraction.skip(len(chunk))
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            entries = zf.infolist()
            if len(entries) > MAX_MEMBERS:
                raise InvalidAdapter(f"archive has more than {MAX_MEMBERS} entries")
            for info in entries:
                if info.is_dir() or (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InvalidAdapter(f"archive entry {info.filename!r} is not a regular file")
                with zf.open(info) as source:
                    extraction.member(info.filename, info.file_size, source)
    else:
        raise InvalidAdapter("upload is neither a tar nor a zip archive")
