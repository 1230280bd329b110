"""A history job's bulk from the exchange's public archive, before REST takes the rest.

For the parts of the job's window the ledger does not cover, `ArchiveBackfill.run` plans the
archive files (`exchange.archive_layout.plan_files`: monthly files for whole published months,
daily files for the other whole days) and takes them one at a time: download and verify
(`exchange.archive.ArchiveClient`), zip → CSV → matrix (`exchange.archive_csv`), then the same
`normalize.normalize_page`, rejection reports, `DurableWriter` (indicators, store) and ledger
step as a REST page, so an archived candle is stored as a REST one (prices, volume, time and
`is_closed` bit for bit; indicators from the one indicator stage). The file is the
unit of durability: its rows are written in one batch, then the ledger records only the
candles the file held (`held_spans`); a file missing an hour leaves that hour a hole. What a
file did not prove (a 404, a corrupt file, missing rows) is paged over REST right after it, so
the series is stored oldest first; what no file covers (the unpublished tail, the partial
days at the edges) is left to the job's REST pass (`backfill.HistoryBackfill`). One file per
job is in flight, so a crash costs at most that file.

An archive host that cannot be reached gives one `archive_unavailable` warning and turns the
archive off for the rest of the run: everything goes over REST.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from ..errors import CalendarMismatch
from ..exchange.archive import ArchiveFetch, ArchiveTools, ArchiveUnavailable
from ..exchange.archive_csv import ArchiveFormatError, klines_of_zip
from ..exchange.archive_layout import ArchiveFile, plan_files
from ..exchange.source import Capabilities
from ..intervals import Interval, merge, subtract
from ..jobs.model import Job
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import CandleBatch, JobKey
from ..normalize import NormalizedPage, Window, normalize_page
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..timeframes import Grid
from .backfill import GapFill, HistoryOutcome
from .durable_writer import DurableWriter
from .pipeline import ProvenWrites, ShieldedWrites, report_rejections


def held_spans(timestamps: np.ndarray, grid: Grid) -> list[Interval]:
    """The runs of consecutive candles among sorted open times, as [open, next open)."""
    if not len(timestamps):
        return []
    if grid.months:
        return merge((int(t), grid.next_open(int(t))) for t in timestamps.tolist())
    breaks = np.flatnonzero(np.diff(timestamps) != grid.step_ms)
    starts = timestamps[np.r_[0, breaks + 1]].tolist()
    ends = (timestamps[np.r_[breaks, len(timestamps) - 1]] + grid.step_ms).tolist()
    return list(zip(starts, ends, strict=True))


def read_file(data: bytes, key: JobKey, grid: Grid, file: ArchiveFile) -> NormalizedPage:
    """One verified zip as a normalised page of the file's span (run in a worker thread)."""
    window = Window(file.span[0], file.span[1], closed_before_ms=file.span[1])
    return normalize_page(klines_of_zip(data), key, grid, window)


class ArchiveBackfill:
    def __init__(
        self,
        tools: ArchiveTools,
        writer: DurableWriter,
        state: StateStore,
        registry: JobRegistry,
        events: EventLog,
        metrics: Metrics,
        capabilities: Capabilities,
        now_ms: Callable[[], int],
    ) -> None:
        self._tools = tools
        self._proven = ProvenWrites(writer, state, registry, metrics)
        self._state = state
        self._events = events
        self._metrics = metrics
        self._capabilities = capabilities
        self._now_ms = now_ms
        self._writes = ShieldedWrites()
        self.unavailable = False
        self.files = 0  # files stored in this run
        self.bytes = 0  # bytes downloaded in this run, every outcome

    async def run(self, job: Job, result: HistoryOutcome, fill: GapFill) -> None:
        """Store what the archive holds of the job's uncovered window, file by file, counting
        into `result`; after each file, `fill` (REST) pages what the file did not prove (a 404,
        a corrupt file, missing rows), so the series is stored oldest first. Raises what the
        REST pass raises (JobPaused, ExchangeFault, StoreFault, CalendarMismatch), so the
        caller handles both alike."""
        market_id = self._tools.market_ids.get(job.key.symbol)
        start, end = job.record.start_ms, job.record.end_ms
        if self.unavailable or not market_id or start is None or end is None:
            return
        grid = self._capabilities.grid(job.key.timeframe)
        now_ms = self._now_ms()
        for gap in subtract((start, end), await self._state.coverage(job.key)):
            for file in plan_files(self._tools.layout, market_id, grid, gap, now_ms):
                job.check()  # paused: let go of the worker between files
                held = await self._one(job, grid, file, result)
                if held is None:  # the host is unreachable: the REST pass takes the rest
                    return
                for hole in subtract(file.span, held):
                    await fill(job, hole, result)

    async def _one(
        self, job: Job, grid: Grid, file: ArchiveFile, result: HistoryOutcome
    ) -> list[Interval] | None:
        """Fetch, read and store one file; what it held (nothing, for a file that proved
        nothing), or None when the host turned out unreachable."""
        started = time.monotonic()
        try:
            fetched = await self._tools.source.fetch(file)
        except ArchiveUnavailable as exc:
            self._give_up(exc)
            return None
        self._metrics.archive_file(job.key.exchange, fetched.outcome, fetched.size)
        self.bytes += fetched.size
        if fetched.outcome != "ok":
            self._report(job.key, fetched)
            return []
        try:
            page = await asyncio.to_thread(read_file, fetched.data, job.key, grid, file)
        except ArchiveFormatError as exc:
            self._report(job.key, ArchiveFetch(file, "corrupt", size=fetched.size, error=str(exc)))
            return []
        if page.rejected:
            report_rejections(self._events, self._metrics, job.key, page.rejected)
            result.rejected.update(page.rejected)
        if page.calendar_mismatch is not None:
            raise CalendarMismatch(page.calendar_mismatch)
        held = held_spans(page.batch.timestamps, grid)
        writing = self._store(job, file, page.batch, held, fetched.size, started)
        result.rows += await self._writes.start(writing)
        result.pages += 1
        self.files += 1
        return held

    async def _store(
        self,
        job: Job,
        file: ArchiveFile,
        batch: CandleBatch,
        held: list[Interval],
        size: int,
        started: float,
    ) -> int:
        """Write the file's rows, then count them and add what it held to the ledger, in one
        transaction."""
        written = await self._proven.store(job, batch, held)
        self._events.info(
            "archive_file_done",
            f"stored {len(batch)} candles from {file.name}",
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            rows=len(batch),
            source="archive",
            file=file.name,
            bytes=size,
            since=file.span[0],
            until=file.span[1],
            holes=len(subtract(file.span, held)) or None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return written

    def _report(self, key: JobKey, fetched: ArchiveFetch) -> None:
        """A file that proved nothing: REST fetches its span. A 404 is routine (not published
        yet, or before the listing); a corrupt or failed file is loud."""
        log = self._events.debug if fetched.outcome == "missing" else self._events.warning
        log(
            f"archive_file_{fetched.outcome}",
            f"{fetched.file.name}: {fetched.error}; REST fills its span",
            symbol=key.symbol,
            timeframe=key.timeframe,
            source="archive",
            file=fetched.file.name,
            since=fetched.file.span[0],
            until=fetched.file.span[1],
            error=fetched.error,
        )

    def _give_up(self, exc: ArchiveUnavailable) -> None:
        if not self.unavailable:
            self.unavailable = True
            self._events.warning(
                "archive_unavailable",
                f"archive host {self._tools.base_url} cannot be reached; history over REST only",
                error=str(exc)[:300],
            )

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for file writes still under way (at most `timeout_s`)."""
        await self._writes.drain(timeout_s)
