"""History mode: backfill [start, end) for every job, exactly and resumably.

A job pages forward through the parts of its range the ledger does not cover yet. Each page is
normalised, written (durably), and only then added to the ledger, together with the job row that
counts it; so a rerun of a finished range asks for nothing, and a crash costs at most the pages
that were in flight. A paused job stops between pages (and no request of it leaves: see
`GatedSource`); resuming runs it again from the ledger, which is exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExchangeFault, PermanentFault, StoreFault
from ..exchange.fetcher import Fetcher
from ..intervals import subtract
from ..jobs.ledger import StateStore
from ..jobs.registry import COMPLETED, FAILED, PAUSED, Job, JobPaused, JobRegistry
from ..models import CandleBatch, JobKey
from ..normalize import Window, normalize_page
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from .durable_writer import DurableWriter
from .rejections import report_rejections


def _forget_stored(task: asyncio.Future[int]) -> None:
    """Mark the outcome seen: the job that awaited it may be gone (cancelled); faults it met
    were reported by the writer."""
    if not task.cancelled():
        task.exception()


@dataclass
class JobResult:
    key: JobKey
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
        self._fetcher = fetcher
        self._registry = registry
        self._storing: set[asyncio.Future[int]] = set()
        self._metrics = metrics
        self._writer = writer
        self._state = state
        self._events = events
        self._page_limit = min(page_limit, fetcher.source.capabilities.max_page_size)
        self._pipeline_pages = max(1, writer.store.pipeline_pages)

    async def _fill(self, job: Job, gap: tuple[int, int], result: JobResult) -> None:
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
                raw = await self._fetcher.candles(key, since, end - 1, self._page_limit)
                page = normalize_page(raw, key, tf_ms, Window(since, end, closed_before_ms=end))
                if page.rejected:
                    result.rejected.update(page.rejected)
                    report_rejections(self._events, self._metrics, key, page.rejected)
                following = next_since(since, page.newest_open_ms, tf_ms, end)
                covered_to = end if following is None else following
                pending.append(
                    self._shielded(self._store(job, page.batch, since, covered_to, started))
                )
                result.pages += 1
                while len(pending) >= (1 if following is None else self._pipeline_pages):
                    result.rows += await pending.popleft()
                if following is None:
                    return
                since = following
        finally:
            for abandoned in pending:  # a fault or a pause: their outcome is the writer's
                abandoned.add_done_callback(_forget_stored)

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

    def _shielded(self, storing: Coroutine[Any, Any, int]) -> Awaitable[int]:
        """A page being stored finishes even when its job is cancelled meanwhile, so that the
        job's saved count always matches the rows in the store; `drain` waits for them."""
        task = asyncio.ensure_future(storing)
        self._storing.add(task)
        task.add_done_callback(_forget_stored)
        task.add_done_callback(self._storing.discard)
        return asyncio.shield(task)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for pages still being stored (at most `timeout_s`)."""
        if self._storing:
            await asyncio.wait(set(self._storing), timeout=timeout_s)

    async def run_job(self, job: Job, result: JobResult | None = None) -> JobResult:
        """Backfill the job's window from the ledger on; faults are caught here and reported in
        the result, and so is a pause (status PAUSED). `result` accumulates across attempts."""
        result = result or JobResult(job.key)
        result.status, result.error, result.retryable = COMPLETED, None, False
        assert job.start_ms is not None and job.end_ms is not None
        try:
            for gap in subtract((job.start_ms, job.end_ms), await self._state.coverage(job.key)):
                await self._fill(job, gap, result)
        except JobPaused:
            result.status = PAUSED
        except (ExchangeFault, StoreFault) as exc:
            result.status = FAILED
            result.error = str(exc)
            result.retryable = not isinstance(exc, PermanentFault)
        return result
