"""Live mode: every candle as it closes, the open one refreshed, holes after downtime repaired.

Each job (exchange, symbol, timeframe) is one task that sleeps until its next due instant (by
its schedule: each candle close and open-candle refresh, or a cron's instants) and then syncs:
it fetches everything after its cursor (the newest stored closed candle) up to and including
the candle in progress, writes it, and moves the cursor. Due instants come from the
clock, not from sleeping fixed intervals, so there is no drift; a run that overruns its next due
instant skips it rather than piling up. After downtime the first sync pages through the hole
(within the shared budget) before the job is live again, so catch-up needs no special mode.

Each job shows in the jobs registry as RUNNING, with its last and next run, rows and last
error. A paused job skips its due runs and, on resume, runs at once: that sync catches up on
everything since its cursor. A cancelled job's task stops; the other jobs go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ExchangeFault, PermanentFault, StoreFault
from ..exchange.fetcher import Fetcher
from ..intervals import Interval
from ..jobs.control import register_live_jobs, run_cancellable
from ..jobs.model import CANCELLED, PAUSED, PENDING, Job, JobPaused, JobRecord
from ..jobs.registry import JobRegistry
from ..jobs.schedule import EACH_CLOSE, Schedule, next_cron_ms
from ..jobs.state import StateStore
from ..models import CandleBatch, JobKey
from ..normalize import Window
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..timeframes import Grid, grid_of
from .durable_writer import DurableWriter
from .pipeline import DRAIN_ON_STOP_S, PageStep, ShieldedWrites, proven_span

if TYPE_CHECKING:
    from ..exchange.runtime import ExchangeRuntime


def next_due_ms(now_ms: int, grid: Grid, refresh_ms: int, settle_ms: int) -> int:
    """The first instant after `now_ms` at which a job runs: a candle close on the series'
    calendar `grid` (a month's end for 1M, the exchange's week start for 1w) or an open-candle
    refresh tick (multiples of `refresh_ms` from the epoch), plus the settle delay."""
    next_close = grid.next_open(now_ms - settle_ms) + settle_ms
    next_refresh = (now_ms - settle_ms) // refresh_ms * refresh_ms + refresh_ms + settle_ms
    return min(next_close, next_refresh)


@dataclass
class LiveJob:
    """What scheduling a live series needs. What the jobs API shows (runs, last error, rows)
    lives on `handle`, the registry's job, and changes only through the registry."""

    key: JobKey
    grid: Grid  # where the series' candles open, on its exchange's calendar
    cursor_ms: int | None  # newest stored closed candle's open time
    next_due_ms: int = 0
    # Where what pages proved of the closed candles ends: past the cursor when the newest
    # closed candles are a hole the exchange has, which is then not asked for again.
    proven_to_ms: int | None = None
    handle: Job | None = field(default=None, repr=False)  # the job as the registry shows it
    schedule: Schedule = EACH_CLOSE
    released: bool = False  # stopped here because its lease went to another instance
    syncing: bool = False  # a run is under way (not asleep until its next due instant)

    def lag_s(self, now_ms: int) -> float | None:
        """Seconds since the newest stored closed candle closed."""
        if self.cursor_ms is None:
            return None
        return max(0.0, (now_ms - self.grid.next_open(self.cursor_ms)) / 1000)


@dataclass
class _Cycle:
    """Jobs due at one instant; complete when every one of them has run."""

    due_ms: int
    pending: int = 0
    jobs: int = 0
    rows: int = 0
    max_lag_s: float = 0.0
    failed: int = 0


@dataclass(frozen=True)
class LiveSettings:
    """Live mode's part of the configuration (the app builds it once)."""

    refresh_ms: int
    settle_ms: int
    page_limit: int
    initial_candles: int
    concurrency: int


@dataclass
class LiveExchange:
    """Live jobs of one exchange, sharing its fetcher (and so its one limiter)."""

    fetcher: Fetcher
    writer: DurableWriter
    state: StateStore
    events: EventLog
    settings: LiveSettings
    metrics: Metrics
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    registry: JobRegistry = field(default_factory=lambda: JobRegistry("live"))
    _cycles: dict[int, _Cycle] = field(default_factory=dict)
    _slots: asyncio.Semaphore = field(init=False)
    _writes: ShieldedWrites = field(default_factory=ShieldedWrites)
    _step: PageStep = field(init=False)

    def __post_init__(self) -> None:
        self._step = PageStep(self.fetcher, self.events, self.metrics)
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    def now_ms(self) -> int:
        return self.fetcher.source.now_ms()

    async def _persist(self, job: LiveJob, batch: CandleBatch, closed: list[Interval]) -> None:
        """Write, then move the cursor and the ledger: in that order, and not interrupted. The
        ledger gets what the page proved of the closed candles."""
        written = await self.writer.write(batch)
        newest_closed = batch.newest_closed_ms
        if newest_closed is not None:
            job.cursor_ms = newest_closed
        if closed:
            job.proven_to_ms = max(job.proven_to_ms or closed[-1][1], closed[-1][1])
        await self.state.add_coverage(job.key, closed)
        self.registry.note(self._handle(job), rows=written, cursor_ms=job.cursor_ms)

    def _report_holes(self, job: LiveJob, closed: list[Interval], batch: CandleBatch) -> None:
        """A gap the page proved in the closed candles (`closed`: its proven span before the
        candle in progress) is the exchange's own: recorded in the ledger, not asked again."""
        slots = sum(job.grid.count(a, b) for a, b in closed)
        missing = slots - int(batch.closed.sum())
        if missing > 0:
            self.metrics.gaps_found(job.key.exchange)
            self.events.warning(
                "gap_detected",
                f"the exchange has no candles for {missing} intervals; recorded, not re-fetched",
                symbol=job.key.symbol,
                timeframe=job.key.timeframe,
                rows=missing,
                since=closed[0][0],
            )

    async def sync(self, job: LiveJob) -> int:
        """Fetch from the cursor up to the open candle, page by page; returns rows written."""
        now = self.now_ms()
        grid = job.grid
        boundary = grid.floor(now)  # the candle in progress opens here
        if job.cursor_ms is None:
            since = grid.shift(boundary, -self.settings.initial_candles)
        else:
            since = grid.next_open(job.cursor_ms)
        since = max(since, job.proven_to_ms or since)
        rows = pages = 0
        limit = self.settings.page_limit
        end = min(grid.next_open(boundary), grid.shift(since, limit))  # no wider than one page
        newer_seen = False  # a candle after `end` is known: an empty answer is then a hole
        while since < end:
            window = Window(since, end, closed_before_ms=boundary, keep_open=True)
            page = await self._step.fetch(job.key, grid, window, end - 1, limit)
            if not len(page.seen_ms) and not newer_seen:
                # Nothing yet after the cursor: the newest candles may only be late, so this
                # proves no hole; the next run asks again.
                break
            settled, proven = proven_span((since, end), page, grid)
            if settled[0] > since:
                # The answer proves nothing before its oldest candle (a truncated page, or a
                # listing): ask for that older part first, so the cursor never passes a hole
                # that was not looked at.
                end, newer_seen = settled[0], True
                continue
            newer_seen = False
            closed = [(a, min(b, boundary)) for a, b in proven if a < boundary]
            self._report_holes(job, closed, page.batch)
            await self._writes.start(self._persist(job, page.batch, closed))
            rows += len(page.batch)
            pages += 1
            since = settled[1]
            end = min(grid.next_open(boundary), grid.shift(since, limit))
        if pages > 1:
            self.metrics.gaps_repaired(job.key.exchange)
            self.events.info(
                "gap_repaired",
                f"caught up {pages} pages after downtime",
                symbol=job.key.symbol,
                timeframe=job.key.timeframe,
                rows=rows,
            )
        return rows

    @staticmethod
    def _handle(job: LiveJob) -> Job:
        assert job.handle is not None, "run() registers every job"
        return job.handle

    def _register(self, job: LiveJob, due_ms: int) -> None:
        job.next_due_ms = due_ms
        self._cycles.setdefault(due_ms, _Cycle(due_ms)).pending += 1
        self.registry.note(self._handle(job), next_run_ms=due_ms)

    def _finish(self, job: LiveJob, due_ms: int, rows: int, failed: bool, ran: bool = True) -> None:
        """The job is done with the cycle of `due_ms`; a job that did not run (paused,
        cancelled) leaves it without counting, and a cycle in which none ran is not reported."""
        cycle = self._cycles[due_ms]
        cycle.pending -= 1
        if ran:
            cycle.jobs += 1
            cycle.rows += rows
            cycle.failed += failed
            cycle.max_lag_s = max(cycle.max_lag_s, job.lag_s(self.now_ms()) or 0.0)
        if cycle.pending == 0:
            del self._cycles[due_ms]
        if cycle.pending == 0 and cycle.jobs:
            self.events.info(
                "live_cycle_complete",
                f"{cycle.jobs} jobs, {cycle.rows} rows",
                jobs=cycle.jobs,
                rows=cycle.rows,
                failed=cycle.failed or None,
                lag_s=round(cycle.max_lag_s, 3),
                duration_ms=max(0, self.now_ms() - due_ms),
            )

    def next_due(self, job: LiveJob, now_ms: int) -> int:
        """When the job runs next after `now_ms`, by its schedule."""
        if job.schedule.cron is not None:
            return next_cron_ms(job.schedule.cron, now_ms)
        return next_due_ms(now_ms, job.grid, self.settings.refresh_ms, self.settings.settle_ms)

    def _ran(self, job: LiveJob, started: float, rows: int, error: str | None) -> None:
        """One run of the job is over: a `job_run` event (DEBUG: one per job and close) and
        the run's duration in the job-run histogram."""
        seconds = time.monotonic() - started
        self.metrics.job_run(job.key.exchange, "live", seconds)
        self.events.debug(
            "job_run",
            f"{self._handle(job).id}: {rows} rows",
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            job=self._handle(job).id,
            rows=rows,
            duration_ms=round(seconds * 1000, 1),
            error=error,
        )

    async def _run_once(self, job: LiveJob) -> tuple[int, bool]:
        async with self._slots:
            handle = self._handle(job)
            self.registry.run_started(handle, self.now_ms())
            started = time.monotonic()
            try:
                rows = await self.sync(job)
                self.registry.note(handle, last_error=None)
                self._ran(job, started, rows, None)
                return rows, False
            except JobPaused:  # paused mid-way: what was stored stays, the rest on resume
                return 0, False
            except (ExchangeFault, StoreFault) as exc:
                # The cursor did not move: the next run starts where this one stopped.
                self.registry.note(handle, last_error=str(exc))
                self._ran(job, started, 0, str(exc)[:500])
                level = (
                    self.events.error if isinstance(exc, PermanentFault) else self.events.warning
                )
                level(
                    "job_error",
                    f"{job.key} sync failed; retrying at its next due time",
                    symbol=job.key.symbol,
                    timeframe=job.key.timeframe,
                    error=str(exc)[:500],
                )
                return 0, True

    async def run_job(self, job: LiveJob) -> None:
        """One sync per due instant, forever; the next instant is computed after each run, so
        runs of a job never overlap and missed instants are skipped, not queued. A paused job
        skips its instants and runs at once when resumed."""
        handle = self._handle(job)
        in_cycle = True  # registered for the cycle of job.next_due_ms
        try:
            while True:
                due = job.next_due_ms
                wait_ms = due - self.now_ms()
                if wait_ms > 0:
                    await self.sleep(wait_ms / 1000)
                if handle.status == PAUSED:
                    self._finish(job, due, 0, False, ran=False)
                    in_cycle = False
                    self.registry.note(handle, next_run_ms=None)
                    await handle.wait_unpaused()
                    self._register(job, self.now_ms())
                    in_cycle = True
                    continue
                job.syncing = True
                try:
                    rows, failed = await self._run_once(job)
                finally:
                    job.syncing = False
                self._finish(job, due, rows, failed)
                self._register(job, self.next_due(job, self.now_ms()))
        except asyncio.CancelledError:
            if (handle.status == CANCELLED or job.released) and in_cycle:
                self._finish(job, job.next_due_ms, 0, False, ran=False)
                self.registry.note(handle, next_run_ms=None)
            raise

    def attach(self, job: LiveJob, due_ms: int) -> Job:
        """Register the job (its saved record if the registry has one) and its first run at
        `due_ms`; `run_job` then keeps it live."""
        handle = self.registry.find(job.key, "live") or self.registry.add(
            Job(JobRecord.of(job.key, "live", cursor_ms=job.cursor_ms))
        )
        if handle.status == PENDING:
            self.registry.apply(handle, "start")
        handle.active = True
        job.handle = handle
        self._register(job, due_ms)
        return handle

    async def drain(self, timeout_s: float | None = DRAIN_ON_STOP_S) -> None:
        """Let pages already fetched finish their write (by default within the stop budget,
        1 s; None: however long they take)."""
        await self._writes.drain(timeout_s)

    async def run(self, jobs: list[LiveJob]) -> None:
        """Start every job with a catch-up sync now (one cycle), then keep them live."""
        start = self.now_ms()
        for job in jobs:
            self.attach(job, start)
        try:
            await asyncio.gather(*(run_cancellable(self._handle(j), self.run_job(j)) for j in jobs))
        except asyncio.CancelledError:
            await self.drain()
            raise


async def prepare_live(
    registry: JobRegistry,
    state: StateStore,
    runtimes: list[ExchangeRuntime],
    keys: list[JobKey],
    cursors: Mapping[JobKey, int],
    metrics: Metrics,
) -> dict[JobKey, Grid]:
    """Register the jobs with what their saved rows carry over, and show each series' newest
    stored close; returns each key's grid on its exchange's calendar."""
    await register_live_jobs(registry, state, keys, cursors)
    by_exchange = {rt.config.id: rt.source.capabilities for rt in runtimes}
    grids = {k: by_exchange[k.exchange].grid(k.timeframe) for k in keys}
    for key, open_ms in cursors.items():
        close_s = (grids.get(key) or grid_of(key.timeframe)).next_open(open_ms) / 1000
        metrics.newest_closed_candle(key.exchange, key.symbol, key.timeframe, close_s)
    return grids
