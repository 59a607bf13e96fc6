"""Which base model an adapter belongs to: one rule, shared by the registry and the trainer.

The fingerprint hashes what makes adapters transferable: the architecture's shape (a whitelist
of config keys) and the tokenizer's vocabulary. It leaves out what serving changes without
changing the model an adapter was trained for: dtype, `quantization_config`, version stamps.
So a QLoRA adapter trained on an NF4 base matches the fp8/AWQ copy of that base it is served
on. It cannot tell apart two fine-tunes of one architecture (base vs instruct); the declared
base name in adapter_config.json is shown next to it for that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
FINGERPRINT_PREFIX = "base-v1:"


def base_fingerprint(model_dir: Path) -> str:
    """Fingerprint of a local HF model folder (config.json + tokenizer files)."""
    config = json.loads((model_dir / "config.json").read_text())
    digest = hashlib.sha256()
    shape = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    digest.update(json.dumps(shape, sort_keys=True).encode())
    found = False
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            found = True
    if not found:
        raise FileNotFoundError(f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {model_dir}")
    return FINGERPRINT_PREFIX + digest.hexdigest()
