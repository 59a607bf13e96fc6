"""Traffic capture: a sample of served requests and their responses, as rotating JSONL files.

Off unless `capture_dir` is set. Files, not the registry database: capture is an append-only
stream on the request path, which must never wait on (or contend with) the registry's
transactions; files rotate and expire by size, ship anywhere, and `loraplex eval compare` /
`eval pairs` read them as prompt sets. The request path only decides the sample and appends a
dict to a deque (no lock, no wake-up); a writer thread drains it every WRITE_INTERVAL_S,
formats, redacts and writes, so a slow disk costs dropped records (counted), never latency.
No request metadata is read, so no API key can reach a file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pkgutil
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.domain import EngineRequest, GenerationChunk

log = logging.getLogger(__name__)

FORMAT = "loraplex-capture/1"
FILE_GLOB = "capture-*.jsonl"
REDACTED = "[REDACTED]"
BASE = "base"  # the sampling-rate key of requests without an adapter
QUEUE_RECORDS = 10_000  # records waiting for the writer; past it, new ones are dropped
WRITE_INTERVAL_S = 0.2  # the writer wakes this often (not per record: no GIL hand-off each)

Hook = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class CaptureSettings:
    """GatewayConfig's capture_* fields."""

    folder: Path
    default_rate: float
    rates: dict[str, float]
    redact: Sequence[str] = ()
    hook: str | None = None
    max_file_bytes: int = 64 << 20
    max_total_bytes: int = 1 << 30


def load_hook(spec: str) -> Hook:
    """`module:function` -> the function (pkgutil's resolver, as entry points are written)."""
    try:
        hook = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"capture_hook {spec!r} cannot be imported: {exc}") from exc
    if not callable(hook):
        raise ValueError(f"capture_hook {spec!r} is not a function")
    return hook


class TrafficCapture:
    """Samples requests (per adapter reference, name, or the default rate) and writes them."""

    def __init__(
        self,
        settings: CaptureSettings,
        on_outcome: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._patterns = [re.compile(p) for p in settings.redact]
        self._hook = load_hook(settings.hook) if settings.hook else None
        self._on_outcome = on_outcome or (lambda _outcome: None)
        self._rng = rng or random.Random()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._closing = threading.Event()
        settings.folder.mkdir(parents=True, exist_ok=True)
        self._file: Any = None
        self._file_bytes = 0
        self._sequence = 0
        self._thread = threading.Thread(target=self._write_loop, name="capture", daemon=True)
        self._thread.start()

    def sampled(self, requested: str, engine_request: EngineRequest) -> bool:
        """Whether this request is captured: the rate of the reference as sent (NAME@alias),
        else of the adapter's name (`base` without one), else the default."""
        adapter = engine_request.adapter
        name = adapter.name if adapter is not None else BASE
        rates = self.settings.rates
        rate = rates.get(requested, rates.get(name, self.settings.default_rate))
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    def record(
        self,
        requested: str,
        prompt_text: str | None,
        engine_request: EngineRequest,
        response: GenerationChunk,
    ) -> None:
        """Queue one served request (call only for sampled ones); never blocks, never raises."""
        adapter = engine_request.adapter
        usage = response.usage
        item: dict[str, Any] = {
            "format": FORMAT,
            "id": engine_request.request_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "adapter": adapter.name if adapter is not None else "",
            "version": adapter.version if adapter is not None else None,
            "requested": requested,
            "prompt": prompt_text,
            "response": response.text,
            "finish_reason": response.finish_reason.value if response.finish_reason else None,
            "prompt_tokens": usage.prompt_tokens if usage else len(engine_request.prompt_token_ids),
            "completion_tokens": usage.completion_tokens if usage else len(response.token_ids),
        }
        if prompt_text is None:
            item["prompt_token_ids"] = list(engine_request.prompt_token_ids)
        if len(self._pending) >= QUEUE_RECORDS:
            self._on_outcome("dropped_full")
            return
        self._pending.append(item)  # atomic; the writer picks it up within WRITE_INTERVAL_S

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "capture: the writer did not finish in %.0f s; records may be lost", timeout
            )

    # -- the writer thread --------------------------------------------------------------------

    def _redact(self, text: str | None) -> str | None:
        if text is None:
            return None
        for pattern in self._patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def _write_loop(self) -> None:
        while True:
            closing = self._closing.wait(WRITE_INTERVAL_S)
            while self._pending:
                self._write(self._pending.popleft())
            if self._file is not None:
                self._file.flush()  # readers see each batch at once
            if closing:
                break
        if self._file is not None:
            self._file.close()

    def _write(self, item: dict[str, Any]) -> None:
        item["prompt"] = self._redact(item["prompt"])
        item["response"] = self._redact(item["response"])
        record: dict[str, Any] | None = item
        if self._hook is not None:
            try:
                record = self._hook(item)
            except Exception:  # a broken hook drops records, never requests
                log.exception("capture_hook failed; the record is dropped")
                self._on_outcome("dropped_hook_error")
                return
            if record is None:
                self._on_outcome("dropped_by_hook")
                return
        try:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            if self._file is None or self._file_bytes + len(line) > self.settings.max_file_bytes:
                self._rotate()
            self._file.write(line)
            self._file_bytes += len(line)
        except (OSError, TypeError, ValueError) as exc:  # a full disk, a hook's bad value
            log.error("capture: cannot write a record: %s", exc)
            self._on_outcome("dropped_error")
            return
        self._on_outcome("written")

    def _rotate(self) -> None:
        """Start a new file; delete the oldest ones until the folder plus a full new file fit
        in max_total_bytes (a file grows to max_file_bytes before the next rotation)."""
        if self._file is not None:
            self._file.close()
        self._sequence += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.settings.folder / f"capture-{stamp}-{os.getpid()}-{self._sequence:05d}.jsonl"
        self._file = path.open("ab")
        self._file_bytes = 0
        files = sorted(self.settings.folder.glob(FILE_GLOB))
        total = sum(f.stat().st_size for f in files)
        for old in files:
            if total + self.settings.max_file_bytes <= self.settings.max_total_bytes or old == path:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)
