"""Durable writes with retries: rows are retried, never dropped.

Both modes write through this, so a store fault is handled the same way everywhere: each
failure is logged as `store_write_error`; a transient one (or one the store did not classify) is
retried with backoff, and after the last attempt a `StoreFault` tells the caller not to move its
cursor; a `PermanentStoreError` is raised at once, since retrying cannot help.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from ..errors import StoreFault
from ..models import CandleBatch
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import Failure, RetryPolicy, is_permanent, retry_async
from ..store import CandleStore
from ..timeframes import grid_of
from .indicator_stage import IndicatorStage


class DurableWriter:
    def __init__(
        self,
        store: CandleStore,
        policy: RetryPolicy,
        events: EventLog,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        indicators: IndicatorStage | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._indicators = indicators
        self._metrics = metrics or Metrics()
        self._policy = policy
        self._events = events
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock

    async def write(self, batch: CandleBatch) -> int:
        """Rows written; returns only once they are durable, or raises StoreFault.

        With indicators on, the rows get their columns first, and the series' indicator state
        is saved only after the rows are durable."""
        if not len(batch):
            return 0
        if self._indicators is None:
            return await self.write_as_is(batch)
        enriched, commit = await self._indicators.prepare(batch)
        try:
            written = await self.write_as_is(enriched)
        except BaseException:
            await asyncio.shield(self._indicators.abort(batch))
            raise
        await commit()
        return written

    async def write_as_is(self, batch: CandleBatch) -> int:
        """Write the rows exactly as given (no indicator step). A `PermanentStoreError` is raised
        at once; any other error is retried as the policy says (an unclassified one counts as
        transient: rows are never dropped on a guess), then a `StoreFault` is raised. Each failed
        attempt is a `store_write_error` event; the write that succeeds is a `store_write_ok`
        (debug) with its rows and how long it took, retries and waits included."""

        def report(failure: Failure) -> None:
            self._metrics.store_write_error(self.store.name)
            exc = failure.error
            self._events.error(
                "store_write_error",
                f"writing {len(batch)} rows to {self.store.name} failed",
                exchange=batch.key.exchange,
                symbol=batch.key.symbol,
                timeframe=batch.key.timeframe,
                rows=len(batch),
                attempt=failure.attempt,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )

        started = self._clock()
        try:
            written = await retry_async(
                lambda: self.store.write(batch),
                self._policy,
                transient=(Exception,),  # a store may raise whatever its client raises
                on_failure=report,
                sleep=self._sleep,
                rng=self._rng,
            )
        except Exception as exc:
            if is_permanent(exc):
                raise  # as the store said it, reason and all
            raise StoreFault(
                f"store write failed {self._policy.attempts} times: {exc}", permanent=False
            ) from exc
        self._events.debug(
            "store_write_ok",
            f"{written} rows durable in {self.store.name}",
            exchange=batch.key.exchange,
            symbol=batch.key.symbol,
            timeframe=batch.key.timeframe,
            rows=written,
            duration_ms=round((self._clock() - started) * 1000, 1),
        )
        self._metrics.rows_written(self.store.name, written)
        newest = batch.newest_closed_ms
        if newest is not None:
            key, close_ms = batch.key, grid_of(batch.key.timeframe).close_of(newest)
            self._metrics.newest_closed_candle(
                key.exchange, key.symbol, key.timeframe, close_ms / 1000
            )
        return written
