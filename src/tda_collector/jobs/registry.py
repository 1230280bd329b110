"""The registry: every job of the run, by id and by key, and the only writer of their records.

It keeps per-exchange sums current on every change (see `progress.py`), so that `/progress`
never walks the jobs. It also keeps the set of jobs whose saved row is out of date; `flush`
writes them in one transaction (history pages save their own row with their ledger interval
instead: see `StateStore.add_coverage`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..intervals import Interval
from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from .model import OPEN, USER_ACTIONS, Job, JobRecord, TransitionRefused, next_status
from .state import StateStore

_EVENTS = {"pause": "job_paused", "resume": "job_resumed", "cancel": "job_cancelled"}


@dataclass
class ExchangeTally:
    """One exchange's sums over its jobs, moved on every change so that progress never walks
    the jobs. Slots are candle intervals of the requested windows (see `progress.py`)."""

    counts: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    slots: float = 0.0
    covered: float = 0.0
    remaining: float = 0.0  # uncovered slots of the jobs still open
    budget_per_s: float | None = None  # the exchange's published request budget
    limit_per_s: float | None = None  # what its limiter lets through (budget x safety)
    requests: Callable[[], int] | None = None  # requests sent so far

    @property
    def open_jobs(self) -> int:
        return sum(self.counts[status] for status in OPEN)

    @property
    def done(self) -> int:
        return sum(n for status, n in self.counts.items() if status not in OPEN)

    def add(self, status: str, rows: int, slots: float, uncovered: float) -> None:
        self.counts[status] += 1
        self.rows += rows
        self.slots += slots
        self.covered += slots - uncovered
        if status in OPEN:
            self.remaining += uncovered

    def move(self, old: str, new: str, uncovered: float) -> None:
        self.counts[old] -= 1
        self.counts[new] += 1
        if (old in OPEN) != (new in OPEN):
            self.remaining += uncovered if new in OPEN else -uncovered

    def drop(self, status: str, rows: int, slots: float, uncovered: float) -> None:
        """Undo `add` for a job that leaves the run."""
        self.counts[status] -= 1
        self.rows -= rows
        self.slots -= slots
        self.covered -= slots - uncovered
        if status in OPEN:
            self.remaining -= uncovered

    def grow(self, rows: int, covered_slots: float, still_open: bool) -> None:
        self.rows += rows
        self.covered += covered_slots
        if still_open:
            self.remaining -= covered_slots


def wall_ms() -> int:
    return int(time.time() * 1000)


class JobRegistry:
    """Every job of this run, by id and by key, with per-exchange tallies kept current. Every
    change of a job's record goes through here: one new record per change, stamped with
    `updated_ms`, tallied, marked for the next `flush` and waking whoever waits on the job."""

    def __init__(
        self,
        mode: str,
        state: StateStore | None = None,
        metrics: Metrics | None = None,
        events: EventLog | None = None,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.mode = mode
        self.jobs: dict[str, Job] = {}
        self.tallies: dict[str, ExchangeTally] = {}
        self.clock_ms = clock_ms
        self._by_key: dict[tuple[JobKey, str], Job] = {}  # (series, mode) -> its job
        self._dirty: dict[str, Job] = {}
        self._state = state
        self._metrics = metrics
        self._events = events
        self._settled: dict[str, asyncio.Event] = {}

    # -- membership and queries
    def add(self, job: Job) -> Job:
        if job.id in self.jobs:
            raise ValueError(f"job {job.id} is registered twice")
        self.jobs[job.id] = self._by_key[job.key, job.record.mode] = job
        tally = self.tally(job.key.exchange)
        tally.add(job.status, job.record.rows, job.slots, self._uncovered(job))
        self._changed(job)
        return job

    def remove(self, job: Job) -> None:
        """Forget a job that is not running any more (deleted, or replaced by a new one of the
        same id). Its row is still saved by the next `flush` and stays in the state store: a
        new job of that series carries its counts over."""
        if self.jobs.get(job.id) is not job:
            return
        del self.jobs[job.id]
        del self._by_key[job.key, job.record.mode]
        tally = self.tally(job.key.exchange)
        tally.drop(job.status, job.record.rows, job.slots, self._uncovered(job))
        if self._metrics is not None:
            self._metrics.set_jobs(self.counts())

    def tally(self, exchange: str) -> ExchangeTally:
        return self.tallies.setdefault(exchange, ExchangeTally())

    def track_budget(
        self, exchange: str, budget_per_s: float, limit_per_s: float, requests: Callable[[], int]
    ) -> None:
        """Show the exchange's request budget and how much of it the run uses."""
        tally = self.tally(exchange)
        tally.budget_per_s, tally.limit_per_s, tally.requests = budget_per_s, limit_per_s, requests

    def find(self, key: JobKey, mode: str | None = None) -> Job | None:
        """The series' job of `mode` (default: the run's mode)."""
        return self._by_key.get((key, mode or self.mode))

    def check(self, key: JobKey, mode: str | None = None) -> None:
        """The request gate (the `Fetcher`'s `gate`): JobPaused when the series' job of `mode`
        (default: the run's) is paused."""
        job = self.find(key, mode)
        if job is not None:
            job.check()

    def select(self, **wanted: str | None) -> list[Job]:
        """Jobs whose record fields equal every given value; `q` is a substring of the id."""
        text = wanted.pop("q", None)
        found = list(self.jobs.values())
        if text:
            found = [j for j in found if text.lower() in j.id.lower()]
        for name, value in wanted.items():
            if value:
                found = [j for j in found if getattr(j.record, name) == value]
        return list(found)

    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for tally in self.tallies.values():
            total.update(tally.counts)
        return total

    # -- transitions
    def apply(self, job: Job, action: str, error: str | None = None) -> None:
        """Move a job along the state machine (TransitionRefused if it has no such move)."""
        status = next_status(action, job.status)
        self.tally(job.key.exchange).move(job.status, status, self._uncovered(job))
        if error is None:
            self._changed(job, status=status)
        else:
            self._changed(job, status=status, last_error=error)

    def command(self, job: Job, action: str, log: bool = True) -> None:
        """A user's pause, resume or cancel, with what it sets in motion."""
        if action not in USER_ACTIONS:
            raise TransitionRefused(f"Unknown action {action}")
        was = job.status
        self.apply(job, action)
        if action == "resume" and job.active:
            self.apply(job, "start")  # its worker has not let go yet: it simply goes on
        elif action == "resume" and not job.queued and job.requeue is not None:
            job.requeue(job)
        elif action == "cancel" and job.task is not None:
            job.task.cancel()
        if log and self._events is not None:
            self._events.info(
                _EVENTS[action],
                f"{job.id}: {was} -> {job.status}",
                exchange=job.key.exchange,
                symbol=job.key.symbol,
                timeframe=job.key.timeframe,
                job=job.id,
                status=job.status,
            )

    def command_all(self, action: str, statuses: Iterable[str]) -> int:
        """The same command for every job in one of `statuses` (one event for them all);
        returns how many moved."""
        wanted = set(statuses)
        chosen = [job for job in self.jobs.values() if job.status in wanted]
        for job in chosen:
            self.command(job, action, log=False)
        if chosen and self._events is not None:
            self._events.info(_EVENTS[action], f"{action}: {len(chosen)} jobs", jobs=len(chosen))
        return len(chosen)

    async def wait_settled(self, exchange: str) -> None:
        """Until no job of the exchange is PENDING, RUNNING or PAUSED."""
        event = self._settled.setdefault(exchange, asyncio.Event())
        while self.tally(exchange).open_jobs:
            event.clear()
            await event.wait()

    # -- progress
    def record_page(self, job: Job, proven: list[Interval], rows: int) -> JobRecord:
        """Count a stored history page in memory and return the job row to save with its ledger
        intervals. `proven` was uncovered, so the covered length grows by exactly it."""
        grown = sum(max(0, end - start) for start, end in proven)
        self.tally(job.key.exchange).grow(rows, job.slots_in(grown), job.status in OPEN)
        was, now = job.record, self.clock_ms()
        job.changed(
            replace(
                was,
                covered_ms=was.covered_ms + grown,
                cursor_ms=max((end for _, end in proven), default=was.cursor_ms),
                rows=was.rows + rows,
                pages=was.pages + 1,
                last_run_ms=now,
                updated_ms=now,
            )
        )
        return job.record

    def note(self, job: Job, rows: int = 0, **changes: Any) -> None:
        """Live runs: `rows` more written, and new values of record fields (last/next run,
        cursor, last error); TypeError for a name that is not a field."""
        if rows:
            self.tally(job.key.exchange).grow(rows, 0.0, False)
            changes["rows"] = job.record.rows + rows
        self._changed(job, metrics=False, **changes)

    def run_started(self, job: Job, at_ms: int) -> None:
        """A live run of the job starts at `at_ms`: count it (the count is saved with the
        job's row, so it goes on across restarts) and show it as its last run."""
        self.note(job, runs=job.record.runs + 1, last_run_ms=at_ms)

    # -- persistence
    async def flush(self) -> None:
        """Save every changed job row in one transaction (a no-op without a state store)."""
        if self._state is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        try:
            await self._state.save_jobs([job.record for job in dirty.values()])
        except BaseException:
            for job_id, job in dirty.items():  # try again at the next flush
                self._dirty.setdefault(job_id, job)
            raise

    # -- internals
    def _uncovered(self, job: Job) -> float:
        return max(0.0, job.slots - job.slots_in(job.record.covered_ms))

    def _changed(self, job: Job, metrics: bool = True, **changes: Any) -> None:
        job.changed(replace(job.record, updated_ms=self.clock_ms(), **changes))
        self._dirty[job.id] = job
        exchange = job.key.exchange
        if not self.tally(exchange).open_jobs and exchange in self._settled:
            self._settled[exchange].set()
        if metrics and self._metrics is not None:
            self._metrics.set_jobs(self.counts())
