"""The open connectors of the live service: each one's runtime, live scheduler and job tasks.

A connection is an opened `ExchangeRuntime` with its `LiveExchange`; each live job of it runs
as its own task, so jobs start and stop one at a time while the others go on. A job task that
dies of anything but a cancel fails the whole service (`failure`), loudly, as a gathered
live mode would.

A connection's jobs are declared (registered, shown by the jobs API) and, by default, run here
at once. With shared state they run only while this instance holds their lease: declaring them
then calls `on_declared`, and the lease balancer (`leased_live.LiveLeases`) launches and halts
them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..exchange.runtime import ExchangeRuntime
from ..jobs.control import run_cancellable
from ..jobs.model import OPEN, RUNNING, Job, JobRecord
from ..jobs.schedule import Schedule
from ..models import JobKey
from .daemon_backfill import ServiceParts
from .durable_writer import DurableWriter
from .live import LiveExchange, LiveJob

HALT_POLL_S = 0.05  # how often a job let go of is looked at until its run under way ends


@dataclass
class Connection:
    """An opened connector: its runtime, its live scheduler, its declared live jobs and the
    tasks of those that run here."""

    runtime: ExchangeRuntime
    live: LiveExchange
    jobs: dict[JobKey, LiveJob] = field(default_factory=dict)
    tasks: dict[JobKey, asyncio.Task[bool]] = field(default_factory=dict)


class Connections:
    def __init__(
        self,
        parts: ServiceParts,
        schedule_of: Callable[[JobKey], Schedule],
        on_declared: Callable[[], None] | None = None,
    ) -> None:
        """`on_declared`: None, every declared job runs here at once; else jobs are only
        declared, and this is called after each declaration (see `leased_live`)."""
        self._p = parts
        self._schedule_of = schedule_of
        self._on_declared = on_declared
        self.opened: dict[str, Connection] = {}
        self._failed: asyncio.Future[None] | None = None

    def add(self, runtime: ExchangeRuntime) -> Connection:
        """Keep the opened runtime, with a live scheduler of its own (its writer, its page
        limit clamped to the exchange's maximum)."""
        p = self._p
        events = p.events.bind(exchange=runtime.config.id)
        writer = DurableWriter(
            p.store, p.policy, events, metrics=p.metrics, indicators=p.indicators
        )
        page_limit = min(p.settings.page_limit, runtime.source.capabilities.max_page_size)
        settings = replace(p.settings, page_limit=page_limit)
        live = LiveExchange(
            runtime.fetcher, writer, p.state, events, settings, p.metrics, registry=p.registry
        )
        conn = self.opened[runtime.config.id] = Connection(runtime, live)
        return conn

    def job_count(self) -> int:
        return sum(len(conn.jobs) for conn in self.opened.values())

    def start_jobs(self, conn: Connection, keys: list[JobKey], cursors: dict[JobKey, int]) -> None:
        """Declare the jobs, each from its cursor (the newest stored closed candle, else its
        registered record's); without leases each runs now (a first run at once, then on its
        schedule)."""
        now = conn.live.now_ms()
        for key in keys:
            job = self._declare(conn, key, cursors.get(key))
            if self._on_declared is None:
                self.launch(conn, job, now)
        if self._on_declared is not None:
            self._on_declared()

    def _declare(self, conn: Connection, key: JobKey, cursor_ms: int | None) -> LiveJob:
        schedule = self._schedule_of(key)
        grid = conn.runtime.source.capabilities.grid(key.timeframe)
        job = LiveJob(key, grid, cursor_ms, schedule=schedule)
        registry = self._p.registry
        handle = registry.find(key, "live")
        if handle is None:
            handle = registry.add(Job(JobRecord.of(key, "live", cursor_ms=cursor_ms)))
        elif job.cursor_ms is None:
            job.cursor_ms = handle.record.cursor_ms
        handle.schedule = schedule.to_json()
        job.handle = handle
        conn.jobs[key] = job
        return job

    def launch(self, conn: Connection, job: LiveJob, due_ms: int) -> None:
        """Run a declared job here: its first run at `due_ms`, then on its schedule."""
        job.released = False
        handle = conn.live.attach(job, due_ms)
        task = asyncio.create_task(run_cancellable(handle, conn.live.run_job(job)))
        task.add_done_callback(self.watch)
        conn.tasks[job.key] = task

    async def halt(self, conn: Connection, key: JobKey, patience_s: float = 0.0) -> None:
        """Stop a job running here without forgetting it (its lease goes to another instance):
        its run under way may end by itself within `patience_s` (its gate refuses its next
        request: the page in flight is stored, not fetched again by the next holder), else it
        is cancelled; once the exchange's writes under way are over, it shows as PENDING here,
        so that whoever takes it on goes on from what is stored."""
        task = conn.tasks.pop(key, None)
        job = conn.jobs.get(key)
        deadline = time.monotonic() + patience_s
        while job is not None and job.syncing and time.monotonic() < deadline:
            await asyncio.sleep(HALT_POLL_S)
        if job is not None:
            job.released = True
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await conn.live.drain(None)
        handle = self._p.registry.find(key, "live")
        if handle is not None:
            handle.active = False
            if handle.status == RUNNING:
                self._p.registry.apply(handle, "requeue")

    def failure(self) -> asyncio.Future[None]:
        """Completes with the error of the first job task that died (never otherwise)."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    def watch(self, task: asyncio.Task[Any]) -> None:
        """Fail the service when `task` dies of anything but a cancel."""
        if task.cancelled() or task.exception() is None:
            return
        failed = self.failure()
        if not failed.done():
            failed.set_exception(task.exception() or RuntimeError("job task died"))

    async def stop_jobs(self, conn: Connection, keys: list[JobKey], log: bool = True) -> list[Job]:
        """Cancel these jobs' tasks and forget the jobs (a `job_cancelled` event each when
        `log`: they were deleted, not moved); returns them, for their records."""
        registry = self._p.registry
        stopped = []
        for key in keys:
            conn.jobs.pop(key, None)
            task = conn.tasks.pop(key, None)
            handle = registry.find(key, "live")
            if handle is None:
                continue
            if handle.status in OPEN:
                registry.command(handle, "cancel", log=log)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            registry.remove(handle)
            stopped.append(handle)
        return stopped

    async def close(self, exchange: str) -> dict[JobKey, JobRecord]:
        """Stop the open connector's live jobs and close its exchange; returns the jobs'
        records (saved too, so that opening it again carries them over)."""
        old = self.opened.pop(exchange, None)
        if old is None:
            return {}
        stopped = await self.stop_jobs(old, list(old.jobs), log=False)
        await old.live.drain()
        await old.runtime.source.close()
        await self._p.registry.flush()
        return {job.key: job.record for job in stopped}

    async def stop_everything(self, others: Iterable[asyncio.Task[Any]]) -> None:
        """Stopping: every job task and `others` cancelled, pages already fetched written."""
        tasks: list[asyncio.Task[Any]] = [
            t for conn in self.opened.values() for t in conn.tasks.values()
        ]
        tasks.extend(others)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(conn.live.drain() for conn in self.opened.values()))

    async def close_sources(self) -> None:
        await asyncio.gather(
            *(conn.runtime.source.close() for conn in self.opened.values()), return_exceptions=True
        )
