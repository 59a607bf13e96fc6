"""`loraplex quantize`: a compressed-tensors copy vLLM can serve, of the same base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gateway.config import ConfigError, GatewayConfig
from gateway.contract import base_fingerprint
from gateway.registry.base_model import BaseLayers
from tests.support.cli import run_loraplex
from trainer.quantize import QuantizeError, quantize_base


@pytest.fixture(scope="module")
def w8a8(tiny_model, tmp_path_factory):
    return quantize_base(tiny_model.base, tmp_path_factory.mktemp("q") / "w8a8", "w8a8", print)


def test_w8a8_copy_has_int8_weights_with_per_channel_scales(w8a8, tiny_model):
    original = load_file(tiny_model.base / "model.safetensors")
    quantized = load_file(w8a8 / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    weight, scale = quantized[f"{name}.weight"], quantized[f"{name}.weight_scale"]
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
    # Symmetric per output channel: each row's largest magnitude maps to the end of the range.
    reference = original[f"{name}.weight"].float()
    assert torch.all(weight.float().abs().amax(dim=1) >= 127)
    error = (weight.float() * scale.float() - reference).abs().max()
    assert error <= (reference.abs().amax() / 127).item()  # at most one step (bf16 scale)
    # lm_head (LoRA may target it) and the embeddings stay unquantized.
    assert quantized["lm_head.weight"].dtype == torch.bfloat16
    assert quantized["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_w8a8_config_is_what_vllm_reads(w8a8):
    config = json.loads((w8a8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    activations = group["input_activations"]
    assert activations["dynamic"] is True and activations["strategy"] == "token"
    assert config["ignore"] == ["lm_head"]


def test_the_copy_is_the_same_base_for_adapters(w8a8, tiny_model):
    """Adapters trained on the original register against the copy (same fingerprint, same
    layer shapes for the registry's shape check)."""
    assert base_fingerprint(w8a8) == base_fingerprint(tiny_model.base)
    assert BaseLayers.from_folder(w8a8) == BaseLayers.from_folder(tiny_model.base)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (w8a8 / name).read_bytes() == (tiny_model.base / name).read_bytes()


def test_w4a16_packs_groups_of_128(tiny_model, tmp_path):
    out = quantize_base(tiny_model.base, tmp_path / "w4a16", "w4a16", print)
    tensors = load_file(out / "model.safetensors")
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (256, 512 // 8)  # 8 values per int32
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (256, 512 // 128)
    # packed layers keep their shape in compressed-tensors' weight_shape, which registration reads
    assert BaseLayers.from_folder(out) == BaseLayers.from_folder(tiny_model.base)


def test_refusals_leave_nothing_behind(w8a8, tiny_model, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_base(w8a8, tmp_path / "again", "w8a8", print)
    with pytest.raises(QuantizeError, match="exists"):
        quantize_base(tiny_model.base, w8a8, "w8a8", print)
    with pytest.raises(QuantizeError, match="not a model folder"):
        quantize_base(tmp_path, tmp_path / "out", "w8a8", print)
    with pytest.raises(QuantizeError, match="scheme must be one of"):
        quantize_base(tiny_model.base, tmp_path / "out", "w2a2", print)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_quantizes_and_reports_bad_input_with_exit_2(tiny_model, tmp_path):
    done = run_loraplex("quantize", str(tiny_model.base), "--out", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr
    assert "quantizing 14 linear layers to w8a8" in done.stdout
    again = run_loraplex("quantize", str(tiny_model.base), "--out", str(tmp_path / "q"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_online_fp8_is_refused_on_a_cpu_without_amx(monkeypatch):
    from gateway import engine

    config = GatewayConfig(model="m", quantization="fp8_per_channel")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"no AMX.*loraplex quantize"):
        engine.check_quantization(config)
    engine.check_quantization(GatewayConfig(model="m"))  # a checkpoint's own quantization
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    engine.check_quantization(config)  # vLLM's native fp8 kernels need AMX


def test_serve_with_online_fp8_exits_2_before_loading_anything(tiny_model, tmp_path):
    if torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has AMX: vLLM's fp8 kernels run natively")
    done = run_loraplex(
        "serve", "--model", str(tiny_model.base), "--adapters-dir", str(tmp_path),
        "--quantization", "fp8_per_channel", timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no AMX" in done.stderr and "loraplex quantize" in done.stderr


def test_reuse_keeps_only_the_same_schemes_copy_of_the_same_weights(tiny_model, tmp_path):
    source = tmp_path / "base"
    shutil.copytree(tiny_model.base, source)
    out = quantize_base(source, tmp_path / "q", "w8a8", print)
    made = (out / "model.safetensors").stat().st_mtime_ns
    assert quantize_base(source, out, "w8a8", print, reuse=True) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == made  # not written again
    with pytest.raises(QuantizeError, match="exists"):
        quantize_base(source, out, "w4a16", print, reuse=True)
    weights = source / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2  # a rebuilt base, same sizes
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(QuantizeError, match="exists"):
        quantize_base(source, out, "w8a8", print, reuse=True)
