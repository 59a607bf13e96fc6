"""A real `loraplex serve` child process for the integration tests, on a free loopback port."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.client import Client, wait_until_serving
from gateway.process import free_port, kill, start_gateway, stop
from trainer.tiny import TinyModel

N_ADAPTERS = 5  # one more than the engine's 4 slots, and one with an lm_head LoRA
MAX_MODEL_LEN = 512


@dataclass
class RunningGateway:
    """A `loraplex serve` child process and how to reach it."""

    target: str
    process: subprocess.Popen
    log: Path
    metrics_port: int
    capture_dir: Path | None = None  # traffic capture's folder, when it is on

    def client(self) -> Client:
        return Client(self.target)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        return stop(self.process, timeout)


def launch_gateway(
    model: TinyModel,
    log: Path,
    *extra: str,
    data_dir: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> RunningGateway:
    """Start a gateway on a free loopback port and wait until it is SERVING.

    Registry mode with `data_dir`; otherwise directory mode over the tiny model's adapters.
    """
    port, metrics_port = free_port(), free_port()
    mode = (
        ["--data-dir", str(data_dir)]
        if data_dir is not None
        else ["--adapters-dir", str(model.base.parent / "adapters")]
    )
    args = [
        "--model", str(model.base),
        *mode,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        *extra,
    ]  # fmt: skip
    process = start_gateway(args, log)
    gateway = RunningGateway(f"127.0.0.1:{port}", process, log, metrics_port)
    try:
        wait_until_serving(
            gateway.target, 300, lambda: process.poll() is None, credentials=credentials
        )
    except (TimeoutError, RuntimeError):
        kill(process)
        raise RuntimeError(f"gateway did not start; log:\n{log.read_text()[-4000:]}") from None
    return gateway
