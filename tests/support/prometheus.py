"""A throwaway Prometheus server for tests: the repo's rules, a short scrape interval, loopback.

The binary comes from Debian's `prometheus` package; `make test` installs it when missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from gateway.process import free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules"
JOB = "loraplex-gateway"


class PrometheusServer:
    """Prometheus scraping `targets` every `scrape_interval_s`; use as a context manager."""

    def __init__(self, targets: list[str], scrape_interval_s: float = 1.0) -> None:
        self.targets = targets
        self.scrape_interval_s = scrape_interval_s
        self.port = 0
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }

    def __enter__(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("no `prometheus` binary: run `make test` (installs Debian's)")
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-prometheus-"))
        config = self.root / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        self.port = free_port()
        log = (self.root / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited; log:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError("prometheus did not become ready in 60 s")

    def log(self) -> str:
        assert self.root is not None
        return (self.root / "prometheus.log").read_text()[-4000:]

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query: {sorted label pairs (without __name__): value}."""
        data = self._get("/api/v1/query", query=promql)
        return {
            tuple(sorted((k, v) for k, v in item["metric"].items() if k != "__name__")): float(
                item["value"][1]
            )
            for item in data["result"]
        }

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rules (recording and alerting), with their health."""
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
