"""Assembly: builds each component from its part of the config, runs one mode, shuts down cleanly.

The config is read here and nowhere below: the modes get their settings objects
(`HistorySettings`, `LiveSettings`), every retry loop the one `RetryPolicy`, the store its
`storage` section, the admin server its `admin` section.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping

import pyarrow as pa

from .admin.jobs_api import Fleet, jobs_routes
from .admin.server import AdminServer, build_admin_server
from .config import Config
from .errors import EXIT_JOBS_FAILED, EXIT_OK, ExchangeFault, StoreFault
from .exchange.fetcher import Fetcher, Gate
from .exchange.runtime import (
    ExchangeRuntime,
    RunRequest,
    SourceFactory,
    open_all,
    retry_policy,
)
from .exchange.throttle import Pauses
from .jobs.control import JobMonitor
from .jobs.leases import LeaseKeeper, LeaseStore, run_id_of
from .jobs.progress import Progress
from .jobs.progress_bar import terminal_bar
from .jobs.registry import JobRegistry
from .jobs.state import StateStore, build_state
from .models import JobKey
from .modes.history import HistorySettings, run_history
from .modes.indicator_stage import IndicatorStage, indicator_columns
from .modes.live import LiveSettings, run_live
from .observability.events import EventLog
from .observability.metrics import Metrics
from .store import CandleStore, build_store

# A clean stop lets go of its leases within this (the whole stop has about a second).
RELEASE_ON_STOP_S = 0.3


def history_settings(config: Config) -> HistorySettings:
    return HistorySettings(
        page_limit=config.history_page_limit,
        concurrency=config.history_concurrency,
        failure_limit=config.retry.exchange_failure_limit,
        chunk_pages=config.lease_chunk_pages,
    )


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def lease_keeper(
    config: Config, leases: LeaseStore | None, mode: str, events: EventLog
) -> LeaseKeeper | None:
    """With shared state, this instance's leases; else None."""
    if leases is None:
        return None
    owner = config.instance_id or default_instance_id()
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
    store = build_store(
        config.storage, events, request.mode, indicator_columns(spec) if spec else (), environ
    )
    policy = retry_policy(config.retry)
    url = config.state_url.get_secret_value() if config.state_url is not None else None
    state, fleet = build_state(config.state_path, url, events)
    indicators = IndicatorStage(spec, state, store, events) if spec else None
    registry = JobRegistry(request.mode, state, metrics, events)
    keeper = lease_keeper(config, fleet, request.mode, events)
    heartbeat: asyncio.Task[None] | None = None
    progress = Progress(registry)
    admin = build_admin_server(
        config.admin,
        metrics,
        readiness,
        jobs_routes(
            registry,
            progress,
            config.admin.host,
            admin_token,
            config.admin.token_env,
            pauses,
            fleet_of(keeper, request),
        ),
    )
    try:
        if admin is not None:
            await admin.start()
            events.info("admin_started", f"admin API on {admin.url}", url=admin.url)
        await state.open()  # first: with state_url, the exchanges' budgets live there
        if keeper is not None:
            heartbeat = asyncio.create_task(keeper.heartbeat())
            events.info("instance_started", f"instance {keeper.owner}", instance=keeper.owner)
        runtimes, failure = await open_all(
            config.exchanges,
            request,
            events,
            factory,
            metrics,
            policy,
            fetch_gate(registry, keeper),
            pauses,
            fleet,
        )
        if failure is not None:
            raise failure
        await store.ensure()
        keys = [k for rt in runtimes for k in rt.keys]
        live = request.mode == "live"
        # One query serves both: indicator states are checked against it, and it gives live
        # mode its cursors (on BigQuery each query scans the table).
        newest_closed = await store.newest(keys) if live or indicators is not None else {}
        if indicators is not None:
            await indicators.load(keys, newest_closed)
        readiness.store_ready = True
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
            return await run_live(
                live_settings(config),
                events,
                runtimes,
                store,
                state,
                policy,
                metrics,
                indicators,
                registry,
                cursors=newest_closed,
                keeper=keeper,
            )
    except Exception as exc:
        readiness.failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if keeper is not None:
            await asyncio.shield(keeper.release_all(RELEASE_ON_STOP_S))
        await asyncio.shield(_close_all(runtimes, store, state, admin))


async def _close_all(
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    admin: AdminServer | None,
) -> None:
    await asyncio.gather(
        *(rt.source.close() for rt in runtimes),
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
    except (ExchangeFault, StoreFault, OSError) as exc:
        # The exchange or the store could not be opened (a DuckDB file another process holds,
        # a dataset we may not write): one event naming it, exit 1, no traceback.
        events.error("startup_failed", f"could not start: {exc}", error=str(exc))
        return EXIT_JOBS_FAILED
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
