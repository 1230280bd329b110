"""The one page step both modes share, and the writes that finish even when their job stops.

A page step is: one request through the exchange's fetcher (its limiter, gate and retries),
normalising and validating what came back against the window asked for, and reporting the
candles that were rejected (one event and one counter per reason). What a mode does with the
page (where the ledger moves, what counts as a hole) stays with the mode.

Writes go through `ShieldedWrites`: a page whose write has started finishes it even when its
job is paused or cancelled meanwhile, so the job's saved counts always match the rows in the
store; on stop, `drain` gives those writes part of the shutdown budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, TypeVar

from ..exchange.fetcher import Fetcher
from ..models import JobKey
from ..normalize import NormalizedPage, Window, normalize_page
from ..observability.events import EventLog
from ..observability.metrics import Metrics

# SIGTERM must end the process within 1 s (the interface's exit-code contract); writes already
# under way get this much of it, the rest is closing the exchange, the store and the state.
DRAIN_ON_STOP_S = 0.6

T = TypeVar("T")


def report_rejections(
    events: EventLog, metrics: Metrics, key: JobKey, rejected: Mapping[str, int]
) -> None:
    """One `candle_rejected` warning and one counter increment per reason."""
    for reason, count in sorted(rejected.items()):
        metrics.candles_rejected(key.exchange, reason, count)
        events.warning(
            "candle_rejected",
            f"{count} candles rejected: {reason}",
            symbol=key.symbol,
            timeframe=key.timeframe,
            reason=reason,
            rows=count,
        )


class PageStep:
    """Fetch → normalise → report rejections, for one page of one series."""

    def __init__(self, fetcher: Fetcher, events: EventLog, metrics: Metrics) -> None:
        self.fetcher = fetcher
        self._events = events
        self._metrics = metrics

    async def fetch(
        self, key: JobKey, tf_ms: int, window: Window, until_ms: int, limit: int
    ) -> NormalizedPage:
        """The candles opening in `window` from one request for `[window.start_ms, until_ms]`
        of at most `limit` candles; raises the fetcher's faults (ExchangeFault, JobPaused)."""
        raw = await self.fetcher.candles(key, window.start_ms, until_ms, limit)
        page = normalize_page(raw, key, tf_ms, window)
        if page.rejected:
            report_rejections(self._events, self._metrics, key, page.rejected)
        return page


def _mark_seen(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome so asyncio does not log it: whoever awaited the write may be gone
    (cancelled), and the writer already reported any fault it met."""
    if not task.cancelled():
        task.exception()


class ShieldedWrites:
    """Writes that run to their end even when whoever awaits them is cancelled."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    def start(self, writing: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Start `writing` now; awaiting the result waits for it, and cancelling that await
        leaves the write running (`drain` waits for it)."""
        task = asyncio.ensure_future(writing)
        self._running.add(task)
        task.add_done_callback(_mark_seen)
        task.add_done_callback(self._running.discard)
        return asyncio.shield(task)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for the writes still under way (at most `timeout_s`)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)


def forget(pending: Awaitable[Any]) -> None:
    """A write whose job let go of it (a fault or a pause): its outcome is the writer's."""
    if isinstance(pending, asyncio.Future):
        pending.add_done_callback(_mark_seen)
