"""Write a pre-quantized compressed-tensors copy of a base model, data-free, for serving.

vLLM serves compressed-tensors checkpoints with LoRA on CPU and GPU alike, and on CPU they are
the fast quantized path (benchmarks/README.md, "quantized base"): W8A8 int8 runs
`CPUInt8ScaledMMLinearKernel` (int8 weights per output channel, activations quantized per token
at run time), W4A16 packs 4-bit weights in groups of 128. Both need only the weights (min/max
per channel or group), so no calibration data is involved; compressed-tensors (a vLLM
dependency) computes the scales and writes the format. The copy keeps the base's architecture
and tokenizer, so its fingerprint (gateway/registry/fingerprint.py) is the base's and adapters
trained on the original register against it. lm_head stays unquantized: LoRA may target it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

Scheme = Literal["w8a8", "w4a16"]
SCHEMES: dict[str, tuple[str, str]] = {
    # our name -> (compressed-tensors preset, checkpoint format)
    "w8a8": ("W8A8", "int-quantized"),
    "w4a16": ("W4A16", "pack-quantized"),
}
UNQUANTIZED = ["lm_head"]
# Files of a model folder that are not weights and are copied as they are.
_COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")
STAMP = "loraplex-quantize.json"  # in the copy: what it was made from, for --reuse


class QuantizeError(ValueError):
    """The source cannot be quantized as asked (not a model folder, a shape the scheme can't
    take, a target that is already quantized)."""


def quantize_base(
    source: Path,
    out: Path,
    scheme: Scheme = "w8a8",
    echo: Callable[[str], None] = print,
    reuse: bool = False,
) -> Path:
    """Quantize the model folder `source` into `out` (written whole, then renamed into place).

    `reuse`: an existing `out` made by this function from the same source and scheme is kept
    (init containers and compose services run again on every start).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    if scheme not in SCHEMES:
        raise QuantizeError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    source, out = Path(source), Path(out)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise QuantizeError(f"{source} is not a model folder (no config.json)")
    if "quantization_config" in json.loads(config_file.read_text()):
        raise QuantizeError(f"{source} is already quantized; start from the unquantized base")
    stamp = _stamp(source, scheme)
    if out.exists():
        if reuse and _read_stamp(out) == stamp:
            echo(f"{out} is already the {scheme} copy of {source}: reused")
            return out
        raise QuantizeError(f"{out} exists; remove it or choose another folder")
    preset, checkpoint_format = SCHEMES[scheme]
    echo(f"loading {source}")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
        ignore=UNQUANTIZED,
    )
    apply_quantization_config(model, config)
    count = _set_weight_scales(model)
    echo(f"quantizing {count} linear layers to {scheme} ({checkpoint_format})")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=checkpoint_format)
    compressor.compress_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        compressor.update_config(str(staging))
        (staging / STAMP).write_text(json.dumps(stamp, indent=1))
        for path in source.iterdir():
            copied = path.suffix in _COPIED_SUFFIXES and path.name not in _WEIGHT_FILES
            if path.is_file() and copied:
                shutil.copy2(path, staging / path.name)
        staging.rename(out)
    echo(f"wrote {out}")
    return out


def _stamp(source: Path, scheme: str) -> dict:
    """What identifies a copy's origin: the scheme and the sha256 of the source's config and
    weight files (read once more; a stale copy of a rebuilt base must not be reused)."""
    files = [source / "config.json", *sorted(source.glob("*.safetensors"))]
    digests = {}
    for path in files:
        with path.open("rb") as f:
            digests[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return {"scheme": scheme, "source_sha256": digests}


def _read_stamp(out: Path) -> dict | None:
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _set_weight_scales(model: torch.nn.Module) -> int:
    """Weight scales and zero points from each weight's min/max (per channel or per group)."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    count = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        weight = module.weight.detach().float()
        if args.strategy == "channel":
            low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
        elif args.strategy == "group":
            if weight.shape[1] % args.group_size:
                raise QuantizeError(
                    f"{name}: input size {weight.shape[1]} is not a multiple of the group size "
                    f"{args.group_size}; use w8a8"
                )
            grouped = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = grouped.amin(dim=2), grouped.amax(dim=2)
        else:  # the presets above use only these two
            raise QuantizeError(f"{name}: unsupported weight strategy {args.strategy}")
        scale, zero_point = calculate_qparams(low, high, args)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
        count += 1
    if count == 0:
        raise QuantizeError("no linear layer to quantize")
    return count
