"""The page pipeline wired as the app wires it, for in-process tests.

source → the exchange's `RateLimiter` → `Fetcher` (with the pause gate) → `DurableWriter` →
store, plus one history job run through `HistoryBackfill` the way history mode runs it.
Benchmarks run the collector as a process instead (bench/), so they need none of this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from event_support import recording_events
from memory_store import MemoryStore

from tda_collector.exchange.fetcher import Fetcher
from tda_collector.exchange.ratelimit import RateLimiter
from tda_collector.exchange.source import CandleSource
from tda_collector.jobs.control import register_history_jobs
from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.model import Job
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.modes.backfill import HistoryBackfill, HistoryOutcome
from tda_collector.modes.durable_writer import DurableWriter
from tda_collector.modes.indicator_stage import IndicatorStage
from tda_collector.observability.events import EventLog
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy
from tda_collector.store import CandleStore

FAST_RETRY = RetryPolicy(base_s=0.01, cap_s=0.02, attempts=3)


@dataclass
class Pipeline:
    fetcher: Fetcher
    writer: DurableWriter


def wire(
    source: CandleSource,
    store: CandleStore,
    events: EventLog,
    *,
    policy: RetryPolicy = FAST_RETRY,
    rate_per_s: float = 10_000,
    burst: int = 100,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    gate: Callable[[JobKey], None] | None = None,
    indicators: IndicatorStage | None = None,
) -> Pipeline:
    """A fetcher and a durable writer over `source` and `store`; `clock` and `sleep` put the
    limiter, the retries and the writer on a virtual clock."""
    timing: dict[str, Any] = {}
    if clock is not None:
        timing["clock"] = clock
    if sleep is not None:
        timing["sleep"] = sleep
    limiter = RateLimiter(rate_per_s, burst, **timing)
    fetcher = Fetcher(source, limiter, policy, events, gate=gate, **timing)
    writer_timing = {"sleep": sleep} if sleep is not None else {}
    writer = DurableWriter(store, policy, events, indicators=indicators, **writer_timing)
    return Pipeline(fetcher, writer)


@dataclass
class BackfillResult:
    outcome: HistoryOutcome
    rows: list[tuple]  # the series' stored candles, (open_ms, o, h, l, c, v), oldest first
    coverage: list[tuple[int, int]]
    job: Job
    events: Any  # the recorded events (`.named(event)`)


async def backfill_one(
    tmp_path: Path,
    source: CandleSource,
    key: JobKey,
    start_ms: int,
    end_ms: int,
    page_limit: int,
) -> BackfillResult:
    """Register one history job for `key` over [start, end) as history mode does (aligned to
    the exchange's calendar, clipped to its clock) and run it once against a memory store."""
    events, recorder = recording_events()
    store, state = MemoryStore(), SqliteState(str(tmp_path / "state.sqlite"))
    await state.open()
    try:
        registry = JobRegistry("history")
        origins = {key.exchange: source.capabilities.week_origin_ms}
        exchanges = [(key.exchange, [key], source.now_ms())]
        [job] = await register_history_jobs(registry, state, exchanges, start_ms, end_ms, origins)
        pipeline = wire(source, store, events, gate=registry.check)
        history = HistoryBackfill(
            pipeline.fetcher, pipeline.writer, state, events, page_limit, Metrics(), registry
        )
        outcome = await history.run_job(job, HistoryOutcome())
        coverage = await state.coverage(key)
    finally:
        await state.close()
    rows = [tuple(r[:6]) for r in store.series_rows(key)]
    return BackfillResult(outcome, rows, coverage, job, recorder)
