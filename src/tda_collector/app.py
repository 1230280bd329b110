"""Mode dispatcher: builds the components from the config, runs one mode, shuts down cleanly."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping

from .admin.jobs_api import jobs_routes
from .admin.server import AdminServer, build_admin_server
from .config import Config
from .errors import ExchangeFault
from .exchange.runtime import (
    ExchangeRuntime,
    RunRequest,
    SourceFactory,
    open_all,
    retry_policy,
)
from .jobs.control import JobMonitor, finish_history_run, gated, register_history_jobs
from .jobs.ledger import StateStore
from .jobs.progress import Progress
from .jobs.progress_bar import terminal_bar
from .jobs.registry import CANCELLED, JobRegistry
from .models import Column, JobKey
from .modes.durable_writer import DurableWriter
from .modes.history import FAILED, HistoryBackfill, JobResult
from .modes.history_pool import ExchangeHistory
from .modes.indicator_stage import IndicatorStage, indicator_columns
from .modes.live import run_live
from .observability.events import EventLog
from .observability.metrics import Metrics
from .store import CandleStore
from .store.duckdb_store import DuckDBStore

EXIT_OK, EXIT_JOBS_FAILED, EXIT_USAGE = 0, 1, 2


def build_store(
    config: Config,
    events: EventLog,
    mode: str,
    extra_columns: tuple[Column, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> CandleStore:
    """DuckDB (writes grouped into commits), or BigQuery: streaming inserts for live mode,
    batched load jobs for history."""
    if config.storage.backend == "duckdb":
        duck = config.storage.duckdb
        return DuckDBStore(
            duck.path,
            events,
            extra_columns,
            batch_rows=duck.batch_rows,
            # Live: a candle's latency is what counts, and its writes are a row or two; a
            # commit then carries the writes made in one turn of the event loop, with no wait.
            batch_seconds=duck.batch_seconds if mode == "history" else 0.0,
        )
    from .store.bigquery_store import BigQueryStore  # the Google libraries take ~0.5 s to import

    bq = config.storage.bigquery
    return BigQueryStore(
        bq,
        events,
        mode="load" if mode == "history" else "stream",
        extra_columns=extra_columns,
        environ=environ or {},
        partitioning=bq.partitioning,
        flush_rows=bq.load_batch_rows,
        flush_seconds=bq.load_batch_seconds,
    )


def _summarise(
    events: EventLog, results: list[JobResult], runtimes: list[ExchangeRuntime], started: float
) -> int:
    duration = time.monotonic() - started
    failed = [r for r in results if r.status == FAILED]
    cancelled = sum(r.status == CANCELLED for r in results)
    for r in failed:
        events.error(
            "job_failed",
            f"{r.key} failed: {r.error}",
            exchange=r.key.exchange,
            symbol=r.key.symbol,
            timeframe=r.key.timeframe,
            error=r.error,
        )
    rows = sum(r.rows for r in results)
    requests = sum(rt.fetcher.requests for rt in runtimes)
    rejected = sum(sum(r.rejected.values()) for r in results)
    log = events.error if failed else events.info
    log(
        "history_complete",
        f"{len(results) - len(failed) - cancelled}/{len(results)} jobs complete, "
        f"{rows} candles stored"
        + (f"; {cancelled} cancelled" if cancelled else "")
        + (f"; failed: {', '.join(str(r.key) for r in failed)}" if failed else ""),
        jobs=len(results),
        completed=len(results) - len(failed) - cancelled,
        failed=len(failed),
        cancelled=cancelled or None,
        failed_jobs=[str(r.key) for r in failed] or None,
        rows=rows,
        rejected=rejected,
        requests=requests,
        duration_ms=round(duration * 1000),
        candles_per_s=round(rows / duration, 1) if duration > 0 else None,
        requests_per_s=round(requests / duration, 2) if duration > 0 else None,
    )
    return EXIT_JOBS_FAILED if failed else EXIT_OK


async def _discard_orphan_ledgers(
    store: CandleStore, state: StateStore, keys: list[JobKey], events: EventLog
) -> None:
    """A ledger whose store has no rows at all (file deleted, new dataset) would skip data
    forever; forget it so the range is fetched again."""
    newest = await store.newest(keys, closed_only=False)
    for key in keys:
        if key not in newest and await state.coverage(key):
            events.warning(
                "state_reset",
                f"{key}: the ledger covers ranges but the store has no rows; refetching",
                exchange=key.exchange,
                symbol=key.symbol,
                timeframe=key.timeframe,
            )
            await state.forget(key)


async def run_history(
    config: Config,
    request: RunRequest,
    events: EventLog,
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    metrics: Metrics,
    indicators: IndicatorStage | None = None,
    registry: JobRegistry | None = None,
) -> int:
    started = time.monotonic()
    keys = [k for rt in runtimes for k in rt.keys]
    await _discard_orphan_ledgers(store, state, keys, events)
    assert request.start_ms is not None and request.end_ms is not None
    registry = registry or JobRegistry("history", state, metrics, events)
    exchanges = [(rt.config.id, rt.keys, rt.source.now_ms()) for rt in runtimes]
    jobs = await register_history_jobs(registry, state, exchanges, request.start_ms, request.end_ms)
    per_exchange = []
    for rt in runtimes:
        exchange_events = events.bind(exchange=rt.config.id)
        writer = DurableWriter(
            store, retry_policy(config), exchange_events, metrics=metrics, indicators=indicators
        )
        backfill = HistoryBackfill(
            rt.fetcher, writer, state, exchange_events, config.history_page_limit, metrics, registry
        )
        pool = ExchangeHistory(
            backfill,
            registry,
            [job for job in jobs if job.key.exchange == rt.config.id],
            config.history_concurrency,
            config.retry.exchange_failure_limit,
            exchange_events,
        )
        per_exchange.append(pool.run())
    results = [r for group in await asyncio.gather(*per_exchange) for r in group]
    if indicators is not None:
        await indicators.repair(DurableWriter(store, retry_policy(config), events).write_as_is)
    await finish_history_run(registry, state)
    return _summarise(events, results, runtimes, started)


class Readiness:
    """What `/readyz` reports: not ready until the store is ensured, nor after the run died."""

    def __init__(self) -> None:
        self.store_ready = False
        self.failure: str | None = None

    async def __call__(self) -> str | None:
        if self.failure:
            return self.failure
        return None if self.store_ready else "starting: the store is not ensured yet"


def _track_budgets(registry: JobRegistry, runtimes: list[ExchangeRuntime]) -> None:
    for rt in runtimes:
        limit = rt.limiter.rate_per_s
        registry.track_budget(rt.config.id, rt.budget, limit, lambda f=rt.fetcher: f.requests)


async def _run_mode(
    config: Config,
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
    admin_token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    readiness = Readiness()
    runtimes: list[ExchangeRuntime] = []
    spec = config.indicators.spec() if config.indicators.enabled else None
    store = build_store(
        config, events, request.mode, indicator_columns(spec) if spec else (), environ
    )
    indicators = IndicatorStage(spec, config.state_path, store, events) if spec else None
    state = StateStore(config.state_path)
    registry = JobRegistry(request.mode, state, metrics, events)
    progress = Progress(registry)
    admin = build_admin_server(
        config.admin,
        metrics,
        readiness,
        jobs_routes(registry, progress, config.admin.host, admin_token, config.admin.token_env),
    )
    try:
        if admin is not None:
            await admin.start()
            events.info("admin_started", f"admin API on {admin.url}", url=admin.url)
        runtimes, failure = await open_all(
            config, request, events, gated(factory, registry), metrics
        )
        if failure is not None:
            raise failure
        await state.open()
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
                return await run_history(
                    config, request, events, runtimes, store, state, metrics, indicators, registry
                )
            return await run_live(
                config,
                events,
                runtimes,
                store,
                state,
                retry_policy(config),
                metrics,
                indicators,
                registry,
                cursors=newest_closed,
            )
    except Exception as exc:
        readiness.failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        await asyncio.shield(_close_all(runtimes, store, state, admin, indicators))


async def _close_all(
    runtimes: list[ExchangeRuntime],
    store: CandleStore,
    state: StateStore,
    admin: AdminServer | None,
    indicators: IndicatorStage | None,
) -> None:
    await asyncio.gather(
        *(rt.source.close() for rt in runtimes),
        store.close(),
        state.close(),
        *([indicators.close()] if indicators is not None else []),
        *([admin.stop()] if admin is not None else []),
        return_exceptions=True,
    )


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
    except ExchangeFault as exc:
        events.error("startup_failed", f"could not start: {exc}", error=str(exc))
        return EXIT_JOBS_FAILED
    except OSError as exc:
        events.error("startup_failed", f"could not start: {exc}", error=str(exc))
        return EXIT_JOBS_FAILED
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
