"""Backfills inside the live daemon: a series' history job run beside its live job.

The job pages through the uncovered parts of its window like any history job
(`backfill.HistoryBackfill`), into the same store and ledger, with the connector's one limiter
at background priority (`Fetcher.background`): live requests go first. A pause lets go between
pages and the run goes on from the ledger on resume; a cancel stops it at once. Its end is one
`job_run` event and one observation of the job-run histogram; indicators touched by the older
rows are then recomputed (`IndicatorStage.repair`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..exchange.runtime import ExchangeRuntime
from ..jobs.catalog import Catalog
from ..jobs.control import run_cancellable
from ..jobs.model import CANCELLED, COMPLETED, OPEN, PAUSED, PENDING, Job
from ..jobs.registry import JobRegistry
from ..jobs.state import StateStore
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


class DaemonBackfills:
    """The daemon's running backfills (their tasks are cancelled when it stops)."""

    def __init__(self, parts: ServiceParts) -> None:
        self._p = parts
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, runtime: ExchangeRuntime, job: Job) -> None:
        """Run the registered history `job` on `runtime`'s exchange, from now on."""
        task = asyncio.create_task(self._run(runtime, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, runtime: ExchangeRuntime, job: Job) -> None:
        p, registry = self._p, self._p.registry
        events = p.events.bind(exchange=job.key.exchange)
        fetcher = runtime.fetcher.background(lambda key: registry.check(key, "history"))
        writer = DurableWriter(
            p.store, p.policy, events, metrics=p.metrics, indicators=p.indicators
        )
        backfill = HistoryBackfill(
            fetcher, writer, p.state, events, p.history_page_limit, p.metrics, registry
        )
        started = time.monotonic()
        outcome = HistoryOutcome()
        try:
            while job.status in OPEN:
                if job.status == PENDING:
                    registry.apply(job, "start")
                outcome = HistoryOutcome()
                job.active = True
                try:
                    if not await run_cancellable(job, backfill.run_job(job, outcome)):
                        return
                finally:
                    job.active = False
                if outcome.status == PAUSED:
                    await job.wait_unpaused()
                elif outcome.status == COMPLETED:
                    registry.apply(job, "complete")
                else:
                    registry.apply(job, "fail", error=outcome.error or "failed")
        finally:
            current = asyncio.current_task()
            stopping = job.status == CANCELLED or (current is not None and current.cancelling())
            await backfill.drain(DRAIN_ON_STOP_S if stopping else None)
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
