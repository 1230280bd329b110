"""One exchange's history jobs when several instances share the state: claimed, chunk by chunk.

Each of `concurrency` workers claims a job nobody holds (`LeaseStore.claim_job`), backfills one
chunk of it (`chunk_pages` pages from where the ledger says it stands, whichever instance put
it there), and lets it go again, or marks it over once its window is covered (or it failed for
good). A job therefore runs on one instance at a time, a long one moves between instances
chunk by chunk, and the pages of a dead instance are taken over when its lease runs out. A
worker that finds nothing to claim waits and looks again while any job is not over: leases
held by others may run out. The run ends when every job is over, whoever did it; jobs other
instances finished are moved here too, so this instance's summary and exit code speak for
the whole run.

More than `failure_limit` failures stop the exchange's remaining jobs, as in a lone instance.

A pause or cancel through this instance's API holds the job here only (it is not claimed
here again; another instance may still take it).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

from ..jobs.control import run_cancellable
from ..jobs.leases import LeaseKeeper
from ..jobs.model import COMPLETED, FAILED, OPEN, PAUSED, PENDING, RUNNING, Job
from ..jobs.registry import JobRegistry
from ..observability.events import EventLog
from .backfill import HistoryBackfill, HistoryOutcome
from .history_pool import NOT_RUN, JobResult
from .indicator_stage import IndicatorStage
from .pipeline import DRAIN_ON_STOP_S

IDLE_POLL_S = 0.5  # nothing to claim: look again this often (leases held elsewhere may end)


@dataclass(frozen=True)
class LeaseSettings:
    run_id: str  # the run's identity, shared by every instance started for the same window
    chunk_pages: int  # pages of a job worked per claim
    failure_limit: int  # more failed jobs than this (whoever failed them) stop the exchange here


class LeasedHistory:
    def __init__(
        self,
        backfill: HistoryBackfill,
        registry: JobRegistry,
        jobs: list[Job],
        concurrency: int,
        keeper: LeaseKeeper,
        settings: LeaseSettings,
        events: EventLog,
        indicators: IndicatorStage | None = None,
    ) -> None:
        """`indicators`: reconciled with the shared state at each claim (another instance may
        have moved the series); what it marks dirty the run repairs at its end."""
        self._backfill = backfill
        self._registry = registry
        self._jobs = {job.id: job for job in jobs}
        self._concurrency = concurrency
        self._keeper = keeper
        self._settings = settings
        self._events = events
        self._indicators = indicators
        self._rows: Counter[str] = Counter()
        self._transient: Counter[str] = Counter()  # transient failures per job, here
        self._holding = 0  # jobs this instance works on now
        self._share_of, self._share_at = concurrency, -1.0
        self._rejected: dict[str, Counter[str]] = {job.id: Counter() for job in jobs}
        self._failures = 0  # failed runs of a job here, and jobs other instances failed
        self._stopped = False  # too many failures: nothing more is claimed here

    async def run(self) -> list[JobResult]:
        """Until every job is over, on whichever instance; one result per job."""
        if not self._jobs:
            return []
        done = [j.id for j in self._jobs.values() if j.status == COMPLETED]
        await self._keeper.store.offer_jobs(self._settings.run_id, list(self._jobs), done)
        workers = [asyncio.create_task(self._worker()) for _ in range(self._concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            current = asyncio.current_task()
            stopping = current is not None and current.cancelling() > 0
            await self._backfill.drain(DRAIN_ON_STOP_S if stopping else None)
        return [self._result(job) for job in self._jobs.values()]

    def _result(self, job: Job) -> JobResult:
        error = job.record.last_error if job.status == FAILED else None
        return JobResult(job.key, job.status, self._rows[job.id], self._rejected[job.id], error)

    async def _share(self) -> int:
        """How many jobs this instance may hold at once: its fair part of the open jobs (over
        the history instances with a recent heartbeat), so that the work spreads over every
        instance rather than staying with the first that claimed it. Asked once a second."""
        now = time.monotonic()
        if now - self._share_at >= 1.0:
            self._share_at = now
            instances = await self._keeper.store.active_instances("history", self._keeper.lease_s)
            open_jobs = sum(j.status in OPEN for j in self._jobs.values())
            self._share_of = max(1, math.ceil(open_jobs / max(1, instances)))
        return self._share_of

    async def _worker(self) -> None:
        store, run_id = self._keeper.store, self._settings.run_id
        while True:
            claimable = [j.id for j in self._jobs.values() if j.status == PENDING]
            since = time.monotonic()
            claimed = (
                await store.claim_job(run_id, self._keeper.owner, self._keeper.lease_s, claimable)
                if claimable and self._holding < await self._share()
                else None
            )
            if claimed is None:
                if not await self._open_elsewhere():
                    return
                await asyncio.sleep(IDLE_POLL_S)
                continue
            self._keeper.held(claimed, since)
            self._holding += 1
            try:
                await self._work(self._jobs[claimed])
            finally:
                self._holding -= 1
                self._keeper.dropped(claimed)

    async def _open_elsewhere(self) -> bool:
        """Moves the jobs other instances finished; True while any job is still open."""
        open_ids = [j.id for j in self._jobs.values() if j.status in OPEN]
        outcomes = await self._keeper.store.job_outcomes(self._settings.run_id, open_ids)
        for job_id, (status, error) in outcomes.items():
            job = self._jobs[job_id]
            if job.status in OPEN and job.status != PAUSED:
                self._registry.apply(job, "complete" if status == COMPLETED else "fail", error)
                self._failures += status != COMPLETED
        self._stop_if_failing()
        return any(j.status in OPEN for j in self._jobs.values())

    def _stop_if_failing(self) -> None:
        """As a lone instance does (`history_pool`): after more than `failure_limit` failures
        (a job's failed run here, or a job failed on another instance, whose failures stop it
        too), the jobs not running here fail as not run, and nothing more is claimed."""
        if self._stopped or self._failures <= self._settings.failure_limit:
            return
        self._stopped = True
        self._events.error(
            "exchange_stopped",
            f"{self._failures} jobs failed; stopping the exchange's remaining jobs",
            failed=self._failures,
        )
        for job in self._jobs.values():
            if job.status in (PENDING, PAUSED) and not job.active:
                self._registry.apply(job, "fail", error=job.record.last_error or NOT_RUN)

    async def _work(self, job: Job) -> None:
        """One chunk of a claimed job, then let it go (or mark it over)."""
        store, run_id, owner = self._keeper.store, self._settings.run_id, self._keeper.owner
        outcome = HistoryOutcome()
        if self._indicators is not None:
            await self._indicators.reconcile(job.key)
        self._registry.apply(job, "start")
        job.active = True
        try:
            finished = await run_cancellable(
                job, self._backfill.run_job(job, outcome, self._settings.chunk_pages)
            )
        finally:
            job.active = False
        self._rows[job.id] += outcome.rows
        self._rejected[job.id].update(outcome.rejected)
        if not finished:  # cancelled here: let another instance decide about it
            await store.release_job(run_id, job.id, owner)
            return
        self._failures += outcome.status == FAILED
        if outcome.status == COMPLETED and not outcome.more:
            await store.finish_job(run_id, job.id, owner, COMPLETED, None)
            self._registry.apply(job, "complete")
        elif outcome.status == FAILED and self._gives_up(job, outcome):
            await store.finish_job(run_id, job.id, owner, FAILED, outcome.error)
            self._registry.apply(job, "fail", error=outcome.error)
        else:  # a chunk done, a transient failure, a pause or a lost lease: anyone goes on
            await store.release_job(run_id, job.id, owner)
            if job.status == RUNNING:
                self._registry.apply(job, "requeue", error=outcome.error)
        self._stop_if_failing()

    def _gives_up(self, job: Job, outcome: HistoryOutcome) -> bool:
        """A permanent failure, or a transient one for the second time here (as the pool of a
        lone instance: one more try, from the ledger)."""
        if not outcome.retryable:
            return True
        self._transient[job.id] += 1
        return self._transient[job.id] > 1
