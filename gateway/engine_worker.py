"""A vLLM worker extension: engine fixes applied, where LoRA adapters live, cache activity.

vLLM mixes this class into its worker (`worker_extension_cls`); the gateway calls it through
`collective_rpc`. Adapters in `_active_adapters` sit in batch slots; the rest of
`_registered_adapters` are cached in CPU memory; anything else is on disk only.

For the metrics, `loraplex_adapter_stats` wraps (once, on its first call) three methods of the
worker's LoRA manager instance: loads from disk (timed), each cache's eviction hook, and the
per-step adapter set, where a batch that newly needs an adapter finds it in a slot, in CPU
memory, or on disk. Counting only newly needed adapters keeps the counts per use, not per step.
"""

from __future__ import annotations

import collections
import time
from typing import Any


class _AdapterCacheStats:
    """Counters kept in the worker between two `loraplex_adapter_stats` calls."""

    def __init__(self, worker_manager: Any) -> None:
        self.loads: list[tuple[int, float]] = []
        self.load_failures: list[int] = []
        self.evictions: collections.Counter[tuple[int, str]] = collections.Counter()
        self.lookups: collections.Counter[tuple[int, str]] = collections.Counter()
        self._previous_batch: set[int] = set()
        self._hook(worker_manager)

    def _hook(self, worker_manager: Any) -> None:
        manager = worker_manager._adapter_manager
        load, apply = worker_manager._load_adapter, worker_manager._apply_adapters

        def timed_load(request: Any) -> Any:
            started = time.perf_counter()
            try:
                adapter = load(request)
            except BaseException:
                self.load_failures.append(request.lora_int_id)
                raise
            self.loads.append((request.lora_int_id, time.perf_counter() - started))
            return adapter

        def counted_apply(requests: set[Any]) -> None:
            batch = {r.lora_int_id for r in requests if r}
            for engine_id in batch - self._previous_batch:
                if engine_id in manager._active_adapters:
                    self.lookups[(engine_id, "slot")] += 1
                elif engine_id in manager._registered_adapters:
                    self.lookups[(engine_id, "cpu")] += 1
                else:
                    self.lookups[(engine_id, "disk")] += 1
            self._previous_batch = batch
            apply(requests)

        worker_manager._load_adapter = timed_load
        worker_manager._apply_adapters = counted_apply
        self._count_evictions(manager._active_adapters, "slot")
        self._count_evictions(manager._registered_adapters, "cpu")

    def _count_evictions(self, cache: Any, tier: str) -> None:
        on_remove = cache._on_remove

        def counted(key: int, value: Any) -> None:
            self.evictions[(key, tier)] += 1
            on_remove(key, value)

        cache._on_remove = counted

    def drain(self) -> dict[str, list]:
        result: dict[str, list] = {
            "loads": self.loads,
            "load_failures": self.load_failures,
            "evictions": [(i, tier, n) for (i, tier), n in self.evictions.items()],
            "lookups": [(i, tier, n) for (i, tier), n in self.lookups.items()],
        }
        self.loads, self.load_failures = [], []
        self.evictions.clear()
        self.lookups.clear()
        return result


class LoraResidencyExtension:
    """Mixed into vLLM's worker class."""

    def loraplex_engine_fixes(self) -> dict[str, Any]:
        """Platform, model runner, vLLM version and the loraplex fixes this worker runs."""
        from gateway.engine_patches import worker_report  # vLLM's processes only

        return worker_report(self)

    def _loraplex_manager(self) -> Any:
        runner = getattr(self, "model_runner", None)
        return getattr(runner, "lora_manager", None)

    def loraplex_lora_residency(self) -> tuple[list[int], list[int]]:
        """(ids in batch slots, ids cached in CPU memory) of this worker's LoRA manager."""
        manager = getattr(self._loraplex_manager(), "_adapter_manager", None)
        if manager is None:
            return [], []
        active = list(manager._active_adapters.cache)
        registered = list(manager._registered_adapters.cache)
        return active, registered

    def loraplex_adapter_stats(self) -> dict[str, list]:
        """Residency plus cache activity since the previous call (installs the hooks)."""
        worker_manager = self._loraplex_manager()
        if getattr(worker_manager, "_adapter_manager", None) is None:
            return {k: [] for k in ("active", "cached", "loads", "load_failures",
                                    "evictions", "lookups")}  # fmt: skip
        stats = getattr(self, "_loraplex_cache_stats", None)
        if stats is None:
            stats = self._loraplex_cache_stats = _AdapterCacheStats(worker_manager)
        active, registered = self.loraplex_lora_residency()
        return {"active": active, "cached": registered, **stats.drain()}
