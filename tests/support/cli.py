"""Run the `loraplex` command as a user would: a subprocess, output captured."""

from __future__ import annotations

import os
import subprocess
import sys


def run_loraplex(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
