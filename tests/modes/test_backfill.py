"""One history job's pages: windows a page can hold, and a ledger of only what pages proved."""

from __future__ import annotations

import asyncio

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S
from event_support import recording_events
from fake_exchange import SymbolSpec, expected_candles
from memory_source import MemorySource
from memory_store import MemoryStore

from tda_collector.exchange.fetcher import Fetcher
from tda_collector.exchange.ratelimit import RateLimiter
from tda_collector.exchange.source import Capabilities
from tda_collector.jobs.ledger import StateStore
from tda_collector.jobs.model import COMPLETED, FAILED, Job, JobRecord
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.modes.backfill import HistoryBackfill, HistoryOutcome, earliest_served
from tda_collector.modes.durable_writer import DurableWriter
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy
from tda_collector.timeframes import grid_of

MIN = 60_000
NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS
START_MS = END_MS - 1000 * MIN
KEY = JobKey("okx", "BTC/USDT", "1m")


async def backfill(tmp_path, source: MemorySource, page: int = 300, start_ms: int = START_MS):
    """Run one job over [start, END) against `source`; returns outcome, store, ledger, events."""
    events, recorder = recording_events()
    policy = RetryPolicy(base_s=0.01, cap_s=0.02, attempts=3)
    fetcher = Fetcher(source, RateLimiter(10_000, 100), policy, events)
    store, state = MemoryStore(), StateStore(str(tmp_path / "state.sqlite"))
    await state.open()
    registry = JobRegistry("history")
    job = registry.add(
        Job(JobRecord.of(KEY, "history", start_ms=start_ms, end_ms=END_MS, cursor_ms=start_ms))
    )
    writer = DurableWriter(store, policy, events)
    history = HistoryBackfill(fetcher, writer, state, events, page, Metrics(), registry)
    outcome = await history.run_job(job, HistoryOutcome())
    coverage = await state.coverage(KEY)
    await state.close()
    return outcome, store, coverage, recorder


def stored(store: MemoryStore) -> list[tuple]:
    return [tuple(r[:6]) for r in store.series_rows(KEY)]


def memory(spec: SymbolSpec, **knobs) -> MemorySource:
    return MemorySource([spec], lambda: FROZEN_NOW_S, asyncio.sleep, page_size=300, **knobs)


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest-first", "newest-first"])
async def test_every_candle_of_the_range_is_stored_whichever_end_the_exchange_answers(
    tmp_path, newest_first
):
    spec = SymbolSpec("BTC/USDT")
    source = memory(spec, newest_first=newest_first)
    outcome, store, coverage, _ = await backfill(tmp_path, source)
    assert outcome.status == COMPLETED
    assert stored(store) == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert coverage == [(START_MS, END_MS)]
    # Every request asked for a window one page can hold, never the job's far end.
    assert all(until - since < 300 * MIN for _, _, _, since, until in source.calls)


async def test_a_page_smaller_than_asked_costs_requests_not_candles(tmp_path):
    # OKX's history endpoint was reported to answer 100 where 300 were asked: the newest 100.
    spec = SymbolSpec("BTC/USDT", gaps=[(START_MS + 150 * MIN, START_MS + 160 * MIN)])
    source = memory(spec, newest_first=True, answer_cap=100)
    outcome, store, coverage, _ = await backfill(tmp_path, source)
    assert outcome.status == COMPLETED
    assert stored(store) == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert coverage == [(START_MS, END_MS)]


async def test_a_range_before_the_listing_is_a_proven_hole_and_the_rest_is_stored(tmp_path):
    listed = START_MS + 437 * MIN
    spec = SymbolSpec("BTC/USDT", listed_at_ms=listed)
    outcome, store, coverage, _ = await backfill(tmp_path, memory(spec, newest_first=True))
    assert outcome.status == COMPLETED
    assert stored(store)[0][0] == listed
    assert stored(store) == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert coverage == [(START_MS, END_MS)]


async def test_rejected_candles_stay_out_of_the_ledger_and_are_fetched_again(tmp_path):
    spec = SymbolSpec("BTC/USDT")
    bad = frozenset(START_MS + n * MIN for n in range(300, 600))  # a whole page of bad candles
    outcome, store, coverage, recorder = await backfill(tmp_path, memory(spec, corrupt=bad))
    assert outcome.rejected["ohlc_inconsistent"] == 300
    assert coverage == [(START_MS, START_MS + 300 * MIN), (START_MS + 600 * MIN, END_MS)]
    assert len(stored(store)) == 700
    assert recorder.named("candle_rejected")


async def test_history_older_than_the_exchange_serves_is_reported_not_recorded(tmp_path):
    spec = SymbolSpec("BTC/USDT")
    source = memory(spec)
    source.capabilities = Capabilities(max_page_size=300, reach_candles=720)
    earliest = earliest_served(source.capabilities, NOW_MS, grid_of("1m"))
    outcome, store, coverage, recorder = await backfill(tmp_path, source)
    assert earliest > START_MS
    assert outcome.status == FAILED and not outcome.retryable
    assert "not served" in (outcome.error or "")
    [event] = recorder.named("history_unavailable")
    assert event["earliest_ms"] == earliest
    assert coverage == [(earliest, END_MS)]
    assert stored(store) == expected_candles(spec, "1m", earliest, END_MS, NOW_MS)
    assert all(since >= earliest for _, _, _, since, _ in source.calls)
