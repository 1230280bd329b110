"""Jobs in a run: registering them (with what a restart carries over), running a job so that a
cancel stops it at once, and the once-a-second background duties.

What a restart carries over. History: when the previous history run did not finish (a crash or
SIGTERM) and this one has the same `--start`, it is a restart of it, and each job keeps its saved
counts, times, last error and a PAUSED or CANCELLED status; otherwise it is a new run and every
job starts afresh. Live: jobs keep their counts, times, last error and a PAUSED status. The
covered fraction is always recomputed from the ledger, which is the truth about what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import Any

from ..intervals import Interval, subtract
from ..models import JobKey
from ..observability.events import EventLog
from ..timeframes import MONDAY_WEEK_ORIGIN_MS, Grid, grid_of
from .model import CANCELLED, COMPLETED, PAUSED, PENDING, Job, JobRecord
from .progress import Progress
from .progress_bar import ProgressBar
from .registry import JobRegistry
from .state import RunRecord, StateStore

TICK_S = 1.0  # rates sampled and changed job rows saved at least this often
PROGRESS_EVENT_S = 5.0  # the `progress` event, at most this often


def history_window(start_ms: int, end_ms: int, grid: Grid, now_ms: int) -> tuple[int, int]:
    """A job's [start, end) on its calendar `grid`: candles opening from `start_ms` on, before
    `end_ms`, closed by `now_ms` (both ends are open times of the grid)."""
    start = grid.ceil(start_ms)
    end = min(grid.ceil(end_ms), grid.floor(now_ms))
    return start, max(start, end)


def history_record(key: JobKey, start: int, end: int, coverage: list[Interval]) -> JobRecord:
    """A new history job's record over [start, end): what the ledger's `coverage` already
    holds of it counted as covered, its cursor at the first part still missing (or `end`)."""
    gaps = subtract((start, end), coverage)
    return JobRecord.of(
        key,
        "history",
        start_ms=start,
        end_ms=end,
        covered_ms=end - start - sum(b - a for a, b in gaps),
        cursor_ms=gaps[0][0] if gaps else end,
    )


def restore(record: JobRecord, saved: JobRecord, keep_status: Iterable[str]) -> JobRecord:
    """A new job's record with a saved row's counts, times and last error carried over, and its
    status too when that is one of `keep_status`."""
    return replace(
        record,
        status=saved.status if saved.status in set(keep_status) else record.status,
        rows=saved.rows,
        pages=saved.pages,
        runs=saved.runs,
        last_error=saved.last_error,
        last_run_ms=saved.last_run_ms,
        next_run_ms=saved.next_run_ms,
    )


async def register_history_jobs(
    registry: JobRegistry,
    state: StateStore,
    exchanges: list[tuple[str, list[JobKey], int]],
    start_ms: int,
    end_ms: int,
    week_origins: Mapping[str, int] | None = None,
) -> list[Job]:
    """Register each (exchange, keys, exchange clock ms), each job's window on its exchange's
    calendar (`week_origins`: exchange id -> where its weeks open, default Monday); a job whose
    window the ledger already covers is COMPLETED at once."""
    week_origins = week_origins or {}
    last = await state.last_run("history")
    restarted = last is not None and last.finished_ms is None and last.start_ms == start_ms
    saved = {r.key: r for r in await state.load_jobs("history")} if restarted else {}
    await state.save_run(RunRecord("history", start_ms, end_ms, registry.clock_ms(), None))
    jobs = []
    for exchange, keys, now_ms in exchanges:
        ledger = await state.coverage_of_exchange(exchange)
        for key in keys:
            grid = grid_of(key.timeframe, week_origins.get(exchange, MONDAY_WEEK_ORIGIN_MS))
            start, end = history_window(start_ms, end_ms, grid, now_ms)
            record = history_record(key, start, end, ledger.get(key, []))
            if key in saved:
                record = restore(record, saved[key], (PAUSED, CANCELLED))
            if record.covered_ms == end - start and record.status == PENDING:
                record = replace(record, status=COMPLETED)
            jobs.append(registry.add(Job(record)))
    return jobs


async def finish_history_run(registry: JobRegistry, state: StateStore) -> None:
    """Mark the run finished, so that the next start is a new run rather than a restart."""
    last = await state.last_run("history")
    if last is not None:
        await state.save_run(
            RunRecord("history", last.start_ms, last.end_ms, last.started_ms, registry.clock_ms())
        )


async def register_live_jobs(
    registry: JobRegistry, state: StateStore, keys: list[JobKey], cursors: Mapping[JobKey, int]
) -> None:
    saved = {r.key: r for r in await state.load_jobs("live")}
    for key in keys:
        record = JobRecord.of(key, "live", cursor_ms=cursors.get(key))
        if key in saved:
            record = restore(record, saved[key], (PAUSED,))
        registry.add(Job(record))


async def run_cancellable(job: Job, work: Coroutine[Any, Any, object]) -> bool:
    """Run `work` as the job's own task, so that cancelling the job stops it at once (inside a
    request, a backoff or a limiter wait) without stopping the caller. False when it was."""
    task = asyncio.ensure_future(work)
    job.task = task
    try:
        await task
        return True
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and job.status == CANCELLED and not (current and current.cancelling()):
            return False
        raise
    finally:
        job.task = None


class JobMonitor:
    """Once a second: sample the rates, save changed job rows (one transaction), refresh the
    terminal bar; every few seconds in history mode, log a `progress` event. A failed save is
    logged and tried again at the next tick; a final save runs on the way out."""

    def __init__(
        self,
        registry: JobRegistry,
        progress: Progress,
        events: EventLog,
        bar: ProgressBar | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._progress = progress
        self._events = events
        self._bar = bar
        self._clock = clock
        self._last_event = -PROGRESS_EVENT_S  # the first tick logs one
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobMonitor:
        self._progress.tick()
        if self._bar is not None:
            self._bar.open(self._progress.summary())
        self._task = asyncio.create_task(self._loop(), name="job-monitor")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bar is not None:
            self._bar.update(self._progress.summary())
            self._bar.close()
        await asyncio.shield(self._save())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self.tick()

    async def tick(self) -> None:
        self._progress.tick()
        await self._save()
        now = self._clock()
        event_due = now - self._last_event >= PROGRESS_EVENT_S
        if self._bar is None and not event_due:
            return
        summary = self._progress.summary()
        if self._bar is not None:
            self._bar.update(summary)
        if self._registry.mode == "history" and event_due:
            self._last_event = now
            self._events.info("progress", summary.line(), **summary.event_fields())

    async def _save(self) -> None:
        try:
            await self._registry.flush()
        except Exception as exc:  # the state store's own error; the rows stay marked
            self._events.error(
                "jobs_save_error", "saving job rows failed; retrying", error=str(exc)[:500]
            )
