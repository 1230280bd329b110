"""The live daemon as a service: connectors and jobs changed while it runs, backfills inside it.

Each enabled connector is opened (source, its one limiter, fetcher: `ExchangeRuntime`) and its
live jobs run as one task each on that connector's `LiveExchange`. A connector's jobs are the
symbols x timeframes it declares, less the ones `DELETE /jobs/{id}` dismissed, plus the ones
`POST /jobs` added (see `jobs/catalog.py`, which persists all of it). Changes take effect at once:

- a new job attaches like any new live series (its first run fetches `live_initial_candles`
  or catches up from the newest stored candle); a deleted job's task is cancelled and the job
  forgotten, its stored candles stay;
- disabling a connector pauses its running jobs (no request of theirs leaves: the fetcher's
  gate), and enabling resumes those (not one a user had paused; the catalog keeps which, across
  restarts): the first run after it pages through the hole, as after downtime; a connector
  never opened in this process (disabled at start, or new) is opened on enable;
- `POST /jobs` with a new schedule for a series that has a job reschedules it in place (its
  record carried over); the job is then the API's, like an added one;
- a PUT with a changed block opens the connector anew with it (nothing changes if that fails),
  then moves the jobs over, carrying their records: jobs the new block no longer declares stop
  (a disabled connector is closed instead, and opened with the new block when enabled);
- deleting a connector stops its jobs and closes it; a tombstone keeps it deleted;
- a backfill is a history job of the series run here, under the connector's one limiter at
  background priority (live requests go first) and into the same store and ledger.

Changes are made one at a time (a lock), so two requests never interleave their steps, and
only once every job has started (before that: 503). The open connections themselves are
`connections.Connections`; backfills are `daemon_backfill.DaemonBackfills`.

With shared state (a `LeaseKeeper`), every job is declared here as above, but runs only while
this instance holds its lease: `leased_live.LiveLeases` claims this instance's fair share of the
jobs and lets go of the rest, so several instances run each job once between them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from ..config import ExchangeConfig
from ..errors import StoreFault, UsageError
from ..exchange.runtime import ExchangeRuntime
from ..exchange.universe import check_symbols, check_timeframes
from ..jobs.catalog import (
    ADDED,
    DISMISSED,
    Connector,
    JobDefinition,
    config_body,
    reconcile,
    secrets_refusal,
)
from ..jobs.control import history_record, history_window, register_live_jobs
from ..jobs.leases import LeaseKeeper
from ..jobs.model import OPEN, PAUSED, PENDING, Job
from ..jobs.schedule import EACH_CLOSE, Schedule
from ..models import JobKey
from .connections import Connection, Connections
from .daemon_backfill import DaemonBackfills, ServiceParts
from .durable_writer import DurableWriter
from .leased_live import LiveLeases
from .live import prepare_live

Opener = Callable[[ExchangeConfig], Awaitable[ExchangeRuntime]]


class Refused(Exception):
    """A change the service will not make: `status` is the HTTP answer (400, 404, 409, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LiveService:
    def __init__(
        self, parts: ServiceParts, opener: Opener, keeper: LeaseKeeper | None = None
    ) -> None:
        """`keeper`: this instance's leases, when several instances share the state."""
        self._p = parts
        self._opener = opener
        self.connectors: dict[str, Connector] = {}
        self._tombstones: dict[str, Connector] = {}  # deleted connectors (see `catalog`)
        self.definitions: dict[JobKey, JobDefinition] = {}
        self._leases = (
            None
            if keeper is None
            else LiveLeases(keeper, parts.state, parts.events, parts.indicators)
        )
        wake = self._leases.wake if self._leases is not None else None
        self.connections = Connections(parts, self._schedule_of, wake)
        self.opened = self.connections.opened
        self._backfills = DaemonBackfills(parts, keeper)
        self._lock = asyncio.Lock()
        self._started = False  # changes are refused until `run` has started every job

    @contextlib.asynccontextmanager
    async def _change(self) -> AsyncIterator[None]:
        """One change at a time, and only once the service runs (else 503)."""
        if not self._started:
            raise Refused(503, "the collector is starting; try again in a moment")
        async with self._lock:
            yield

    # -- start and run
    async def open_enabled(
        self, opener: Opener, file_blocks: list[ExchangeConfig], only: tuple[str, ...] = ()
    ) -> None:
        """Load the catalog with the config file applied (`catalog.reconcile`), then open every
        enabled connector (`only`: just these ids) concurrently with `opener` (the start's,
        which may narrow symbols and timeframes); the first failure is raised once the others
        are open (they are then closed by `close`)."""
        catalog = self._p.catalog
        await catalog.open()
        connectors = reconcile(await catalog.connectors(), file_blocks)
        await catalog.save_connectors(connectors)
        self.connectors = {c.id: c for c in connectors if not c.deleted}
        self._tombstones = {c.id: c for c in connectors if c.deleted}
        self.definitions = {d.key: d for d in await catalog.definitions()}
        wanted = [c for c in self.connectors.values() if c.enabled and (not only or c.id in only)]
        unknown = [e for e in only if e not in self.connectors]
        if unknown:
            raise UsageError(f"--exchange {', '.join(unknown)}: no such connector")
        opened = await asyncio.gather(*(opener(c.config) for c in wanted), return_exceptions=True)
        for result in opened:
            if isinstance(result, ExchangeRuntime):
                self.connections.add(result)
        failure = next((r for r in opened if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure

    def keys(self) -> list[JobKey]:
        """Every live job's series of the opened connectors."""
        return [k for conn in self.opened.values() for k in self.jobs_of(conn)]

    async def run(self, cursors: dict[JobKey, int]) -> int:
        """Keep every job of the opened connectors live until cancelled, each from its cursor:
        the newest stored closed candle, as the store reported it at start."""
        p = self._p
        keys = self.keys()
        runtimes = [conn.runtime for conn in self.opened.values()]
        await prepare_live(p.registry, p.state, runtimes, keys, cursors, p.metrics)
        if p.indicators is not None and self._leases is None:  # leased: each as it is taken on
            await p.indicators.repair(DurableWriter(p.store, p.policy, p.events).write_as_is)
        for conn in self.opened.values():
            self.connections.start_jobs(conn, self.jobs_of(conn), cursors)
        self._started = True
        jobs = self.connections.job_count()
        self._p.events.info("live_started", f"{jobs} jobs going live", jobs=jobs)
        balancing = self._balance()
        following = None if self._leases is None else asyncio.create_task(self._follow())
        try:
            await self.connections.failure()
        finally:
            for task in (following, balancing):  # first: no job is launched while others stop
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await self.connections.stop_everything(self._backfills.tasks)
        return 0

    def _balance(self) -> asyncio.Task[None] | None:
        """With leases, the task keeping this instance's share of the jobs running (its death
        by anything but a cancel fails the service, as a job task's does)."""
        if self._leases is None:
            return None
        task = asyncio.create_task(self._leases.run(self.connections), name="live-leases")
        task.add_done_callback(self.connections.watch)
        return task

    async def _follow(self) -> None:
        """With shared state, until cancelled: what other instances' APIs changed in the
        catalog, applied here every third of a lease (the database away: tried again then)."""
        assert self._leases is not None
        while True:
            await asyncio.sleep(self._leases.lease_s / 3)
            try:
                changes = await self.follow_catalog()
            except (StoreFault, Refused) as exc:
                self._p.events.warning(
                    "catalog_follow_failed", f"the shared catalog was not read: {exc}"
                )
                continue
            if changes:
                self._p.events.info(
                    "catalog_followed",
                    f"changes made through another instance: {', '.join(changes)}",
                    changes=changes,
                )

    async def close(self) -> None:
        await asyncio.gather(
            self.connections.close_sources(), self._p.catalog.close(), return_exceptions=True
        )

    def _schedule_of(self, key: JobKey) -> Schedule:
        definition = self.definitions.get(key)
        return definition.schedule if definition is not None else EACH_CLOSE

    # -- the jobs of a connector
    def jobs_of(self, conn: Connection) -> list[JobKey]:
        """Declared keys less the dismissed ones, then the added ones, no key twice."""
        exchange = conn.runtime.config.id
        dismissed = {k for k, d in self.definitions.items() if d.kind == DISMISSED}
        added = [k for k, d in self.definitions.items() if d.kind == ADDED]
        added = [k for k in added if k.exchange == exchange]
        keys = [k for k in conn.runtime.keys if k not in dismissed]
        return list(dict.fromkeys([*keys, *added]))

    async def _cursors(self, keys: list[JobKey]) -> dict[JobKey, int]:
        """Newest stored closed candle of new series (and their indicator states loaded)."""
        if not keys:
            return {}
        newest = await self._p.store.newest(keys)
        if self._p.indicators is not None:
            await self._p.indicators.load(keys, newest)
        return dict(newest)

    # -- connectors
    async def put_connector(self, config: ExchangeConfig) -> tuple[bool, Connector]:
        """Upsert; (created, connector). The same block again changes nothing."""
        async with self._change():
            known = self.connectors.get(config.id)
            if known is not None and config_body(known.config) == config_body(config):
                return False, known
            refusal = secrets_refusal(known, config)
            if refusal is not None:
                raise Refused(400, refusal)
            connector = Connector(config, known.enabled if known else True, None)
            if known is not None:  # still disabled: enabling resumes what disabling paused
                connector = replace(connector, paused_jobs=known.paused_jobs)
            previous = known or self._tombstones.get(config.id)
            if previous is not None:  # the file's block it was last applied with
                connector = replace(connector, file_body=previous.file_body)
            if connector.enabled:
                await self._reopen(config)
            else:  # enabling opens it anew, with this block
                await self.connections.close(config.id)
            await self._p.catalog.save_connectors([connector])
            self.connectors[config.id] = connector
            self._tombstones.pop(config.id, None)
            self._p.events.info(
                "connector_saved", f"connector {config.id} saved", exchange=config.id
            )
            return known is None, connector

    async def delete_connector(self, exchange: str) -> Connector:
        """Stop the connector's jobs (live and backfills), close its exchange and forget it
        and the jobs added to it; its stored candles stay."""
        async with self._change():
            connector = self._connector(exchange)
            await self.connections.close(exchange)
            registry = self._p.registry
            for job in registry.select(exchange=exchange):
                if job.status in OPEN:
                    registry.command(job, "cancel", log=False)
                registry.remove(job)
            added = [k for k in self.definitions if k.exchange == exchange]
            await self._p.catalog.drop_definitions(added)
            for key in added:
                del self.definitions[key]
            tombstone = replace(connector, deleted=True)
            await self._p.catalog.save_connectors([tombstone])
            del self.connectors[exchange]
            self._tombstones[exchange] = tombstone
            self._p.events.info(
                "connector_deleted", f"connector {exchange} deleted", exchange=exchange
            )
            return connector

    async def _reopen(self, config: ExchangeConfig) -> None:
        runtime = await self._open_checked(config)
        records = await self.connections.close(config.id)
        conn = self.connections.add(runtime)
        # A PUT declares anew: what it declares again is no longer dismissed (an added job's
        # definition, holding its schedule, stays).
        dismissed = {k for k, d in self.definitions.items() if d.kind == DISMISSED}
        undismissed = [k for k in runtime.keys if k in dismissed]
        await self._p.catalog.drop_definitions(undismissed)
        for key in undismissed:
            del self.definitions[key]
        keys = self.jobs_of(conn)
        cursors = await self._cursors(keys)
        registry = self._p.registry
        for key in keys:
            if key in records and registry.find(key, "live") is None:  # counts carried over
                registry.add(Job(replace(records[key], status=PENDING, next_run_ms=None)))
        fresh = [k for k in keys if k not in records and registry.find(k, "live") is None]
        await register_live_jobs(registry, self._p.state, fresh, cursors)
        self.connections.start_jobs(conn, keys, cursors)

    async def _open_checked(self, config: ExchangeConfig) -> ExchangeRuntime:
        try:
            return await asyncio.wait_for(self._opener(config), 60)
        except UsageError as exc:
            raise Refused(400, str(exc)) from None
        except Exception as exc:  # the exchange could not be reached or refused us
            raise Refused(400, f"could not open {config.id}: {exc}") from None

    async def set_enabled(self, exchange: str, enabled: bool) -> Connector:
        async with self._change():
            connector = self._connector(exchange)
            conn = self.opened.get(exchange)
            if enabled and conn is None:
                await self._reopen(connector.config)
            if enabled:
                self._resume(exchange, set(connector.paused_jobs))
                connector = replace(connector, enabled=True, paused_jobs=())
            else:  # disabling twice keeps what the first one paused
                paused = [*connector.paused_jobs, *self._pause(exchange)]
                connector = replace(connector, enabled=False, paused_jobs=tuple(paused))
            await self._p.catalog.save_connectors([connector])
            self.connectors[exchange] = connector
            self._p.events.info(
                "connector_enabled" if enabled else "connector_disabled",
                f"connector {exchange} {'enabled' if enabled else 'disabled'}",
                exchange=exchange,
            )
            return connector

    def _pause(self, exchange: str) -> list[str]:
        """Pause every open, unpaused job of the connector (so none of its requests leaves);
        returns their ids."""
        registry = self._p.registry
        paused = []
        for job in registry.select(exchange=exchange):
            if job.status in OPEN and job.status != PAUSED:
                registry.command(job, "pause")
                paused.append(job.id)
        return paused

    def _resume(self, exchange: str, ids: set[str]) -> None:
        """Resume the connector's paused jobs among `ids` (what disabling paused); they catch
        up at once. A job a user paused stays paused."""
        registry = self._p.registry
        for job in registry.select(exchange=exchange):
            if job.status == PAUSED and job.id in ids:
                registry.command(job, "resume")

    def refuses_resume(self, job: Job) -> str | None:
        """Why a job may not be resumed by hand: its connector is disabled."""
        connector = self.connectors.get(job.key.exchange)
        if connector is not None and not connector.enabled:
            return f"connector {connector.id} is disabled; enable it to resume its jobs"
        return None

    def _connector(self, exchange: str) -> Connector:
        connector = self.connectors.get(exchange)
        if connector is None:
            raise Refused(404, f"no connector {exchange}")
        return connector

    def _enabled(self, exchange: str, field: str = "exchange") -> Connection:
        connector = self.connectors.get(exchange)
        if connector is None:
            raise Refused(400, f"{field}: no connector {exchange}")
        conn = self.opened.get(exchange)
        if not connector.enabled or conn is None:
            raise Refused(409, f"connector {exchange} is disabled")
        return conn

    # -- jobs
    async def add_job(self, key: JobKey, schedule: Schedule | None) -> tuple[bool, Job]:
        """A live job of the series on `schedule` (None: each close for a new job, unchanged
        for one that exists); (created, job). One that exists gets a different schedule in
        place; otherwise it is left as it is."""
        async with self._change():
            conn = self._enabled(key.exchange)
            source = conn.runtime.source
            try:
                check_timeframes(key.exchange, [key.timeframe], source.timeframes)
                check_symbols(key.exchange, [key.symbol], source.markets())
            except UsageError as exc:
                raise Refused(400, str(exc)) from None
            if key in conn.jobs:
                if schedule is not None and schedule != self._schedule_of(key):
                    await self._reschedule(conn, key, schedule)
                return False, self._live_job(key)
            definition = JobDefinition(key, ADDED, schedule or EACH_CLOSE)
            await self._p.catalog.save_definition(definition)
            self.definitions[key] = definition
            self.connections.start_jobs(conn, [key], await self._cursors([key]))
            return True, self._live_job(key)

    async def _reschedule(self, conn: Connection, key: JobKey, schedule: Schedule) -> None:
        """Restart the job's task on `schedule`, its record carried over (paused stays
        paused); the new schedule is kept as the API's definition of the job."""
        definition = JobDefinition(key, ADDED, schedule)
        await self._p.catalog.save_definition(definition)
        self.definitions[key] = definition
        await self._restart(conn, key)

    async def _restart(self, conn: Connection, key: JobKey) -> None:
        """The job's task anew on its schedule now, its record carried over."""
        paused = self._live_job(key).status == PAUSED
        [stopped] = await self.connections.stop_jobs(conn, [key], log=False)
        status = PAUSED if paused else PENDING
        self._p.registry.add(Job(replace(stopped.record, status=status, next_run_ms=None)))
        self.connections.start_jobs(conn, [key], {})

    # -- what other instances changed (shared state)
    async def follow_catalog(self) -> list[str]:
        """Make this instance run what the shared catalog now says, as another instance's API
        changed it: jobs added, deleted or rescheduled, connectors enabled or disabled (their
        jobs paused or resumed here too). Read under the change lock, so that it never undoes
        a change of this instance's own. Returns what changed. A connector created, changed or
        deleted elsewhere takes effect here at the next start."""
        changes: list[str] = []
        async with self._change():
            connectors = await self._p.catalog.connectors()
            fresh = {d.key: d for d in await self._p.catalog.definitions()}
            if fresh != self.definitions:
                old, self.definitions = self.definitions, fresh
                for conn in self.opened.values():
                    changes += await self._follow_jobs(conn, old)
            for connector in connectors:
                known = self.connectors.get(connector.id)
                if known is None or connector.deleted or connector.enabled == known.enabled:
                    continue
                if connector.enabled and connector.id not in self.opened:
                    await self._reopen(connector.config)
                if connector.enabled:
                    self._resume(connector.id, set(known.paused_jobs))
                else:
                    self._pause(connector.id)
                self.connectors[connector.id] = connector
                changes.append(f"{connector.id} {'enabled' if connector.enabled else 'disabled'}")
        return changes

    async def _follow_jobs(self, conn: Connection, old: dict[JobKey, JobDefinition]) -> list[str]:
        wanted = self.jobs_of(conn)
        gone = [k for k in conn.jobs if k not in wanted]
        new = [k for k in wanted if k not in conn.jobs]
        moved = [
            k
            for k in wanted
            if k in conn.jobs
            and self._schedule_of(k) != (old[k].schedule if k in old else EACH_CLOSE)
        ]
        if gone:
            await self.connections.stop_jobs(conn, gone)
        if new:
            self.connections.start_jobs(conn, new, await self._cursors(new))
        for key in moved:
            await self._restart(conn, key)
        return [*(f"{k} added" for k in new), *(f"{k} deleted" for k in gone)] + [
            f"{k} rescheduled" for k in moved
        ]

    def _live_job(self, key: JobKey) -> Job:
        job = self._p.registry.find(key, "live")
        assert job is not None
        return job

    async def delete_job(self, job: Job) -> None:
        """Stop and forget the job; a declared one stays away until a PUT declares it."""
        async with self._change():
            key = job.key
            if job.record.mode == "history":
                if job.status in OPEN:
                    self._p.registry.command(job, "cancel")
                self._p.registry.remove(job)
                return
            conn = self.opened.get(key.exchange)
            if conn is not None:
                await self.connections.stop_jobs(conn, [key])
            else:
                self._p.registry.remove(job)
            declared = conn is None or key in conn.runtime.keys
            if declared:
                definition = JobDefinition(key, DISMISSED)
                await self._p.catalog.save_definition(definition)
                self.definitions[key] = definition
            else:
                await self._p.catalog.drop_definitions([key])
                self.definitions.pop(key, None)

    async def backfill(self, key: JobKey, start_ms: int, end_ms: int) -> Job:
        """A history job of the series over [start, end), started now (202)."""
        async with self._change():
            conn = self._enabled(key.exchange)
            registry = self._p.registry
            earlier = registry.find(key, "history")
            if earlier is not None and earlier.status in OPEN:
                raise Refused(409, f"{earlier.id} is still {earlier.status}")
            holder = None if self._leases is None else await self._leases.held_elsewhere(key)
            if holder is not None:  # its indicator state is there: the repair must reach it
                raise Refused(
                    409, f"{key}'s live job runs on instance {holder}: ask that instance's API"
                )
            source = conn.runtime.source
            grid = source.capabilities.grid(key.timeframe)
            start, end = history_window(start_ms, end_ms, grid, source.now_ms())
            if start >= end:
                raise Refused(400, "start: the range holds no closed candle")
            if earlier is not None:
                registry.remove(earlier)
            record = history_record(key, start, end, await self._p.state.coverage(key))
            job = registry.add(Job(record))
            self._backfills.start(conn.runtime, job)
            return job
