"""Assembly: builds each component from its part of the config, runs one mode, shuts down cleanly.

The config is read here and nowhere below: the modes get their settings objects
(`HistorySettings`, `LiveSettings`), every retry loop the one `RetryPolicy`, the store its
`storage` section, the admin server its `admin` section.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping

import pyarrow as pa
from aiohttp import web

from .admin.jobs_api import Fleet, describe_job, jobs_routes, no_guard, routes_access
from .admin.ohlcv_api import ohlcv_routes
from .admin.server import AdminServer, build_admin_server
from .admin.service_api import ServiceApi
from .config import Config, ExchangeConfig
from .errors import EXIT_JOBS_FAILED, EXIT_OK, ExchangeFault, StoreFault
from .exchange.fetcher import Fetcher, Gate
from .exchange.runtime import (
    ExchangeRuntime,
    RunRequest,
    SourceFactory,
    open_all,
    open_exchange,
    retry_policy,
)
from .exchange.shared_budget import BudgetStore
from .exchange.throttle import Pauses
from .jobs.catalog import SqliteCatalog
from .jobs.control import JobMonitor
from .jobs.leases import LeaseKeeper, LeaseStore, run_id_of
from .jobs.progress import Progress
from .jobs.progress_bar import terminal_bar
from .jobs.registry import JobRegistry
from .jobs.state import StateStore, build_state
from .models import JobKey
from .modes.daemon_backfill import ServiceParts
from .modes.handover import daemon_url, hand_over
from .modes.history import HistorySettings, run_history
from .modes.indicator_stage import IndicatorStage, indicator_columns
from .modes.live import LiveSettings
from .modes.service import LiveService, Opener
from .observability.events import EventLog
from .observability.metrics import Metrics
from .store import CandleStore, build_store
from .store.duckdb_errors import held_by_another_process

# A clean stop lets go of its leases within this (the whole stop has about a second).
RELEASE_ON_STOP_S = 0.3


def history_settings(config: Config) -> HistorySettings:
    return HistorySettings(
        page_limit=config.history_page_limit,
        concurrency=config.history_concurrency,
        failure_limit=config.retry.exchange_failure_limit,
        chunk_pages=config.lease_chunk_pages,
    )


def lease_keeper(
    config: Config, leases: LeaseStore | None, mode: str, events: EventLog
) -> LeaseKeeper | None:
    """With shared state, this instance's leases; else None."""
    if leases is None:
        return None
    owner = instance_name(config)
    return LeaseKeeper(leases, owner, mode, config.lease_seconds, events)


def fleet_of(keeper: LeaseKeeper | None, request: RunRequest) -> Fleet | None:
    """What the admin API shows of the other instances (with shared state)."""
    if keeper is None:
        return None
    run_id = run_id_of(request.mode, request.start_ms, request.end_ms)
    return Fleet(keeper.store, run_id, request.mode, keeper.lease_s)


def fetch_gate(registry: JobRegistry, keeper: LeaseKeeper | None) -> Gate:
    """What a candle request asks first: the job is not paused, and with shared state, its
    lease is surely still this instance's."""
    if keeper is None:
        return registry.check
    held = keeper

    def gate(key: JobKey) -> None:
        registry.check(key)
        held.check(key)

    return gate


def live_settings(config: Config) -> LiveSettings:
    return LiveSettings(
        refresh_ms=round(config.update_interval_seconds * 1000),
        settle_ms=round(config.live_settle_seconds * 1000),
        page_limit=config.live_page_limit,
        initial_candles=config.live_initial_candles,
        concurrency=config.live_concurrency,
    )


class Readiness:
    """What `/readyz` reports: not ready until the store is ensured, nor after the run died, nor
    while an exchange asked to be left alone for longer than `retry.retry_after_max_seconds`."""

    def __init__(self, pauses: Pauses | None = None) -> None:
        self.store_ready = False
        self.failure: str | None = None
        self.pauses = pauses if pauses is not None else Pauses()

    async def __call__(self) -> str | None:
        if self.failure:
            return self.failure
        paused = self.pauses.reason()
        if paused is not None:
            return paused
        return None if self.store_ready else "starting: the store is not ensured yet"


def _track_budgets(registry: JobRegistry, runtimes: list[ExchangeRuntime]) -> None:
    for rt in runtimes:
        limit = rt.limiter.rate_per_s
        registry.track_budget(rt.config.id, rt.budget, limit, _requests_of(rt.fetcher))


def _requests_of(fetcher: Fetcher) -> Callable[[], int]:
    return lambda: fetcher.requests


def instance_name(config: Config) -> str:
    """This instance: `instance_id`, by default hostname-pid (the jobs API's `owner`)."""
    return config.instance_id or f"{socket.gethostname()}-{os.getpid()}"


def _opener(
    config: Config,
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
    registry: JobRegistry,
    pauses: Pauses,
    patient: bool = True,
    shared: BudgetStore | None = None,
    gate: Gate | None = None,
) -> Opener:
    """How the live service opens a connector: as `open_exchange` does at start (with the
    command line's narrowing in `request`), its budget then shown in /progress. Not `patient`
    (a change through the API, which must answer), an exchange that cannot be reached fails
    after the retry policy's attempts instead of being waited for. `shared`: the budgets shared
    with other instances (state_url); `gate`: what each candle request asks first (default: the
    job is not paused)."""
    policy = retry_policy(config.retry)
    filed = [e.id for e in config.exchanges]

    async def open_one(cfg: ExchangeConfig) -> ExchangeRuntime:
        position = filed.index(cfg.id) if cfg.id in filed else len(filed)
        rt = await open_exchange(
            cfg,
            request,
            events,
            policy,
            factory,
            metrics,
            position,
            gate or registry.check,
            pauses,
            patient,
            shared,
        )
        _track_budgets(registry, [rt])
        return rt

    return open_one


async def _run_mode(
    config: Config,
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
    admin_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    pauses = Pauses()
    readiness = Readiness(pauses)
    runtimes: list[ExchangeRuntime] = []
    spec = config.indicators.spec() if config.indicators.enabled else None
    url = config.state_url.get_secret_value() if config.state_url is not None else None
    state, fleet = build_state(config.state_path, url, events, instance_name(config))
    store = build_store(
        config.storage,
        events,
        request.mode,
        indicator_columns(spec) if spec else (),
        environ,
        state,  # the Storage Write API's stream offsets and commit intents
        # Shared state: each instance's live rows go to a committed stream of its own.
        live_stream_owner(config),
    )
    policy = retry_policy(config.retry)
    indicators = IndicatorStage(spec, state, store, events) if spec else None
    registry = JobRegistry(request.mode, state, metrics, events)
    live = request.mode == "live"
    keeper = lease_keeper(config, fleet, request.mode, events)
    gate = fetch_gate(registry, keeper)
    heartbeat: asyncio.Task[None] | None = None
    progress = Progress(registry)
    catalog = SqliteCatalog(config.state_path) if fleet is None else fleet.catalog()
    parts = ServiceParts(
        live_settings(config),
        config.history_page_limit,
        events,
        store,
        state,
        catalog,
        policy,
        metrics,
        registry,
        indicators,
    )
    service = LiveService(
        parts,
        _opener(
            config,
            RunRequest("live"),
            events,
            factory,
            metrics,
            registry,
            pauses,
            False,
            fleet,
            gate,
        ),
        keeper,
    )

    def known_series() -> frozenset[JobKey] | None:
        """The series `GET /ohlcv` answers for (the run's jobs); None until the store is open."""
        if not readiness.store_ready:
            return None
        return frozenset(job.key for job in registry.jobs.values())

    routes = [
        *_admin_routes(
            config,
            admin_token,
            (registry, progress, pauses),
            service if live else None,
            fleet_of(keeper, request),
        ),
        *ohlcv_routes(store, known_series, events),
    ]
    admin = build_admin_server(config.admin, metrics, readiness, routes, admin_token)
    try:
        # The state, then the store, before any exchange request: a store that cannot be
        # opened ends the run unspent, and one a daemon holds gets a history range handed over.
        # The state comes first because the store's ensure settles the BigQuery commits a
        # killed run left in doubt.
        await state.open()
        if live:
            await store.ensure()
        else:
            handed = await _ensure_or_hand_over(store, config, admin_token, request, events)
            if handed is not None:
                return handed
        if admin is not None:  # after the hand-over: the daemon listens on the same address
            await admin.start()
            events.info("admin_started", f"admin API on {admin.url}", url=admin.url)
        heartbeat = _start_heartbeat(keeper, events)
        if live:
            start_opener = _opener(
                config, request, events, factory, metrics, registry, pauses, True, fleet, gate
            )
            await service.open_enabled(start_opener, config.exchanges, request.exchanges)
            keys = service.keys()
        else:
            runtimes, failure = await open_all(
                config.exchanges,
                request,
                events,
                factory,
                metrics,
                policy,
                gate,
                pauses,
                fleet,
            )
            if failure is not None:
                raise failure
            keys = [k for rt in runtimes for k in rt.keys]
        # One query serves both: indicator states are checked against it, and it gives live
        # mode its cursors (on BigQuery each query scans the table).
        newest_closed = await store.newest(keys) if live or indicators is not None else {}
        if indicators is not None:
            await indicators.load(keys, newest_closed)
        readiness.store_ready = True
        if not live:
            _track_budgets(registry, runtimes)
        bar = terminal_bar(request.mode, events.logger)
        async with JobMonitor(registry, progress, events, bar):
            if not live:
                assert request.start_ms is not None and request.end_ms is not None
                return await run_history(
                    history_settings(config),
                    (request.start_ms, request.end_ms),
                    events,
                    runtimes,
                    store,
                    state,
                    metrics,
                    policy,
                    indicators,
                    registry,
                    keeper,
                )
            return await service.run(dict(newest_closed))
    except Exception as exc:
        readiness.failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        await _let_go(heartbeat, keeper)
        await asyncio.shield(_close_all(runtimes, store, state, admin, indicators, service))


def _start_heartbeat(keeper: LeaseKeeper | None, events: EventLog) -> asyncio.Task[None] | None:
    """With shared state, announce this instance and keep its heartbeat and leases renewed."""
    if keeper is None:
        return None
    events.info("instance_started", f"instance {keeper.owner}", instance=keeper.owner)
    return asyncio.create_task(keeper.heartbeat())


async def _let_go(heartbeat: asyncio.Task[None] | None, keeper: LeaseKeeper | None) -> None:
    """Stop the instance's heartbeat and hand back its leases (a clean stop)."""
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    if keeper is not None:
        await asyncio.shield(keeper.release_all(RELEASE_ON_STOP_S))


def live_stream_owner(config: Config) -> str:
    """The key of live mode's committed BigQuery stream in the state: with shared state, one
    per instance (`instance_id`), as two instances must never append to one stream."""
    return "live" if config.state_url is None else f"live:{instance_name(config)}"


def _admin_routes(
    config: Config,
    token: str | None,
    run: tuple[JobRegistry, Progress, Pauses],
    service: LiveService | None,
    fleet: Fleet | None,
) -> list[web.RouteDef]:
    """The jobs API's routes, and in live mode the service's before them (the jobs API's
    `/jobs/{id}/{action}` would take `backfill`). With `fleet`, a job's owner is its lease's."""
    admin, (registry, progress, pauses) = config.admin, run
    owner = instance_name(config)
    job_json = functools.partial(describe_job, owner=owner)
    guard = service.refuses_resume if service is not None else no_guard
    routes = jobs_routes(
        registry, progress, admin.host, token, admin.token_env, pauses, job_json, guard, fleet
    )
    if service is None:
        return routes
    access = routes_access(admin.host, token, admin.token_env)
    return [*ServiceApi(service, registry, access, owner).routes(), *routes]


async def _ensure_or_hand_over(
    store: CandleStore,
    config: Config,
    admin_token: str | None,
    request: RunRequest,
    events: EventLog,
) -> int | None:
    """Ensure the store; when another process holds it and a daemon answers at the admin
    address, run the request through that daemon and return the exit code (see `handover`)."""
    try:
        await store.ensure()
        return None
    except StoreFault as exc:
        url = daemon_url(config.admin)
        if url is None or not held_by_another_process(exc):
            raise
        handed = await hand_over(url, admin_token, request, events)
        if handed is None:
            raise StoreFault(f"{exc}; and no collector answers at {url}") from exc
        return handed


async def _close_all(
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    admin: AdminServer | None,
    indicators: IndicatorStage | None,
    service: LiveService,
) -> None:
    await asyncio.gather(
        *(rt.close() for rt in runtimes),
        service.close(),
        store.close(),
        state.close(),
        *([admin.stop()] if admin is not None else []),
        return_exceptions=True,
    )


def leave_signals_to_the_loop() -> None:
    """Stop pyarrow from swapping in a SIGTERM/SIGINT handler of its own while it works.

    The klines fast path parses every page with Arrow's CSV reader on the event loop's thread.
    A signal landing there became `ArrowCancelled` out of the parse (a live daemon then exited
    1 with a traceback) or never reached our handler (it kept running): about 1 SIGTERM in 25
    sent right after start-up. With this, the loop's handlers are the only ones."""
    pa.enable_signal_handlers(False)


async def run(
    config: Config,
    request: RunRequest,
    events: EventLog,
    metrics: Metrics,
    factory: SourceFactory,
    admin_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run one mode to its end, or until SIGTERM/SIGINT (then exit code 0 after a clean stop).
    `admin_token` is the bearer token the jobs API's POSTs need off loopback; `environ` is
    where a store finds its cloud project and credentials."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def request_stop(signame: str) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            events.info("shutdown_requested", f"{signame} received; stopping", signal=signame)
            main.cancel()

    leave_signals_to_the_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    started = time.monotonic()
    try:
        return await _run_mode(config, request, events, factory, metrics, admin_token, environ)
    except asyncio.CancelledError:
        if not stopping:
            raise
        events.info(
            "shutdown",
            "stopped cleanly",
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return EXIT_OK
    except (ExchangeFault, StoreFault, OSError, sqlite3.Error) as exc:
        # The exchange, the store or the state file could not be opened (a DuckDB file another
        # process holds, a dataset we may not write): one event naming it, and the same line
        # on stderr for whoever started us; exit 1, no traceback.
        events.error("startup_failed", f"could not start: {exc}", error=str(exc))
        print(f"tda-collector: could not start: {exc}", file=sys.stderr)
        return EXIT_JOBS_FAILED
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
