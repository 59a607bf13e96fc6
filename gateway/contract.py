"""What the gateway, the trainer and the eval suite share: alias and verdict names, the
scored-token cap, the base-fingerprint rule and the content address of an adapter folder. One
small module all three import, so that trainer/ and evalsuite/ never reach into gateway
internals for them.

The base fingerprint hashes what makes adapters transferable: the architecture's shape (a
whitelist of config keys) and the tokenizer's vocabulary. It leaves out what serving changes
without changing the model an adapter was trained for: dtype, `quantization_config`, version
stamps. So a QLoRA adapter trained on an NF4 base matches the int8 copy it is served on. It
cannot tell apart two fine-tunes of one architecture (base vs instruct).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

from loraplex.v1 import adapters_pb2 as apb

PRODUCTION = "production"
"""The alias a bare adapter name resolves to, and the one the gate promotes to."""
CANDIDATE = "candidate"
"""The alias new versions from the trainer get, awaiting the gate."""

Verdict = Literal["pass", "fail", "error"]
"""An evaluation's outcome; `error` (no verdict could be reached) never promotes."""
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
VERDICT_TO_PB: dict[Verdict, int] = {
    "pass": apb.VERDICT_PASS,
    "fail": apb.VERDICT_FAIL,
    "error": apb.VERDICT_ERROR,
}
VERDICT_FROM_PB: dict[int, Verdict] = {number: name for name, number in VERDICT_TO_PB.items()}

MAX_SCORED_TOKEN_IDS = 128
"""Most token ids one request may score (`logprob_token_ids`): vLLM's sampler row width."""

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


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's files (names and contents, in name order): the registry's
    content address of an adapter, and how a trainer manifest names the models it used."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as handle:
            file_hash = hashlib.file_digest(handle, "sha256")
        digest.update(path.name.encode() + b"\0" + file_hash.digest())
    return digest.hexdigest()
