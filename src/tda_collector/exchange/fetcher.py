"""Candle requests with the exchange's shared budget, retries and server feedback.

Every request first takes a slot from the exchange's one `RateLimiter`. Transient faults are
retried per page with the `RetryPolicy` (tenacity runs the loop); a 429/418 pauses the whole
exchange's limiter until the exchange's `Retry-After` before anyone asks again. Permanent faults
propagate at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from ..errors import ExchangeFault, PermanentFault, RateLimited, TransientFault
from ..models import JobKey, RawCandles
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from .ratelimit import RateLimiter
from .source import CandleSource

# A rate-limit answer says "wait", not "broken": it does not use up the transient attempts,
# but an exchange that keeps refusing after this many waits in a row is reported.
MAX_RATE_LIMITED_WAITS = 20


def _outcome(exc: ExchangeFault) -> str:
    if isinstance(exc, RateLimited):
        return "rate_limited"
    return "permanent" if isinstance(exc, PermanentFault) else "transient"


@dataclass
class _Tally:
    """Failed attempts of one page so far, by kind."""

    transient: int = 0
    rate_limited: int = 0


class Fetcher:
    def __init__(
        self,
        source: CandleSource,
        limiter: RateLimiter,
        policy: RetryPolicy,
        events: EventLog,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self.source = source
        self._metrics = metrics or Metrics()
        self.limiter = limiter
        self._policy = policy
        self._events = events
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self.requests = 0

    def _tally(self, tally: _Tally, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            tally.rate_limited += 1
        else:
            tally.transient += 1

    def _wait(self, tally: _Tally, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            return 0.0  # the limiter's pause holds every task of the exchange
        return self._policy.delay(tally.transient, self._rng)

    def _stop(self, tally: _Tally, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            return tally.rate_limited > MAX_RATE_LIMITED_WAITS
        return self._policy.gives_up_after(tally.transient)

    def _on_rate_limited(self, key: JobKey, exc: RateLimited, attempt: int) -> None:
        wait_s = exc.retry_after_s if exc.retry_after_s is not None else self._policy.ceiling(1)
        self.limiter.pause_until(self._clock() + wait_s)
        log = self._events.error if exc.status == 418 else self._events.warning
        log(
            "rate_limited",
            f"{key.exchange} answered {exc.status}; every request waits {wait_s:.1f}s",
            symbol=key.symbol,
            timeframe=key.timeframe,
            status=exc.status,
            wait_s=round(wait_s, 3),
            attempt=attempt,
        )

    async def candles(self, key: JobKey, since_ms: int, until_ms: int, limit: int) -> RawCandles:
        """One page of raw candles opening in [since_ms, until_ms], retried as the policy says."""
        tally = _Tally()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((TransientFault, RateLimited)),
            after=partial(self._tally, tally),
            wait=partial(self._wait, tally),
            stop=partial(self._stop, tally),
            sleep=self._sleep,
            before_sleep=partial(self._before_retry, key, tally),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                cost = self.source.capabilities.ohlcv_request_cost
                await self.limiter.acquire(cost)
                self.requests += 1
                started = self._clock()
                try:
                    rows = await self.source.fetch_ohlcv(
                        key.symbol, key.timeframe, since_ms, until_ms, limit
                    )
                except ExchangeFault as exc:
                    self._count(key, _outcome(exc), started, cost)
                    if isinstance(exc, RateLimited) and exc.status in (418, 429):
                        self._metrics.throttled(key.exchange, exc.status)
                    raise
                self._count(key, "ok", started, cost)
                self._events.debug(
                    "fetch_ok",
                    f"{len(rows)} candles",
                    symbol=key.symbol,
                    timeframe=key.timeframe,
                    rows=len(rows),
                    duration_ms=round((self._clock() - started) * 1000, 1),
                )
                return rows
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _count(self, key: JobKey, outcome: str, started: float, cost: float) -> None:
        self._metrics.request(key.exchange, outcome, self._clock() - started, cost)

    def _before_retry(self, key: JobKey, tally: _Tally, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            self._on_rate_limited(key, exc, tally.rate_limited)
            return
        self._events.warning(
            "backoff_retry",
            f"retrying in {state.upcoming_sleep:.1f}s",
            symbol=key.symbol,
            timeframe=key.timeframe,
            attempt=tally.transient,
            status=getattr(exc, "status", None),
            error=str(exc),
            wait_s=round(state.upcoming_sleep, 3),
        )
