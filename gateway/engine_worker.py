"""A vLLM worker extension: reports where LoRA adapters live, for the registry's residency.

vLLM mixes this class into its worker (`worker_extension_cls`); the gateway calls it through
`collective_rpc`. Adapters in `_active_adapters` sit in batch slots; the rest of
`_registered_adapters` are cached in CPU memory; anything else is on disk only.
"""

from __future__ import annotations


class LoraResidencyExtension:
    """Mixed into vLLM's worker class."""

    def loraplex_lora_residency(self) -> tuple[list[int], list[int]]:
        """(ids in batch slots, ids cached in CPU memory) of this worker's LoRA manager."""
        runner = getattr(self, "model_runner", None)
        worker_manager = getattr(runner, "lora_manager", None)
        manager = getattr(worker_manager, "_adapter_manager", None)
        if manager is None:
            return [], []
        active = list(manager._active_adapters.cache)
        registered = list(manager._registered_adapters.cache)
        return active, registered
