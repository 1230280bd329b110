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

from ..errors import CalendarMismatch
from ..exchange.fetcher import Fetcher
from ..intervals import Interval, merge, subtract
from ..jobs.model import Job
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import CandleBatch, JobKey
from ..normalize import NormalizedPage, Window, normalize_page
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..timeframes import Grid
from .durable_writer import DurableWriter

# SIGTERM must end the process within 1 s (the interface's exit-code contract); writes already
# under way get this much of it, the rest is closing the exchange, the store and the state.
DRAIN_ON_STOP_S = 0.6

# Exchanges publish a candle a moment after it closes (Binance within a second, others within
# seconds): until then an empty answer for it means "not yet", not "no trades". Whichever is
# longer of this margin and the newest closed candle counts as possibly unpublished.
PUBLICATION_MARGIN_MS = 60_000

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
        self, key: JobKey, grid: Grid, window: Window, until_ms: int, limit: int
    ) -> NormalizedPage:
        """The candles opening in `window` from one request for `[window.start_ms, until_ms]`
        of at most `limit` candles, checked against the series' calendar `grid`; raises the
        fetcher's faults (ExchangeFault, JobPaused), and CalendarMismatch (permanent: the job
        fails) when every candle of the window is off the grid, which rejecting them one by
        one would hide."""
        raw = await self.fetcher.candles(key, window.start_ms, until_ms, limit)
        page = normalize_page(raw, key, grid, window)
        if page.rejected:
            report_rejections(self._events, self._metrics, key, page.rejected)
        if page.calendar_mismatch is not None:
            raise CalendarMismatch(page.calendar_mismatch)
        return page

    def grid(self, timeframe: str) -> Grid:
        """Where `timeframe`'s candles open on this step's exchange (its week origin)."""
        return self.fetcher.source.capabilities.grid(timeframe)


class ProvenWrites:
    """History's one way to store what a page (or an archive file) proved: write the rows
    durably, then count them and add the proven intervals to the ledger, with the job row, in
    one transaction."""

    def __init__(
        self, writer: DurableWriter, state: StateStore, registry: JobRegistry, metrics: Metrics
    ) -> None:
        self._writer = writer
        self._state = state
        self._registry = registry
        self._metrics = metrics

    async def store(self, job: Job, batch: CandleBatch, proven: list[Interval]) -> int:
        """Rows written; raises the writer's StoreFault (nothing is recorded then)."""
        written = await self._writer.write(batch)
        self._metrics.history_candles(job.key.exchange, job.key.timeframe, written)
        record = self._registry.record_page(job, proven, written)
        await self._state.add_coverage(job.key, proven, record)
        return written


def proven_span(
    window: Interval, page: NormalizedPage, grid: Grid
) -> tuple[Interval, list[Interval]]:
    """What one answer for `window` settles, and what of that the ledger may record.

    The answer proves the span from the first to the last candle it holds inside the window:
    between them the exchange has exactly what it sent, whichever end of an oversized window
    it answers from and however small its real page is. Outside that span it proves nothing
    (a truncated page, a listing, a hole at the window's edge), so those parts are asked for
    again. An empty answer proves the whole window empty (a hole the exchange has): callers
    ask only for windows the exchange serves (see `Capabilities.reach_candles`).

    Returns (settled, stored): `settled` is not asked for again in this run; `stored` is
    `settled` less the candles that were rejected, which are fetched again next run. A page
    with rows whose time could not be read proves only the candles it stored.
    """
    if page.untimed:
        own = [(t, grid.next_open(t)) for t in page.batch.timestamps.tolist()]
        return window, merge(own)
    if not len(page.seen_ms):
        return window, [window]
    span = (int(page.seen_ms[0]), grid.next_open(int(page.seen_ms[-1])))
    rejected = [(t, grid.next_open(t)) for t in page.rejected_ms.tolist()]
    return span, subtract(span, rejected)


def unpublished_from(now_ms: int, grid: Grid) -> int:
    """Open time from which candles may be closed but not yet published by the exchange at
    `now_ms` (its clock): the newest closed candle, or every candle that closed within
    `PUBLICATION_MARGIN_MS`, whichever reaches further back. An empty answer reaching past it
    proves nothing yet, so no ledger may record it."""
    return min(grid.shift(grid.floor(now_ms), -1), grid.floor(now_ms - PUBLICATION_MARGIN_MS))


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
