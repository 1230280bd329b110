"""History mode: backfill [start, end) for every job, exactly and resumably.

A job pages forward through the parts of its range the ledger does not cover yet. Each page is
normalised, written (durably), and only then added to the ledger; so a rerun of a finished range
asks for nothing, and a crash costs at most the page that was in flight.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from .errors import ExchangeFault, PermanentFault, StoreFault
from .events import EventLog
from .fetcher import Fetcher
from .intervals import subtract
from .metrics import Metrics
from .models import JobKey
from .normalize import Window, normalize_page
from .persist import DurableWriter
from .rejections import report_rejections
from .state import StateStore
from .timeframes import ceil_ms, closed_before, timeframe_ms

COMPLETED = "COMPLETED"
FAILED = "FAILED"


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
    ) -> None:
        self._fetcher = fetcher
        self._metrics = metrics
        self._writer = writer
        self._state = state
        self._events = events
        self._page_limit = min(page_limit, fetcher.source.capabilities.max_page_size)

    async def _fill(self, key: JobKey, tf_ms: int, gap: tuple[int, int], result: JobResult) -> None:
        since, end = gap
        while True:
            started = time.monotonic()
            raw = await self._fetcher.candles(key, since, end - 1, self._page_limit)
            page = normalize_page(raw, key, tf_ms, Window(since, end, closed_before_ms=end))
            if page.rejected:
                result.rejected.update(page.rejected)
                report_rejections(self._events, self._metrics, key, page.rejected)
            written = await self._writer.write(page.batch)
            result.rows += written
            self._metrics.history_candles(key.exchange, key.timeframe, written)
            following = next_since(since, page.newest_open_ms, tf_ms, end)
            covered_to = end if following is None else following
            await self._state.add_coverage(key, since, covered_to)
            result.pages += 1
            self._events.info(
                "history_page_done",
                f"stored {len(page.batch)} candles",
                symbol=key.symbol,
                timeframe=key.timeframe,
                rows=len(page.batch),
                since=since,
                until=covered_to,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            if following is None:
                return
            since = following

    async def run_job(self, key: JobKey, start_ms: int, end_ms: int) -> JobResult:
        """Backfill one series; faults are caught here and reported in the result."""
        result = JobResult(key)
        tf_ms = timeframe_ms(key.timeframe)
        start = ceil_ms(start_ms, tf_ms)
        end = min(ceil_ms(end_ms, tf_ms), closed_before(self._fetcher.source.now_ms(), tf_ms))
        try:
            for gap in subtract((start, end), await self._state.coverage(key)):
                await self._fill(key, tf_ms, gap, result)
        except (ExchangeFault, StoreFault) as exc:
            result.status = FAILED
            result.error = str(exc)
            result.retryable = not isinstance(exc, PermanentFault)
        return result
