"""One history job's backfill of its window [start, end), exactly and resumably.

A job pages through the parts of its range the ledger does not cover yet, asking for one
window a page can hold at a time. Each page is normalised and written (durably), and only then
is what it proved (`pipeline.proven_span`) added to the ledger, together with the job row that
counts it; so a rerun of a finished range asks for nothing, a crash costs at most the pages
that were in flight, and nothing the exchange did not answer is ever recorded as stored. A
paused job stops between pages (and no request of it leaves: the fetcher's gate refuses it);
resuming runs it again from the ledger, which is exactly where it stopped. The page step itself
(fetch, normalise, report rejections) is `pipeline.PageStep`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ExchangeFault, StoreFault
from ..exchange.fetcher import Fetcher
from ..exchange.source import Capabilities
from ..intervals import Interval, subtract
from ..jobs.model import COMPLETED, FAILED, PAUSED, Job, JobPaused
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import CandleBatch
from ..normalize import Window
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import is_permanent
from ..timeframes import Grid, iso_utc
from .durable_writer import DurableWriter
from .pipeline import (
    PageStep,
    ProvenWrites,
    ShieldedWrites,
    forget,
    proven_span,
    unpublished_from,
)


@dataclass
class HistoryOutcome:
    """What one run of a history job came to, counted as its pages are stored: COMPLETED,
    PAUSED (it let go of its worker at a page boundary) or FAILED, with the error and whether
    a retry may help. The pool applies it to the job (see `ExchangeHistory`)."""

    status: str = COMPLETED
    rows: int = 0
    pages: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    retryable: bool = False
    unavailable_before_ms: int | None = None  # the exchange serves nothing older than this
    more: bool = False  # COMPLETED a chunk (`max_pages`), not the window: the rest is left


GapFill = Callable[[Job, Interval, HistoryOutcome], Awaitable[None]]


class BulkPass(Protocol):
    """A pass that stores what it can of a job's uncovered window before the REST pages (the
    exchange's archive), recording in the ledger only what it proved; `fill` pages a span it
    could not prove over REST at once, so the series is stored in time order."""

    async def run(self, job: Job, result: HistoryOutcome, fill: GapFill) -> None: ...

    async def drain(self, timeout_s: float | None = None) -> None: ...


def earliest_served(caps: Capabilities, now_ms: int, grid: Grid) -> int | None:
    """Open time of the oldest candle the exchange serves at all, where its depth is bounded
    (Kraken: the newest 720 candles of any timeframe, the one in progress included)."""
    if caps.reach_candles is None:
        return None
    return grid.shift(now_ms, 1 - caps.reach_candles)


class HistoryBackfill:
    def __init__(
        self,
        fetcher: Fetcher,
        writer: DurableWriter,
        state: StateStore,
        events: EventLog,
        page_limit: int,
        metrics: Metrics,
        registry: JobRegistry,
        bulk: BulkPass | None = None,
        pipeline_pages: int | None = None,
    ) -> None:
        """`pipeline_pages`: page writes of a job under way at once, at most; default the
        store's own (`CandleStore.pipeline_pages`)."""
        self._bulk = bulk
        self._proven = ProvenWrites(writer, state, registry, metrics)
        self._step = PageStep(fetcher, events, metrics)
        self._writes = ShieldedWrites()
        self._state = state
        self._events = events
        self._source = fetcher.source
        self._page_limit = page_limit
        self._pipeline_pages = max(1, pipeline_pages or writer.store.pipeline_pages)

    def _reachable(self, job: Job, gap: Interval, result: HistoryOutcome) -> Interval | None:
        """The part of `gap` the exchange serves; the rest is reported once, never recorded."""
        grid = self._step.grid(job.key.timeframe)
        earliest = earliest_served(self._source.capabilities, self._source.now_ms(), grid)
        if earliest is None or gap[0] >= earliest:
            return gap
        if result.unavailable_before_ms is None:
            result.unavailable_before_ms = earliest
            self._events.warning(
                "history_unavailable",
                f"{job.key.exchange} serves {job.key.timeframe} candles from "
                f"{iso_utc(earliest / 1000)} on; the older part of the range cannot be fetched",
                symbol=job.key.symbol,
                timeframe=job.key.timeframe,
                earliest_ms=earliest,
                since=gap[0],
            )
        return (earliest, gap[1]) if earliest < gap[1] else None

    async def _fill(
        self, job: Job, gap: Interval, result: HistoryOutcome, max_pages: int | None = None
    ) -> None:
        """Page through `gap`, one window a page can hold at a time, until every part of it is
        settled by what pages proved (`pipeline.proven_span`). Up to the store's
        `pipeline_pages` writes of the job may be under way while the next page is fetched,
        since stores gather pages of many jobs into one commit or load job; a crash refetches
        at most that many pages. The ledger is a set of intervals, so pages may become durable
        in any order. With `max_pages`, it stops after that many pages of the run (`more`)."""
        key, grid = job.key, self._step.grid(job.key.timeframe)
        reachable = self._reachable(job, gap, result)
        unsettled = [reachable] if reachable is not None else []
        pending: deque[Awaitable[int]] = deque()
        try:
            while unsettled:
                if max_pages is not None and result.pages >= max_pages:
                    result.more = True
                    break
                job.check()  # paused: let go of the worker between pages
                started = time.monotonic()
                since, gap_end = unsettled[0]
                limit = min(self._page_limit, self._source.capabilities.max_page_size)
                end = min(gap_end, grid.shift(since, limit))  # no wider than one page
                window = Window(since, end, closed_before_ms=end)
                page = await self._step.fetch(key, grid, window, end - 1, limit)
                result.rejected.update(page.rejected)
                settled, stored = proven_span((since, end), page, grid)
                unpublished = unpublished_from(self._source.now_ms(), grid)
                if not len(page.seen_ms) and not page.untimed and end > unpublished:
                    stored = self._proven_before(job, settled, unpublished)
                unsettled = [part for u in unsettled for part in subtract(u, [settled])]
                pending.append(self._writes.start(self._store(job, page.batch, stored, started)))
                result.pages += 1
                last = not unsettled or (max_pages is not None and result.pages >= max_pages)
                while len(pending) >= (1 if last else self._pipeline_pages):
                    result.rows += await pending.popleft()
        finally:
            for abandoned in pending:
                forget(abandoned)

    def _proven_before(self, job: Job, window: Interval, unpublished: int) -> list[Interval]:
        """What the ledger may record of an empty answer for `window`, which reaches candles
        the exchange may not have published yet (from `unpublished` on): only the part before
        them. This run asks no more; the next run asks for the rest again."""
        self._events.info(
            "history_tail_pending",
            f"{job.key.exchange} has not published candles from "
            f"{iso_utc(max(window[0], unpublished) / 1000)} yet; the next run fetches them",
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            since=max(window[0], unpublished),
            until=window[1],
        )
        return [(window[0], unpublished)] if window[0] < unpublished else []

    async def _store(
        self, job: Job, batch: CandleBatch, stored: list[Interval], started: float
    ) -> int:
        """Write the page, then count it and add what it proved to the ledger, in one
        transaction."""
        written = await self._proven.store(job, batch, stored)
        self._events.info(
            "history_page_done",
            f"stored {len(batch)} candles",
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            rows=len(batch),
            source="rest",
            since=stored[0][0] if stored else None,
            until=stored[-1][1] if stored else None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return written

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for pages still being stored (at most `timeout_s`)."""
        bulk = [self._bulk.drain(timeout_s)] if self._bulk is not None else []
        await asyncio.gather(self._writes.drain(timeout_s), *bulk)

    async def run_job(
        self, job: Job, result: HistoryOutcome, max_pages: int | None = None
    ) -> HistoryOutcome:
        """Backfill the job's window from the ledger on, counting into `result` (a fresh one per
        run, so a cancelled run leaves what it counted), and return it. Faults are caught here
        and reported in it, and so is a pause (status PAUSED); the job itself is not moved.
        `max_pages` makes it one chunk of the job: that many pages at most (see `more`)."""
        start, end = job.record.start_ms, job.record.end_ms
        assert start is not None and end is not None
        try:
            if self._bulk is not None:
                await self._bulk.run(job, result, self._fill)
            for gap in subtract((start, end), await self._state.coverage(job.key)):
                await self._fill(job, gap, result, max_pages)
                if result.more:
                    break
            if result.unavailable_before_ms is not None and not result.more:
                result.status, result.retryable = FAILED, False
                earliest = iso_utc(result.unavailable_before_ms / 1000)
                result.error = (
                    f"candles before {earliest} are not served by {job.key.exchange}; "
                    "the rest of the range is stored"
                )
        except JobPaused:
            result.status = PAUSED
        except (ExchangeFault, StoreFault) as exc:
            result.status = FAILED
            result.error = str(exc)
            result.retryable = not is_permanent(exc)
        return result
