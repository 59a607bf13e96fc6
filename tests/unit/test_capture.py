"""Traffic capture: sampling, the record, redaction and hooks, rotation within the bound, and no
key material, through a real gRPC servicer (fake engine)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gateway.capture import FILE_GLOB, FORMAT, REDACTED, CaptureSettings, TrafficCapture
from gateway.client import AsyncClient
from gateway.config import ConfigError, load_config
from gateway.domain import (
    EngineRequest,
    GenerationChunk,
    ResolvedAdapter,
    Sampling,
    Stopping,
    Usage,
)
from gateway.keys import KeyRing, KeyStore
from tests.support.registry_server import start_registry_server


def make_adapter(name: str, version: int) -> ResolvedAdapter:
    return ResolvedAdapter(name, version, version, Path("/nowhere"), 8, ())


def _settings(folder: Path, **changes) -> CaptureSettings:
    values = {"folder": folder, "default_rate": 1.0, "rates": {}, **changes}
    return CaptureSettings(**values)


def _request(adapter=None, request_id="r1", prompt=(5, 6, 7)) -> EngineRequest:
    return EngineRequest(request_id, prompt, Sampling(), Stopping(), 8, None, None, adapter)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob(FILE_GLOB)) for line in f.open()]


def _capture(folder: Path, **changes) -> tuple[TrafficCapture, list[str]]:
    outcomes: list[str] = []
    return TrafficCapture(_settings(folder, **changes), outcomes.append), outcomes


def test_rates_by_reference_then_name_then_default(tmp_path):
    capture, _ = _capture(
        tmp_path, default_rate=0.0, rates={"acme@candidate": 1.0, "acme": 0.0, "base": 1.0}
    )
    acme = _request(make_adapter("acme", 2))
    assert capture.sampled("acme@candidate", acme)
    assert not capture.sampled("acme", acme) and not capture.sampled("acme@production", acme)
    assert capture.sampled("", _request())  # no adapter: the `base` rate
    assert not capture.sampled("other", _request(make_adapter("other", 1)))  # the default
    capture.close()


def test_a_fractional_rate_samples_about_that_share(tmp_path):
    settings = _settings(tmp_path, default_rate=0.25)
    capture = TrafficCapture(settings, rng=random.Random(0))
    share = sum(capture.sampled("", _request()) for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28, share
    capture.close()


def test_a_record_holds_the_served_version_redacted_text_and_usage(tmp_path):
    capture, outcomes = _capture(tmp_path, redact=[r"[\w.]+@[\w.]+", r"\b\d{4}-\d{4}\b"])
    response = GenerationChunk(text="mail bob@example.com, card 1234-5678", token_ids=[1, 2])
    response.usage = Usage(prompt_tokens=3, completion_tokens=2)
    capture.record("acme@candidate", "I am ann@example.org", _request(make_adapter("acme", 3)),
                   response)  # fmt: skip
    capture.record("", None, _request(request_id="r2"), GenerationChunk(text="x", token_ids=[9]))
    capture.close()
    first, second = _records(tmp_path)
    assert (
        first["format"] == FORMAT and first["id"] == "r1" and first["requested"] == "acme@candidate"
    )
    assert (first["adapter"], first["version"]) == ("acme", 3)
    assert first["prompt"] == f"I am {REDACTED}"
    assert first["response"] == f"mail {REDACTED}, card {REDACTED}"
    assert (first["prompt_tokens"], first["completion_tokens"]) == (3, 2)
    assert "prompt_token_ids" not in first
    assert second["prompt"] is None and second["prompt_token_ids"] == [5, 6, 7]
    assert (second["adapter"], second["version"]) == ("", None)
    assert outcomes == ["written", "written"]


def keep_short(record: dict) -> dict | None:
    """A capture hook: drops long answers, tags the rest."""
    if len(record["response"]) > 3:
        return None
    return {**record, "tag": "short"}


def broken(record: dict) -> dict | None:
    raise RuntimeError("hook bug")


def test_a_hook_changes_or_drops_records_and_a_broken_one_drops_only_records(tmp_path):
    capture, outcomes = _capture(tmp_path / "a", hook=f"{__name__}:keep_short")
    for text in ("ok", "far too long"):
        capture.record("", "p", _request(), GenerationChunk(text=text))
    capture.close()
    assert [(r["response"], r["tag"]) for r in _records(tmp_path / "a")] == [("ok", "short")]
    assert outcomes == ["written", "dropped_by_hook"]
    capture, outcomes = _capture(tmp_path / "b", hook=f"{__name__}:broken")
    capture.record("", "p", _request(), GenerationChunk(text="ok"))
    capture.close()
    assert _records(tmp_path / "b") == [] and outcomes == ["dropped_hook_error"]
    with pytest.raises(ValueError, match="cannot be imported"):
        TrafficCapture(_settings(tmp_path, hook="no.such.module:f"))


def test_files_rotate_and_the_folder_stays_within_its_bound(tmp_path):
    capture, outcomes = _capture(tmp_path, max_file_bytes=4096, max_total_bytes=3 * 4096)
    for i in range(300):  # ~350 bytes each: ~100 KiB in all, 25 times the file size
        capture.record("", "p" * 100, _request(request_id=f"r{i:03d}"),
                       GenerationChunk(text="x" * 100))  # fmt: skip
    capture.close()
    files = sorted(tmp_path.glob(FILE_GLOB))
    assert len(files) >= 2 and all(f.stat().st_size <= 4096 for f in files)
    assert sum(f.stat().st_size for f in files) <= 3 * 4096
    ids = [r["id"] for r in _records(tmp_path)]
    assert ids == sorted(ids) and ids[-1] == "r299"  # the newest kept, the oldest deleted
    assert outcomes.count("written") == 300


def test_capture_settings_are_checked():
    with pytest.raises(ConfigError, match="capture_redact"):
        load_config(model="m", capture_dir="/tmp/c", capture_redact=["(unclosed"])
    with pytest.raises(ConfigError, match="capture_rates"):
        load_config(model="m", capture_rates={"acme": 2.0})
    with pytest.raises(ConfigError, match="2 x capture_max_file_bytes"):
        load_config(model="m", capture_max_file_bytes=1 << 20, capture_max_total_bytes=1 << 20)
    assert load_config(model="m").capture is None  # off by default


async def test_served_requests_are_captured_without_key_material(tiny_model, tmp_path):
    """Unary and streamed requests through gRPC with an API key: the key is in no file."""
    store = KeyStore(f"sqlite:///{tmp_path / 'keys.db'}")
    _, secret = store.create("tester", "admin", "test")
    keys = KeyRing(store)
    capture = TrafficCapture(_settings(tmp_path / "capture"))
    server = await start_registry_server(
        tiny_model.base, tmp_path / "data", keys=keys, capture=capture
    )
    try:
        async with AsyncClient(server.target, api_key=secret) as client:
            unary = await client.generate("hello there", max_tokens=3, request_id="u1")
            streamed = [d async for d in client.stream("general kenobi", max_tokens=3,
                                                       request_id="s1")]  # fmt: skip
    finally:
        await server.stop()
        capture.close()
    records = {r["id"]: r for r in _records(tmp_path / "capture")}
    assert records["u1"]["prompt"] == "hello there" and records["u1"]["response"] == unary.text
    assert records["s1"]["response"] == "".join(d.text for d in streamed)
    assert records["s1"]["completion_tokens"] == 3
    text = "".join(f.read_text() for f in (tmp_path / "capture").glob(FILE_GLOB))
    assert secret not in text and "authorization" not in text.lower()
