"""The open connectors of the live service: each one's runtime, live scheduler and job tasks.

A connection is an opened `ExchangeRuntime` with its `LiveExchange`; each live job of it runs
as its own task, so jobs start and stop one at a time while the others go on. A job task that
dies of anything but a cancel fails the whole service (`failure`), loudly, as a gathered
live mode would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..exchange.runtime import ExchangeRuntime
from ..jobs.control import run_cancellable
from ..jobs.model import OPEN, Job, JobRecord
from ..jobs.schedule import Schedule
from ..models import JobKey
from .daemon_backfill import ServiceParts
from .durable_writer import DurableWriter
from .live import LiveExchange, LiveJob


@dataclass
class Connection:
    """An opened connector: its runtime, its live scheduler and each live job's task."""

    runtime: ExchangeRuntime
    live: LiveExchange
    tasks: dict[JobKey, asyncio.Task[bool]] = field(default_factory=dict)


class Connections:
    def __init__(self, parts: ServiceParts, schedule_of: Callable[[JobKey], Schedule]) -> None:
        self._p = parts
        self._schedule_of = schedule_of
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
        return sum(len(conn.tasks) for conn in self.opened.values())

    def start_jobs(self, conn: Connection, keys: list[JobKey], cursors: dict[JobKey, int]) -> None:
        """Each job's first run now, from its cursor (the newest stored closed candle, else
        its registered record's), then on its schedule."""
        now = conn.live.now_ms()
        caps = conn.runtime.source.capabilities
        for key in keys:
            schedule = self._schedule_of(key)
            job = LiveJob(key, caps.grid(key.timeframe), cursors.get(key), schedule=schedule)
            saved = self._p.registry.find(key, "live")
            if saved is not None and job.cursor_ms is None:
                job.cursor_ms = saved.record.cursor_ms
            handle = conn.live.attach(job, now)
            handle.schedule = schedule.to_json()
            task = asyncio.create_task(run_cancellable(handle, conn.live.run_job(job)))
            task.add_done_callback(self._watch)
            conn.tasks[key] = task

    def failure(self) -> asyncio.Future[None]:
        """Completes with the error of the first job task that died (never otherwise)."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    def _watch(self, task: asyncio.Task[bool]) -> None:
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
        stopped = await self.stop_jobs(old, list(old.tasks), log=False)
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
