"""Real peft LoRAs made for other bases than the tiny one, which must never be served on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from gateway.contract import base_fingerprint

# The tiny base (trainer/tiny.py) is hidden 256, 2 layers, vocab len(tokenizer); each of these
# differs from it in one way. name -> (LlamaConfig changes, target modules, the refusal)
FOREIGN = {
    "smaller hidden": (
        {"hidden_size": 128, "intermediate_size": 256},
        ["q_proj", "v_proj"],
        "model.layers.0.self_attn.q_proj: lora_A is [8, 128] and lora_B is [128, 8]",
    ),
    "larger hidden": (
        {"hidden_size": 512, "intermediate_size": 1024},
        ["q_proj", "v_proj"],
        "model.layers.0.self_attn.q_proj: lora_A is [8, 512] and lora_B is [512, 8]",
    ),
    "more layers": (
        {"num_hidden_layers": 4},
        ["q_proj", "v_proj"],
        "target modules not in the base model: model.layers.2.self_attn.q_proj",
    ),
    "other vocab, lm_head LoRA": (
        {"vocab_size": 2048},
        ["q_proj", "lm_head"],
        "lm_head: lora_A is [8, 256] and lora_B is [2048, 8]",
    ),
}


def build_foreign_adapter(
    tiny_base: Path,
    out: Path,
    changes: dict,
    targets: list[str],
    claim: str = "name",
    declared: Path | None = None,
) -> Path:
    """A LoRA trained (randomly) on the tiny base's architecture with `changes`, saved by peft.

    It claims the tiny base as its own: by `claim="name"` its adapter_config.json declares the
    tiny base's path, by `claim="fingerprint"` a manifest carries the tiny base's fingerprint;
    only the weight shapes can tell. `declared` names another base folder instead.
    """
    tiny = json.loads((tiny_base / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    sizes = {key: tiny[key] for key in (*keys, "num_hidden_layers", "vocab_size")}
    config = LlamaConfig(**{**sizes, **changes}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.name_or_path = str(declared or tiny_base)  # peft copies it into base_model_name_or_path
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    if claim == "fingerprint":
        manifest = {"base_fingerprint": base_fingerprint(tiny_base)}
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out
