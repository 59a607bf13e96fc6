"""What a compression bomb upload costs the gateway: time, peak memory, peak disk.

The bomb is the one from the issue: a ~1.3 MB tar.gz whose two members (each under the
default 1 GiB adapter limit) unpack to 1.25 GiB of zeros. It goes through the registry's real
upload path (`Registry.upload`: receive, extract, validate), in this process, with SQLite and
no engine, once alone and then `--concurrent` at once. Run it on another checkout with
`PYTHONPATH=<checkout>` to measure that code the same way (benchmarks/README.md has both).

    python benchmarks/upload_bomb.py [--member-mib 640] [--concurrent 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

from gateway.errors import LoraplexError
from gateway.registry.service import Registration, Registry
from tests.support.adapters import zero_bomb
from trainer.tiny import build_tiny_model

try:
    from gateway.registry.base_model import BaseModelFacts
except ImportError:  # checkouts before the base-model module
    from gateway.registry.validate import BaseModelFacts  # type: ignore[no-redef]

MIB = 1 << 20
ADAPTER_LIMIT = 1 << 30  # the gateway's default max_adapter_bytes


def build_bomb(path: Path, member_bytes: int) -> bytes:
    zero_bomb(path, {"README.md": member_bytes, "adapter_model.safetensors": member_bytes})
    return path.read_bytes()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peaks:
    """Peak RSS (the kernel's high-water mark, reset first) and peak disk under a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.disk, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
                self.disk = max(self.disk, size)
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    def __enter__(self) -> Peaks:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.rss_before = _rss_kib("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_peak_delta = _rss_kib("VmHWM") - self.rss_before


async def upload_bombs(registry: Registry, bomb: bytes, count: int) -> list[str]:
    async def chunks():
        for i in range(0, len(bomb), MIB):
            yield bomb[i : i + MIB]

    async def prewarm(_adapter) -> None:
        raise AssertionError("a bomb must never reach the engine")

    async def one(i: int) -> str:
        try:
            await registry.upload(Registration(name=f"bomb-{i}"), chunks(), "", "bench", prewarm)
        except LoraplexError as exc:
            return f"{exc.code.name}: {exc}"
        return "ACCEPTED"

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member-mib", type=int, default=640)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("build/bench/upload_bomb"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_model(args.out / "tiny")
    bomb = build_bomb(args.out / "bomb.tar.gz", args.member_mib * MIB)
    print(f"bomb: {len(bomb) / 1e6:.2f} MB, unpacks to {2 * args.member_mib} MiB")
    rows = []
    for count in (1, args.concurrent):
        with tempfile.TemporaryDirectory(dir=args.out) as data:
            data_dir = Path(data)
            registry = Registry.open(
                f"sqlite:///{data_dir / 'registry.db'}",
                data_dir,
                BaseModelFacts.from_folder(tiny.base),
                16,
                ADAPTER_LIMIT,
            )
            with Peaks(data_dir) as peaks:
                start = time.perf_counter()
                outcomes = asyncio.run(upload_bombs(registry, bomb, count))
                seconds = time.perf_counter() - start
            registry.close()
        row = {
            "uploads": count,
            "seconds": round(seconds, 2),
            "peak_rss_mib": round(peaks.rss_peak_delta / 1024),
            "peak_disk_mib": round(peaks.disk / MIB),
            "outcomes": outcomes,
        }
        rows.append(row)
        print(
            f"{count} at once: {seconds:6.2f} s, peak RSS +{row['peak_rss_mib']} MiB, "
            f"peak disk {row['peak_disk_mib']} MiB"
        )
        for outcome in sorted(set(outcomes)):
            print(f"    {outcomes.count(outcome)} x {outcome[:150]}")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
