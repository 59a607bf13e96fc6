"""Many generations through the gateway at once: bounded concurrency, a progress bar, a deadline
on every request, and the first failure cancelling the rest (an evaluation with a hole in it must
not look finished)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from tqdm import tqdm

from evalsuite.errors import EvalError, EvalInputError, gateway_deadline
from gateway.client import AsyncClient
from loraplex.v1 import generation_pb2 as pb

T = TypeVar("T")
# Per-request deadline of generations through the gateway (seconds), unless the caller sets one:
# long enough for a slow CPU engine with a full queue, short enough that a hung gateway ends
# the run as an error instead of hanging it. The lm-eval backend uses it too.
DEFAULT_TIMEOUT_S = 600.0
# (prompt, adapter=..., **options) -> GenerateResponse (or anything with .text and .adapter).
GenerateFn = Callable[..., Awaitable[Any]]

GENERATION_OPTIONS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name) | frozenset(
    pb.StoppingCriteria.DESCRIPTOR.fields_by_name
)
_FAILED = {pb.FINISH_REASON_ERROR: "ERROR", pb.FINISH_REASON_CANCELLED: "CANCELLED"}


def check_generation_options(options: Mapping[str, Any], what: str = "sampling") -> dict:
    """The options as a dict, or EvalInputError naming the unknown ones (before any request)."""
    unknown = sorted(set(options) - GENERATION_OPTIONS)
    if unknown:
        raise EvalInputError(
            f"unknown {what} option(s) {unknown}; known: {', '.join(sorted(GENERATION_OPTIONS))}"
        )
    return dict(options)


def served_version(adapter: Any) -> str:
    """ "name@vN" of a ServedAdapter, or "base" (same spelling as the lm-eval backend)."""
    return f"{adapter.name}@v{adapter.version}" if adapter.name else "base"


def check_finished(response: Any, reference: str) -> None:
    """A completion the engine failed or cancelled is not an answer to judge."""
    failed = _FAILED.get(getattr(response, "finish_reason", None))
    if failed is not None:
        raise EvalError(f"generation with {reference or 'the base model'!r} ended with {failed}")


def check_timeout(timeout: float, what: str = "timeout") -> float:
    """A per-request deadline in seconds; EvalInputError unless it is positive."""
    if not timeout > 0:  # also refuses NaN
        raise EvalInputError(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


@asynccontextmanager
async def gateway_generate(
    target: str | None, generate: GenerateFn | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> AsyncIterator[GenerateFn]:
    """`generate` if one is injected (tests), else AsyncClient(target).generate, closed after.

    Every request to the gateway carries `timeout` as its deadline; one that passes is a
    DeadlineExceeded naming the request's adapter."""
    if generate is not None:
        yield generate
        return
    if not target:
        raise EvalInputError("no gateway target (host:port) given")
    timeout = check_timeout(timeout)
    async with AsyncClient(target) as client:

        async def call(prompt: str, adapter: str = "", **options: Any) -> pb.GenerateResponse:
            with gateway_deadline(target, f"a generation with {adapter or 'base'!r}", timeout):
                return await client.generate(prompt, adapter, timeout=timeout, **options)

        yield call


async def bounded_gather(
    jobs: Sequence[Callable[[], Awaitable[T]]],
    concurrency: int,
    desc: str,
    progress: bool = True,
) -> list[T]:
    """Results of `jobs` in order, at most `concurrency` running; the first exception cancels the
    others and is re-raised as itself (a grpc.RpcError stays one, not an ExceptionGroup)."""
    if concurrency < 1:
        raise EvalInputError(f"concurrency must be >= 1, got {concurrency}")
    limit = asyncio.Semaphore(concurrency)
    with tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False) as bar:

        async def run(job: Callable[[], Awaitable[T]]) -> T:
            async with limit:
                result = await job()
            bar.update(1)
            return result

        tasks = [asyncio.ensure_future(run(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
