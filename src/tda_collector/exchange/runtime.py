"""Per-exchange runtime: the source, its one limiter and fetcher, and the jobs it serves.

Built from the config once per run; everything that talks to one exchange shares it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..config import ExchangeConfig, RetryConfig
from ..errors import UsageError
from ..models import JobKey
from ..observability.events import EventLog
from ..observability.metrics import Metrics
from ..retry import RetryPolicy
from .archive import ArchiveClient, ArchiveTools
from .archive_layout import ARCHIVE_LAYOUTS
from .ccxt_source import CcxtExchange
from .fetcher import Fetcher, Gate
from .ratelimit import Limiter, RateLimiter, burst_for
from .shared_budget import BudgetStore, SharedBudget
from .source import CandleSource, Capabilities, UsedWeightRule
from .throttle import Pauses
from .universe import check_symbols, check_timeframes, filter_markets, merge_symbols, top_by_volume
from .weight_guard import UsedWeightGuard


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
    budget: float  # the exchange's requests/s, configured or ccxt's; the limiter runs below it
    limiter: Limiter
    fetcher: Fetcher
    keys: list[JobKey] = field(default_factory=list)
    archive: ArchiveTools | None = None  # history mode, where the exchange publishes archives

    async def close(self) -> None:
        await self.source.close()
        if self.archive is not None:
            await self.archive.source.close()


SourceFactory = Callable[[ExchangeConfig], CandleSource]


def ccxt_source_factory(credentials: dict[str, dict[str, str]]) -> SourceFactory:
    """Sources backed by ccxt, with each exchange's credentials from the environment."""

    def build(config: ExchangeConfig) -> CandleSource:
        return CcxtExchange(config.id, {**config.ccxt, **credentials.get(config.id, {})})

    return build


def used_weight_rule(
    cfg: ExchangeConfig, capabilities: Capabilities, field: str
) -> UsedWeightRule | None:
    """The exchange's known used-weight header, with what the config (at `field`) overrides;
    None when off or when neither names a header or a limit."""
    given, known = cfg.rate_limit.used_weight, capabilities.used_weight
    if not given.enabled:
        return None
    header = given.header or (known.header if known else None)
    limit = given.limit or (known.limit if known else None)
    if header is None and limit is None:
        return None
    if header is None or limit is None:
        missing = "header" if header is None else "limit"
        raise UsageError(f"{field}.{missing}: required, as {cfg.id}'s own is not known")
    window_s = given.window_seconds or (known.window_s if known else 60.0)
    return UsedWeightRule(header, limit, window_s)


def archive_tools(
    cfg: ExchangeConfig, source: CandleSource, field: str, policy: RetryPolicy
) -> ArchiveTools | None:
    """The exchange's archive for a history run, its downloads retried as `policy` says: on by
    default where its layout is known (`archive_layout.ARCHIVE_LAYOUTS`); asked for (at
    `field`) where none is known, a UsageError."""
    layout, wanted = ARCHIVE_LAYOUTS.get(cfg.id), cfg.archive.enabled
    if wanted is False or (wanted is None and layout is None):
        return None
    if layout is None:
        known = ", ".join(sorted(ARCHIVE_LAYOUTS))
        raise UsageError(f"{field}.enabled: no known archive for {cfg.id} (known: {known})")
    base_url = cfg.archive.base_url or layout.base_url
    market_ids = {m.symbol: m.id for m in source.markets() if m.id}
    client = ArchiveClient(base_url, cfg.archive.concurrency, policy)
    return ArchiveTools(client, layout, market_ids, base_url)


def build_limiter(
    cfg: ExchangeConfig, budget: float, metrics: Metrics, shared: BudgetStore | None
) -> Limiter:
    """The exchange's limiter at `safety` of `budget`: in this process, or, with `shared`, one
    budget group's slots in the shared state (several instances, one budget)."""
    rate, burst = budget * cfg.rate_limit.safety, burst_for(budget, cfg.rate_limit.safety)

    def on_wait(seconds: float) -> None:
        metrics.rate_limit_wait(cfg.id, seconds)

    if shared is not None:
        group = cfg.rate_limit.budget_group or cfg.id
        return SharedBudget(shared, group, rate, burst, on_wait=on_wait)
    return RateLimiter(rate, burst, on_wait=on_wait)


def retry_policy(config: RetryConfig) -> RetryPolicy:
    return RetryPolicy(
        config.base_seconds,
        config.factor,
        config.cap_seconds,
        config.attempts,
        config.retry_after_max_seconds,
    )


def select_exchanges(exchanges: list[ExchangeConfig], request: RunRequest) -> list[ExchangeConfig]:
    configured = {e.id: e for e in exchanges}
    unknown = [e for e in request.exchanges if e not in configured]
    if unknown:
        raise UsageError(
            f"--exchange {', '.join(unknown)}: not configured (configured: {', '.join(configured)})"
        )
    wanted = request.exchanges or tuple(configured)
    return [configured[e] for e in wanted]


async def _job_keys(
    cfg: ExchangeConfig, fetcher: Fetcher, request: RunRequest, field: str
) -> list[JobKey]:
    """The exchange's jobs; no symbol at all (a `markets` block at `field` that matches nothing,
    and no explicit symbols) is a UsageError: a run of zero jobs would do nothing and exit 0."""
    source = fetcher.source
    timeframes = list(request.timeframes or cfg.timeframes)
    check_timeframes(cfg.id, timeframes, source.timeframes)
    markets = source.markets()
    if request.symbols:
        symbols = list(request.symbols)
    else:
        resolved: list[str] = []
        if cfg.markets is not None:
            candidates = filter_markets(markets, cfg.markets)
            volumes = await fetcher.quote_volumes(candidates) if cfg.markets.limit else {}
            resolved = top_by_volume(candidates, volumes, cfg.markets.limit)
        symbols = merge_symbols(cfg.symbols, resolved)
        if not symbols and cfg.markets is not None:
            wanted = cfg.markets
            raise UsageError(
                f"{field}: No symbols found matching criteria on {cfg.id} (quote "
                f"{', '.join(wanted.quote) or 'any'}, type {wanted.type}, "
                f"active_only {str(wanted.active_only).lower()})"
            )
    check_symbols(cfg.id, symbols, markets)
    return [JobKey(cfg.id, s, tf) for s in symbols for tf in timeframes]


async def open_exchange(
    cfg: ExchangeConfig,
    request: RunRequest,
    events: EventLog,
    policy: RetryPolicy,
    factory: SourceFactory,
    metrics: Metrics,
    position: int,
    gate: Gate | None = None,
    pauses: Pauses | None = None,
    patient: bool | None = None,
    shared: BudgetStore | None = None,
) -> ExchangeRuntime:
    """Build the exchange's source, limiter and fetcher, load its markets and resolve its jobs;
    `position` is its index in the config's `exchanges`, for error messages. The fetcher asks
    `gate` before each candle request and reports long pauses to `pauses`. Loading markets is
    retried forever when `patient` (default: in live mode), else as the retry policy says;
    `shared` holds the budgets shared with other instances (None: this process has the budget
    to itself)."""
    source = factory(cfg)
    try:
        budget = cfg.rate_limit.requests_per_second or source.default_requests_per_second
        metrics.set_budget(cfg.id, budget)
        limiter = build_limiter(cfg, budget, metrics, shared)
        exchange_events = events.bind(exchange=cfg.id)
        field = f"exchanges[{position}].rate_limit.used_weight"
        rule = used_weight_rule(cfg, source.capabilities, field)
        if rule is not None:
            safety = cfg.rate_limit.safety
            guard = UsedWeightGuard(
                cfg.id, rule, safety, limiter, exchange_events, metrics, source.now_ms
            )
            source.watch_used_weight(rule.header, guard.observe)
        fetcher = Fetcher(
            source, limiter, policy, exchange_events, metrics=metrics, gate=gate, pauses=pauses
        )
        runtime = ExchangeRuntime(cfg, source, budget, limiter, fetcher)
        await fetcher.open(forever=request.mode == "live" if patient is None else patient)
        runtime.keys = await _job_keys(cfg, fetcher, request, f"exchanges[{position}].markets")
        if request.mode == "history":
            field = f"exchanges[{position}].archive"
            runtime.archive = archive_tools(cfg, source, field, policy)
    except BaseException:
        await source.close()
        raise
    return runtime


async def open_all(
    exchanges: list[ExchangeConfig],
    request: RunRequest,
    events: EventLog,
    factory: SourceFactory,
    metrics: Metrics,
    policy: RetryPolicy,
    gate: Gate | None = None,
    pauses: Pauses | None = None,
    shared: BudgetStore | None = None,
) -> tuple[list[ExchangeRuntime], BaseException | None]:
    """Open every selected exchange concurrently; the opened ones are returned even when
    another failed, so that they can be closed. `gate`, `pauses` and `shared` go to every
    exchange."""
    opened = await asyncio.gather(
        *(
            open_exchange(
                cfg,
                request,
                events,
                policy,
                factory,
                metrics,
                exchanges.index(cfg),
                gate,
                pauses,
                shared=shared,
            )
            for cfg in select_exchanges(exchanges, request)
        ),
        return_exceptions=True,
    )
    runtimes = [r for r in opened if isinstance(r, ExchangeRuntime)]
    failure = next((r for r in opened if isinstance(r, BaseException)), None)
    return runtimes, failure
