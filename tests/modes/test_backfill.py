"""One history job's pages: windows a page can hold, and a ledger of only what pages proved."""

from __future__ import annotations

import asyncio

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S
from fake_exchange import SymbolSpec, expected_candles
from memory_source import MemorySource
from pipeline_support import backfill_one

from tda_collector.exchange.source import Capabilities
from tda_collector.jobs.model import COMPLETED, FAILED
from tda_collector.models import JobKey
from tda_collector.modes.backfill import earliest_served
from tda_collector.timeframes import grid_of

MIN = 60_000
NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS
START_MS = END_MS - 1000 * MIN
KEY = JobKey("okx", "BTC/USDT", "1m")


async def backfill(tmp_path, source: MemorySource, page: int = 300):
    """Run one job over [START, END) against `source`."""
    return await backfill_one(tmp_path, source, KEY, START_MS, END_MS, page)


def memory(spec: SymbolSpec, **knobs) -> MemorySource:
    return MemorySource([spec], lambda: FROZEN_NOW_S, asyncio.sleep, page_size=300, **knobs)


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest-first", "newest-first"])
async def test_every_candle_of_the_range_is_stored_whichever_end_the_exchange_answers(
    tmp_path, newest_first
):
    spec = SymbolSpec("BTC/USDT")
    source = memory(spec, newest_first=newest_first)
    run = await backfill(tmp_path, source)
    assert run.outcome.status == COMPLETED
    assert run.rows == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert run.coverage == [(START_MS, END_MS)]
    # Every request asked for a window one page can hold, never the job's far end.
    assert all(until - since < 300 * MIN for _, _, _, since, until in source.calls)


async def test_a_page_smaller_than_asked_costs_requests_not_candles(tmp_path):
    # OKX's history endpoint was reported to answer 100 where 300 were asked: the newest 100.
    spec = SymbolSpec("BTC/USDT", gaps=[(START_MS + 150 * MIN, START_MS + 160 * MIN)])
    source = memory(spec, newest_first=True, answer_cap=100)
    run = await backfill(tmp_path, source)
    assert run.outcome.status == COMPLETED
    assert run.rows == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert run.coverage == [(START_MS, END_MS)]


async def test_a_range_before_the_listing_is_a_proven_hole_and_the_rest_is_stored(tmp_path):
    listed = START_MS + 437 * MIN
    spec = SymbolSpec("BTC/USDT", listed_at_ms=listed)
    run = await backfill(tmp_path, memory(spec, newest_first=True))
    assert run.outcome.status == COMPLETED
    assert run.rows[0][0] == listed
    assert run.rows == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert run.coverage == [(START_MS, END_MS)]


async def test_rejected_candles_stay_out_of_the_ledger_and_are_fetched_again(tmp_path):
    spec = SymbolSpec("BTC/USDT")
    bad = frozenset(START_MS + n * MIN for n in range(300, 600))  # a whole page of bad candles
    run = await backfill(tmp_path, memory(spec, corrupt=bad))
    assert run.outcome.rejected["ohlc_inconsistent"] == 300
    assert run.coverage == [(START_MS, START_MS + 300 * MIN), (START_MS + 600 * MIN, END_MS)]
    assert len(run.rows) == 700
    assert run.events.named("candle_rejected")


async def test_history_older_than_the_exchange_serves_is_reported_not_recorded(tmp_path):
    spec = SymbolSpec("BTC/USDT")
    source = memory(spec)
    source.capabilities = Capabilities(max_page_size=300, reach_candles=720)
    earliest = earliest_served(source.capabilities, NOW_MS, grid_of("1m"))
    run = await backfill(tmp_path, source)
    assert earliest > START_MS
    assert run.outcome.status == FAILED and not run.outcome.retryable
    assert "not served" in (run.outcome.error or "")
    [event] = run.events.named("history_unavailable")
    assert event["earliest_ms"] == earliest
    assert run.coverage == [(earliest, END_MS)]
    assert run.rows == expected_candles(spec, "1m", earliest, END_MS, NOW_MS)
    assert all(since >= earliest for _, _, _, since, _ in source.calls)


async def test_a_newest_candle_not_yet_published_is_fetched_next_run_not_recorded_as_a_hole(
    tmp_path,
):
    # A run ending "now": the exchange publishes the candle that closed 30 s ago only later.
    spec = SymbolSpec("BTC/USDT")
    start, newest = NOW_MS - NOW_MS % MIN - 400 * MIN, NOW_MS - NOW_MS % MIN
    lagging = memory(spec, publication_lag_ms=90_000)
    first = await backfill_one(tmp_path, lagging, KEY, start, NOW_MS + DAY_MS, 300)
    assert first.outcome.status == COMPLETED
    assert first.rows == expected_candles(spec, "1m", start, newest - MIN, NOW_MS)
    assert first.coverage == [(start, newest - MIN)]
    [pending] = first.events.named("history_tail_pending")
    assert (pending["since"], pending["until"]) == (newest - MIN, newest)

    second = await backfill_one(tmp_path, memory(spec), KEY, start, NOW_MS + DAY_MS, 300)
    assert second.rows == expected_candles(spec, "1m", newest - MIN, newest, NOW_MS)
    assert second.coverage == [(start, newest)]
