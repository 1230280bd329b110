"""One exchange's history jobs through a bounded pool of workers that can be paused and resumed.

Workers take PENDING jobs from a queue. A job paused while it runs lets go of its worker at the
next page boundary, and the worker takes the next job: a paused job never holds a slot that
another job could use. Resuming queues it again (at the back) and it goes on from the ledger.
A cancelled job's task is cancelled at once; a page it was storing still lands, with its count.

Jobs that failed on a transient fault are queued once more, at the back, resuming from the
ledger. More than `failure_limit` failed jobs stop the exchange: jobs not started yet fail with
"not run". The pool ends when none of its jobs is PENDING, RUNNING or PAUSED, so a paused job
keeps the run open until it is resumed or cancelled.
"""

from __future__ import annotations

import asyncio

from ..jobs.control import run_cancellable
from ..jobs.registry import CANCELLED, COMPLETED, FAILED, PAUSED, PENDING, RUNNING, Job, JobRegistry
from ..observability.events import EventLog
from .history import HistoryBackfill, JobResult

NOT_RUN = "not run: the exchange was stopped after too many failures"
DRAIN_ON_STOP_S = 0.6  # of the 1 s stop budget, for pages being stored


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
        self._results = {job.id: JobResult(job.key) for job in jobs}
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
        return [self._final(job) for job in self._jobs]

    def _final(self, job: Job) -> JobResult:
        result = self._results[job.id]
        result.status = job.status
        if job.status == FAILED:
            result.error = job.last_error
        return result

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            job.queued = False
            if job.status == PENDING:
                await self._run(job)

    async def _run(self, job: Job) -> None:
        result = self._results[job.id]
        self._registry.apply(job, "start")
        job.active = True
        try:
            finished = await run_cancellable(job, self._backfill.run_job(job, result))
        finally:
            job.active = False
        if finished:
            self._settle(job, result)
        else:
            result.status = CANCELLED

    def _settle(self, job: Job, result: JobResult) -> None:
        if result.status == COMPLETED:
            self._registry.apply(job, "complete")
        elif result.status == PAUSED:
            if job.status == RUNNING:  # resumed while it was letting go: queue it again
                self._registry.apply(job, "requeue")
                self.enqueue(job)
        else:
            self._failed(job, result)

    def _failed(self, job: Job, result: JobResult) -> None:
        self._failures += 1
        error = result.error or "failed"
        limit_reached = self._failures > self._failure_limit
        if result.retryable and job.id not in self._retried and not limit_reached:
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
                already = self._results[job.id].error if job.id in self._retried else None
                self._registry.apply(job, "fail", error=already or NOT_RUN)
