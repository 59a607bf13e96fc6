"""The content-addressed artifact store."""

from __future__ import annotations

import pytest

from gateway.contract import folder_digest
from gateway.registry.artifacts import ArtifactStore


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    return src


def test_put_is_content_addressed_idempotent_and_read_only(tmp_path, folder):
    store = ArtifactStore(tmp_path / "store")
    first = store.put(folder)
    again = store.put(folder)
    assert first.created and not again.created
    assert first.sha256 == again.sha256 == folder_digest(folder)
    assert sorted(p.name for p in first.path.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert all(p.stat().st_mode & 0o222 == 0 for p in first.path.iterdir())
    assert list(store.tmp.iterdir()) == []
    (folder / "adapter_model.safetensors").write_bytes(b"retrained")
    assert store.put(folder).sha256 != first.sha256


def test_sweep_removes_crash_leftovers_and_orphans(tmp_path, folder):
    store = ArtifactStore(tmp_path / "store")
    kept = store.put(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"other")
    orphan = store.put(folder)
    (store.tmp / "half-copied").mkdir()
    removed = store.sweep(referenced={kept.sha256})
    assert removed == [orphan.sha256]
    assert store.exists(kept.sha256) and not store.exists(orphan.sha256)
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("damage", ["emptied", "changed"])
def test_put_replaces_a_stored_copy_damaged_since(tmp_path, folder, damage):
    """Registering the same files again heals an object whose files were deleted or altered."""
    store = ArtifactStore(tmp_path / "store")
    stored = store.put(folder)
    weights = stored.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    if damage == "emptied":
        weights.unlink()
    else:
        weights.write_bytes(b"bit rot")
    healed = store.put(folder)
    assert healed.created and healed.path == stored.path
    assert folder_digest(healed.path) == stored.sha256
    assert list(store.tmp.iterdir()) == []
