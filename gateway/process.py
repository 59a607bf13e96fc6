"""Child server processes (gateway, vLLM's server) for the demo, tests and benchmarks.

Each child gets its own session, so stopping it also stops the engine processes it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run a server in its own process group, logging to a file."""
    with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def start_gateway(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`loraplex serve ARGS` as a child process."""
    return spawn([sys.executable, "-m", "gateway.cli", "serve", *args], log_path, env)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child and everything in its process group (its engine processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(proc: subprocess.Popen, timeout: float = 90.0) -> int:
    """SIGTERM and wait for the drain; SIGKILL the group if it hangs. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        return proc.returncode
