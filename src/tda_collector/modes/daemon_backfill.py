"""Backfills inside the live daemon: a series' history job run beside its live job.

The job pages through the uncovered parts of its window like any history job
(`backfill.HistoryBackfill`), into the same store and ledger, with the connector's one limiter
at background priority (`Fetcher.background`): live requests go first. A pause lets go between
pages and the run goes on from the ledger on resume; a cancel stops it at once. Its end is one
`job_run` event and one observation of the job-run histogram; indicators touched by the older
rows are then recomputed (`IndicatorStage.repair`).

With shared state, a backfill works only while this instance holds its series' lease in the one
`backfill` run (`SeriesLease`): a backfill of the same series asked of two instances runs on one
at a time, and the second goes on from the ledger where the first left it (nothing twice).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..exchange.runtime import ExchangeRuntime
from ..jobs.catalog import Catalog
from ..jobs.control import run_cancellable
from ..jobs.leases import LeaseKeeper
from ..jobs.model import CANCELLED, COMPLETED, OPEN, PAUSED, PENDING, Job
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from ..store import CandleStore
from .backfill import HistoryBackfill, HistoryOutcome
from .durable_writer import DurableWriter
from .indicator_stage import IndicatorStage
from .live import LiveSettings
from .pipeline import DRAIN_ON_STOP_S


@dataclass(frozen=True)
class ServiceParts:
    """What the service writes with and reports to (built once by the app)."""

    settings: LiveSettings
    history_page_limit: int
    events: EventLog
    store: CandleStore
    state: StateStore
    catalog: Catalog
    policy: RetryPolicy
    metrics: Metrics
    registry: JobRegistry
    indicators: IndicatorStage | None = None


BACKFILL_RUN = "backfill"  # the daemons' backfills: one lease per series, never finished
IDLE_POLL_S = 0.5  # another instance backfills the series: look again this often


class SeriesLease:
    """With shared state (`keeper`), a backfill holds its series' lease while it works; without,
    it always may."""

    def __init__(self, keeper: LeaseKeeper | None) -> None:
        self._keeper = keeper

    def check(self, key: JobKey) -> None:
        """The backfill's request gate: `LeaseLost` unless the lease is surely still ours."""
        if self._keeper is not None:
            self._keeper.check(key, "history")

    async def hold(self, job: Job) -> bool:
        """Until this instance holds the series' lease (another instance may be backfilling
        it); False when the job was cancelled meanwhile. A paused job does not claim it."""
        keeper = self._keeper
        if keeper is None:
            return job.status in OPEN
        await keeper.store.offer_jobs(BACKFILL_RUN, [job.id], [])
        while job.status in OPEN:
            since = time.monotonic()
            if job.status != PAUSED and await keeper.store.claim_job(
                BACKFILL_RUN, keeper.owner, keeper.lease_s, [job.id]
            ):
                keeper.held(job.id, since)
                return True
            await asyncio.sleep(IDLE_POLL_S)
        return False

    async def let_go(self, job: Job, backfill: HistoryBackfill) -> None:
        """Release the lease (the backfill is over, paused, or its lease was lost) once the
        pages fetched under it are stored (within the stop budget when stopping)."""
        if self._keeper is None:
            return
        await backfill.drain(DRAIN_ON_STOP_S if _stopping(job) else None)
        self._keeper.dropped(job.id)
        await self._keeper.store.release_job(BACKFILL_RUN, job.id, self._keeper.owner)


def _stopping(job: Job) -> bool:
    """The job was cancelled, or the daemon is stopping (this task is being cancelled)."""
    current = asyncio.current_task()
    return job.status == CANCELLED or (current is not None and current.cancelling() > 0)


class DaemonBackfills:
    """The daemon's running backfills (their tasks are cancelled when it stops)."""

    def __init__(self, parts: ServiceParts, keeper: LeaseKeeper | None = None) -> None:
        """`keeper`: this instance's leases, when several instances share the state."""
        self._p = parts
        self._lease = SeriesLease(keeper)
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, runtime: ExchangeRuntime, job: Job) -> None:
        """Run the registered history `job` on `runtime`'s exchange, from now on."""
        task = asyncio.create_task(self._run(runtime, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, runtime: ExchangeRuntime, job: Job) -> None:
        p, registry = self._p, self._p.registry
        events = p.events.bind(exchange=job.key.exchange)
        lease = self._lease

        def gate(key: JobKey) -> None:
            registry.check(key, "history")
            lease.check(key)

        fetcher = runtime.fetcher.background(gate)
        writer = DurableWriter(
            p.store, p.policy, events, metrics=p.metrics, indicators=p.indicators
        )
        backfill = HistoryBackfill(
            fetcher, writer, p.state, events, p.history_page_limit, p.metrics, registry
        )
        started = time.monotonic()
        outcome = HistoryOutcome()
        try:
            while await lease.hold(job):
                if job.status == PENDING:
                    registry.apply(job, "start")
                outcome = HistoryOutcome()
                job.active = True
                try:
                    if not await run_cancellable(job, backfill.run_job(job, outcome)):
                        return
                finally:
                    job.active = False
                    await asyncio.shield(lease.let_go(job, backfill))
                if outcome.status == PAUSED:  # or its lease lost: held again before going on
                    await job.wait_unpaused()
                elif outcome.status == COMPLETED:
                    if p.indicators is not None:  # COMPLETED: its rows final, indicators too
                        await p.indicators.repair(writer.write_as_is, [job.key])
                    registry.apply(job, "complete")
                else:
                    registry.apply(job, "fail", error=outcome.error or "failed")
        finally:
            await backfill.drain(DRAIN_ON_STOP_S if _stopping(job) else None)
            self._ran(job, outcome, time.monotonic() - started)
        if p.indicators is not None:
            await p.indicators.repair(DurableWriter(p.store, p.policy, events).write_as_is)

    def _ran(self, job: Job, outcome: HistoryOutcome, seconds: float) -> None:
        self._p.metrics.job_run(job.key.exchange, "history", seconds)
        log = self._p.events.info if job.status == COMPLETED else self._p.events.warning
        log(
            "job_run",
            f"{job.id}: {job.status}, {job.record.rows} rows",
            exchange=job.key.exchange,
            symbol=job.key.symbol,
            timeframe=job.key.timeframe,
            job=job.id,
            status=job.status,
            rows=job.record.rows,
            duration_ms=round(seconds * 1000, 1),
            error=outcome.error,
        )
