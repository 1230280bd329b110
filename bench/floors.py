"""The CPU floors under the throughput benchmark's figure, each part measured alone.

Whole-process CPU per stored candle cannot go below the sum of what its unavoidable parts
cost on this machine, however the pipeline around them is arranged:

- start-up and shutdown: a one-page history run, spread over the throughput run's candles;
- the request path: ccxt building and sending klines requests, aiohttp, and the klines parser,
  with no limiter, no store and no other work (`CcxtExchange.fetch_ohlcv` in a loop);
- DuckDB: the real store writing 1,000-candle pages with the table's columns (indicators
  included), at the group size the collector reaches at its budget and at a size that only a
  long commit delay or many pages in flight per job would give.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tda_collector.exchange.ccxt_source import CcxtExchange
from tda_collector.indicators import IndicatorSpec, compute, initial_state
from tda_collector.models import BASE_COLUMNS, CandleBatch, JobKey
from tda_collector.modes.indicator_stage import indicator_columns
from tda_collector.observability.events import EventLog
from tda_collector.store.duckdb_store import DuckDBStore

from .harness import (
    ccxt_options,
    fake_exchange,
    run_measured,
    synthetic_symbols,
    write_collector_config,
)
from .throughput import MIN_MS, PAGE, _range, history_argv

THROUGHPUT_CANDLES = 1_000_000  # what one throughput run stores (1,000 requests × 1,000)


@dataclass
class Floor:
    part: str
    cpu_us_per_candle: float
    detail: str


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def startup() -> Floor:
    start_ms, end_ms = _range(1)
    with tempfile.TemporaryDirectory() as tmp, fake_exchange(1, None, 0.0) as fake:
        config = write_collector_config(
            Path(tmp), fake.base_url, synthetic_symbols(1), 50, 0.9, concurrency=32
        )
        measured = run_measured(history_argv(config, start_ms, end_ms))
    return Floor(
        "start-up and shutdown",
        measured.cpu_s * 1e6 / THROUGHPUT_CANDLES,
        f"{measured.cpu_s:.2f} s for a one-page run, over {THROUGHPUT_CANDLES:,} candles",
    )


async def _fetch_pages(base_url: str, tasks: int, pages: int) -> tuple[int, float]:
    exchange = CcxtExchange("binance", ccxt_options(base_url))
    await exchange.open()
    start_ms, end_ms = _range(pages + 1)

    async def pages_of(symbol: str, count: int) -> int:
        since, candles = start_ms, 0
        for _ in range(count):
            page = await exchange.fetch_ohlcv(symbol, "1m", since, end_ms - 1, PAGE)
            candles += len(page)
            since = int(page[-1][0]) + MIN_MS
        return candles

    symbols = synthetic_symbols(tasks)
    try:
        await pages_of(symbols[0], 3)  # connections and caches warm
        before = _cpu_s()
        counts = await asyncio.gather(*(pages_of(s, pages) for s in symbols))
        return sum(counts), _cpu_s() - before
    finally:
        await exchange.close()


def request_path(tasks: int = 8, pages: int = 100) -> Floor:
    with fake_exchange(tasks, None, 0.0) as fake:
        candles, cpu_s = asyncio.run(_fetch_pages(fake.base_url, tasks, pages))
    return Floor(
        "request path (ccxt, aiohttp, klines parser)",
        cpu_s * 1e6 / candles,
        f"{candles:,} candles from {tasks} tasks, no limiter and no store",
    )


def _pages(count: int, spec: IndicatorSpec) -> list[CandleBatch]:
    """`count` 1,000-candle pages of 100 series with their indicator columns."""
    rng = np.random.default_rng(7)
    pages = []
    for i in range(count):
        key = JobKey("binance", f"SYM{i % 100:04d}/USDT", "1m")
        first_ms = 1_600_000_000_000 + (i // 100) * PAGE * MIN_MS
        close = np.round(100 + np.cumsum(rng.normal(0, 0.1, PAGE)), 2)
        extra, _ = compute(close, initial_state(spec), spec)
        pages.append(
            CandleBatch(
                key=key,
                timestamps=first_ms + np.arange(PAGE, dtype=np.int64) * MIN_MS,
                open=close,
                high=close + 0.02,
                low=close - 0.02,
                close=close,
                volume=np.round(rng.exponential(100, PAGE), 3),
                closed=np.ones(PAGE, dtype=bool),
                extra=extra,
            )
        )
    return pages


async def _write_groups(path: str, pages: list[CandleBatch], group: int, spec: IndicatorSpec):
    events = EventLog(logging.getLogger("bench.floors"))
    store = DuckDBStore(
        path, events, indicator_columns(spec), batch_rows=group * PAGE, batch_seconds=3600
    )
    await store.ensure()
    before = _cpu_s()
    for at in range(0, len(pages), group):
        await asyncio.gather(*(store.write(page) for page in pages[at : at + group]))
    await store.close()  # the last checkpoint belongs to the cost
    return _cpu_s() - before, store.commits


def duckdb_rows(group: int, pages: int = 600) -> Floor:
    spec = IndicatorSpec()
    batches = _pages(pages, spec)
    with tempfile.TemporaryDirectory() as tmp:
        cpu_s, commits = asyncio.run(_write_groups(f"{tmp}/f.duckdb", batches, group, spec))
    columns = len(BASE_COLUMNS) + len(spec.column_names())
    return Floor(
        f"DuckDB, {group} pages a commit",
        cpu_s * 1e6 / (pages * PAGE),
        f"{pages * PAGE:,} rows of {columns} columns in {commits} commits",
    )


def run(collector_group: int = 3, large_group: int = 150) -> None:
    started = datetime.now(UTC)
    floors = [
        startup(),
        request_path(),
        duckdb_rows(collector_group),
        duckdb_rows(large_group),
    ]
    print("| part | CPU µs/candle | measured on |")
    print("|---|---|---|")
    for floor in floors:
        print(f"| {floor.part} | {floor.cpu_us_per_candle:.2f} | {floor.detail} |")
    start_up, requests, at_budget, large = (f.cpu_us_per_candle for f in floors)
    print(
        f"\nsum of floors, DuckDB at the collector's group size: "
        f"{start_up + requests + at_budget:.2f} µs/candle; "
        f"with DuckDB's large transactions: {start_up + requests + large:.2f} "
        f"(then still without validation, indicators, ledger and events)"
    )
    print(f"(started {started:%Y-%m-%d %H:%M} UTC)")
