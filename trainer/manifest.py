"""manifest.json: where an adapter came from, so a version in the registry can be trusted.

The registry checks `base_fingerprint` against the served base (the same rule,
`gateway.registry.fingerprint`), and shows the rest as provenance.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.contract import base_fingerprint
from trainer.config import RunConfig
from trainer.data import DataReport

MANIFEST_FORMAT = "loraplex-adapter-manifest/1"
VERSIONED = (
    "loraplex",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the result."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    config: RunConfig,
    data: DataReport,
    metrics: dict[str, dict[str, float]],
    wall_time_s: float,
    global_step: int,
) -> dict[str, Any]:
    """The manifest of a finished run (JSON-ready)."""
    return {
        "format": MANIFEST_FORMAT,
        "method": config.method,
        "task": "reward-model" if config.method == "reward" else "causal-lm",
        "quantization": "bnb-4bit" if config.quantization is not None else None,
        "base_model": str(config.model.path),
        "base_fingerprint": base_fingerprint(config.model.path),
        "init_from": str(config.lora.init_from) if config.lora.init_from else None,
        "config": config.model_dump(mode="json"),
        "data": data.as_dict(),
        "metrics": metrics,
        "seed": config.training.seed,
        "steps": global_step,
        "versions": library_versions(),
        "wall_time_s": round(wall_time_s, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json into the adapter folder."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
