"""The live service's jobs when several instances share the state: each job run by one of them.

Every live job of every instance is a lease of the one live run (`run_id_of("live")`, which
never ends). The service declares its jobs (`Connections.start_jobs`) and this balancer decides
which of them run here. Every third of a lease, and at once after a change, it looks at its
share, per connector: it claims declared jobs that nobody holds (or whose holder's lease ran
out: a dead instance) until it holds its fair share (the connector's jobs over the live
instances with a recent heartbeat), and lets go of what it holds beyond that share, so jobs
spread as instances join and leave.

A job taken on goes on from the ledger, whoever stored there: its first sync pages through
whatever the previous holder left (a dead instance's hole is repaired), and its indicator series
is reconciled with the shared state first (recomputed where another instance left it behind).
A job let go of stops here first, its request in flight answered and its pages written, and
only then is its lease released, so no series is ever asked by two instances at once. A job
whose lease was lost (not renewed in time) stops at its next request (`LeaseLost`, see
`LeaseKeeper.check`) and is halted here at the next look. A job cancelled here lets its lease go
(another instance may run it); a paused one stays held, paused; a deleted one lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from ..errors import StoreFault
from ..jobs.leases import LeaseKeeper, run_id_of
from ..jobs.model import OPEN, PENDING, job_id
from ..jobs.state import StateStore
from ..models import JobKey
from ..observability.events import EventLog
from .connections import Connection, Connections
from .indicator_stage import IndicatorStage
from .live import LiveJob

LIVE_RUN = run_id_of("live", None, None)


class LiveLeases:
    def __init__(
        self,
        keeper: LeaseKeeper,
        state: StateStore,
        events: EventLog,
        indicators: IndicatorStage | None = None,
    ) -> None:
        self._keeper, self._state, self._events = keeper, state, events
        self._indicators = indicators
        self._held: dict[str, JobKey] = {}  # job id -> series, for the jobs whose lease is ours
        self._offered: set[str] = set()  # job ids known to have a lease row
        self._wake = asyncio.Event()

    @property
    def lease_s(self) -> float:
        return self._keeper.lease_s

    async def held_elsewhere(self, key: JobKey) -> str | None:
        """The other instance that holds the series' live lease now, if one does."""
        owner = (await self._keeper.store.owners(LIVE_RUN)).get(job_id(key, "live"))
        return owner if owner is not None and owner != self._keeper.owner else None

    def wake(self) -> None:
        """Look at the share now (jobs were declared)."""
        self._wake.set()

    async def run(self, connections: Connections) -> None:
        """Until cancelled: keep this instance's share of the declared jobs running. A look that
        the state could not answer (its own retries spent) is reported and tried again."""
        while True:
            self._wake.clear()
            try:
                await self.balance(connections)
            except StoreFault as exc:
                self._events.error(
                    "lease_balance_failed", f"live leases not balanced: {exc}", error=str(exc)
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._keeper.lease_s / 3)

    async def balance(self, connections: Connections) -> None:
        """Tidy what is held, then, per connector, let go of jobs beyond the fair share and
        claim up to it."""
        for held, key in list(self._held.items()):
            await self._tidy(connections, held, key)
        store, keeper = self._keeper.store, self._keeper
        instances = max(1, await store.active_instances("live", keeper.lease_s))
        for conn in list(connections.opened.values()):
            wanted = {job_id(k, "live"): job for k, job in conn.jobs.items() if _wanted(job)}
            new = [j for j in wanted if j not in self._offered]
            if new:
                await store.offer_jobs(LIVE_RUN, new, [])
                self._offered.update(new)
            share = math.ceil(len(wanted) / instances)
            mine = [held for held in self._held if held in wanted]
            for held in mine[share:]:
                await self._let_go(connections, conn, held)
            taken = []  # claimed first, all of them, then started (a start reads the state)
            for _ in range(share - len(mine)):
                free = [j for j, job in wanted.items() if j not in self._held and _free(job)]
                since = time.monotonic()
                claimed = await store.claim_job(LIVE_RUN, keeper.owner, keeper.lease_s, free)
                if claimed is None:
                    break
                keeper.held(claimed, since)
                self._held[claimed] = wanted[claimed].key
                taken.append(wanted[claimed])
            for job in taken:
                await self._take(connections, conn, job)

    async def _tidy(self, connections: Connections, held: str, key: JobKey) -> None:
        """A held job whose connector or job is gone, or that was cancelled here: let go. One
        whose lease was lost: halted. One whose connector was opened anew: run again."""
        conn = connections.opened.get(key.exchange)
        job = conn.jobs.get(key) if conn is not None else None
        if conn is None or job is None or not _wanted(job):
            await self._let_go(connections, conn, held)
        elif not self._keeper.holds(held):
            del self._held[held]
            await connections.halt(conn, key, self._keeper.margin_s)
        elif key not in conn.tasks:
            await self._take(connections, conn, job)

    async def _let_go(self, connections: Connections, conn: Connection | None, held: str) -> None:
        """Stop the job here, its page in flight stored (the gate refuses its next request once
        the lease is dropped), then release its lease for anyone to claim."""
        key = self._held.pop(held)
        self._keeper.dropped(held)
        if conn is not None and key in conn.tasks:
            await connections.halt(conn, key, self._keeper.margin_s)
        await self._keeper.store.release_job(LIVE_RUN, held, self._keeper.owner)

    async def _take(self, connections: Connections, conn: Connection, job: LiveJob) -> None:
        """Run a job whose lease is ours from where the ledger stands, whoever stored there,
        its indicator series reconciled first."""
        covered = await self._state.coverage(job.key)
        if covered:
            job.proven_to_ms = max(job.proven_to_ms or covered[-1][1], covered[-1][1])
        if self._indicators is not None:
            if await self._indicators.reconcile(job.key):
                await self._indicators.repair(conn.live.writer.write_as_is, [job.key])
            # Go on after the newest candle the series' indicators have seen, which is stored:
            # a dead holder's last page may be stored but not in the ledger, and fetching it
            # again would land before that candle and leave the series' indicators undone.
            seen = (await self._state.load_indicator_series(job.key)).get(job.key)
            if seen is not None and seen.last_ms is not None:
                job.cursor_ms = max(job.cursor_ms or seen.last_ms, seen.last_ms)
        if connections.opened.get(job.key.exchange) is conn and conn.jobs.get(job.key) is job:
            connections.launch(conn, job, conn.live.now_ms())
        # else: deleted or moved meanwhile (a change through the API); the next look lets go


def _wanted(job: LiveJob) -> bool:
    """A declared job that should run somewhere: not cancelled here (a paused one stays held,
    waiting for its resume)."""
    return job.handle is not None and job.handle.status in OPEN


def _free(job: LiveJob) -> bool:
    """A job this instance may take on: neither paused nor cancelled here."""
    return job.handle is not None and job.handle.status == PENDING
