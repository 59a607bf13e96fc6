"""Registration checks: an adapter is refused with a clear reason before anything is stored.

`inspect_adapter` reads a peft LoRA folder without loading tensors (safetensors headers only)
and checks it against the served base, down to every LoRA matrix's shape against the layer it
targets: an adapter made for another base must fail here, not serve nonsense.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open

from gateway.errors import InvalidAdapter
from gateway.registry.base_model import BaseLayers, BaseModelFacts, Shape

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # directory mode only; registration wants safetensors
MANIFEST_FILE = "manifest.json"
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "README.md"})
PEFT_PREFIX = "base_model.model."
_LORA_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>[AB])(?:\.[^.]+)?$")
# peft saves the base's own embedding / lm_head next to a LoRA on them; vLLM skips the copy
_BASE_COPY = re.compile(r"^(?P<module>.+\.embed_tokens|lm_head)\.base_layer\.weight$")


@dataclass
class LoraModule:
    """The LoRA matrices of one targeted module, as shapes."""

    kind: Literal["linear", "embedding"]
    a: list[int] | None = None
    b: list[int] | None = None
    base_copy: list[int] | None = None  # peft's copy of the base layer's own weight


@dataclass(frozen=True)
class AdapterFacts:
    """What registration records about a valid adapter."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_fingerprint: str
    base_rule: str  # "fingerprint" (trainer manifest) or "declared-name" (adapter_config.json)
    manifest: dict


def check_files(folder: Path, max_bytes: int) -> int:
    """Only expected regular files, no links, within the size limit; returns the total size."""
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder.name!r} is not a directory")
    total = 0
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            raise InvalidAdapter(f"{path.name}: symbolic links are not accepted")
        if not path.is_file() or path.name not in ALLOWED_FILES:
            raise InvalidAdapter(
                f"unexpected entry {path.name!r}; allowed: {', '.join(sorted(ALLOWED_FILES))}"
            )
        total += path.stat().st_size
    if total > max_bytes:
        raise InvalidAdapter(f"adapter is {total} bytes, over the limit of {max_bytes}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / required).is_file():
            raise InvalidAdapter(f"{required} is missing")
    return total


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object")
    return value


def read_lora_config(folder: Path) -> tuple[dict, int, tuple[str, ...]]:
    """A LoRA adapter's adapter_config.json: the config, its rank r and its target modules."""
    config = _read_json(folder / CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"peft_type is {config.get('peft_type')!r}; only LORA is served")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter("adapter_config.json: target_modules must be module names")
    return config, rank, tuple(sorted(targets))


def _tensor_shapes(weights_path: Path) -> dict[str, list[int]]:
    """{tensor name: shape}: a safetensors header, or a legacy .bin (mmapped, directory mode)."""
    if weights_path.suffix == ".bin":
        import torch  # a pickle: read with weights_only, never executed

        try:
            tensors = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # any unreadable file is the adapter's problem
            raise InvalidAdapter(f"{weights_path.name} is not a readable weights file") from exc
        return {name: list(tensor.shape) for name, tensor in tensors.items()}
    try:
        with safe_open(weights_path, framework="pt") as weights:
            names = weights.keys()  # a safetensors handle, not a dict
            return {name: list(weights.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{weights_path.name} is not a readable safetensors file") from exc


def lora_modules(weights_path: Path) -> dict[str, LoraModule]:
    """{module path: its LoRA matrices}; any tensor that is not a LoRA A/B matrix is refused,
    so nothing in the file goes unchecked (DoRA magnitudes, modules_to_save copies)."""
    modules: dict[str, LoraModule] = {}
    kind: Literal["linear", "embedding"]
    for name, shape in sorted(_tensor_shapes(weights_path).items()):
        short = name.removeprefix(PEFT_PREFIX)
        copy = _BASE_COPY.match(short)
        if copy is not None:
            kind = "embedding" if copy["module"].endswith("embed_tokens") else "linear"
            modules.setdefault(copy["module"], LoraModule(kind)).base_copy = shape
            continue
        match = _LORA_LINEAR.match(short)
        kind = "linear"
        if match is None:
            match, kind = _LORA_EMBEDDING.match(short), "embedding"
        if match is None or len(shape) != 2:
            raise InvalidAdapter(
                f"{weights_path.name}: tensor {short!r} is not a LoRA A/B matrix; only plain "
                "LoRA is served (no DoRA magnitudes, no full copies of modules_to_save)"
            )
        module = modules.setdefault(match["module"], LoraModule(kind))
        if module.kind != kind:
            raise InvalidAdapter(f"{match['module']}: mixes linear and embedding LoRA matrices")
        setattr(module, match["part"].lower(), shape)
    if not modules:
        raise InvalidAdapter(f"{weights_path.name} holds no LoRA weights (lora_A / lora_B)")
    return modules


def _targets_match(module: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex string must fullmatch; list entries match the last name parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_fits(module: str, lora: LoraModule, rank: int, base: Shape) -> None:
    """lora_A is [r, in_features] and lora_B [out_features, r] of the base layer."""
    if lora.kind == "linear":
        (out_features, in_features), names = base, ("lora_A", "lora_B")
    else:  # an embedding's weight is [num_embeddings, embedding_dim]; A reads token ids
        (in_features, out_features), names = base, ("lora_embedding_A", "lora_embedding_B")
    if lora.a != [rank, in_features] or lora.b != [out_features, rank]:
        raise InvalidAdapter(
            f"{module}: {names[0]} is {lora.a} and {names[1]} is {lora.b}, but the base layer "
            f"takes {in_features} inputs and gives {out_features} outputs (expected "
            f"[{rank}, {in_features}] and [{out_features}, {rank}]): the adapter was made for "
            "a different base model"
        )


def check_lora_weights(
    config: dict, modules: dict[str, LoraModule], layers: BaseLayers, max_rank: int
) -> int:
    """The weights agree with the config and fit the base's layers; returns the largest rank."""
    ranks = {int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())}
    targets = config.get("target_modules") or []
    module_ranks: dict[str, int] = {}
    for module, lora in sorted(modules.items()):
        if lora.a is None and lora.b is None:
            continue  # only peft's copy of the base layer: its shape is checked below
        if lora.a is None or lora.b is None:
            present = "lora_A" if lora.a is not None else "lora_B"
            raise InvalidAdapter(f"{module}: has {present} without its pair")
        rank_a, rank_b = lora.a[0], lora.b[1]
        if rank_a != rank_b or rank_a not in ranks:
            raise InvalidAdapter(
                f"{module}: lora_A/lora_B ranks {rank_a}/{rank_b} disagree with r={config['r']}"
            )
        if not _targets_match(module, targets):
            raise InvalidAdapter(f"{module}: has weights but is not in target_modules {targets}")
        module_ranks[module] = rank_a
    if not module_ranks:
        raise InvalidAdapter("the weights hold no LoRA matrices (lora_A / lora_B)")
    rank = max(ranks)
    if rank > max_rank:
        raise InvalidAdapter(f"rank {rank} is above the gateway's max_lora_rank {max_rank}")
    missing = [m for m in sorted(modules) if m not in layers.modules]
    if missing:
        raise InvalidAdapter(f"target modules not in the base model: {', '.join(missing[:5])}")
    for module, lora in sorted(modules.items()):
        shape = layers.shapes.get(module)
        if shape is None and module in layers.vectors:
            raise InvalidAdapter(
                f"{module}: the base layer's weight is a vector (a norm), not a matrix a LoRA "
                "can adapt"
            )
        if shape is None:
            raise InvalidAdapter(
                f"{module}: the base's weights for this layer are packed in a format whose "
                "shape loraplex cannot read, so the adapter cannot be checked against it"
            )
        if module in module_ranks:
            _check_fits(module, lora, module_ranks[module], shape)
        if lora.base_copy is not None and tuple(lora.base_copy) != shape:
            raise InvalidAdapter(
                f"{module}: the adapter carries a copy of the base layer shaped "
                f"{lora.base_copy}, but this base's layer is {list(shape)}: the adapter was "
                "made for a different base model"
            )
    return rank


def _check_base(config: dict, manifest: dict, base: BaseModelFacts) -> str:
    """The adapter was made for this base; returns which rule decided."""
    declared_fp = manifest.get("base_fingerprint")
    if declared_fp:
        if declared_fp != base.fingerprint:
            raise InvalidAdapter(
                f"trained for base fingerprint {declared_fp}, but this gateway serves "
                f"{base.fingerprint} (rule: fingerprint from {MANIFEST_FILE})"
            )
        return "fingerprint"
    declared = config.get("base_model_name_or_path")
    if not declared:
        raise InvalidAdapter(
            f"cannot tell which base the adapter was trained for: no {MANIFEST_FILE} "
            "fingerprint and no base_model_name_or_path in adapter_config.json"
        )
    if declared not in base.names:
        raise InvalidAdapter(
            f"trained for base {declared!r}, which is not a name of the base this gateway "
            f"serves (fingerprint {base.fingerprint}); the operator lists accepted names in "
            "base_model_names (rule: declared name in adapter_config.json; no fingerprint in "
            "a manifest)"
        )
    return "declared-name"


def inspect_adapter(
    folder: Path, base: BaseModelFacts, max_rank: int, max_bytes: int
) -> AdapterFacts:
    """All registration checks on an adapter folder; raises InvalidAdapter naming the problem."""
    size = check_files(folder, max_bytes)
    config, _, targets = read_lora_config(folder)
    manifest = _read_json(folder / MANIFEST_FILE) if (folder / MANIFEST_FILE).is_file() else {}
    modules = lora_modules(folder / WEIGHTS_FILE)
    rank = check_lora_weights(config, modules, base.layers, max_rank)
    return AdapterFacts(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=targets,
        size_bytes=size,
        base_fingerprint=base.fingerprint,
        base_rule=_check_base(config, manifest, base),
        manifest=manifest,
    )
