"""Jobs you can watch and steer: statuses, the state machine, stable ids, and the registry.

A job is one (exchange, symbol, timeframe, mode). Its id is stable and URL-safe, e.g.
`binance:BTC-USDT:1m:history`: the symbol's "/" becomes "-", and a symbol that already holds "-"
or any character outside `A-Z a-z 0-9 . _ :` gets "~" and 8 hex digits of a hash of the exact
symbol, so that two symbols never share an id.

The registry holds the run's jobs in memory and keeps per-exchange sums current on every change
(see `progress.py`), so that `/progress` never walks the jobs. It also keeps the set of jobs whose
saved row is out of date; `flush` writes them in one transaction (history pages save their own
row with their ledger interval instead: see `StateStore.add_coverage`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from .ledger import JobRecord, StateStore

PENDING, RUNNING, PAUSED = "PENDING", "RUNNING", "PAUSED"
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
STATUSES = (PENDING, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED)
OPEN = frozenset({PENDING, RUNNING, PAUSED})  # a run is not over while a job is in one of these

# action -> {from: to}. Users send pause, resume and cancel; the collector itself starts,
# completes, fails and requeues (a transient failure, or a job resumed while letting go).
TRANSITIONS: dict[str, dict[str, str]] = {
    "pause": {PENDING: PAUSED, RUNNING: PAUSED},
    "resume": {PAUSED: PENDING},
    "cancel": {PENDING: CANCELLED, RUNNING: CANCELLED, PAUSED: CANCELLED},
    "start": {PENDING: RUNNING},
    "complete": {PENDING: COMPLETED, RUNNING: COMPLETED, PAUSED: COMPLETED},
    "fail": {PENDING: FAILED, RUNNING: FAILED, PAUSED: FAILED},
    "requeue": {RUNNING: PENDING},
}
USER_ACTIONS = ("pause", "resume", "cancel")
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

    def grow(self, rows: int, covered_slots: float, still_open: bool) -> None:
        self.rows += rows
        self.covered += covered_slots
        if still_open:
            self.remaining -= covered_slots


class TransitionRefused(Exception):
    """The state machine has no such move, e.g. "Cannot pause job in COMPLETED state"."""


class JobPaused(Exception):
    """Raised at a page boundary, or instead of sending a request, when the job is paused."""


def next_status(action: str, status: str) -> str:
    try:
        return TRANSITIONS[action][status]
    except KeyError:
        raise TransitionRefused(f"Cannot {action} job in {status} state") from None


_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def job_id(key: JobKey, mode: str) -> str:
    slug = key.symbol.replace("/", "-")
    if "-" in key.symbol or _UNSAFE.search(slug):
        digest = hashlib.blake2b(key.symbol.encode(), digest_size=4).hexdigest()
        slug = f"{_UNSAFE.sub('_', slug)}~{digest}"
    return f"{key.exchange}:{slug}:{key.timeframe}:{mode}"


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class Job:
    """One job's live state. The saved fields mirror `JobRecord`; the rest is run plumbing."""

    key: JobKey
    mode: str
    tf_ms: int
    status: str = PENDING
    start_ms: int | None = None  # history: the requested window, aligned to the timeframe
    end_ms: int | None = None
    covered_ms: int = 0
    cursor_ms: int | None = None
    rows: int = 0
    pages: int = 0
    last_error: str | None = None
    last_run_ms: int | None = None
    next_run_ms: int | None = None
    updated_ms: int = 0
    active: bool = False  # a worker or live task is running it right now
    queued: bool = False  # waiting in a worker pool's queue
    task: asyncio.Future[object] | None = None  # cancelled by a cancel command
    requeue: Callable[[Job], None] | None = None  # how a resumed, idle job gets a worker again
    id: str = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.id = job_id(self.key, self.mode)

    @property
    def window_ms(self) -> int | None:
        if self.start_ms is None or self.end_ms is None:
            return None
        return self.end_ms - self.start_ms

    @property
    def slots(self) -> float:
        """Candle intervals in the window: the unit progress and ETA count in."""
        return (self.window_ms or 0) / self.tf_ms

    @property
    def covered(self) -> float | None:
        """Fraction of the requested window that the ledger covers (None in live mode)."""
        window = self.window_ms
        if window is None:
            return None
        return 1.0 if window <= 0 else self.covered_ms / window

    def check(self) -> None:
        """Raise JobPaused when paused: called before each page and before each request."""
        if self.status == PAUSED:
            raise JobPaused(self.id)

    async def wait_unpaused(self) -> None:
        while self.status == PAUSED:
            self._wake.clear()
            await self._wake.wait()

    def record(self) -> JobRecord:
        k = self.key
        return JobRecord(
            k.exchange,
            k.symbol,
            k.timeframe,
            self.mode,
            self.status,
            self.start_ms,
            self.end_ms,
            self.covered_ms,
            self.cursor_ms,
            self.rows,
            self.pages,
            self.last_error,
            self.last_run_ms,
            self.next_run_ms,
            self.updated_ms,
        )

    def to_json(self) -> dict[str, object]:
        covered = self.covered
        return {
            "id": self.id,
            "exchange": self.key.exchange,
            "symbol": self.key.symbol,
            "timeframe": self.key.timeframe,
            "mode": self.mode,
            "status": self.status,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "covered": None if covered is None else round(covered, 6),
            "cursor_ms": self.cursor_ms,
            "rows": self.rows,
            "pages": self.pages,
            "last_error": self.last_error,
            "last_run_ms": self.last_run_ms,
            "next_run_ms": self.next_run_ms,
            "updated_ms": self.updated_ms,
        }


class JobRegistry:
    """Every job of this run, by id and by key, with per-exchange tallies kept current."""

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
        self._by_key: dict[JobKey, Job] = {}
        self._dirty: dict[str, Job] = {}
        self._state = state
        self._metrics = metrics
        self._events = events
        self._settled: dict[str, asyncio.Event] = {}

    # -- membership and queries
    def add(self, job: Job) -> Job:
        if job.id in self.jobs:
            raise ValueError(f"job {job.id} is registered twice")
        self.jobs[job.id] = self._by_key[job.key] = job
        self.tally(job.key.exchange).add(job.status, job.rows, job.slots, self._uncovered(job))
        self._changed(job)
        return job

    def tally(self, exchange: str) -> ExchangeTally:
        return self.tallies.setdefault(exchange, ExchangeTally())

    def track_budget(
        self, exchange: str, budget_per_s: float, limit_per_s: float, requests: Callable[[], int]
    ) -> None:
        """Show the exchange's request budget and how much of it the run uses."""
        tally = self.tally(exchange)
        tally.budget_per_s, tally.limit_per_s, tally.requests = budget_per_s, limit_per_s, requests

    def find(self, key: JobKey) -> Job | None:
        return self._by_key.get(key)

    def check(self, key: JobKey) -> None:
        """The request gate (see `GatedSource`): JobPaused when that job is paused."""
        job = self._by_key.get(key)
        if job is not None:
            job.check()

    def select(self, **wanted: str | None) -> list[Job]:
        """Jobs whose attributes equal every given value; `q` is a substring of the id."""
        text = wanted.pop("q", None)
        found = self.jobs.values()
        if text:
            found = [j for j in found if text.lower() in j.id.lower()]
        for name, value in wanted.items():
            if value:
                found = [j for j in found if _attribute(j, name) == value]
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
        job.status = status
        if error is not None:
            job.last_error = error
        self._changed(job)

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
    def record_page(self, job: Job, since_ms: int, covered_to_ms: int, rows: int) -> JobRecord:
        """Count a stored history page in memory and return the job row to save with its ledger
        interval. [since, covered_to) was uncovered, so the covered length grows by exactly it."""
        grown = max(0, covered_to_ms - since_ms)
        self.tally(job.key.exchange).grow(rows, grown / job.tf_ms, job.status in OPEN)
        job.covered_ms += grown
        job.cursor_ms = covered_to_ms
        job.rows += rows
        job.pages += 1
        job.last_run_ms = job.updated_ms = self.clock_ms()
        return job.record()

    def note(self, job: Job, rows: int = 0, **changes: object) -> None:
        """Live runs: rows written and new last/next run, cursor or last error."""
        if rows:
            self.tally(job.key.exchange).grow(rows, 0.0, False)
            job.rows += rows
        for name, value in changes.items():
            setattr(job, name, value)
        self._changed(job, metrics=False)

    # -- persistence
    async def flush(self) -> None:
        """Save every changed job row in one transaction (a no-op without a state store)."""
        if self._state is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        records = [job.record() for job in dirty.values()]
        try:
            await self._state.save_jobs(records)
        except BaseException:
            for record in records:  # try again at the next flush
                job = self._by_key[record.key]
                self._dirty[job.id] = job
            raise

    # -- internals
    def _uncovered(self, job: Job) -> float:
        return max(0.0, job.slots - job.covered_ms / job.tf_ms)

    def _changed(self, job: Job, metrics: bool = True) -> None:
        job.updated_ms = self.clock_ms()
        self._dirty[job.id] = job
        job._wake.set()
        exchange = job.key.exchange
        if not self.tally(exchange).open_jobs and exchange in self._settled:
            self._settled[exchange].set()
        if metrics and self._metrics is not None:
            self._metrics.set_jobs(self.counts())


def _attribute(job: Job, name: str) -> object:
    if name in ("exchange", "symbol", "timeframe"):
        return getattr(job.key, name)
    return getattr(job, name)
