"""Live mode: every candle as it closes, the open one refreshed, holes after downtime repaired.

Each job (exchange, symbol, timeframe) is one task that sleeps until its next due instant and
then syncs: it fetches everything after its cursor (the newest stored closed candle) up to and
including the candle in progress, writes it, and moves the cursor. Due instants come from the
clock, not from sleeping fixed intervals, so there is no drift; a run that overruns its next due
instant skips it rather than piling up. After downtime the first sync pages through the hole
(within the shared budget) before the job is live again, so catch-up needs no special mode.

Each job shows in the jobs registry as RUNNING, with its last and next run, rows and last
error. A paused job skips its due runs and, on resume, runs at once: that sync catches up on
everything since its cursor. A cancelled job's task stops; the other jobs go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import ExchangeFault, PermanentFault, StoreFault
from ..exchange.fetcher import Fetcher
from ..intervals import Interval
from ..jobs.control import register_live_jobs, run_cancellable
from ..jobs.leases import LeaseKeeper
from ..jobs.model import CANCELLED, PAUSED, PENDING, Job, JobPaused, JobRecord
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import CandleBatch, JobKey
from ..normalize import Window
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from ..store import CandleStore
from ..timeframes import Grid, grid_of
from .durable_writer import DurableWriter
from .indicator_stage import IndicatorStage
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
    released: bool = False  # stopped because another instance goes on with it

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
    _slots: asyncio.Semaphore | None = None
    _writes: ShieldedWrites = field(default_factory=ShieldedWrites)
    _step: PageStep = field(init=False)

    def __post_init__(self) -> None:
        self._step = PageStep(self.fetcher, self.events, self.metrics)

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

    async def _run_once(self, job: LiveJob) -> tuple[int, bool]:
        assert self._slots is not None
        async with self._slots:
            handle = self._handle(job)
            self.registry.run_started(handle, self.now_ms())
            try:
                rows = await self.sync(job)
                self.registry.note(handle, last_error=None)
                return rows, False
            except JobPaused:  # paused mid-way: what was stored stays, the rest on resume
                return 0, False
            except (ExchangeFault, StoreFault) as exc:
                # The cursor did not move: the next run starts where this one stopped.
                self.registry.note(handle, last_error=str(exc))
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
                rows, failed = await self._run_once(job)
                self._finish(job, due, rows, failed)
                settings = self.settings
                self._register(
                    job,
                    next_due_ms(self.now_ms(), job.grid, settings.refresh_ms, settings.settle_ms),
                )
        except asyncio.CancelledError:
            if (handle.status == CANCELLED or job.released) and in_cycle:
                self._finish(job, job.next_due_ms, 0, False, ran=False)
                self.registry.note(handle, next_run_ms=None)
            raise

    def prepare(self, jobs: list[LiveJob]) -> None:
        """Register every job (as the registry shows it); none runs yet."""
        self._slots = self._slots or asyncio.Semaphore(self.settings.concurrency)
        for job in jobs:
            job.handle = self.registry.find(job.key) or self.registry.add(
                Job(JobRecord.of(job.key, "live", cursor_ms=job.cursor_ms))
            )

    def start_job(self, job: LiveJob, due_ms: int) -> asyncio.Future[bool]:
        """Run a prepared job from `due_ms` on (a catch-up sync first), until cancelled."""
        handle = self._handle(job)
        if handle.status == PENDING:
            self.registry.apply(handle, "start")
        handle.active = True
        job.released = False
        self._register(job, due_ms)
        return asyncio.ensure_future(run_cancellable(handle, self.run_job(job)))

    async def drain(self) -> None:
        """Let pages already fetched finish their write (the stop budget is 1 s)."""
        await self._writes.drain(DRAIN_ON_STOP_S)

    async def run(self, jobs: list[LiveJob]) -> None:
        """Start every job with a catch-up sync now (one cycle), then keep them live."""
        self.prepare(jobs)
        start = self.now_ms()
        try:
            await asyncio.gather(*(self.start_job(job, start) for job in jobs))
        except asyncio.CancelledError:
            await self.drain()
            raise


async def run_live(
    settings: LiveSettings,
    events: EventLog,
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    retry_policy: RetryPolicy,
    metrics: Metrics,
    indicators: IndicatorStage | None = None,
    registry: JobRegistry | None = None,
    *,
    cursors: Mapping[JobKey, int],
    keeper: LeaseKeeper | None = None,
) -> int:
    """Run every configured job live until cancelled (SIGTERM/SIGINT), each from its cursor:
    the newest stored closed candle, as the store reported it at start. With `keeper` (shared
    state), this instance runs its share of the jobs, under leases (`LeasedLive`)."""
    keys = [k for rt in runtimes for k in rt.keys]
    registry = registry or JobRegistry("live", state, metrics, events)
    await register_live_jobs(registry, state, keys, cursors)
    grids = {k: rt.source.capabilities.grid(k.timeframe) for rt in runtimes for k in rt.keys}
    for key, open_ms in cursors.items():
        close_s = (grids.get(key) or grid_of(key.timeframe)).next_open(open_ms) / 1000
        metrics.newest_closed_candle(key.exchange, key.symbol, key.timeframe, close_s)
    if indicators is not None:
        repair_writer = DurableWriter(store, retry_policy, events, metrics=metrics)
        await indicators.repair(repair_writer.write_as_is)
    exchanges = []
    for rt in runtimes:
        exchange_events = events.bind(exchange=rt.config.id)
        live = LiveExchange(
            rt.fetcher,
            DurableWriter(
                store, retry_policy, exchange_events, metrics=metrics, indicators=indicators
            ),
            state,
            exchange_events,
            replace(
                settings,
                page_limit=min(settings.page_limit, rt.source.capabilities.max_page_size),
            ),
            metrics,
            registry=registry,
        )
        jobs = [LiveJob(k, grids[k], cursors.get(k)) for k in rt.keys]
        if keeper is not None:
            from .leased_live import LeasedLive  # it builds on this module

            exchanges.append(LeasedLive(live, jobs, keeper, state, indicators).run())
        else:
            exchanges.append(live.run(jobs))
    events.info("live_started", f"{len(keys)} jobs going live", jobs=len(keys))
    await asyncio.gather(*exchanges)
    return 0
