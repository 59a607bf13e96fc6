"""Deterministic, offline builder of a tiny Llama base model plus LoRA adapters.

Tests and local demos need a real vLLM-loadable model without network access or
GPUs, so everything here is built from a committed corpus and fixed seeds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trainer.templates import CHAT_TEMPLATES

VOCAB_SIZE = 1024
CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
BUILD_VERSION = 2  # bump when the output format or recipe changes, to invalidate stamps
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, target modules) cycled over adapters so tests exercise mixed ranks/targets.
ADAPTER_SHAPES: list[tuple[int, list[str]]] = [
    (8, ["q_proj", "v_proj"]),
    (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (4, ["gate_proj", "up_proj", "down_proj"]),
    (8, ALL_LINEAR),
    # An lm_head LoRA changes the logits layer itself (vLLM's LogitsProcessorWithLoRA path).
    (8, ["q_proj", "v_proj", "lm_head"]),
]
# Plain-text turns keep the template usable with only the four special tokens.
CHAT_TEMPLATE = CHAT_TEMPLATES["plain"]


@dataclass(frozen=True)
class TinyModel:
    """Paths of a built tiny model: an HF base folder and peft adapter folders."""

    base: Path
    adapters: dict[str, Path]


def adapter_name(index: int) -> str:
    """Stable, human-friendly adapter names: Greek letters first, then numbered."""
    return GREEK[index] if index < len(GREEK) else f"adapter-{index}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the committed corpus (lossless decode, Llama-style BOS)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )


def build_base(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """Random-init tiny Llama; head_dim 64 because vLLM's CPU attention needs >= 32."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        dtype="float32",
        **ids,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(**ids)
    return model


def build_adapter(base: LlamaForCausalLM, base_dir: Path, index: int, seed: int, out: Path) -> None:
    """Save a random LoRA whose rank/targets depend on its index.

    init_lora_weights=False keeps nn.Linear's default init for A and B, so B@A is
    non-zero: with alpha=2r the delta is ~2x the base weights' scale, enough to
    change greedy outputs without collapsing them (checked with HF and vLLM).
    """
    r, targets = ADAPTER_SHAPES[index % len(ADAPTER_SHAPES)]
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = copy.deepcopy(base)
    model.name_or_path = str(base_dir)  # peft copies this into base_model_name_or_path
    torch.manual_seed(seed + index + 1)
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)


def build_tiny_model(out: Path, adapters: int = 0, seed: int = 0) -> TinyModel:
    """Build (or reuse, if the stamp matches) a tiny base model and `adapters` LoRAs in `out`."""
    if adapters < 0:
        raise ValueError(f"adapters must be >= 0, got {adapters}")
    out = Path(out).resolve()
    base_dir, adapters_dir, stamp = out / "base", out / "adapters", out / "tiny.json"
    names = [adapter_name(i) for i in range(adapters)]
    result = TinyModel(base=base_dir, adapters={n: adapters_dir / n for n in names})
    params = {
        "version": BUILD_VERSION,
        "vocab_size": VOCAB_SIZE,
        "adapters": adapters,
        "seed": seed,
        "corpus_sha256": hashlib.sha256(CORPUS.read_bytes()).hexdigest(),
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        needed = [base_dir / "model.safetensors"]
        needed += [p / "adapter_model.safetensors" for p in result.adapters.values()]
        if all(p.is_file() for p in needed):
            return result
    stamp.unlink(missing_ok=True)  # stamp is written last, so its presence means "complete"
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.rmtree(adapters_dir, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG alone
        tokenizer = build_tokenizer()
        base = build_base(tokenizer, seed)
        base.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        for i, path in enumerate(result.adapters.values()):
            build_adapter(base, base_dir, i, seed, path)
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    built = build_tiny_model(args.out, args.adapters, args.seed)
    print(f"base: {built.base} ({time.perf_counter() - start:.1f}s)")
    for name, path in built.adapters.items():
        print(f"{name}: {path}")
