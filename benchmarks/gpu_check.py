"""GPU check: QLoRA SFT on CUDA with bitsandbytes, on one NVIDIA GPU, offline, without vLLM.

vLLM's CUDA wheel is far over what can be carried to a bare GPU machine, so this checks the
part of the project that needs a GPU and no vLLM: the trainer's QLoRA path (transformers 4-bit
base, peft LoRA, trl's SFTTrainer, bitsandbytes' paged 8-bit AdamW). Every check prints one
line, PASS / FAIL / SKIP with its figures; the exit code is 1 if any check failed.

1. cuda: a CUDA device is there (`--device cuda`; `auto` picks it when there is one).
2. base: a tiny Llama built by code (seeded; `trainer.tiny`'s tokenizer, wider layers so that
   some LoRA tensors reach bitsandbytes' paging threshold of 1e5 elements), saved, and loaded
   4-bit NF4 (double quantization, float32 compute, as examples/colors/qlora.yaml) on the device:
   every linear layer of the decoder is a bitsandbytes `Linear4bit` holding packed uint8 NF4.
3. train: LoRA (r 64, all linear layers) SFT with trl's `SFTTrainer` for `--steps` steps on a
   synthetic data set made by code (token chains through a fixed random permutation of 128
   token ids: a bigram map LoRA can learn), `optim="paged_adamw_8bit"`.
4. loss: mean of the last 5 logged losses below the first 5's by at least `LOSS_DROP` nats.
5. optimizer: bitsandbytes' 8-bit AdamW did the steps, with 8-bit (uint8) states; on CUDA some
   states are paged (unified memory). On CPU bitsandbytes 0.50 falls back to unpaged states,
   so the paging half is a SKIP there.
6. adapter: the saved adapter loads with peft onto the float32 base, and its LoRA tensors equal
   the trained ones exactly (trl keeps a quantized base's LoRA weights in bfloat16; peft
   upcasts them losslessly on load).
7. cuda_vs_cpu: float32 base + adapter on CUDA against the same on CPU, TF32 off: max |logit
   difference| / max |logit| < `FP32_REL_TOL`; and the adapter must move the logits by over
   1000 times that, so the comparison is not vacuous.
8. qlora_vs_fp32: the trained model as it trained (4-bit base, bfloat16 LoRA, on the device)
   against the float32 base + adapter on CPU: top-1 agreement >= `QLORA_TOP1` and
   relative error <= `QLORA_REL_ERR` (NF4 rounding, not a bug, is what separates them).
9. time: the whole run under 10 minutes.

Run on the device machine (python3 there is 3.12 with torch+CUDA, transformers and accelerate,
but no bitsandbytes, trl or datasets; `make gpu-wheels` here puts the lock's versions of what
the check imports, 56 MiB of wheels, in build/gpu-wheels):

    make gpu-wheels          # here, once (PyPI); then the device tool's run with
                             # carry=["build/gpu-wheels"], timeout_s=600 and the command:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      build/gpu-wheels/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
      python3 benchmarks/gpu_check.py --device cuda --json $OUT/gpu_check.json

CPU mode: the same flow, CUDA-only checks SKIPped (tests/integration/test_gpu_check.py runs it
with `--steps 12`: 40 s on 2 busy cores; the default 30 steps take ~2-3 min there):

    .venv/bin/python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# The device machine has no install of the project: import trainer.tiny from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# Thresholds, from CPU runs (float32 compute, what CUDA runs for a batch too: bitsandbytes
# dequantizes NF4 and multiplies in float32), seeds 0 and 1, 30 steps and the test's 12:
# benchmarks/README.md ("gpu_check.py").
LOSS_WINDOW = 5  # logged losses averaged at each end
LOSS_DROP = 1.0  # nats; CPU runs dropped 5.6-5.7 in 30 steps, 2.2-2.4 in 12
# float32 on both devices differs only by summation order: ~sqrt(K) * 6e-8 relative per matmul
# of depth K <= 2048, a few 1e-6 after two layers. TF32 (10-bit mantissa) would give ~1e-3, and
# a dropped or mis-scaled LoRA layer far more.
FP32_REL_TOL = 1e-4
ADAPTER_EFFECT_MIN = 1000 * FP32_REL_TOL  # the adapter's own effect on the logits, relative
# NF4 keeps ~3 bits of each weight: the 4-bit model's logits differ from float32's by a few
# percent of the largest. CPU gave 0.040-0.071 of it, and top-1 agreement 0.979-1.0.
QLORA_TOP1 = 0.85
QLORA_REL_ERR = 0.15
TIME_LIMIT_S = 600.0

VOCAB_FIRST = 4  # ids below are <unk> <s> </s> <pad>
CHAIN_TOKENS = 128  # the chains run over ids 4..131: each step sees every transition ~2 times
LORA_R = 64
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Report:
    """Check results in order; each printed as it is recorded."""

    checks: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str, **figures: Any) -> bool:
        self.checks.append({"name": name, "status": status, "detail": detail, **figures})
        print(f"{status:<4} {name}: {detail}", flush=True)
        return status != "FAIL"

    def check(self, name: str, ok: bool, detail: str, **figures: Any) -> bool:
        return self.add(name, "PASS" if ok else "FAIL", detail, **figures)

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if c["status"] == "FAIL"]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    found["torch.cuda"] = str(torch.version.cuda)
    return found


def build_base(out: Path, seed: int) -> Any:
    """A seeded tiny Llama (float32) and trainer.tiny's tokenizer, saved to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2048,  # down_proj's LoRA A (64 x 2048) and gate/up's B are paged
        num_hidden_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.float().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def chains(count: int, length: int, seed: int) -> torch.Tensor:
    """`count` token chains x, p(x), p(p(x)), ... through a permutation p fixed by `seed`.

    The permutation depends on `seed` only; the starts on `seed` and `count`, so a held-out
    set (another count) starts elsewhere but follows the same map.
    """
    n = CHAIN_TOKENS
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    starts = torch.randint(n, (count,), generator=torch.Generator().manual_seed(seed + count))
    rows = [starts]
    for _ in range(length - 1):
        rows.append(perm[rows[-1]])
    return torch.stack(rows, dim=1) + VOCAB_FIRST


def load_4bit(base: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.float32,
        quantization_config=quantization,
        device_map={"": device} if device != "cpu" else None,
    )
    if device == "cpu":
        # As trainer.modeling.prepare_4bit_base: bitsandbytes 0.50 on CPUs with AVX512-BF16
        # repacks a 4-bit weight for inference on its first no-grad forward and never undoes it.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def load_fp32(base: Path, adapter: Path | None, device: str) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = model.to(device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    device = next(p.device for p in model.parameters())
    return model(input_ids=ids.to(device)).logits.double().cpu()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    scale = ref.abs().max().item()
    return {
        "max_abs_diff": (out - ref).abs().max().item(),
        "rel_err": (out - ref).abs().max().item() / scale,
        "top1": (out.argmax(-1) == ref.argmax(-1)).double().mean().item(),
    }


def make_trainer(kind: str, model: Any, tokenizer: Any, data: torch.Tensor, args: Any, out: Path):
    """trl's SFTTrainer as trainer/run.py builds it (quantized base + peft_config), or the same
    run through transformers' Trainer when trl or datasets cannot be imported."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=LORA_R,
        lora_alpha=2 * LORA_R,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    common = dict(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="paged_adamw_8bit",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
    )
    rows = [{"input_ids": row.tolist()} for row in data]
    if kind == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=model,
            args=SFTConfig(**common, max_length=data.shape[1]),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = get_peft_model(model, lora)
    for param in model.parameters():  # as trl does for a quantized base
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return Trainer(
        model=model,
        args=TrainingArguments(**common),
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def optimizer_states(trainer: Any) -> tuple[Any, int, int, int]:
    """(bitsandbytes optimizer, states, 8-bit states, paged states) after training."""
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    states = [s for s in opt.state.values() if "state1" in s]
    eight = sum(s["state1"].dtype == torch.uint8 for s in states)
    paged = sum(bool(getattr(s["state1"], "is_paged", False)) for s in states)
    return opt, len(states), eight, paged


def run(args: argparse.Namespace, report: Report, work: Path) -> None:
    start = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        args.device = device
    if device == "cuda":
        if not torch.cuda.is_available():
            report.add("cuda", "FAIL", f"torch {torch.__version__} sees no CUDA device")
            return
        props = torch.cuda.get_device_properties(0)
        report.check(
            "cuda",
            True,
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
            f"CUDA {torch.version.cuda}",
            gpu=props.name,
        )
        device = "cuda:0"
        # float32 means float32: the CUDA-vs-CPU comparison below relies on it.
        torch.set_float32_matmul_precision("highest")
    else:
        report.add("cuda", "SKIP", "--device cpu: the same flow on CPU (no paging)")

    kind = args.trainer
    if kind == "auto":
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401

            kind = "trl"
        except ImportError as error:
            kind = "transformers"
            print(f"WARN trl unusable ({error}): training with transformers.Trainer", flush=True)

    base_dir, adapter_dir = work / "base", work / "adapter"
    tokenizer = build_base(base_dir, args.seed)
    model = load_4bit(base_dir, device)
    import bitsandbytes as bnb

    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.")]
    linears = [m for m in linears if isinstance(m, torch.nn.Linear)]
    q4: list[Any] = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    ok = (
        len(q4) == len(linears) == 7 * model.config.num_hidden_layers
        and all(m.weight.quant_state.quant_type == "nf4" for m in q4)
        and all(m.weight.quant_state.nested for m in q4)
        and all(m.weight.dtype == torch.uint8 for m in q4)
        and all(m.weight.device.type == torch.device(device).type for m in q4)
    )
    report.check(
        "base_4bit",
        ok,
        f"{len(q4)}/{len(linears)} decoder linears Linear4bit nf4 (double quant, uint8) on "
        f"{q4[0].weight.device if q4 else '?'}; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M stored params",
    )

    train = chains(args.steps * args.batch, args.length, args.seed)
    held_out = chains(16, args.length, args.seed)
    trainer = make_trainer(kind, model, tokenizer, train, args, work / "run")
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    first = sum(losses[:LOSS_WINDOW]) / LOSS_WINDOW
    last = sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW
    report.check(
        "loss",
        len(losses) >= 2 * LOSS_WINDOW and math.isfinite(last) and first - last >= LOSS_DROP,
        f"{kind} {len(losses)} steps in {train_s:.1f}s; mean of first {LOSS_WINDOW} {first:.3f}, "
        f"last {LOSS_WINDOW} {last:.3f}: drop {first - last:.3f} (need >= {LOSS_DROP})",
        first=first,
        last=last,
        losses=losses,
        train_s=train_s,
    )

    opt, n_states, n_8bit, n_paged = optimizer_states(trainer)
    report.check(
        "optimizer_8bit",
        type(opt).__module__.startswith("bitsandbytes") and n_8bit > 0,
        f"{type(opt).__module__}.{type(opt).__name__}: {n_8bit}/{n_states} 8-bit states",
    )
    if device == "cpu":
        report.add("optimizer_paged", "SKIP", "bitsandbytes pages optimizer states on CUDA only")
    else:
        report.check(
            "optimizer_paged",
            bool(getattr(opt, "is_paged", False)) and n_paged > 0,
            f"is_paged={getattr(opt, 'is_paged', None)}, {n_paged}/{n_states} paged states",
        )

    model = trainer.model.eval()
    model.save_pretrained(adapter_dir)
    trained = {
        n.replace(".default", ""): p.detach().float().cpu()
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    cpu_ref = load_fp32(base_dir, adapter_dir, "cpu")
    loaded = {
        n.replace(".default", ""): p.detach() for n, p in cpu_ref.named_parameters() if "lora_" in n
    }
    same = loaded.keys() == trained.keys() and all(
        torch.equal(loaded[n], trained[n]) for n in trained
    )
    moved = sum(bool(trained[n].abs().max() > 0) for n in trained if "lora_B" in n)
    report.check(
        "adapter_load",
        same and moved > 0,
        f"peft loaded {len(loaded)} LoRA tensors onto the float32 base, equal to the trained "
        f"{len(trained)}: {same}; {moved} lora_B non-zero",
    )

    ref = logits(cpu_ref, held_out)
    base_only = logits(load_fp32(base_dir, None, "cpu"), held_out)
    effect = compare(base_only, ref)["rel_err"]
    if device == "cpu":
        report.add("cuda_vs_cpu", "SKIP", f"no CUDA device (adapter's effect: {effect:.3f})")
    else:
        c = compare(logits(load_fp32(base_dir, adapter_dir, device), held_out), ref)
        report.check(
            "cuda_vs_cpu",
            c["rel_err"] < FP32_REL_TOL and effect > ADAPTER_EFFECT_MIN,
            f"float32 base+adapter, CUDA vs CPU: max|diff| {c['max_abs_diff']:.2e} = "
            f"{c['rel_err']:.2e} of max|logit| (< {FP32_REL_TOL:g}), top-1 {c['top1']:.4f}; "
            f"the adapter moves logits by {effect:.3f} (> {ADAPTER_EFFECT_MIN:g})",
            **c,
            adapter_effect=effect,
        )
    q = compare(logits(model, held_out), ref)
    report.check(
        "qlora_vs_fp32",
        q["top1"] >= QLORA_TOP1 and q["rel_err"] <= QLORA_REL_ERR,
        f"trained 4-bit model on {device} vs float32 base+adapter on CPU: top-1 agreement "
        f"{q['top1']:.4f} (>= {QLORA_TOP1}), max|diff| {q['rel_err']:.4f} of max|logit| "
        f"(<= {QLORA_REL_ERR})",
        **q,
    )
    if device != "cpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"INFO peak CUDA memory allocated: {peak:.0f} MiB", flush=True)
    elapsed = time.perf_counter() - start
    if device == "cpu":  # the budget is the GPU machine's; a CPU's speed is no finding
        report.add(
            "time", "SKIP", f"{elapsed:.1f}s on CPU (the {TIME_LIMIT_S:.0f}s budget is CUDA's)"
        )
    else:
        report.check("time", elapsed < TIME_LIMIT_S, f"{elapsed:.1f}s (< {TIME_LIMIT_S:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--trainer", choices=["auto", "trl", "transformers"], default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the checks and figures here")
    args = parser.parse_args(argv)

    found = versions()
    print("INFO " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        try:
            run(args, report, Path(tmp))
        except Exception as error:  # noqa: BLE001 -- a crash is a failed check; figures kept
            report.add("crash", "FAIL", f"{type(error).__name__}: {error}")
            import traceback

            traceback.print_exc()
    result = {"versions": found, "args": vars(args) | {"json": str(args.json)}, **vars(report)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'FAIL' if report.failed else 'OK'}: {len(report.checks)} checks", end="")
    print(f", failed: {', '.join(report.failed)}" if report.failed else "", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
