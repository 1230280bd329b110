"""One exchange's live jobs when several instances share the state: each job held by one.

Every third of a lease, this instance looks at its share: it claims live jobs that nobody holds
(or whose holder's lease ran out: a dead instance) until it holds its fair share (the jobs over
the live instances with a recent heartbeat), and lets go of what it holds beyond that share, so
jobs spread as instances join and leave. A job taken on goes on from the ledger, whoever
stored there: its first sync pages through whatever the previous holder left (a dead
instance's hole is repaired), then it runs live as usual (`LiveExchange`). A job whose lease
is lost stops at its next request (`LeaseLost`) and its task here is ended.
"""

from __future__ import annotations

import asyncio
import math
import time

from ..jobs.leases import LeaseKeeper, run_id_of
from ..jobs.model import RUNNING, job_id
from ..jobs.state import StateStore
from .indicator_stage import IndicatorStage
from .live import LiveExchange, LiveJob

LIVE_RUN = run_id_of("live", None, None)  # live jobs' leases never end: one run for all


class LeasedLive:
    def __init__(
        self,
        live: LiveExchange,
        jobs: list[LiveJob],
        keeper: LeaseKeeper,
        state: StateStore,
        indicators: IndicatorStage | None = None,
    ) -> None:
        """`indicators`: a series taken on is reconciled with the shared state and, where
        another instance left it behind, recomputed before it runs here."""
        self._live, self._keeper, self._state = live, keeper, state
        self._indicators = indicators
        self._jobs = {job_id(job.key, "live"): job for job in jobs}
        self._tasks: dict[str, asyncio.Future[bool]] = {}
        self._stopped: set[asyncio.Future[bool]] = set()  # cancelled, not yet over

    async def run(self) -> None:
        """Until cancelled: keep this instance's share of the jobs running."""
        self._live.prepare(list(self._jobs.values()))
        await self._keeper.store.offer_jobs(LIVE_RUN, list(self._jobs), [])
        try:
            while True:
                await self.balance()
                await asyncio.sleep(self._keeper.lease_s / 3)
        finally:
            for held in list(self._tasks):
                self._stop(held)
            await asyncio.gather(*self._stopped, return_exceptions=True)
            await self._live.drain()

    async def balance(self) -> None:
        """End jobs whose lease is gone, let go of jobs beyond the fair share, claim up to it."""
        for held, task in list(self._tasks.items()):
            if not self._keeper.holds(held):
                self._stop(held)
            elif task.done():  # cancelled through the API: anyone may take it on
                self._stop(held)
                await self._keeper.store.release_job(LIVE_RUN, held, self._keeper.owner)
        instances = await self._keeper.store.active_instances("live", self._keeper.lease_s)
        share = math.ceil(len(self._jobs) / max(1, instances))
        for held in list(self._tasks)[share:]:
            self._stop(held)
            await self._keeper.store.release_job(LIVE_RUN, held, self._keeper.owner)
        while len(self._tasks) < share:
            free = [j for j in self._jobs if j not in self._tasks]
            since = time.monotonic()
            claimed = await self._keeper.store.claim_job(
                LIVE_RUN, self._keeper.owner, self._keeper.lease_s, free
            )
            if claimed is None:
                return
            self._keeper.held(claimed, since)
            await self._start(claimed)

    async def _start(self, held: str) -> None:
        job = self._jobs[held]
        covered = await self._state.coverage(job.key)
        if covered:  # where the ledger stands, whichever instance put it there
            job.proven_to_ms = max(job.proven_to_ms or covered[-1][1], covered[-1][1])
        if self._indicators is not None and await self._indicators.reconcile(job.key):
            await self._indicators.repair(self._live.writer.write_as_is, [job.key])
        self._tasks[held] = self._live.start_job(job, self._live.now_ms())

    def _stop(self, held: str) -> None:
        task = self._tasks.pop(held)
        self._keeper.dropped(held)
        job = self._jobs[held]
        job.released = True
        task.cancel()
        self._stopped.add(task)
        task.add_done_callback(self._stopped.discard)
        handle = job.handle
        if handle is not None and handle.status == RUNNING:
            self._live.registry.apply(handle, "requeue")
