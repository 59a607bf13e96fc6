"""A registration killed with SIGKILL at each step leaves a consistent registry after restart.

A child process registers an adapter and parks at a failpoint (LORAPLEX_TEST_PAUSE_AT); the
test kills it with SIGKILL there, then opens the registry as a restarted gateway would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gateway.registry.artifacts import PAUSE_ENV
from gateway.registry.base_model import BaseModelFacts
from gateway.registry.service import Registration, Registry

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway.registry.service import Registration, Registry
    from gateway.registry.base_model import BaseModelFacts

    url, data, base, adapter = sys.argv[1:5]
    registry = Registry.open(url, Path(data), BaseModelFacts.from_folder(Path(base)), 16, 1 << 26)

    async def no_engine(adapter):
        return None

    asyncio.run(registry.register(Path(adapter), Registration("acme"), "child", no_engine))
    """
)


async def _noop_prewarm(adapter: object) -> None:
    return None


def _open(registry_url, tmp_path, tiny_model) -> Registry:
    base = BaseModelFacts.from_folder(tiny_model.base)
    return Registry.open(registry_url, tmp_path / "data", base, 16, 1 << 26)


def _kill_registration_at(point, registry_url, tmp_path, tiny_model) -> None:
    marker = tmp_path / f"reached-{point}"
    env = {**os.environ, PAUSE_ENV: point, f"{PAUSE_ENV}_MARKER": str(marker)}
    args = [registry_url, tmp_path / "data", tiny_model.base, tiny_model.adapters["alpha"]]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never reached the failpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("point", ["before_rename", "after_artifact", "after_commit"])
async def test_sigkill_mid_registration_leaves_a_consistent_registry(
    point, registry_url, tmp_path, tiny_model
):
    _kill_registration_at(point, registry_url, tmp_path, tiny_model)
    registry = _open(registry_url, tmp_path, tiny_model)  # the restart: recovery runs here
    try:
        snapshot = registry.store.snapshot()
        objects = sorted(p.name for p in registry.artifacts.objects.iterdir())
        assert list(registry.artifacts.tmp.iterdir()) == []
        if point == "after_commit":  # committed: a complete version, its files in place
            assert [(a, n) for a, n, *_ in snapshot.versions] == [("acme", 1)]
            sha = snapshot.versions[0][2]
            assert objects == [sha]
            assert (registry.artifacts.path(sha) / "adapter_model.safetensors").is_file()
        else:  # not committed: no version, no files
            assert snapshot.versions == [] and objects == []
            assert registry.store.audit_events() == []
        # and the registry works: the next registration gets the next number
        record = await registry.register(
            tiny_model.adapters["alpha"], Registration("acme"), "test", _noop_prewarm
        )
        assert record.number == (2 if point == "after_commit" else 1)
    finally:
        registry.close()


@pytest.mark.parametrize("point", ["key_create_before_commit", "key_revoke_before_commit"])
def test_sigkill_mid_key_change_leaves_keys_as_they_were(point, registry_url, tmp_path):
    """`loraplex keys create|revoke` killed inside its transaction: the change did not happen."""
    from gateway.keys import KeyRing, KeyStore

    store = KeyStore(registry_url)
    kept, kept_secret = store.create("kept", "admin", "test")
    marker = tmp_path / f"reached-{point}"
    env = {**os.environ, PAUSE_ENV: point, f"{PAUSE_ENV}_MARKER": str(marker)}
    command = ["create", "doomed", "--role", "infer"]
    if point == "key_revoke_before_commit":
        command = ["revoke", kept.id]
    child = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "keys", *command, "--registry-url", registry_url],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never reached the failpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store.close()

    reopened = KeyStore(registry_url)  # as a restarted gateway or CLI would
    try:
        keys = reopened.list(include_revoked=True)
        assert [(k.name, k.revoked_at) for k in keys] == [("kept", None)]
        assert KeyRing(reopened).authenticate(kept_secret) == keys[0]
        # and the database takes writes again (no lock left behind by the killed writer)
        reopened.revoke(kept.id, "test")
        assert reopened.list() == []
    finally:
        reopened.close()
