"""What adapters are checked against: the served base's layer shapes, fingerprint and names.

The layer shapes come from the checkpoint's safetensors headers (no tensor is loaded, except
compressed-tensors' two-number `weight_shape` of a packed layer). Where a layer's weights are
packed in a format whose header does not show its shape (4-bit, AWQ, GPTQ), or the base is a
hub id, the shape comes from the architecture in config.json (Llama-family layer names).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from safetensors import safe_open

from gateway.contract import base_fingerprint

Shape = tuple[int, int]
"""A layer's weight as stored: a linear layer's [out_features, in_features], an embedding's
[num_embeddings, embedding_dim]."""

# dtypes whose 2-D `.weight` is a packed quantized blob, not the layer's shape (bitsandbytes)
_PACKED_WEIGHT_DTYPES = frozenset({"U8"})

_LAYER_SHAPES: dict[str, Callable[[Mapping[str, int]], Shape]] = {
    "self_attn.q_proj": lambda c: (c["heads"] * c["head_dim"], c["hidden"]),
    "self_attn.k_proj": lambda c: (c["kv_heads"] * c["head_dim"], c["hidden"]),
    "self_attn.v_proj": lambda c: (c["kv_heads"] * c["head_dim"], c["hidden"]),
    "self_attn.o_proj": lambda c: (c["hidden"], c["heads"] * c["head_dim"]),
    "mlp.gate_proj": lambda c: (c["intermediate"], c["hidden"]),
    "mlp.up_proj": lambda c: (c["intermediate"], c["hidden"]),
    "mlp.down_proj": lambda c: (c["hidden"], c["intermediate"]),
}


def config_shapes(config: Mapping[str, Any]) -> dict[str, Shape]:
    """Layer shapes of a Llama-family architecture (Llama, Mistral, Qwen2/3) from config.json."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        sizes = {
            "hidden": hidden,
            "heads": heads,
            "kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "intermediate": int(config["intermediate_size"]),
        }
        vocab, layers = int(config["vocab_size"]), int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return {}  # not an architecture this rule knows: only checkpoint headers count
    shapes = {"model.embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden)}
    for layer in range(layers):
        for name, shape in _LAYER_SHAPES.items():
            shapes[f"model.layers.{layer}.{name}"] = shape(sizes)
    return shapes


def _weight_files(model_dir: Path) -> dict[str, list[str]]:
    """{safetensors file: tensor names} of a single or sharded checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(file, []).append(name)
        return files
    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        return {"model.safetensors": list(weights.keys())}


def checkpoint_shapes(model_dir: Path) -> tuple[frozenset[str], dict[str, Shape], frozenset[str]]:
    """(every module holding weights, the 2-D weight shapes the headers show, the modules whose
    weight is a vector: norms, which no LoRA can adapt)."""
    modules: set[str] = set()
    shapes: dict[str, Shape] = {}
    vectors: set[str] = set()
    for file, names in _weight_files(model_dir).items():
        with safe_open(model_dir / file, framework="pt") as weights:
            for name in names:
                module, _, kind = name.rpartition(".")
                modules.add(module)
                if kind == "weight":
                    tensor = weights.get_slice(name)
                    shape = tensor.get_shape()
                    if len(shape) == 2 and tensor.get_dtype() not in _PACKED_WEIGHT_DTYPES:
                        shapes.setdefault(module, (shape[0], shape[1]))
                    elif len(shape) == 1:
                        vectors.add(module)
                elif kind == "weight_shape":  # compressed-tensors' packed layers keep it here
                    out_features, in_features = weights.get_tensor(name).tolist()
                    shapes[module] = (int(out_features), int(in_features))
    return frozenset(modules), shapes, frozenset(vectors)


@dataclass(frozen=True)
class BaseLayers:
    """The layers of the served base that a LoRA can target, with their weight shapes."""

    shapes: Mapping[str, Shape]  # module path (e.g. model.layers.0.mlp.up_proj) -> shape
    modules: frozenset[str]  # every module path holding weights (1-D norms included)
    vectors: frozenset[str] = frozenset()  # modules whose weight is 1-D (norms)

    @classmethod
    def from_folder(cls, model_dir: Path) -> BaseLayers:
        """Headers first; the architecture fills in layers whose weights are packed."""
        modules, shapes, vectors = checkpoint_shapes(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        derived = config_shapes(config)
        for module in modules - shapes.keys():
            if module in derived:
                shapes[module] = derived[module]
        return cls(MappingProxyType(shapes), modules, vectors)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseLayers:
        """From the architecture alone (a hub id whose weights are not on this host yet)."""
        shapes = config_shapes(config)
        return cls(MappingProxyType(shapes), frozenset(shapes))

    @classmethod
    def of_model(cls, model: str) -> BaseLayers:
        """A local model folder, or a hub id (its config.json, from the hub's cache or the hub)."""
        if Path(model).is_dir():
            return cls.from_folder(Path(model))
        from huggingface_hub import hf_hub_download  # only for hub ids

        return cls.from_config(json.loads(Path(hf_hub_download(model, "config.json")).read_text()))


@dataclass(frozen=True)
class BaseModelFacts:
    """What registration needs to know about the served base model."""

    names: frozenset[str]  # base_model_name_or_path values accepted as naming this base
    fingerprint: str
    layers: BaseLayers

    @classmethod
    def from_folder(cls, model_dir: Path, aliases: tuple[str, ...] = ()) -> BaseModelFacts:
        """Facts of a local HF model folder (single or sharded safetensors).

        The accepted names are the folder's full path as configured and resolved, and the
        operator's aliases; never the folder's name alone, which any other model may share.
        """
        names = frozenset({str(model_dir), str(model_dir.resolve()), *aliases})
        return cls(names, base_fingerprint(model_dir), BaseLayers.from_folder(model_dir))
