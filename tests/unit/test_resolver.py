"""Directory-mode adapter resolution."""

from __future__ import annotations

import os

import pytest

from gateway.errors import AdapterNotFound, AdapterUnavailable
from gateway.registry.base_model import BaseLayers
from gateway.resolver import DirectoryResolver
from tests.support.fakes import FAKE_BASE, FAKE_HIDDEN, make_adapter, write_lora_weights


def test_resolves_folders_with_stable_ids(tmp_path):
    make_adapter(tmp_path, "alpha")
    make_adapter(tmp_path, "beta", rank=16)
    (tmp_path / "not-an-adapter").mkdir()
    resolver = DirectoryResolver(tmp_path, max_lora_rank=16, base=FAKE_BASE)
    alpha, beta = resolver.resolve("alpha"), resolver.resolve("beta")
    assert (alpha.engine_id, beta.engine_id, beta.rank) == (1, 2, 16)
    assert alpha.target_modules == ("q_proj", "v_proj")
    resolver.scan()
    assert resolver.resolve("alpha").engine_id == 1
    assert sorted(a.name for a in resolver.servable()) == ["alpha", "beta"]


def test_new_adapter_is_found_by_rescan_and_unknown_is_not_found(tmp_path):
    resolver = DirectoryResolver(tmp_path, max_lora_rank=16, base=FAKE_BASE, rescan_interval_s=0)
    with pytest.raises(AdapterNotFound, match="gamma"):
        resolver.resolve("gamma")
    make_adapter(tmp_path, "gamma")
    assert resolver.resolve("gamma").name == "gamma"


def test_changed_weights_get_a_new_engine_id(tmp_path):
    make_adapter(tmp_path, "alpha")
    resolver = DirectoryResolver(tmp_path, max_lora_rank=16, base=FAKE_BASE)
    before = resolver.resolve("alpha").engine_id
    write_lora_weights(tmp_path / "alpha", rank=8, seed=1)  # retrained
    os.utime(tmp_path / "alpha" / "adapter_model.safetensors", ns=(1, 10**18))
    assert resolver.resolve("alpha").engine_id != before  # noticed without a rescan call


def test_unservable_adapters_say_why(tmp_path):
    make_adapter(tmp_path, "big", rank=32)
    make_adapter(tmp_path, "broken")
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    for name, config in {"null-r": '{"r": null}', "a-list": "[]"}.items():
        make_adapter(tmp_path, name)
        (tmp_path / name / "adapter_config.json").write_text(config)
    resolver = DirectoryResolver(tmp_path, max_lora_rank=16, base=FAKE_BASE)
    with pytest.raises(AdapterUnavailable, match="rank 32"):
        resolver.resolve("big")
    for name in ("broken", "null-r", "a-list"):
        with pytest.raises(AdapterUnavailable, match="unreadable"):
            resolver.resolve(name)
    assert resolver.servable() == []


def test_an_adapter_that_does_not_fit_the_base_is_never_served(tmp_path):
    """The registry's weight checks run in directory mode too, before any request uses it."""
    make_adapter(tmp_path, "wide")
    wide = BaseLayers(
        shapes={m: (2 * FAKE_HIDDEN, 2 * FAKE_HIDDEN) for m in FAKE_BASE.modules},
        modules=FAKE_BASE.modules,
    )
    resolver = DirectoryResolver(tmp_path, max_lora_rank=16, base=wide)
    with pytest.raises(AdapterUnavailable) as err:
        resolver.resolve("wide")
    assert "model.layers.0.self_attn.q_proj: lora_A is [8, 32] and lora_B is [32, 8]" in str(
        err.value
    )
    assert "expected [8, 64] and [64, 8]" in str(err.value)
    assert resolver.servable() == []
    make_adapter(tmp_path, "garbage")
    (tmp_path / "garbage" / "adapter_model.safetensors").write_bytes(b"not weights")
    resolver.scan()
    with pytest.raises(AdapterUnavailable, match="not a readable safetensors file"):
        resolver.resolve("garbage")
