"""Adapters broken in one way each, and archives of adapter files, for the registry's tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_config(folder, **changes):
    """Change keys of the adapter's adapter_config.json."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder, edit):
    """Apply `edit` to the adapter's tensors (a dict) and save them back."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _drop_b(tensors):
    del tensors[next(k for k in tensors if "lora_B" in k)]


def _rename_module(tensors):
    for key in [k for k in tensors if "layers.0.self_attn.q_proj" in k]:
        tensors[key.replace("q_proj", "nonexistent_proj")] = tensors.pop(key)


BROKEN = {  # case -> (how to break an adapter folder, the refusal it must get)
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "no weights": (
        lambda f: (f / "adapter_model.safetensors").unlink(),
        "adapter_model.safetensors is missing",
    ),
    "config not json": (
        lambda f: (f / "adapter_config.json").write_text("{oops"),
        "not valid JSON",
    ),
    "weights not safetensors": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10),
        "not a readable safetensors",
    ),
    "not lora": (lambda f: edit_config(f, peft_type="IA3"), "only LORA"),
    "bad r": (lambda f: edit_config(f, r=0), "r must be a positive integer"),
    "r disagrees with weights": (lambda f: edit_config(f, r=4), "disagree with r=4"),
    "weights outside target_modules": (
        lambda f: edit_config(f, target_modules=["q_proj"]),
        "not in target_modules",
    ),
    "lora_A without lora_B": (lambda f: edit_weights(f, _drop_b), "without its pair"),
    "module not in base": (
        lambda f: (
            edit_weights(f, _rename_module),
            edit_config(f, target_modules=["q_proj", "v_proj", "nonexistent_proj"]),
        ),
        "not in the base model",
    ),
    "other base by name": (
        lambda f: edit_config(f, base_model_name_or_path="meta-llama/Llama-3.1-8B"),
        "rule: declared name",
    ),
    "no base at all": (
        lambda f: edit_config(f, base_model_name_or_path=None),
        "cannot tell which base",
    ),
    "other base by fingerprint": (
        lambda f: (f / "manifest.json").write_text(json.dumps({"base_fingerprint": "base-v1:00"})),
        "rule: fingerprint",
    ),
    "unexpected file": (lambda f: (f / "run.sh").write_text("rm -rf /"), "unexpected entry"),
    "symlink": (lambda f: (f / "README.md").symlink_to("/etc/passwd"), "symbolic links"),
}


def tar_of(tmp_path, entries: dict[str, bytes], symlink: str | None = None):
    """A .tar.gz of `entries` (name -> bytes), plus a symlink entry if asked."""
    path = tmp_path / "upload.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


class _Zeros(io.RawIOBase):
    """`size` zero bytes as a file, without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zero_bomb(path: Path, members: dict[str, int]) -> Path:
    """A compression bomb: a tar.gz whose members (name -> size) are all zero bytes; a few
    hundred MiB pack into well under 1 MB."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name, size in members.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    return path
