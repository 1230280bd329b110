"""Job leases: with shared state, a job runs on exactly one instance at a time.

A lease is a row per (run, job) in the shared state: its owner (an instance id), when it runs
out (`locked_until`, the server's clock), and, once the job is over, its final status. Work is
claimed, not sharded: an idle worker of any instance takes the next job nobody holds (`FOR
UPDATE SKIP LOCKED`, so claimers never wait on each other), works one chunk of it (a whole
number of pages), and lets it go again, so a long backfill moves between instances chunk by
chunk and instances can join or leave at any time. A job's progress lives in the coverage
ledger, so whoever takes it next goes on where the last page proved, whichever instance that
was.

`LeaseKeeper` holds this instance's side: a heartbeat renews every held lease at a third of the
lease's length (and the instance's row in `instances`); a job whose lease could not be renewed
stops at its next request (`LeaseLost`, a kind of pause) a third of a lease before the server
lets another instance take it, so two instances never work one job, even across a network cut.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import StoreFault
from ..models import JobKey
from ..observability.events import EventLog
from ..timeframes import iso_utc
from .model import JobPaused, job_id


class LeaseLost(JobPaused):
    """This instance no longer holds the job's lease: it stops before another instance starts."""


@dataclass(frozen=True)
class InstanceInfo:
    """An instance as the fleet sees it: its id, mode, start and newest heartbeat (epoch ms)."""

    instance_id: str
    mode: str
    started_ms: int
    heartbeat_ms: int

    def to_json(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "mode": self.mode,
            "started_at": iso_utc(self.started_ms / 1000),
            "heartbeat_at": iso_utc(self.heartbeat_ms / 1000),
            "heartbeat_ms": self.heartbeat_ms,
        }


class LeaseStore(Protocol):
    async def offer_jobs(self, run_id: str, job_ids: list[str], done: list[str]) -> None:
        """Make the run's jobs claimable (those in `done` as COMPLETED); rows that exist stay."""

    async def claim_job(
        self, run_id: str, owner: str, lease_s: float, job_ids: list[str]
    ) -> str | None:
        """Take one of `job_ids` that is not over and that nobody holds (or whose lease ran
        out); its id, or None when there is none now."""

    async def release_job(self, run_id: str, job: str, owner: str) -> None:
        """Let go of a job that is not over, for anyone to claim."""

    async def finish_job(
        self, run_id: str, job: str, owner: str, status: str, error: str | None
    ) -> None:
        """The job is over (COMPLETED or FAILED): nobody claims it again in this run."""

    async def job_outcomes(
        self, run_id: str, job_ids: list[str]
    ) -> dict[str, tuple[str, str | None]]:
        """The jobs that are over: id -> (status, error)."""

    async def renew(self, owner: str, mode: str, started_ms: int, lease_s: float) -> set[str]:
        """Extend every lease `owner` holds, record its heartbeat; the job ids held."""

    async def release_all(self, owner: str) -> None:
        """Let go of every lease `owner` holds and leave the instances (a clean stop: others
        need not wait its leases or its heartbeat out)."""

    async def instances(self) -> list[InstanceInfo]: ...

    async def active_instances(self, mode: str, within_s: float) -> int:
        """Instances of `mode` with a heartbeat in the last `within_s` seconds."""

    async def owners(self, run_id: str) -> dict[str, str]:
        """Job id -> the instance holding its lease now (expired leases left out)."""

    async def run_totals(self, run_id: str) -> dict[str, int]:
        """The run's jobs over every instance: jobs, completed, failed, running (held now),
        waiting (nobody holds them)."""


def run_id_of(mode: str, start_ms: int | None, end_ms: int | None) -> str:
    """The leases' run: history runs are shared by the instances started for the same window;
    live jobs have one run that never ends."""
    return "live" if mode == "live" else f"history:{start_ms}:{end_ms}"


class LeaseKeeper:
    """This instance's leases: which jobs it holds and until when it may work on them."""

    def __init__(
        self,
        store: LeaseStore,
        owner: str,
        mode: str,
        lease_s: float,
        events: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.owner, self.mode, self.lease_s = store, owner, mode, lease_s
        self._events = events
        self._clock = clock
        self._started_ms = int(time.time() * 1000)
        self._deadlines: dict[str, float] = {}  # job id -> monotonic time to stop by

    @property
    def margin_s(self) -> float:
        """A job stops this long before its lease runs out at the server."""
        return self.lease_s / 3

    def held(self, job: str, since: float) -> None:
        """Claimed at monotonic `since` (taken before the claim was sent)."""
        self._deadlines[job] = since + self.lease_s - self.margin_s

    def holds(self, job: str) -> bool:
        return job in self._deadlines

    def dropped(self, job: str) -> None:
        self._deadlines.pop(job, None)

    def check(self, key: JobKey, mode: str | None = None) -> None:
        """A fetcher gate: raise `LeaseLost` unless the lease of the series' job of `mode`
        (default: this instance's) is surely still ours."""
        job = job_id(key, mode or self.mode)
        deadline = self._deadlines.get(job)
        if deadline is None or self._clock() >= deadline:
            raise LeaseLost(f"{job}: the lease was not renewed in time; another instance goes on")

    async def renew_once(self) -> None:
        """Renew every held lease. One the renewal did not find is lost once its deadline has
        passed (only then may another instance have it); before that, it was claimed while
        the renewal was under way, and the next renewal extends it."""
        started = self._clock()
        held = await self.store.renew(self.owner, self.mode, self._started_ms, self.lease_s)
        for job, deadline in list(self._deadlines.items()):
            if job in held:
                self._deadlines[job] = started + self.lease_s - self.margin_s
            elif deadline <= started and self._deadlines.pop(job, None) is not None:
                self._events.warning("lease_lost", f"{job}: lease lost; it stops here", job=job)

    async def release_all(self, timeout_s: float) -> None:
        """Let go of every lease at a clean stop, so other instances take the jobs over at
        once; given up after `timeout_s` (the database away: the leases then run out)."""
        self._deadlines.clear()
        try:
            await asyncio.wait_for(self.store.release_all(self.owner), timeout_s)
        except (TimeoutError, StoreFault) as exc:
            self._events.warning(
                "lease_release_failed", f"leases left to run out: {exc}", error=str(exc)
            )

    async def heartbeat(self) -> None:
        """Renew every third of a lease, until cancelled. A failure that the state's own
        retries do not cure is reported and tried again: the jobs stop by their deadlines."""
        while True:
            try:
                await self.renew_once()
            except Exception as exc:
                self._events.error(
                    "lease_renew_failed", f"could not renew the leases: {exc}", error=str(exc)
                )
            await asyncio.sleep(self.lease_s / 3)
