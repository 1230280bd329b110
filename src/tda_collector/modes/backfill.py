"""One history job's backfill of its window [start, end), exactly and resumably.

A job pages forward through the parts of its range the ledger does not cover yet. Each page is
normalised, written (durably), and only then added to the ledger, together with the job row that
counts it; so a rerun of a finished range asks for nothing, and a crash costs at most the pages
that were in flight. A paused job stops between pages (and no request of it leaves: the
fetcher's gate refuses it); resuming runs it again from the ledger, which is exactly where it
stopped. The page step itself (fetch, normalise, report rejections) is `pipeline.PageStep`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from ..errors import ExchangeFault, StoreFault
from ..exchange.fetcher import Fetcher
from ..intervals import subtract
from ..jobs.ledger import StateStore
from ..jobs.model import COMPLETED, FAILED, PAUSED, Job, JobPaused
from ..jobs.registry import JobRegistry
from ..models import CandleBatch
from ..normalize import Window
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import is_permanent
from .durable_writer import DurableWriter
from .pipeline import PageStep, ShieldedWrites, forget


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


def next_since(since_ms: int, newest_open_ms: int | None, tf_ms: int, end_ms: int) -> int | None:
    """Where the next page starts, or None when [since, end) is exhausted.

    An empty page means the exchange has nothing from `since` on (Binance answers a request
    before a listing with the first candles after it, and jumps over maintenance holes).
    The next page starts one timeframe after the newest candle seen, and always moves forward.
    """
    if newest_open_ms is None:
        return None
    candidate = max(newest_open_ms + tf_ms, since_ms + tf_ms)
    return candidate if candidate < end_ms else None


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
    ) -> None:
        self._step = PageStep(fetcher, events, metrics)
        self._registry = registry
        self._writes = ShieldedWrites()
        self._metrics = metrics
        self._writer = writer
        self._state = state
        self._events = events
        self._page_limit = min(page_limit, fetcher.source.capabilities.max_page_size)
        self._pipeline_pages = max(1, writer.store.pipeline_pages)

    async def _fill(self, job: Job, gap: tuple[int, int], result: HistoryOutcome) -> None:
        """Page through `gap`. Up to the store's `pipeline_pages` writes of the job may be under
        way while the next page is fetched, since stores gather pages of many jobs into one
        commit or load job; a crash refetches at most that many pages. The ledger is a set of
        intervals, so pages may become durable in any order."""
        key, tf_ms = job.key, job.tf_ms
        since, end = gap
        pending: deque[Awaitable[int]] = deque()
        try:
            while True:
                job.check()  # paused: let go of the worker between pages
                started = time.monotonic()
                window = Window(since, end, closed_before_ms=end)
                page = await self._step.fetch(key, tf_ms, window, end - 1, self._page_limit)
                result.rejected.update(page.rejected)
                following = next_since(since, page.newest_open_ms, tf_ms, end)
                covered_to = end if following is None else following
                pending.append(
                    self._writes.start(self._store(job, page.batch, since, covered_to, started))
                )
                result.pages += 1
                while len(pending) >= (1 if following is None else self._pipeline_pages):
                    result.rows += await pending.popleft()
                if following is None:
                    return
                since = following
        finally:
            for abandoned in pending:
                forget(abandoned)

    async def _store(
        self, job: Job, batch: CandleBatch, since: int, covered_to: int, started: float
    ) -> int:
        """Write the page, then count it and add it to the ledger in one transaction."""
        written = await self._writer.write(batch)
        self._metrics.history_candles(job.key.exchange, job.key.timeframe, written)
        record = self._registry.record_page(job, since, covered_to, written)
        await self._state.add_coverage(job.key, since, covered_to, record)
        self._events.info(
            "history_page_done",
            f"stored {len(batch)} candles",
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            rows=len(batch),
            since=since,
            until=covered_to,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return written

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for pages still being stored (at most `timeout_s`)."""
        await self._writes.drain(timeout_s)

    async def run_job(self, job: Job, result: HistoryOutcome) -> HistoryOutcome:
        """Backfill the job's window from the ledger on, counting into `result` (a fresh one per
        run, so a cancelled run leaves what it counted), and return it. Faults are caught here
        and reported in it, and so is a pause (status PAUSED); the job itself is not moved."""
        start, end = job.record.start_ms, job.record.end_ms
        assert start is not None and end is not None
        try:
            for gap in subtract((start, end), await self._state.coverage(job.key)):
                await self._fill(job, gap, result)
        except JobPaused:
            result.status = PAUSED
        except (ExchangeFault, StoreFault) as exc:
            result.status = FAILED
            result.error = str(exc)
            result.retryable = not is_permanent(exc)
        return result
