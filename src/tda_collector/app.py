"""Mode dispatcher: builds the components from the config, runs one mode, shuts down cleanly."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .admin import AdminServer, build_admin_server
from .config import Config, ExchangeConfig
from .errors import ExchangeFault, RateLimited, TransientFault, UsageError
from .events import EventLog
from .exchange import CcxtExchange
from .fetcher import Fetcher
from .history import FAILED, HistoryBackfill, JobResult
from .history_pool import ExchangeHistory
from .indicator_stage import IndicatorStage, indicator_columns
from .job_control import JobMonitor, finish_history_run, gated, register_history_jobs
from .jobs import CANCELLED, JobRegistry
from .jobs_api import jobs_routes
from .live import run_live
from .metrics import Metrics
from .models import Column, JobKey
from .persist import DurableWriter
from .progress import Progress
from .progress_bar import terminal_bar
from .protocols import CandleSource, CandleStore
from .ratelimit import RateLimiter, burst_for
from .retry import RetryPolicy
from .state import StateStore
from .store_duckdb import DuckDBStore
from .universe import check_symbols, check_timeframes, filter_markets, merge_symbols, top_by_volume

EXIT_OK, EXIT_JOBS_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class RunRequest:
    """What the command line asked for; empty tuples mean "as configured"."""

    mode: Literal["history", "live"]
    start_ms: int | None = None
    end_ms: int | None = None
    exchanges: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()
    timeframes: tuple[str, ...] = ()


@dataclass
class ExchangeRuntime:
    """Everything one exchange's jobs share: its source, its one limiter, its fetcher."""

    config: ExchangeConfig
    source: CandleSource
    limiter: RateLimiter
    fetcher: Fetcher
    keys: list[JobKey] = field(default_factory=list)


SourceFactory = Callable[[ExchangeConfig], CandleSource]


def ccxt_source_factory(credentials: dict[str, dict[str, str]]) -> SourceFactory:
    """Sources backed by ccxt, with each exchange's credentials from the environment."""

    def build(config: ExchangeConfig) -> CandleSource:
        return CcxtExchange(config.id, {**config.ccxt, **credentials.get(config.id, {})})

    return build


def retry_policy(config: Config) -> RetryPolicy:
    r = config.retry
    return RetryPolicy(r.base_seconds, r.factor, r.cap_seconds, r.attempts)


def select_exchanges(config: Config, request: RunRequest) -> list[ExchangeConfig]:
    configured = {e.id: e for e in config.exchanges}
    unknown = [e for e in request.exchanges if e not in configured]
    if unknown:
        raise UsageError(
            f"--exchange {', '.join(unknown)}: not configured (configured: {', '.join(configured)})"
        )
    wanted = request.exchanges or tuple(configured)
    return [configured[e] for e in wanted]


async def _open_source(
    source: CandleSource,
    limiter: RateLimiter,
    policy: RetryPolicy,
    events: EventLog,
    forever: bool,
) -> None:
    """Load markets and the clock, retrying transient faults like any other request. A live
    daemon keeps trying (an exchange down at boot is downtime like any other); a history run
    gives up after the policy's attempts and exits 1."""
    attempt = 0
    rng = random.Random()
    while True:
        attempt += 1
        await limiter.acquire(2)  # markets + server time
        try:
            await source.open()
            return
        except (TransientFault, RateLimited) as exc:
            if policy.gives_up_after(attempt) and not forever:
                raise
            wait_s = policy.delay(min(attempt, policy.attempts), rng)
            if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
                wait_s = max(wait_s, exc.retry_after_s)
            events.warning(
                "backoff_retry",
                f"could not load markets; retrying in {wait_s:.1f}s",
                attempt=attempt,
                status=exc.status,
                error=str(exc)[:500],
                wait_s=round(wait_s, 3),
            )
            await asyncio.sleep(wait_s)


async def _job_keys(cfg: ExchangeConfig, source: CandleSource, request: RunRequest) -> list[JobKey]:
    timeframes = list(request.timeframes or cfg.timeframes)
    check_timeframes(cfg.id, timeframes, source.timeframes)
    markets = source.markets()
    if request.symbols:
        symbols = list(request.symbols)
    else:
        resolved: list[str] = []
        if cfg.markets is not None:
            candidates = filter_markets(markets, cfg.markets)
            volumes = await source.quote_volumes(candidates) if cfg.markets.limit else {}
            resolved = top_by_volume(candidates, volumes, cfg.markets.limit)
        symbols = merge_symbols(cfg.symbols, resolved)
    check_symbols(cfg.id, symbols, markets)
    return [JobKey(cfg.id, s, tf) for s in symbols for tf in timeframes]


async def open_exchange(
    cfg: ExchangeConfig,
    request: RunRequest,
    events: EventLog,
    policy: RetryPolicy,
    factory: SourceFactory,
    metrics: Metrics,
) -> ExchangeRuntime:
    source = factory(cfg)
    budget = cfg.rate_limit.requests_per_second or source.default_requests_per_second
    metrics.set_budget(cfg.id, budget)
    limiter = RateLimiter(
        budget * cfg.rate_limit.safety,
        burst_for(budget, cfg.rate_limit.safety),
        on_wait=lambda seconds: metrics.rate_limit_wait(cfg.id, seconds),
    )
    exchange_events = events.bind(exchange=cfg.id)
    fetcher = Fetcher(source, limiter, policy, exchange_events, metrics=metrics)
    runtime = ExchangeRuntime(cfg, source, limiter, fetcher)
    try:
        await _open_source(source, limiter, policy, exchange_events, forever=request.mode == "live")
        runtime.keys = await _job_keys(cfg, source, request)
    except BaseException:
        await source.close()
        raise
    return runtime


def build_store(
    config: Config,
    events: EventLog,
    mode: str,
    extra_columns: tuple[Column, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> CandleStore:
    """DuckDB, or BigQuery: streaming inserts for live mode, batched load jobs for history."""
    if config.storage.backend == "duckdb":
        return DuckDBStore(config.storage.duckdb.path, events, extra_columns)
    from .store_bigquery import BigQueryStore  # the Google libraries take ~0.5 s to import

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


async def _open_all(
    config: Config,
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
) -> tuple[list[ExchangeRuntime], BaseException | None]:
    """Open every selected exchange concurrently; the opened ones are returned even when
    another failed, so that they can be closed."""
    policy = retry_policy(config)
    opened = await asyncio.gather(
        *(
            open_exchange(cfg, request, events, policy, factory, metrics)
            for cfg in select_exchanges(config, request)
        ),
        return_exceptions=True,
    )
    runtimes = [r for r in opened if isinstance(r, ExchangeRuntime)]
    failure = next((r for r in opened if isinstance(r, BaseException)), None)
    return runtimes, failure


def _track_budgets(registry: JobRegistry, runtimes: list[ExchangeRuntime]) -> None:
    for rt in runtimes:
        budget = rt.config.rate_limit.requests_per_second or rt.source.default_requests_per_second
        limit = rt.limiter.rate_per_s
        registry.track_budget(rt.config.id, budget, limit, lambda f=rt.fetcher: f.requests)


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
        runtimes, failure = await _open_all(
            config, request, events, gated(factory, registry), metrics
        )
        if failure is not None:
            raise failure
        await state.open()
        await store.ensure()
        if indicators is not None:
            await indicators.load([k for rt in runtimes for k in rt.keys])
        readiness.store_ready = True
        _track_budgets(registry, runtimes)
        bar = terminal_bar(request.mode, events.logger)
        async with JobMonitor(registry, progress, events, bar):
            if request.mode == "history":
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
