"""Uploads cost bounded time, memory and disk; adapters made for other bases are refused; no
message to a client names a path of the server.

Bounds are asserted on what the code controls (bytes written, bytes allocated) and on time
only as a ratio to decompressing the same archive in the same test, never in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import tarfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from gateway.errors import AdapterUnavailable, InvalidAdapter, status_of, without_host_paths
from gateway.registry.archive import (
    CHUNK_BYTES,
    MAX_MEMBERS,
    MAX_RATIO,
    _Extraction,
    extract_upload,
)
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc
from tests.support.adapters import BROKEN, tar_of, zero_bomb
from tests.support.foreign_adapters import FOREIGN, build_foreign_adapter
from tests.support.registry_server import (
    ACTOR,
    copy_adapter,
    expect_error,
    register,
    start_registry_server,
    state,
)

MIB = 1 << 20
BOMB_MEMBER_BYTES = 256 * MIB  # zeros; gzip packs each into ~250 KB
SERVER_MAX_BYTES = 1 << 30  # the gateway's default max_adapter_bytes


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """Two members, each under the size limit, 512 MiB in all from about 0.5 MB: the shape of
    the bomb that once wrote 641 MiB before it was refused."""
    members = {"adapter_config.json": BOMB_MEMBER_BYTES, "README.md": BOMB_MEMBER_BYTES}
    return zero_bomb(tmp_path_factory.mktemp("bomb") / "bomb.tar.gz", members)


def _inflate_seconds(archive: Path) -> float:
    """Time to read every member of the archive once, discarding it (the work of a full
    unpack without the disk): the yardstick of the bomb's refusal time."""
    start = time.perf_counter()
    with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            source = tar.extractfile(member)
            while source is not None and source.read(CHUNK_BYTES):
                pass
    return time.perf_counter() - start


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_bomb_is_refused_before_it_writes_a_byte(bomb, tmp_path):
    """A tar member's size is in its header: a member over the budget is never unpacked."""
    full = _inflate_seconds(bomb)
    start = time.perf_counter()
    with pytest.raises(InvalidAdapter, match=f"over {MAX_RATIO} times the archive's size"):
        extract_upload(bomb, tmp_path / "out", SERVER_MAX_BYTES)
    elapsed = time.perf_counter() - start
    assert _bytes_under(tmp_path / "out") == 0
    assert elapsed < 0.25 * full, (elapsed, full)  # measured: under 1% of a full inflate


def test_a_member_longer_than_it_declares_stops_at_the_budget_holding_one_chunk(tmp_path):
    """Whatever a reader lets through, the bytes are counted as they are written."""

    class Endless:
        """Hands out one preallocated chunk forever: only the extraction's allocations count."""

        chunk = bytes(CHUNK_BYTES)

        def read(self, size: int) -> bytes:
            assert size <= CHUNK_BYTES
            return self.chunk

    (tmp_path / "out").mkdir()
    extraction = _Extraction(tmp_path / "out", archive_bytes=MIB, max_bytes=SERVER_MAX_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidAdapter, match=f"over {MAX_RATIO} times the archive's size"):
            extraction.member("adapter_model.safetensors", 0, Endless())  # declares nothing
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _bytes_under(tmp_path / "out") <= MAX_RATIO * MIB
    assert peak < CHUNK_BYTES, peak  # nothing held beyond the chunk being written


def test_a_member_over_the_limit_is_refused_by_its_declared_size_before_any_write(tmp_path):
    archive = zero_bomb(tmp_path / "big.tar.gz", {"adapter_model.safetensors": 64 * MIB})
    ratio_budget = MAX_RATIO * archive.stat().st_size
    with pytest.raises(InvalidAdapter, match="size limit of 65536 bytes"):
        extract_upload(archive, tmp_path / "out", max_bytes=64 * 1024)
    assert ratio_budget > 64 * 1024 and _bytes_under(tmp_path / "out") == 0


def test_duplicate_and_surplus_members_are_refused(tmp_path):
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("adapter_config.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(InvalidAdapter, match="appears more than once"):
        extract_upload(twice, tmp_path / "a", SERVER_MAX_BYTES)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(MAX_MEMBERS + 1):
            zf.writestr(f"f{i}", b"")
    with pytest.raises(InvalidAdapter, match=f"more than {MAX_MEMBERS} entries"):
        extract_upload(many, tmp_path / "b", SERVER_MAX_BYTES)


def test_a_real_adapter_compresses_far_below_the_ratio_cap(tiny_model, tmp_path):
    """Even an untrained adapter (peft's default init: every lora_B all zeros) unpacks to a
    few times its archive: the cap leaves real adapters a wide margin."""
    folder = copy_adapter(tiny_model, tmp_path, "delta")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, weights)
    archive = tar_of(tmp_path, {p.name: p.read_bytes() for p in folder.iterdir()})
    written = extract_upload(archive, tmp_path / "out", SERVER_MAX_BYTES)
    assert written / archive.stat().st_size < MAX_RATIO / 4


# -- through gRPC, against a real registry


def _messages(header: apb.UploadHeader, data: bytes, chunk: int = 64 * 1024):
    yield apb.UploadAdapterRequest(header=header)
    for i in range(0, len(data), chunk):
        yield apb.UploadAdapterRequest(chunk=data[i : i + chunk])


class _DiskPeak:
    """Samples the bytes under a folder every millisecond (a lower bound of the true peak,
    which the extraction's own accounting bounds from above)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):  # removed while being listed
                self.peak = max(self.peak, _bytes_under(self.folder))
            time.sleep(0.001)

    def __enter__(self) -> _DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
async def served(tiny_model, tmp_path):
    server = await start_registry_server(
        tiny_model.base, tmp_path / "data", max_bytes=SERVER_MAX_BYTES, max_uploads=2
    )
    channel = grpc.aio.insecure_channel(server.target)
    yield server, adapters_pb2_grpc.AdapterServiceStub(channel)
    await channel.close()
    await server.stop()


async def test_a_bomb_upload_is_refused_within_its_budget_and_leaves_nothing(served, bomb):
    server, stub = served
    before = state(server)
    data = bomb.read_bytes()
    with _DiskPeak(server.registry.uploads) as disk:
        await expect_error(
            stub.UploadAdapter(_messages(apb.UploadHeader(name="bomb"), data), metadata=ACTOR),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"over {MAX_RATIO} times the archive's size",
        )
    assert disk.peak <= len(data) + MAX_RATIO * len(data) + CHUNK_BYTES < 16 * MIB
    assert state(server) == before


async def test_uploads_past_the_bound_are_refused_at_once_and_the_bound_recovers(
    served, bomb, tiny_model, tmp_path
):
    """Two bombs held open fill the bound; a third upload gets RESOURCE_EXHAUSTED with a
    retry hint before it sends a byte; the two are refused; then an upload goes through."""
    server, stub = served
    before = state(server)
    data = bomb.read_bytes()
    release = asyncio.Event()

    async def held(name: str):
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name))
        await release.wait()
        for message in list(_messages(apb.UploadHeader(name=name), data))[1:]:
            yield message

    calls = [stub.UploadAdapter(held(f"bomb-{i}"), metadata=ACTOR) for i in range(2)]
    tasks = [asyncio.ensure_future(call) for call in calls]
    for _ in range(500):  # both uploads have started on the server (their work folders)
        if len(list(server.registry.uploads.iterdir())) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(list(server.registry.uploads.iterdir())) == 2
    third = stub.UploadAdapter(_messages(apb.UploadHeader(name="third"), data), metadata=ACTOR)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await third
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 uploads are already running" in err.value.details()
    assert dict(err.value.trailing_metadata() or ())["retry-after"] == "1.000"
    with _DiskPeak(server.registry.uploads) as disk:
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r.code() for r in results] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert disk.peak <= 2 * (len(data) + MAX_RATIO * len(data) + CHUNK_BYTES)
    assert state(server) == before
    folder = copy_adapter(tiny_model, tmp_path)
    archive = tar_of(tmp_path, {p.name: p.read_bytes() for p in folder.iterdir()}).read_bytes()
    reply = await stub.UploadAdapter(
        _messages(apb.UploadHeader(name="good"), archive), metadata=ACTOR
    )
    assert reply.version.version == 1


@pytest.mark.parametrize("claim", ["name", "fingerprint"])
@pytest.mark.parametrize("case", sorted(FOREIGN))
async def test_an_adapter_for_another_base_is_refused_and_leaves_nothing(
    served, tiny_model, tmp_path, case, claim
):
    server, stub = served
    before = state(server)
    changes, targets, message = FOREIGN[case]
    folder = build_foreign_adapter(tiny_model.base, tmp_path / "a", changes, targets, claim)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(register(stub, folder, name="foreign"), invalid, message)
    archive = tar_of(tmp_path, {p.name: p.read_bytes() for p in folder.iterdir()}).read_bytes()
    header = apb.UploadHeader(name="foreign", archive_sha256=hashlib.sha256(archive).hexdigest())
    await expect_error(
        stub.UploadAdapter(_messages(header, archive), metadata=ACTOR), invalid, message
    )
    assert state(server) == before
    assert server.engine.loaded == {}  # never reached the engine


# -- no host path in any message to a client

_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/[\w.@+~-]")


def _assert_no_host_path(details: str, *server_paths: Path) -> None:
    for path in server_paths:
        assert str(path) not in details, details
    assert _ABSOLUTE.search(details) is None, details


async def test_no_refusal_names_a_path_of_the_server(served, tiny_model, tmp_path, bomb):
    """Every refusal registration has, by path and by upload, read back from the wire."""
    server, stub = served
    seen: list[str] = []

    async def refused(call) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        seen.append(err.value.details())

    for case, (breaks, _) in sorted(BROKEN.items()):
        folder = copy_adapter(tiny_model, tmp_path, "alpha")
        breaks(folder)
        await refused(register(stub, folder, name="audit"))
        if case != "symlink":  # an archive cannot carry the host's symlink
            files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
            archive = tar_of(tmp_path, files).read_bytes()
            upload = _messages(apb.UploadHeader(name="audit"), archive)
            await refused(stub.UploadAdapter(upload, metadata=ACTOR))
    for changes, targets, _ in FOREIGN.values():
        folder = build_foreign_adapter(
            tiny_model.base, tmp_path / f"f{len(seen)}", changes, targets
        )
        await refused(register(stub, folder, name="audit"))
    await refused(register(stub, tmp_path / "missing", name="audit"))
    await refused(register(stub, tmp_path / "missing" / "deeper", name="audit"))
    bomb_upload = _messages(apb.UploadHeader(name="audit"), bomb.read_bytes())
    await refused(stub.UploadAdapter(bomb_upload, metadata=ACTOR))
    assert len(seen) >= 2 * len(BROKEN) + len(FOREIGN)
    for details in seen:
        _assert_no_host_path(details, tmp_path, server.data_dir, tiny_model.base)


def test_the_error_mapping_cuts_paths_that_slip_into_a_message():
    """The last line of defence: a domain error quoting an OSError still names no path."""
    slipped = AdapterUnavailable(
        "adapter 'x' is unreadable: [Errno 13] Permission denied: "
        "'/srv/loraplex/adapters/x/adapter_config.json'"
    )
    code, details = status_of(slipped)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        details == "adapter 'x' is unreadable: [Errno 13] Permission denied: 'adapter_config.json'"
    )
    kept = "lora_A/lora_B ranks 4/8 disagree; see https://github.com/vllm-project/vllm/issues/1"
    assert without_host_paths(kept) == kept
    assert without_host_paths("trained for base '/models/llama'") == "trained for base 'llama'"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_archive_is_the_uploads_fault_not_an_internal_error(tmp_path, kind, damage):
    """Random bytes (incompressible, as trained weights are) in a damaged archive."""
    data = torch.randn(64 * 1024).numpy().tobytes()
    archive = tmp_path / f"a.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("adapter_model.safetensors", data)
    else:
        archive = tar_of(tmp_path, {"adapter_model.safetensors": data})
    raw = bytearray(archive.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2] if kind == "zip" else raw[:30]
    else:
        raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    archive.write_bytes(bytes(raw))
    with pytest.raises(InvalidAdapter, match=r"damaged or truncated|neither a tar nor a zip"):
        extract_upload(archive, tmp_path / "out", SERVER_MAX_BYTES)
