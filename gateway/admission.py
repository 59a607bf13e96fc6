"""Admission of generation requests: a bounded number pending, and per-key rate limits.

Past `max_pending` requests (running or waiting in the engine), new ones are refused at once
with RESOURCE_EXHAUSTED rather than queued without bound. Each key has token buckets for
requests and tokens per minute (its own limits, else the gateway's defaults); a request is
charged its prompt plus its max_tokens up front, and what it did not generate is refunded
when it ends. A refusal carries how long to wait (`retry-after` trailing metadata).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gateway.domain import EngineRequest
from gateway.errors import Overloaded
from gateway.keys import ApiKey

PENDING_RETRY_AFTER_S = 1.0
IDLE_BUCKETS = 10_000  # buckets of keys idle long enough to be full again are dropped past this


@dataclass
class TokenBucket:
    """`capacity` units, refilled continuously at capacity per minute."""

    capacity: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: it is now)."""
        self._refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Admission:
    """Counts pending requests and keeps one pair of buckets per key."""

    def __init__(
        self,
        max_pending: int,
        default_requests_per_minute: int | None = None,
        default_tokens_per_minute: int | None = None,
    ) -> None:
        self.max_pending = max_pending
        self.default_rpm = default_requests_per_minute
        self.default_tpm = default_tokens_per_minute
        self.pending = 0
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, key: ApiKey, kind: str, limit: int | None) -> TokenBucket | None:
        if limit is None:
            return None
        bucket = self._buckets.get((key.id, kind))
        if bucket is None or bucket.capacity != limit:
            if len(self._buckets) >= IDLE_BUCKETS:
                self._drop_full(time.monotonic())
            bucket = self._buckets[(key.id, kind)] = TokenBucket(float(limit))
        return bucket

    def _drop_full(self, now: float) -> None:
        for name, bucket in list(self._buckets.items()):
            if bucket.wait_for(bucket.capacity, now) == 0:
                del self._buckets[name]

    def _budgets(self, key: ApiKey | None) -> tuple[TokenBucket | None, TokenBucket | None]:
        """The key's (requests, tokens) buckets; None where no limit applies."""
        if key is None:
            return None, None
        return (
            self._bucket(key, "requests", key.requests_per_minute or self.default_rpm),
            self._bucket(key, "tokens", key.tokens_per_minute or self.default_tpm),
        )

    def check_room(self, key: ApiKey | None) -> None:
        """Refuse early (before tokenizing) when no slot or no request budget is left."""
        if self.pending >= self.max_pending:
            raise self._full()
        requests_bucket, _ = self._budgets(key)
        wait = requests_bucket.wait_for(1, time.monotonic()) if requests_bucket else 0.0
        if wait > 0:
            assert key is not None
            raise Overloaded(f"rate limit of key {key.id!r}: requests per minute", wait)

    def _full(self) -> Overloaded:
        return Overloaded(
            f"the gateway has {self.pending} requests pending (max_pending_requests); retry later",
            PENDING_RETRY_AFTER_S,
        )

    @contextlib.contextmanager
    def admit(self, key: ApiKey | None, request: EngineRequest) -> Iterator[Callable[[int], None]]:
        """Hold a pending slot (and the key's budget) while the request runs.

        Yields `used(tokens)`: report the tokens generated so far, for the refund at the end.
        Raises Overloaded (RESOURCE_EXHAUSTED) with a retry-after hint instead of queueing.
        """
        if self.pending >= self.max_pending:
            raise self._full()
        cost = len(request.prompt_token_ids) + request.max_tokens
        requests_bucket, tokens_bucket = self._budgets(key)
        now = time.monotonic()
        if tokens_bucket is not None and cost > tokens_bucket.capacity:
            raise Overloaded(
                f"this request may use {cost} tokens (prompt + max_tokens), more than the "
                f"key's {tokens_bucket.capacity:.0f} tokens per minute; lower max_tokens"
            )
        waits = [
            ("requests", requests_bucket.wait_for(1, now) if requests_bucket else 0.0),
            ("tokens", tokens_bucket.wait_for(cost, now) if tokens_bucket else 0.0),
        ]
        kind, wait = max(waits, key=lambda item: item[1])
        if wait > 0:
            assert key is not None
            raise Overloaded(f"rate limit of key {key.id!r}: {kind} per minute", wait)
        if requests_bucket is not None:
            requests_bucket.take(1)
        if tokens_bucket is not None:
            tokens_bucket.take(cost)
        generated = [0]

        def used(tokens: int) -> None:
            generated[0] += tokens

        self.pending += 1
        try:
            yield used
        finally:
            self.pending -= 1
            if tokens_bucket is not None:
                tokens_bucket.give(max(0, request.max_tokens - generated[0]))
