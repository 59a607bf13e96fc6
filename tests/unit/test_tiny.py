"""The tiny model builder is deterministic and lays out what vLLM and peft load."""

from __future__ import annotations

import hashlib
import json

from trainer.tiny import build_tiny_model


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_are_deterministic_with_distinct_adapters(tmp_path):
    first = build_tiny_model(tmp_path / "a", adapters=3)
    second = build_tiny_model(tmp_path / "b", adapters=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(first.base / name) == _digest(second.base / name)
    shapes = set()
    for name, folder in first.adapters.items():
        weights = folder / "adapter_model.safetensors"
        assert _digest(weights) == _digest(second.adapters[name] / "adapter_model.safetensors")
        config = json.loads((folder / "adapter_config.json").read_text())
        shapes.add((config["r"], tuple(sorted(config["target_modules"]))))
    assert len(shapes) == 3
    config = json.loads((first.base / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
