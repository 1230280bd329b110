"""Requests to one exchange with its shared budget, the job gate, retries and server feedback.

Every request first takes a slot from the exchange's one `RateLimiter`, then asks the gate (a
paused job's request never leaves). Transient faults are retried per page by `retry_async` with
the `RetryPolicy`; a 429/418 pauses the whole exchange's limiter for the exchange's `Retry-After`
(see `Throttle`) before anyone asks again. Permanent faults propagate at once.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import ExchangeFault, PermanentFault, RateLimited, TransientFault
from ..models import JobKey, RawCandles
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import Failure, RetryPolicy, retry_async
from .ratelimit import Limiter
from .source import CandleSource
from .throttle import Pauses, Throttle

T = TypeVar("T")

# Raises when the job may not send a request now (the job registry's `JobPaused`).
Gate = Callable[[JobKey], None]


def _outcome(exc: ExchangeFault) -> str:
    if isinstance(exc, RateLimited):
        return "rate_limited"
    return "permanent" if isinstance(exc, PermanentFault) else "transient"


class Fetcher:
    def __init__(
        self,
        source: CandleSource,
        limiter: Limiter,
        policy: RetryPolicy,
        events: EventLog,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        gate: Gate | None = None,
        pauses: Pauses | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`gate` is asked right before each candle request leaves; `pauses` collects the run's
        long exchange pauses (for /readyz); `wall` is the epoch clock their times are read on."""
        self.source = source
        self._metrics = metrics or Metrics()
        self.limiter = limiter
        self._policy = policy
        self._events = events
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._gate = gate
        self.throttle = Throttle(
            source.id, limiter, policy, events, self._metrics, pauses, clock, wall
        )
        self._sent = [0]  # candle requests sent, shared with `background()` views
        self._acquire = limiter.acquire

    @property
    def requests(self) -> int:
        """Requests sent through this fetcher and its background views."""
        return self._sent[0]

    def background(self, gate: Gate | None) -> Fetcher:
        """The same fetcher (source, limiter, throttle, count) for work that yields to live
        requests: its candle requests take the limiter's background slots and ask `gate`."""
        view = copy.copy(self)
        view._acquire = self.limiter.acquire_background
        view._gate = gate
        return view

    async def open(self, forever: bool) -> None:
        """Load markets and the clock, retrying transient faults like any other request. A live
        daemon keeps trying (`forever`: an exchange down at boot is downtime like any other); a
        history run gives up after the policy's attempts."""

        async def attempt() -> None:
            await self.limiter.acquire(2)  # markets + server time
            await self.source.open()

        await self._retry(attempt, self._reporter("could not load markets; "), forever)

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]:
        """24h quote volume per symbol (for `markets.limit`), through the limiter at what a
        tickers request costs (`Capabilities.tickers_request_cost`: 16 of Binance's 20 a
        second), retried like any other request."""

        async def attempt() -> dict[str, float]:
            await self.limiter.acquire(self.source.capabilities.tickers_request_cost)
            return await self.source.quote_volumes(symbols)

        return await self._retry(attempt, self._reporter("could not fetch tickers; "), False)

    async def candles(self, key: JobKey, since_ms: int, until_ms: int, limit: int) -> RawCandles:
        """One page of raw candles opening in [since_ms, until_ms], retried as the policy says;
        the gate's error (a paused job) propagates before anything is sent."""
        return await self._retry(
            lambda: self._request(key, since_ms, until_ms, limit),
            self._reporter("", candles=True, symbol=key.symbol, timeframe=key.timeframe),
            forever=False,
        )

    def _reporter(
        self, prefix: str, candles: bool = False, **fields: Any
    ) -> Callable[[Failure], None]:
        """Tells about each failure. For a candle request, first `fetch_error`: the request and
        how it failed, once per failed request, the last one included (error level when nothing
        follows, warning when it is retried). Then, for one that is retried, what happens next:
        a refusal through the throttle (`rate_limited`), a transient fault as `backoff_retry`
        with its wait. Ending the job after the last one is the caller's to report."""

        def report(failure: Failure) -> None:
            exc = failure.error
            if candles:
                log = self._events.error if failure.gives_up else self._events.warning
                log(
                    "fetch_error",
                    f"candle request failed ({failure.kind})"
                    + ("" if failure.gives_up else ", retrying"),
                    **fields,
                    attempt=failure.attempt,
                    status=getattr(exc, "status", None),
                    error=str(exc)[:500],
                    retry=not failure.gives_up,
                )
            if failure.gives_up:
                return
            if isinstance(exc, RateLimited):
                self.throttle.report(exc, failure.wait_s, failure.attempt, **fields)
                return
            self._events.warning(
                "backoff_retry",
                f"{prefix}retrying in {failure.wait_s:.1f}s",
                **fields,
                attempt=failure.attempt,
                status=getattr(exc, "status", None),
                error=str(exc)[:500],
                wait_s=round(failure.wait_s, 3),
            )

        return report

    async def _retry(
        self, call: Callable[[], Awaitable[T]], report: Callable[[Failure], None], forever: bool
    ) -> T:
        return await retry_async(
            call,
            self._policy,
            transient=(TransientFault,),
            on_failure=report,
            pause=self.throttle.pause,  # holds every task of the exchange, this one included
            forever=forever,
            sleep=self._sleep,
            rng=self._rng,
        )

    async def _request(self, key: JobKey, since_ms: int, until_ms: int, limit: int) -> RawCandles:
        cost = self.source.capabilities.ohlcv_request_cost
        await self._acquire(cost)
        if self._gate is not None:
            self._gate(key)  # after the wait for a slot: a pause during it still holds
        self._sent[0] += 1
        started = self._clock()
        try:
            rows = await self.source.fetch_ohlcv(
                key.symbol, key.timeframe, since_ms, until_ms, limit
            )
        except ExchangeFault as exc:
            self._count(key, _outcome(exc), started, cost)
            if isinstance(exc, RateLimited) and exc.status is not None:
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

    def _count(self, key: JobKey, outcome: str, started: float, cost: float) -> None:
        self._metrics.request(key.exchange, outcome, self._clock() - started, cost)
