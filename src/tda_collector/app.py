"""Mode dispatcher: builds the components from the config, runs one mode, shuts down cleanly."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .admin import AdminServer, build_admin_server
from .config import Config, ExchangeConfig
from .errors import ExchangeFault, TransientFault, UsageError
from .events import EventLog
from .exchange import CcxtExchange
from .fetcher import Fetcher
from .history import COMPLETED, FAILED, HistoryBackfill, JobResult
from .indicator_stage import IndicatorStage, indicator_columns
from .live import run_live
from .metrics import Metrics
from .models import Column, JobKey
from .persist import DurableWriter
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


async def _open_source(source: CandleSource, limiter: RateLimiter, policy: RetryPolicy) -> None:
    """Load markets and the clock, retrying transient faults like any other request."""
    attempt = 0
    while True:
        attempt += 1
        await limiter.acquire(2)  # markets + server time
        try:
            await source.open()
            return
        except TransientFault:
            if policy.gives_up_after(attempt):
                raise
            await asyncio.sleep(policy.delay(attempt, random.Random()))


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
        await _open_source(source, limiter, policy)
        runtime.keys = await _job_keys(cfg, source, request)
    except BaseException:
        await source.close()
        raise
    return runtime


def build_store(
    config: Config, events: EventLog, extra_columns: tuple[Column, ...] = ()
) -> CandleStore:
    if config.storage.backend == "duckdb":
        return DuckDBStore(config.storage.duckdb.path, events, extra_columns)
    raise UsageError("storage.backend: bigquery is not available in this build yet")


async def _run_exchange_history(
    runtime: ExchangeRuntime,
    backfill: HistoryBackfill,
    request: RunRequest,
    concurrency: int,
    failure_limit: int,
    events: EventLog,
) -> list[JobResult]:
    """Jobs of one exchange through a bounded worker pool. Jobs that failed on a transient
    fault go to a retry queue that runs once more at the end, resuming from the ledger. More
    than `failure_limit` failed jobs stop the exchange's remaining jobs instead of grinding on."""
    assert request.start_ms is not None and request.end_ms is not None
    start_ms, end_ms = request.start_ms, request.end_ms
    failures = 0

    async def run_all(keys: list[JobKey]) -> list[JobResult]:
        nonlocal failures
        queue: asyncio.Queue[JobKey] = asyncio.Queue()
        for key in keys:
            queue.put_nowait(key)
        done: list[JobResult] = []

        async def worker() -> None:
            nonlocal failures
            while not queue.empty() and failures <= failure_limit:
                result = await backfill.run_job(queue.get_nowait(), start_ms, end_ms)
                done.append(result)
                failures += result.status != COMPLETED
                if failures == failure_limit + 1:
                    events.error(
                        "exchange_stopped",
                        f"{failures} jobs failed; stopping the exchange's remaining jobs",
                        failed=failures,
                        error=result.error,
                    )

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(keys)))))
        stopped = "not run: the exchange was stopped after too many failures"
        while not queue.empty():
            done.append(JobResult(queue.get_nowait(), status=FAILED, error=stopped))
        return done

    final = {r.key: r for r in await run_all(runtime.keys)}
    if failures <= failure_limit:
        retry_keys = [r.key for r in final.values() if r.status != COMPLETED and r.retryable]
        for again in await run_all(retry_keys):
            earlier = final[again.key]
            again.rows += earlier.rows
            again.pages += earlier.pages
            again.rejected.update(earlier.rejected)
            final[again.key] = again
    return list(final.values())


def _summarise(
    events: EventLog, results: list[JobResult], runtimes: list[ExchangeRuntime], started: float
) -> int:
    duration = time.monotonic() - started
    failed = [r for r in results if r.status != COMPLETED]
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
        f"{len(results) - len(failed)}/{len(results)} jobs complete, {rows} candles stored"
        + (f"; failed: {', '.join(str(r.key) for r in failed)}" if failed else ""),
        jobs=len(results),
        completed=len(results) - len(failed),
        failed=len(failed),
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
) -> int:
    started = time.monotonic()
    keys = [k for rt in runtimes for k in rt.keys]
    await _discard_orphan_ledgers(store, state, keys, events)
    metrics.set_jobs({"RUNNING": len(keys)})
    per_exchange = []
    for rt in runtimes:
        exchange_events = events.bind(exchange=rt.config.id)
        writer = DurableWriter(
            store, retry_policy(config), exchange_events, metrics=metrics, indicators=indicators
        )
        backfill = HistoryBackfill(
            rt.fetcher, writer, state, exchange_events, config.history_page_limit, metrics
        )
        per_exchange.append(
            _run_exchange_history(
                rt,
                backfill,
                request,
                config.history_concurrency,
                config.retry.exchange_failure_limit,
                exchange_events,
            )
        )
    results = [r for group in await asyncio.gather(*per_exchange) for r in group]
    if indicators is not None:
        await indicators.repair(DurableWriter(store, retry_policy(config), events).write_as_is)
    completed = sum(r.status == COMPLETED for r in results)
    metrics.set_jobs({"COMPLETED": completed, "FAILED": len(results) - completed})
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


async def _run_mode(
    config: Config,
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
) -> int:
    readiness = Readiness()
    admin = build_admin_server(config.admin, metrics, readiness)
    runtimes: list[ExchangeRuntime] = []
    spec = config.indicators.spec() if config.indicators.enabled else None
    store = build_store(config, events, indicator_columns(spec) if spec else ())
    indicators = IndicatorStage(spec, config.state_path, store, events) if spec else None
    state = StateStore(config.state_path)
    try:
        if admin is not None:
            await admin.start()
            events.info("admin_started", f"admin API on {admin.url}", url=admin.url)
        runtimes, failure = await _open_all(config, request, events, factory, metrics)
        if failure is not None:
            raise failure
        await state.open()
        await store.ensure()
        if indicators is not None:
            await indicators.load([k for rt in runtimes for k in rt.keys])
        readiness.store_ready = True
        if request.mode == "history":
            return await run_history(
                config, request, events, runtimes, store, state, metrics, indicators
            )
        return await run_live(
            config, events, runtimes, store, state, retry_policy(config), metrics, indicators
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
) -> int:
    """Run one mode to its end, or until SIGTERM/SIGINT (then exit code 0 after a clean stop)."""
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
        return await _run_mode(config, request, events, factory, metrics)
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
