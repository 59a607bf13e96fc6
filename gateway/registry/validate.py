"""Registration checks: an adapter is refused with a clear reason before anything is stored.

`inspect_adapter` reads a peft LoRA folder without loading tensors (safetensors headers only)
and checks it against the served base; `extract_upload` unpacks an uploaded archive safely.
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from gateway.errors import InvalidAdapter
from gateway.registry.fingerprint import base_fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
ALLOWED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "README.md"})
PEFT_PREFIX = "base_model.model."
_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class BaseModelFacts:
    """What validation needs to know about the served base model."""

    names: frozenset[str]  # declared names an adapter may name as its base
    fingerprint: str
    modules: frozenset[
        str
    ]  # dotted module paths that hold weights, e.g. model.layers.0.mlp.up_proj

    @classmethod
    def from_folder(cls, model_dir: Path, aliases: tuple[str, ...] = ()) -> BaseModelFacts:
        """Facts of a local HF model folder (single or sharded safetensors)."""
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"].keys()
        else:
            with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
                names = list(weights.keys())
        modules = frozenset(name.rsplit(".", 1)[0] for name in names)
        declared = {str(model_dir), str(model_dir.resolve()), model_dir.name, *aliases}
        return cls(frozenset(declared), base_fingerprint(model_dir), modules)


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
        raise InvalidAdapter(f"{folder} is not a directory")
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


def _lora_shapes(weights_path: Path) -> dict[str, dict[str, list[int]]]:
    """{module path: {"A": shape, "B": shape}} from the safetensors header."""
    try:
        with safe_open(weights_path, framework="pt") as weights:
            names = weights.keys()  # a safetensors handle, not a dict
            shapes = {name: list(weights.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    modules: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        match = _LORA_WEIGHT.match(name.removeprefix(PEFT_PREFIX))
        if match:
            modules.setdefault(match["module"], {})[match["part"]] = shape
    if not modules:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights (lora_A / lora_B)")
    return modules


def _targets_match(module: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex string must fullmatch; list entries match the last name parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_weights(config: dict, modules: dict[str, dict[str, list[int]]]) -> int:
    """Weights agree with the config; returns the largest rank used."""
    ranks = {int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())}
    targets = config.get("target_modules") or []
    for module, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"}:
            raise InvalidAdapter(f"{module}: has lora_{next(iter(parts))} without its pair")
        (rank_a, _), (_, rank_b) = parts["A"], parts["B"]
        if rank_a != rank_b or rank_a not in ranks:
            raise InvalidAdapter(
                f"{module}: lora_A/lora_B ranks {rank_a}/{rank_b} disagree with r={config['r']}"
            )
        if not _targets_match(module, targets):
            raise InvalidAdapter(f"{module}: has weights but is not in target_modules {targets}")
    return max(ranks)


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
    if declared not in base.names and Path(declared).name not in base.names:
        raise InvalidAdapter(
            f"trained for base {declared!r}, but this gateway serves {sorted(base.names)[0]!r} "
            "(rule: declared name in adapter_config.json; no fingerprint in a manifest)"
        )
    return "declared-name"


def inspect_adapter(
    folder: Path, base: BaseModelFacts, max_rank: int, max_bytes: int
) -> AdapterFacts:
    """All registration checks on an adapter folder; raises InvalidAdapter naming the problem."""
    size = check_files(folder, max_bytes)
    config, _, targets = read_lora_config(folder)
    manifest = _read_json(folder / MANIFEST_FILE) if (folder / MANIFEST_FILE).is_file() else {}
    shapes = _lora_shapes(folder / WEIGHTS_FILE)
    rank = _check_weights(config, shapes)
    if rank > max_rank:
        raise InvalidAdapter(f"rank {rank} is above the gateway's max_lora_rank {max_rank}")
    missing = [m for m in sorted(shapes) if m not in base.modules]
    if missing:
        raise InvalidAdapter(f"target modules not in the base model: {', '.join(missing[:5])}")
    return AdapterFacts(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=targets,
        size_bytes=size,
        base_fingerprint=base.fingerprint,
        base_rule=_check_base(config, manifest, base),
        manifest=manifest,
    )


def _safe_member_name(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or len(path.parts) != 1:
        raise InvalidAdapter(f"archive entry {name!r}: only plain file names are accepted")
    if path.name not in ALLOWED_FILES:
        raise InvalidAdapter(f"archive entry {name!r} is not an adapter file")
    return path.name


def extract_upload(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a .tar(.gz) or .zip adapter archive into dest: plain files only, size-limited."""
    dest.mkdir(parents=True, exist_ok=False)
    total = 0
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    raise InvalidAdapter(f"archive entry {member.name!r} is not a regular file")
                total += member.size
                if total > max_bytes:
                    raise InvalidAdapter(f"archive unpacks to over {max_bytes} bytes")
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has content
                (dest / _safe_member_name(member.name)).write_bytes(source.read())
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir() or (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InvalidAdapter(f"archive entry {info.filename!r} is not a regular file")
                total += info.file_size
                if total > max_bytes:
                    raise InvalidAdapter(f"archive unpacks to over {max_bytes} bytes")
                (dest / _safe_member_name(info.filename)).write_bytes(zf.read(info))
    else:
        raise InvalidAdapter("upload is neither a tar nor a zip archive")
