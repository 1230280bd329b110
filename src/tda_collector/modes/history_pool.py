"""One exchange's history jobs through a bounded pool of workers that can be paused and resumed.

Workers take PENDING jobs from a queue. A job paused while it runs lets go of its worker at the
next page boundary, and the worker takes the next job: a paused job never holds a slot that
another job could use. Resuming queues it again (at the back) and it goes on from the ledger.
A cancelled job's task is cancelled at once; a page it was storing still lands, with its count.

Jobs that failed on a transient fault are queued once more, at the back, resuming from the
ledger. More than `failure_limit` failed jobs stop the exchange: jobs not started yet fail with
"not run". The pool ends when none of its jobs is PENDING, RUNNING or PAUSED, so a paused job
keeps the run open until it is resumed or cancelled.

A run of a job returns a `HistoryOutcome`; `_apply` is the one place that moves the job in the
registry accordingly. The registry's record is the job's truth: the run's summary (`JobResult`)
reads its final status and error from there.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from ..jobs.control import run_cancellable
from ..jobs.model import COMPLETED, FAILED, PAUSED, PENDING, RUNNING, Job
from ..jobs.registry import JobRegistry
from ..models import JobKey
from ..observability.events import EventLog
from .backfill import HistoryBackfill, HistoryOutcome
from .pipeline import DRAIN_ON_STOP_S

NOT_RUN = "not run: the exchange was stopped after too many failures"


@dataclass(frozen=True)
class JobResult:
    """A history job at the end of the run, for its summary: the final status, the rows stored
    and candles rejected (by reason) in this run, and for a FAILED job its error."""

    key: JobKey
    status: str
    rows: int
    rejected: Counter[str]
    error: str | None = None


class ExchangeHistory:
    def __init__(
        self,
        backfill: HistoryBackfill,
        registry: JobRegistry,
        jobs: list[Job],
        concurrency: int,
        failure_limit: int,
        events: EventLog,
    ) -> None:
        self._backfill = backfill
        self._registry = registry
        self._jobs = jobs
        self._concurrency = concurrency
        self._failure_limit = failure_limit
        self._events = events
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._outcomes: dict[str, list[HistoryOutcome]] = {job.id: [] for job in jobs}
        self._retried: set[str] = set()
        self._failures = 0

    def enqueue(self, job: Job) -> None:
        job.queued = True
        self._queue.put_nowait(job)

    async def run(self) -> list[JobResult]:
        """Run until every job is COMPLETED, FAILED or CANCELLED; one result per job."""
        if not self._jobs:
            return []
        for job in self._jobs:
            job.requeue = self.enqueue
            if job.status == PENDING:
                self.enqueue(job)
        workers = [asyncio.create_task(self._worker()) for _ in range(self._concurrency)]
        try:
            await self._registry.wait_settled(self._jobs[0].key.exchange)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for job in self._jobs:
                job.requeue = None
            current = asyncio.current_task()
            stopping = current is not None and current.cancelling() > 0
            await self._backfill.drain(DRAIN_ON_STOP_S if stopping else None)
        return [self._result(job) for job in self._jobs]

    def _result(self, job: Job) -> JobResult:
        outcomes = self._outcomes[job.id]
        rejected: Counter[str] = Counter()
        for outcome in outcomes:
            rejected.update(outcome.rejected)
        error = job.record.last_error if job.status == FAILED else None
        return JobResult(job.key, job.status, sum(o.rows for o in outcomes), rejected, error)

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            job.queued = False
            if job.status == PENDING:
                await self._run(job)

    async def _run(self, job: Job) -> None:
        outcome = HistoryOutcome()
        self._outcomes[job.id].append(outcome)  # a cancelled run keeps what it counted
        self._registry.apply(job, "start")
        job.active = True
        try:
            finished = await run_cancellable(job, self._backfill.run_job(job, outcome))
        finally:
            job.active = False
        if finished:  # cancelled: the cancel command has moved it already
            self._apply(job, outcome)

    def _apply(self, job: Job, outcome: HistoryOutcome) -> None:
        """Move the job as its run came out: complete it, queue it again when it was resumed
        while letting go, or count the failure (and retry it once, or fail it)."""
        if outcome.status == COMPLETED:
            self._registry.apply(job, "complete")
        elif outcome.status == PAUSED:
            if job.status == RUNNING:  # resumed while it was letting go: queue it again
                self._registry.apply(job, "requeue")
                self.enqueue(job)
        else:
            self._failed(job, outcome)

    def _failed(self, job: Job, outcome: HistoryOutcome) -> None:
        self._failures += 1
        error = outcome.error or "failed"
        limit_reached = self._failures > self._failure_limit
        if outcome.retryable and job.id not in self._retried and not limit_reached:
            self._retried.add(job.id)
            if job.status == RUNNING:
                self._registry.apply(job, "requeue", error=error)
                self.enqueue(job)
            else:  # paused meanwhile: it stays parked, and goes on from the ledger on resume
                self._registry.note(job, last_error=error)
            return
        self._registry.apply(job, "fail", error=error)
        if self._failures == self._failure_limit + 1:
            self._events.error(
                "exchange_stopped",
                f"{self._failures} jobs failed; stopping the exchange's remaining jobs",
                failed=self._failures,
                error=error,
            )
            self._stop()

    def _stop(self) -> None:
        """Fail every job that is not running now: queued, parked or waiting for a retry."""
        for job in self._jobs:
            if job.status in (PENDING, PAUSED) and not job.active:
                already = self._outcomes[job.id][-1].error if job.id in self._retried else None
                self._registry.apply(job, "fail", error=already or NOT_RUN)
