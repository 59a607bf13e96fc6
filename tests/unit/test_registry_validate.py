"""Every registration check, each with an adapter broken in that one way."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from gateway.contract import base_fingerprint
from gateway.errors import InvalidAdapter
from gateway.registry.archive import extract_upload
from gateway.registry.base_model import BaseLayers, BaseModelFacts, config_shapes
from gateway.registry.validate import inspect_adapter
from tests.support.adapters import BROKEN, edit_config, edit_weights, tar_of
from tests.support.foreign_adapters import FOREIGN, build_foreign_adapter

MAX_BYTES = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def base(tiny_model) -> BaseModelFacts:
    return BaseModelFacts.from_folder(tiny_model.base)


@pytest.fixture
def adapter(tiny_model, tmp_path):
    """A fresh copy of the rank-8 q_proj/v_proj adapter, to break."""
    folder = tmp_path / "alpha"
    shutil.copytree(tiny_model.adapters["alpha"], folder)
    (folder / "README.md").unlink(missing_ok=True)
    return folder


def test_a_valid_adapter_passes_with_its_facts(adapter, base):
    facts = inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)
    assert (facts.rank, facts.alpha, facts.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert facts.base_rule == "declared-name" and facts.base_fingerprint == base.fingerprint
    assert facts.size_bytes == sum(p.stat().st_size for p in adapter.iterdir())


def test_every_built_adapter_passes(tiny_model, base, tmp_path):
    """All ranks and target sets of the tiny builder, including an lm_head LoRA."""
    for name, path in tiny_model.adapters.items():
        copy = tmp_path / name
        shutil.copytree(path, copy, ignore=shutil.ignore_patterns("README.md"))
        assert inspect_adapter(copy, base, max_rank=16, max_bytes=MAX_BYTES).rank >= 4


def test_a_matching_fingerprint_manifest_decides(adapter, base, tiny_model):
    (adapter / "manifest.json").write_text(
        json.dumps({"base_fingerprint": base_fingerprint(tiny_model.base)})
    )
    edit_config(adapter, base_model_name_or_path="some/other-name")
    assert inspect_adapter(adapter, base, 16, MAX_BYTES).base_rule == "fingerprint"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_adapter_is_refused_with_the_reason(adapter, base, case):
    breaks, message = BROKEN[case]
    breaks(adapter)
    with pytest.raises(InvalidAdapter, match=message) as err:
        inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)
    assert err.value.code.name == "INVALID_ARGUMENT"


def test_rank_and_size_limits(adapter, base):
    with pytest.raises(InvalidAdapter, match="above the gateway's max_lora_rank 4"):
        inspect_adapter(adapter, base, max_rank=4, max_bytes=MAX_BYTES)
    with pytest.raises(InvalidAdapter, match="over the limit of 1000"):
        inspect_adapter(adapter, base, max_rank=16, max_bytes=1000)


def test_upload_extracts_a_valid_archive(adapter, tmp_path):
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    extract_upload(tar_of(tmp_path, files), tmp_path / "out", MAX_BYTES)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files
    zipped = tmp_path / "upload.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    extract_upload(zipped, tmp_path / "out2", MAX_BYTES)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted(files)


@pytest.mark.parametrize(
    ("entries", "symlink", "message"),
    [
        ({"../adapter_config.json": b"{}"}, None, "only plain file names"),
        ({"/etc/adapter_config.json": b"{}"}, None, "only plain file names"),
        ({"sub/adapter_config.json": b"{}"}, None, "only plain file names"),
        ({"evil.py": b"import os"}, None, "not an adapter file"),
        ({}, "adapter_model.safetensors", "not a regular file"),
        ({"adapter_model.safetensors": b"x" * 2000}, None, "size limit of 1000 bytes"),
    ],
)
def test_hostile_uploads_are_refused(tmp_path, entries, symlink, message):
    with pytest.raises(InvalidAdapter, match=message):
        extract_upload(tar_of(tmp_path, entries, symlink), tmp_path / "out", 1000)


def test_upload_that_is_no_archive(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive")
    with pytest.raises(InvalidAdapter, match="neither a tar nor a zip"):
        extract_upload(junk, tmp_path / "out", 1000)


def test_fingerprint_ignores_serving_dtype_and_quantization(tiny_model, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(tiny_model.base, copy)
    config = json.loads((copy / "config.json").read_text())
    config |= {"dtype": "bfloat16", "quantization_config": {"quant_method": "awq"}}
    (copy / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(copy) == base_fingerprint(tiny_model.base)
    config["hidden_size"] = 512
    (copy / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(copy) != base_fingerprint(tiny_model.base)


@pytest.mark.parametrize("claim", ["name", "fingerprint"])
@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_an_adapter_for_another_base_is_refused_by_its_shapes(
    tiny_model, base, tmp_path, case, claim
):
    """Whatever it claims (the tiny base's path, or a manifest with its fingerprint)."""
    changes, targets, message = FOREIGN[case]
    adapter = build_foreign_adapter(tiny_model.base, tmp_path / "a", changes, targets, claim)
    with pytest.raises(InvalidAdapter) as err:
        inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)
    assert message in str(err.value)


def test_a_folder_name_alone_does_not_name_the_base(tiny_model, base, tmp_path):
    """`loraplex tiny-model` always names its base folder `base`: another build is not ours."""
    other = tmp_path / "elsewhere" / "base"
    adapter = build_foreign_adapter(tiny_model.base, tmp_path / "a", {}, ["q_proj"], declared=other)
    with pytest.raises(InvalidAdapter, match="rule: declared name"):
        inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)
    aliased = BaseModelFacts.from_folder(tiny_model.base, aliases=(str(other),))
    facts = inspect_adapter(adapter, aliased, max_rank=16, max_bytes=MAX_BYTES)
    assert facts.base_rule == "declared-name"  # the operator said that name is this base


def test_peft_copies_of_the_base_layer_are_checked_too(tiny_model, base, tmp_path):
    """peft saves lm_head's own weight next to an lm_head LoRA; a copy of another shape is
    another base even when the LoRA matrices were cut to fit."""
    adapter = tmp_path / "epsilon"
    shutil.copytree(tiny_model.adapters["epsilon"], adapter)
    (adapter / "README.md").unlink(missing_ok=True)
    copy = "base_model.model.lm_head.base_layer.weight"

    def widen(tensors):
        tensors[copy] = torch.zeros(tensors[copy].shape[0] + 1, tensors[copy].shape[1])

    edit_weights(adapter, widen)
    with pytest.raises(InvalidAdapter, match=r"lm_head: the adapter carries a copy of the base"):
        inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", [256]),
        ("base_model.model.score.weight", [1, 256]),
    ],
)
def test_tensors_that_are_not_lora_matrices_are_refused(adapter, base, tensor, shape):
    """DoRA magnitudes and modules_to_save copies would be ignored or misapplied: refused."""
    edit_weights(adapter, lambda tensors: tensors.__setitem__(tensor, torch.zeros(shape)))
    with pytest.raises(InvalidAdapter, match="is not a LoRA A/B matrix"):
        inspect_adapter(adapter, base, max_rank=16, max_bytes=MAX_BYTES)


def test_layer_shapes_read_from_headers_agree_with_the_architecture(tiny_model, tmp_path):
    """The config rule (packed layers, hub ids) gives what the checkpoint headers show."""
    config = json.loads((tiny_model.base / "config.json").read_text())
    derived = config_shapes(config)
    read = BaseLayers.from_folder(tiny_model.base).shapes
    linear = {m: s for m, s in read.items() if m.startswith("model.layers.") or m == "lm_head"}
    assert linear and all(derived[m] == s for m, s in linear.items())
    assert read["model.embed_tokens"] == derived["model.embed_tokens"]


def test_a_packed_base_layer_gets_its_shape_from_compressed_tensors_weight_shape(tmp_path):
    """A W4A16 copy stores q_proj as weight_packed [out, in/8] plus weight_shape [out, in]."""
    tensors = {
        "model.layers.0.self_attn.q_proj.weight_packed": torch.zeros(256, 32, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.weight_shape": torch.tensor([256, 256]),
        "model.layers.0.mlp.up_proj.qweight": torch.zeros(256, 64, dtype=torch.int32),  # AWQ
        "model.norm.weight": torch.ones(256),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    config = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512}
    config |= {"vocab_size": 1000, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    layers = BaseLayers.from_folder(tmp_path)
    assert layers.shapes["model.layers.0.self_attn.q_proj"] == (256, 256)
    assert layers.shapes["model.layers.0.mlp.up_proj"] == (512, 256)  # from the architecture
    assert "model.norm" in layers.modules and "model.norm" not in layers.shapes
