"""Which of engine_patches.py's vLLM fixes belong where, and what the engine may then serve.

Pure decisions (no vLLM import), so they are tested on every platform/runner combination:
- `fixes_to_install`: a fix goes only where its bug is: its platform and the vLLM version it
  was verified against; anything else keeps vLLM as shipped.
- `EngineFixReport`: what one engine worker says it applied (through `collective_rpc`).
- `lora_safety`: from those reports, whether prompt logprobs with adapters are exact, and
  whether adapters with LoRA weights on the vocabulary layers can be served.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.registry.validate import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, lora_modules

VERIFIED_VLLM = "0.32.0"
"""The vLLM release whose source every fix was checked against (the locked one)."""


@dataclass(frozen=True)
class Fix:
    """One fix of gateway/engine_patches.py."""

    name: str
    summary: str
    platforms: frozenset[str] | None  # where the bug is (vLLM device types); None: any


CPU = frozenset({"cpu"})
CPU_LORA_OPS = "cpu_lora_ops"
CPU_PROMPT_LOGPROBS = "cpu_prompt_logprobs_lora"
NO_SPIN_WAIT = "no_spin_wait"
ONE_CALL_PER_STEP = "one_call_per_step"
INT8_LORA_DEVICE = "int8_lora_device"

FIXES = (
    Fix(CPU_LORA_OPS, "CPU LoRA ops: base rows stay base, all adapters batched", CPU),
    Fix(CPU_PROMPT_LOGPROBS, "prompt logits rows get their own request's adapter", CPU),
    Fix(NO_SPIN_WAIT, "engine processes block between steps instead of spinning", None),
    Fix(ONE_CALL_PER_STEP, "the worker samples in the model call when nothing comes between", CPU),
    Fix(INT8_LORA_DEVICE, "LoRA layers find the device of an int8 (oneDNN) base", CPU),
)
FIX_NAMES = tuple(fix.name for fix in FIXES)

VOCAB_LORA_MODULES = ("lm_head", "embed_tokens")
"""Last name parts of the vocabulary layers (output head, input embeddings)."""


def release(vllm_version: str) -> str:
    """The release of a version string (0.32.0+cpu -> 0.32.0): the source the fixes patch."""
    return vllm_version.split("+", 1)[0]


def fixes_to_install(platform: str, vllm_version: str, spin_wait: bool) -> tuple[str, ...]:
    """The fixes a vLLM process on `platform` should install; none on an unverified vLLM."""
    if release(vllm_version) != VERIFIED_VLLM:
        return ()
    return tuple(
        fix.name
        for fix in FIXES
        if (fix.platforms is None or platform in fix.platforms)
        and not (fix.name == NO_SPIN_WAIT and spin_wait)
    )


@dataclass(frozen=True)
class EngineFixReport:
    """What one engine worker runs on and which fixes are in its code paths."""

    platform: str  # vLLM's device type: cpu, cuda, rocm, ...
    model_runner: str  # v1 or v2
    vllm_version: str
    applied: tuple[str, ...]

    @classmethod
    def from_worker(cls, report: dict) -> EngineFixReport:
        return cls(
            str(report["platform"]),
            str(report["model_runner"]),
            str(report["vllm_version"]),
            tuple(report["applied"]),
        )


def applied_everywhere(reports: Sequence[EngineFixReport]) -> tuple[str, ...]:
    """Fixes every worker applied (with tensor/pipeline parallelism, one report per rank)."""
    if not reports:
        return ()
    return tuple(n for n in FIX_NAMES if all(n in r.applied for r in reports))


@dataclass(frozen=True)
class LoraSafety:
    """What the gateway refuses so that nothing it serves is silently wrong; "" allows."""

    prompt_logprobs_refusal: str = ""
    """Why prompt_logprobs requests are refused while LoRA is enabled."""
    vocab_lora_refusal: str = ""
    """Why adapters with LoRA weights on lm_head / embed_tokens are refused."""


def lora_safety(reports: Sequence[EngineFixReport], lora_enabled: bool) -> LoraSafety:
    """Decide from the workers' reports, not from the platform's name alone.

    - loraplex's prompt-logprob fix in every worker (CPU): exact for every adapter.
    - CUDA on the verified vLLM: vLLM's Triton LoRA path computes prompt logprobs for every
      adapter without crashing, but drops an lm_head LoRA's delta from them (vLLM issue 51594,
      fix PR 51597 not in 0.32). Refusing those adapters keeps every prompt logprob exact; the
      gateway cannot see which requests vLLM batches together, so refusing prompt logprobs only
      "while such an adapter might share the batch" would be a guess.
    - Anything else (CPU with the plugin off, an unverified vLLM): prompt logprobs with LoRA
      enabled crashed the engine (vLLM issues 16668, 29955) and are refused.
    """
    if not lora_enabled or not reports:
        return LoraSafety()
    if CPU_PROMPT_LOGPROBS in applied_everywhere(reports):
        return LoraSafety()
    platforms = {r.platform for r in reports}
    versions = {release(r.vllm_version) for r in reports}
    if platforms == {"cuda"} and versions == {VERIFIED_VLLM}:
        return LoraSafety(
            vocab_lora_refusal=(
                f"vLLM {VERIFIED_VLLM} on CUDA drops a LoRA's lm_head delta from prompt "
                "logprobs (vLLM issue 51594), which the eval gate scores with; adapters with "
                f"LoRA weights on {' or '.join(VOCAB_LORA_MODULES)} are not served on this engine"
            )
        )
    where = ", ".join(
        sorted({f"{r.platform} (vLLM {r.vllm_version}, model runner {r.model_runner})"
                for r in reports})
    )  # fmt: skip
    return LoraSafety(
        prompt_logprobs_refusal=(
            f"prompt_logprobs with LoRA enabled are not known to be safe on this engine ({where}; "
            "loraplex's fix is not applied there): vLLM crashed on them (vLLM issues 16668, "
            "29955), so they are refused"
        )
    )


def vocab_lora_modules(modules: Iterable[str]) -> list[str]:
    """The adapter's LoRA modules on the vocabulary layers (from its safetensors keys)."""
    return sorted(m for m in modules if m.rsplit(".", 1)[-1] in VOCAB_LORA_MODULES)


def vocab_lora_in(folder: Path) -> list[str]:
    """The vocabulary LoRA modules of an adapter folder, from its weights' keys (headers only)."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():  # directory mode may serve a legacy .bin
        weights = folder / LEGACY_WEIGHTS_FILE
    modules = lora_modules(weights)
    return vocab_lora_modules(m for m, lora in modules.items() if lora.a is not None)
