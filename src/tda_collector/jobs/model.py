"""What a job is: its statuses and state machine, its stable id, its record, and the live job.

A job is one (exchange, symbol, timeframe, mode). Its id is stable and URL-safe, e.g.
`binance:BTC-USDT:1m:history`: the symbol's "/" becomes "-", and a symbol that already holds "-"
or any character outside `A-Z a-z 0-9 . _ :` gets "~" and 8 hex digits of a hash of the exact
symbol, so that two symbols never share an id.

`JobRecord` declares a job's persisted fields once: the state file's `jobs` table (see
`ledger.py`) and the jobs API's JSON are both derived from its fields. A `Job` is the record
plus the plumbing of running it; only the registry replaces its record (see `registry.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..models import JobKey
from ..timeframes import grid_of

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


class TransitionRefused(Exception):
    """The state machine has no such move, e.g. "Cannot pause job in COMPLETED state"."""


class JobPaused(Exception):
    """Raised at a page boundary, or instead of sending a request, when the job is paused."""


def next_status(action: str, status: str) -> str:
    """The status `action` moves a job in `status` to; TransitionRefused when it has no move."""
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


@dataclass(frozen=True)
class JobRecord:
    """A job's persisted fields, declared here only. `covered_ms` is how much of
    [start_ms, end_ms) the ledger covers (history; the window is aligned to the timeframe);
    `cursor_ms` is where the job goes on (history: the first uncovered instant; live: the newest
    stored closed candle). Times are epoch ms."""

    exchange: str
    symbol: str
    timeframe: str
    mode: str
    status: str = PENDING
    start_ms: int | None = None
    end_ms: int | None = None
    covered_ms: int = 0
    cursor_ms: int | None = None
    rows: int = 0
    pages: int = 0
    runs: int = 0  # live: runs started, over every process that ran the job
    last_error: str | None = None
    last_run_ms: int | None = None
    next_run_ms: int | None = None
    updated_ms: int = 0

    @classmethod
    def of(cls, key: JobKey, mode: str, **values: Any) -> JobRecord:
        """A new record of the job (key, mode); `values` are any other fields."""
        return cls(key.exchange, key.symbol, key.timeframe, mode, **values)

    @property
    def key(self) -> JobKey:
        return JobKey(self.exchange, self.symbol, self.timeframe)

    @property
    def id(self) -> str:
        return job_id(self.key, self.mode)

    @property
    def window_ms(self) -> int | None:
        if self.start_ms is None or self.end_ms is None:
            return None
        return self.end_ms - self.start_ms

    @property
    def covered(self) -> float | None:
        """Fraction of the requested window that the ledger covers (None in live mode)."""
        window = self.window_ms
        if window is None:
            return None
        return 1.0 if window <= 0 else self.covered_ms / window

    def to_json(self) -> dict[str, object]:
        """The jobs API's job object: `id`, then every field in declaration order, except that
        `covered_ms` is shown as `covered`, the fraction (6 decimals), and `runs` is left to the
        service's `runs_total` (see `admin.jobs_api.describe_job`)."""
        body: dict[str, object] = {"id": self.id}
        for f in fields(self):
            if f.name == "runs":
                continue
            if f.name == "covered_ms":
                covered = self.covered
                body["covered"] = None if covered is None else round(covered, 6)
            else:
                body[f.name] = getattr(self, f.name)
        return body


@dataclass(eq=False)
class Job:
    """One job of this run: its record, which only the registry replaces (one write per change),
    and the plumbing of running it. `key` and `id` follow from the record (candle arithmetic
    uses the exchange's `timeframes.Grid`, never a fixed length: months vary)."""

    record: JobRecord
    active: bool = False  # a worker or live task is running it right now
    queued: bool = False  # waiting in a worker pool's queue
    task: asyncio.Future[object] | None = None  # cancelled by a cancel command
    requeue: Callable[[Job], None] | None = None  # how a resumed, idle job gets a worker again
    schedule: dict[str, str] | None = None  # a live job's schedule, as the jobs API shows it
    key: JobKey = field(init=False)
    id: str = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.key = self.record.key
        self.id = self.record.id

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def slots(self) -> float:
        """Candles in the window: the unit progress and ETA count in."""
        start, end = self.record.start_ms, self.record.end_ms
        if start is None or end is None:
            return 0.0
        # The window's ends are open times of the exchange's grid, so counting on the default
        # calendar gives the same number (a week origin only shifts where weeks start).
        return float(grid_of(self.key.timeframe).count(start, end))

    def slots_in(self, ms: int) -> float:
        """Candles in `ms` of the window: exact for fixed-length timeframes; for calendar
        months, the window's candles in proportion to time."""
        window = self.record.window_ms
        return self.slots * ms / window if window else 0.0

    def check(self) -> None:
        """Raise JobPaused when paused: called before each page and before each request."""
        if self.status == PAUSED:
            raise JobPaused(self.id)

    async def wait_unpaused(self) -> None:
        """Return once the job is not PAUSED (the registry wakes it on every change)."""
        while self.status == PAUSED:
            self._wake.clear()
            await self._wake.wait()

    def changed(self, record: JobRecord) -> None:
        """Take the registry's new record and wake whoever waits on this job."""
        self.record = record
        self._wake.set()
