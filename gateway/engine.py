"""The vLLM engine behind the gateway (with engine_patches.py, the only modules importing vLLM).

`VllmEngine` implements `gateway.domain.Engine` on vLLM's `AsyncLLM` (the engine core runs in
its own process, as vLLM does it); the gRPC server runs in this process's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, GatewayConfig
from gateway.domain import (
    AdapterStats,
    EngineInfo,
    EngineRequest,
    FinishReason,
    GenerationChunk,
    ResolvedAdapter,
    Timing,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gateway.engine_fixes import (
    EngineFixReport,
    applied_everywhere,
    lora_safety,
    vocab_lora_in,
)
from gateway.errors import (
    AdapterUnavailable,
    EngineUnavailable,
    InvalidRequest,
    NotSupported,
    Overloaded,
)

if TYPE_CHECKING:
    from vllm.logprobs import FlatLogprobs

log = logging.getLogger(__name__)


def engine_environment(config: GatewayConfig) -> dict[str, str]:
    """Environment variables vLLM's engine processes must start with (they inherit them).

    CPU: vLLM sizes its KV cache from NUMA node 0 only, so the size must be given; it binds
    its compute threads to all cores but the reserved ones; and its processes block rather
    than spin between steps unless asked (`engine_spin_wait`, applied by engine_patches.py).
    """
    from vllm.platforms import current_platform

    from gateway.engine_patches import SPIN_WAIT_ENV

    cpu = current_platform.is_cpu()
    spin = config.engine_spin_wait if config.engine_spin_wait is not None else not cpu
    env = {SPIN_WAIT_ENV: "1" if spin else "0"}
    if cpu and config.gpu_kv_cache_gib is not None:
        raise ConfigError("gpu_kv_cache_gib is the GPU engine's; on CPU set kv_cache_space_gib")
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_space_gib)
        if config.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(config.cpu_reserved_cores)
        if config.cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_threads_bind
    return env


def cache_vllm_environment() -> None:
    """Read vLLM's VLLM_* settings once from now on, not from os.environ on every access.

    vLLM reads some per generated token when its statistics are on (e.g. NaN checks in its
    iteration stats), each a pair of `os.getenv` calls. Its engine processes cache them after
    start-up (`vllm.envs.enable_envs_cache`); its API server does not. Call once the engine is
    up, in a process that starts no other engine with different settings.
    """
    from vllm import envs

    envs.enable_envs_cache()


def check_quantization(config: GatewayConfig) -> None:
    """Refuse online fp8 where vLLM can only emulate it: CPUs without AMX.

    There vLLM 0.32 picks `ChannelWiseTorchFP8ScaledMMLinearKernel`, whose `torch._scaled_mm`
    PyTorch runs natively on CPU only with AMX; otherwise it converts the whole weight to fp32
    on every call (measured 80x slower than bf16 end to end, benchmarks/README.md).
    """
    if not (config.quantization or "").startswith("fp8"):
        return
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not torch.cpu._is_amx_tile_supported():
        raise ConfigError(
            f"quantization {config.quantization}: this CPU has no AMX, so vLLM emulates fp8 "
            "matmuls (every weight converted to fp32 on each call, about 80x slower than "
            "bfloat16). Serve a compressed-tensors copy instead: `loraplex quantize MODEL "
            "--out DIR` (int8 W8A8), then serve DIR with no quantization setting"
        )


def check_parallelism(config: GatewayConfig) -> None:
    """Refuse parallel settings vLLM would only fail on deep in its start-up."""
    import importlib.util

    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if world > 1 and config.distributed_executor_backend == "uni":
        raise ConfigError(
            f"tensor_parallel_size x pipeline_parallel_size = {world} workers, but "
            "distributed_executor_backend uni runs one; use mp (one host) or ray (several)"
        )
    if config.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "distributed_executor_backend ray needs Ray on every node (pip install "
            "'ray[default]' at the version vLLM supports); it is not in loraplex's lock"
        )


def _engine_args(config: GatewayConfig, enable_lora: bool):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=config.model,
        dtype=config.dtype,
        quantization=config.quantization,
        enable_lora=enable_lora,
        max_loras=config.max_loras,
        max_cpu_loras=config.max_cpu_loras,
        max_lora_rank=config.max_lora_rank,  # type: ignore[arg-type]  # a MAX_LORA_RANKS value
        max_model_len=config.max_model_len,  # type: ignore[arg-type]  # None: the model's own
        max_num_seqs=config.max_num_seqs,
        max_logprobs=config.max_logprobs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        kv_cache_memory_bytes=(
            None if config.gpu_kv_cache_gib is None else int(config.gpu_kv_cache_gib * 2**30)
        ),
        enforce_eager=config.enforce_eager,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        seed=config.seed,
        # vLLM's statistics feed its Prometheus metrics and ours (per-adapter queue, timings).
        disable_log_stats=config.metrics_port is None,
        worker_extension_cls="gateway.engine_worker.LoraResidencyExtension",
    )


QueueSink = Callable[[dict[int, int], int], None]
"""Receives (waiting requests per adapter engine id, waiting requests on the base model)."""

LORA_NAME_PREFIX = "loraplex-"


def _queue_logger_factory(sink: QueueSink):
    """A vLLM stat logger that reports the scheduler's waiting requests per adapter.

    vLLM tracks them per LoRA name (its own metric packs the names into one label string);
    our LoRA names carry the engine id, which the gateway maps to adapter names.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class QueueStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:  # noqa: ANN001
            self._last: tuple | None = None

        def record(
            self,
            scheduler_stats,  # noqa: ANN001
            iteration_stats,  # noqa: ANN001
            mm_cache_stats=None,  # noqa: ANN001
            engine_idx: int = 0,
        ):
            if scheduler_stats is None:
                return
            by_name = scheduler_stats.waiting_lora_adapters
            key = (scheduler_stats.num_waiting_reqs, tuple(by_name.items()))
            if key == self._last:  # most steps change nothing
                return
            self._last = key
            waiting = {
                int(name.removeprefix(LORA_NAME_PREFIX)): n
                for name, n in by_name.items()
                if name.startswith(LORA_NAME_PREFIX)
            }
            sink(waiting, max(0, scheduler_stats.num_waiting_reqs - sum(by_name.values())))

        def log_engine_initialized(self) -> None:
            pass

    return QueueStatLogger


def lora_request_for(adapter: ResolvedAdapter):  # noqa: ANN201 - vLLM type, imported lazily
    """The vLLM LoRARequest of an adapter version.

    vLLM compares and hashes LoRARequests by *name* but loads and batches them by int id. Two
    versions of one adapter under one name in the same batch collapsed into one request, the
    other version was never loaded, and the step failed (KeyError: the engine died). So the
    name is derived from the engine id alone: one name per weights, one weights per name.
    """
    from vllm.lora.request import LoRARequest

    return LoRARequest(
        f"{LORA_NAME_PREFIX}{adapter.engine_id}", adapter.engine_id, str(adapter.path)
    )


def _token_logprobs(
    token_ids: list[int], positions: FlatLogprobs, top_n: int, scored: bool = False
) -> list[TokenLogprob]:
    """vLLM's flat logprobs -> the actual token's logprob and rank + the alternatives asked for.

    Each position's entries start with the token actually there (sampled or prompt token, with
    its rank in the vocabulary), then the alternatives: the top-N (ranks 1..N), or with
    `scored` the logprob_token_ids in request order (their "ranks" are list positions, so 0).
    """
    result = []
    for position, token_id in enumerate(token_ids):
        start, end = positions.start_indices[position], positions.end_indices[position]
        if start == end:  # first prompt token: nothing to condition on
            result.append(TokenLogprob(token_id, "", None, 0))
            continue
        alternatives = range(start + 1, end) if scored or top_n > 0 else range(0)
        top = tuple(
            TopLogprob(
                positions.token_ids[i],
                positions.decoded_tokens[i] or "",
                positions.logprobs[i],
                0 if scored else positions.ranks[i] or 0,
            )
            for i in alternatives
            if scored or (positions.ranks[i] or 0) <= top_n
        )
        result.append(
            TokenLogprob(
                token_id,
                positions.decoded_tokens[start] or "",
                positions.logprobs[start],
                positions.ranks[start] or 0,
                top,
            )
        )
    return result


def _yield_between_steps(engine_core) -> None:  # noqa: ANN001
    """Let the event loop run between two engine steps' outputs.

    vLLM's output handler takes each step's outputs from an asyncio.Queue, and `get()` on a
    non-empty queue does not suspend. When steps come faster than the gateway handles them, the
    handler drains the queue without ever yielding, and no stream sends anything until
    generation ends. One `sleep(0)` per step lets the streams send what each step produced.
    (The other cause of late deltas, on CPU hosts, was vLLM's spinning engine processes taking
    the gateway's CPU: engine_patches.py, fix 3.)
    """
    import asyncio

    receive = engine_core.get_output_async

    async def get_output_async():
        outputs = await receive()
        await asyncio.sleep(0)
        return outputs

    engine_core.get_output_async = get_output_async


_FINISH = {
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "error": FinishReason.ERROR,
}


def _finish_reason(
    reason: str | None, stop_reason: int | str | None, stop_token_ids: tuple[int, ...] = ()
) -> FinishReason | None:
    """vLLM reports extra EOS ids (e.g. Llama 3's <|eot_id|>) as stop tokens: those are EOS."""
    if reason is None:
        return None
    if reason == "stop":
        asked = isinstance(stop_reason, str) or stop_reason in stop_token_ids
        return FinishReason.STOP_SEQUENCE if stop_reason is not None and asked else FinishReason.EOS
    return _FINISH.get(reason, FinishReason.ERROR)


def _timing(stats) -> Timing:  # noqa: ANN001 - vllm.v1.metrics.stats.RequestStateStats
    """First-token wall time and mean inter-token latency from vLLM's request statistics."""
    if not stats.num_generation_tokens or not stats.first_token_latency:
        return Timing(None, None)
    first = stats.arrival_time + stats.first_token_latency
    decode = stats.last_token_ts - stats.first_token_ts
    n = stats.num_generation_tokens
    return Timing(first, decode / (n - 1) if n > 1 else None)


class VllmEngine:
    """`Engine` on vLLM's AsyncLLM: one base model, a LoRARequest per request."""

    def __init__(
        self,
        llm,  # noqa: ANN001 - vllm.v1.engine.async_llm.AsyncLLM
        config: GatewayConfig,
        enable_lora: bool,
        fix_reports: list[EngineFixReport],
    ) -> None:
        from vllm import __version__ as vllm_version

        self._llm = llm
        self._lora_enabled = enable_lora
        self._tokenizer = llm.get_tokenizer()
        model_config = llm.model_config
        # What the workers applied decides what is refused (gateway/engine_fixes.py): prompt
        # logprobs where vLLM would crash on them, adapters whose prompt logprobs it gets wrong.
        self.safety = lora_safety(fix_reports, enable_lora)
        self._vocab_lora: dict[int, list[str]] = {}  # engine id -> its vocabulary LoRA modules
        applied = applied_everywhere(fix_reports)
        log.info(
            "engine: %s; loraplex fixes applied: %s",
            ", ".join(sorted({f"{r.platform} model runner {r.model_runner}" for r in fix_reports})),
            ", ".join(applied) or "none",
        )
        for refusal in (self.safety.prompt_logprobs_refusal, self.safety.vocab_lora_refusal):
            if refusal:
                log.warning("refused on this engine: %s", refusal)
        self._loaded_adapters: set[int] = set()
        _yield_between_steps(llm.engine_core)
        self.info = EngineInfo(
            base_model=config.model,
            quantization=config.quantization or model_config.quantization or "none",
            dtype=str(model_config.dtype).removeprefix("torch."),
            max_context_length=model_config.max_model_len,
            max_lora_rank=config.max_lora_rank,
            max_loras=config.max_loras if enable_lora else 0,
            max_logprobs=config.max_logprobs,
            vocab_size=model_config.get_vocab_size(),
            engine=f"vllm {vllm_version}",
            bos_token=_special(self._tokenizer, "bos"),
            eos_token=_special(self._tokenizer, "eos"),
            engine_fixes=applied,
            prompt_logprobs_refusal=self.safety.prompt_logprobs_refusal,
            vocab_lora_refusal=self.safety.vocab_lora_refusal,
        )

    @classmethod
    async def start(
        cls, config: GatewayConfig, enable_lora: bool, queue_sink: QueueSink | None = None
    ) -> VllmEngine:
        """Start the engine core process and load the base model (tens of seconds)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.update(engine_environment(config))
        loggers = [_queue_logger_factory(queue_sink)] if queue_sink is not None else None
        args = _engine_args(config, enable_lora)
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        try:
            reports = await llm.collective_rpc("loraplex_engine_fixes")
        except BaseException:
            llm.shutdown()
            raise
        return cls(llm, config, enable_lora, [EngineFixReport.from_worker(r) for r in reports])

    def _lora_request(self, adapter: ResolvedAdapter | None):
        if adapter is None:
            return None
        if not self._lora_enabled:
            raise AdapterUnavailable("this gateway was started without LoRA support")
        return lora_request_for(adapter)

    def _sampling_params(self, request: EngineRequest, output_kind_delta: bool):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        s, stop = request.sampling, request.stopping
        defaults: dict[str, Any] = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
        }
        kind = RequestOutputKind.DELTA if output_kind_delta else RequestOutputKind.FINAL_ONLY
        try:
            return SamplingParams(
                **{k: v for k, v in defaults.items() if v is not None},
                seed=s.seed,
                max_tokens=request.max_tokens,
                min_tokens=stop.min_tokens,
                stop=list(stop.stop) or None,
                stop_token_ids=list(stop.stop_token_ids) or None,
                ignore_eos=stop.ignore_eos,
                logprobs=None if request.logprob_token_ids else request.logprobs,
                prompt_logprobs=request.prompt_logprobs,
                logprob_token_ids=list(request.logprob_token_ids) or None,
                flat_logprobs=True,  # a few flat lists per request instead of a dict per token
                output_kind=kind,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own checks, behind ours
            raise InvalidRequest("sampling", str(exc)) from exc

    async def generate(
        self, request: EngineRequest, stream: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self._llm.errored:
            raise EngineUnavailable("the engine is not running")
        if request.prompt_logprobs is not None and self.safety.prompt_logprobs_refusal:
            raise NotSupported(self.safety.prompt_logprobs_refusal)
        params = self._sampling_params(request, output_kind_delta=stream)
        if request.adapter is not None:
            await self._ensure_loaded(request.adapter)
        lora = self._lora_request(request.adapter)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        first, generated = True, 0
        outputs = self._llm.generate(prompt, params, request.request_id, lora_request=lora)
        try:
            async with contextlib.aclosing(outputs):  # closing aborts the request in vLLM
                async for output in outputs:
                    chunk = self._chunk(output, request, first)
                    generated += len(chunk.token_ids)
                    if output.finished:
                        chunk.usage = Usage(
                            prompt_tokens=len(request.prompt_token_ids),
                            completion_tokens=generated,
                            cached_tokens=output.num_cached_tokens or 0,
                        )
                    yield chunk
                    first = False
        except EngineDeadError as exc:
            raise EngineUnavailable("the engine died; the gateway is restarting") from exc
        except VLLMClientError as exc:  # vLLM's own request checks, behind ours
            raise InvalidRequest("request", str(exc)) from exc
        except GracefulHTTPError as exc:  # vLLM's admission control
            raise Overloaded(str(exc)) from exc
        except EngineGenerateError as exc:
            if self._llm.errored:
                raise EngineUnavailable("the engine died; the gateway is restarting") from exc
            raise

    async def _ensure_loaded(self, adapter: ResolvedAdapter) -> None:
        """Load a version through vLLM's utility call before its first request.

        A load failure inside a model step would kill the engine; here it is an error for the
        caller (FAILED_PRECONDITION) and the engine keeps serving everyone else.
        """
        if adapter.engine_id not in self._loaded_adapters:
            await self.add_adapter(adapter)

    def _chunk(self, output, request: EngineRequest, first: bool) -> GenerationChunk:  # noqa: ANN001
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        chunk = GenerationChunk(text=completion.text, token_ids=token_ids)
        scored = bool(request.logprob_token_ids)
        if (request.logprobs is not None or scored) and completion.logprobs:
            chunk.logprobs = _token_logprobs(
                token_ids, completion.logprobs, request.logprobs or 0, scored
            )
        if first and request.prompt_logprobs is not None and output.prompt_logprobs:
            chunk.prompt_logprobs = _token_logprobs(
                list(output.prompt_token_ids), output.prompt_logprobs, request.prompt_logprobs
            )
        if output.finished:
            chunk.finish_reason = _finish_reason(
                completion.finish_reason, completion.stop_reason, request.stopping.stop_token_ids
            )
            if output.metrics is not None:  # vLLM's statistics are on (metrics enabled)
                chunk.timing = _timing(output.metrics)
        return chunk

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return list(self._tokenizer.convert_ids_to_tokens(token_ids))

    async def add_adapter(self, adapter: ResolvedAdapter) -> None:
        if self.safety.vocab_lora_refusal:
            await self._check_vocab_lora(adapter)
        try:
            await self._llm.add_lora(self._lora_request(adapter))
        except Exception as exc:
            raise AdapterUnavailable(f"adapter {adapter.name!r} failed to load: {exc}") from exc
        self._loaded_adapters.add(adapter.engine_id)

    async def _check_vocab_lora(self, adapter: ResolvedAdapter) -> None:
        """Refuse an adapter with LoRA weights on lm_head / embed_tokens where that is unsafe."""
        modules = self._vocab_lora.get(adapter.engine_id)
        if modules is None:
            modules = await asyncio.to_thread(vocab_lora_in, adapter.path)
            self._vocab_lora[adapter.engine_id] = modules
        if modules:
            raise AdapterUnavailable(
                f"adapter {adapter.name!r} has LoRA weights on {', '.join(modules)}: "
                f"{self.safety.vocab_lora_refusal}"
            )

    async def adapter_residency(self) -> tuple[set[int], set[int]]:
        if not self._lora_enabled:
            return set(), set()
        # Every rank (tensor / pipeline parallel) holds the same adapters: the first one says.
        slots, registered = (await self._llm.collective_rpc("loraplex_lora_residency"))[0]
        active, cached = set(slots), set(registered)
        return active, cached - active

    async def adapter_stats(self) -> AdapterStats:
        if not self._lora_enabled:
            return AdapterStats()
        return adapter_stats_of(await self._llm.collective_rpc("loraplex_adapter_stats"))

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def is_healthy(self) -> bool:
        return not self._llm.errored

    async def shutdown(self) -> None:
        self._llm.shutdown()


def adapter_stats_of(ranks: list[dict[str, list]]) -> AdapterStats:
    """The workers' `loraplex_adapter_stats` replies as one engine's figures.

    Every rank (tensor / pipeline parallel) loads, evicts and looks up the same adapters, so
    the first rank's counts are the engine's; adding them up would count each event per rank.
    """
    stats, first = AdapterStats(), ranks[0]
    stats.active.update(first["active"])
    stats.cached.update(first["cached"])
    stats.loads.extend(first["loads"])
    stats.load_failures.extend(first["load_failures"])
    for field, counts in (("evictions", stats.evictions), ("lookups", stats.lookups)):
        for engine_id, tier, n in first[field]:
            counts[(engine_id, tier)] = counts.get((engine_id, tier), 0) + n
    stats.cached -= stats.active
    return stats


def _special(tokenizer: Any, kind: str) -> tuple[int, str] | None:
    """(id, text) of the tokenizer's BOS or EOS token, or None when it has none."""
    token_id, text = getattr(tokenizer, f"{kind}_token_id"), getattr(tokenizer, f"{kind}_token")
    return None if token_id is None or text is None else (int(token_id), str(text))
