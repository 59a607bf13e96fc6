"""Models for training: the base (full precision or bitsandbytes 4-bit) and its LoRA setup.

trl wraps the base with peft itself when given a `LoraConfig`; only continuing an existing
adapter (`lora.init_from`) loads it here, and trl then keeps a frozen copy as the DPO reference.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from trainer.config import ConfigError, QuantizationSettings, RunConfig
from trainer.templates import chat_template


def load_tokenizer(config: RunConfig) -> PreTrainedTokenizerBase:
    """The base's tokenizer, with the configured chat template and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    if config.model.chat_template is not None:
        tokenizer.chat_template = chat_template(config.model.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(settings: QuantizationSettings | None) -> BitsAndBytesConfig | None:
    """bitsandbytes 4-bit settings for QLoRA (None: full-precision base)."""
    if settings is None:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, settings.bnb_4bit_compute_dtype),
    )


def load_base(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base model: a causal LM, or for a reward model a one-output sequence classifier."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, config.model.dtype)}
    quantization = bnb_config(config.quantization)
    if quantization is not None and stored_4bit_settings(config.model.path) is None:
        kwargs["quantization_config"] = quantization  # quantized while loading
    if config.method == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(
            config.model.path, num_labels=1, **kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model.path, **kwargs)
    if quantization is not None:
        prepare_4bit_base(model)
    return model


def prepare_4bit_base(model: PreTrainedModel) -> None:
    """Fit a freshly loaded 4-bit base for LoRA training on CPU; free what it no longer needs.

    - bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight into an
      inference-only layout on its first no-grad forward in eval mode, and never undoes it: an
      evaluation before or during training then leaves LoRA training on silently wrong gradients
      (the loss stalls; torch warns that gemv_4bit has no autograd kernel). Found by the QLoRA
      test; the repacking is turned off.
    - On CPU, the weights that stay unquantized (embeddings, norms, head) are zero-copy views of
      the memory-mapped checkpoint, which keeps the whole file mapped, and every page the
      quantizer read stays resident: a 4-bit base would hold its full-precision checkpoint too.
      Copying those few tensors releases the map (measured by benchmarks/train_memory.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
        for param in module.parameters(recurse=False):
            if not isinstance(param, bnb.nn.Params4bit) and param.device.type == "cpu":
                param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "cpu":
                module._buffers[name] = buffer.clone()
    gc.collect()


def stored_4bit_settings(model_dir: Path) -> QuantizationSettings | None:
    """The bitsandbytes 4-bit settings a pre-quantized base folder was saved with (else None)."""
    stored = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not stored or stored.get("quant_method") != "bitsandbytes" or not stored.get("load_in_4bit"):
        return None
    return QuantizationSettings(
        bnb_4bit_quant_type=stored.get("bnb_4bit_quant_type", "fp4"),
        bnb_4bit_use_double_quant=stored.get("bnb_4bit_use_double_quant", False),
        bnb_4bit_compute_dtype=str(stored.get("bnb_4bit_compute_dtype", "float32")).removeprefix(
            "torch."
        ),
    )


def check_base_quantization(config: RunConfig) -> None:
    """A pre-quantized 4-bit base needs a matching `quantization` section (it is QLoRA)."""
    stored = stored_4bit_settings(config.model.path)
    if stored is None:
        return
    if config.quantization is None:
        raise ConfigError(
            f"{config.model.path} is stored in bitsandbytes 4-bit: training on it is QLoRA; "
            f"add a quantization section ({stored.model_dump()})"
        )
    if config.quantization != stored:
        raise ConfigError(
            f"quantization {config.quantization.model_dump()} differs from the settings "
            f"{config.model.path} was quantized with ({stored.model_dump()})"
        )


def save_4bit_base(
    source: Path, out: Path, settings: QuantizationSettings, dtype: str = "bfloat16"
) -> Path:
    """Quantize a base once and save it in 4-bit, so QLoRA runs load ~1/4 of the bytes and never
    hold the full-precision weights (the registry's fingerprint of the copy is unchanged)."""
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=bnb_config(settings), dtype=getattr(torch, dtype)
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def lora_config(config: RunConfig) -> LoraConfig:
    """peft LoraConfig for a fresh adapter (a reward model also trains its score head)."""
    reward = config.method == "reward"
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.lora_alpha,
        lora_dropout=config.lora.lora_dropout,
        target_modules=config.lora.target_modules,
        bias=config.lora.bias,
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        modules_to_save=["score"] if reward else None,
    )


def attach_adapter(
    config: RunConfig, model: PreTrainedModel
) -> tuple[PreTrainedModel | PeftModel, LoraConfig | None]:
    """(model, peft_config) for the trl trainer: a fresh LoRA config, or the loaded init_from."""
    if config.lora.init_from is None:
        return model, lora_config(config)
    if config.quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing
        )
    return PeftModel.from_pretrained(model, config.lora.init_from, is_trainable=True), None


def load_reward_model(
    adapter_dir: Path, base_dir: Path | None = None, dtype: str = "float32"
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A trained reward model (base + LoRA + score head) and its tokenizer, ready to score."""
    from peft import PeftConfig

    base_path = base_dir or Path(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=1, dtype=getattr(torch, dtype)
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer


def load_sequence_classifier(
    model_dir: Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any local one-output sequence-classification model (a reward model not made here)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{model_dir} has {model.config.num_labels} outputs; a reward model has 1")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@torch.inference_mode()
def reward_scores(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 16,
) -> list[float]:
    """Scores of plain-text (prompt, completion) pairs, formatted as trl's RewardTrainer trains:
    prompt + completion + EOS."""
    texts = [
        p + (c if c.endswith(tokenizer.eos_token) else c + tokenizer.eos_token)
        for p, c in zip(prompts, completions, strict=True)
    ]
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        scores += model(**batch).logits.squeeze(-1).float().tolist()
    return scores
