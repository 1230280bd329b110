"""A year of 1m read as Parquet from a running collector holds a chunk at a time, not the year.

Measured on the collector's peak RSS (the kernel's high-water mark, /proc/PID/status VmHWM):
a first read of a month pays what any read costs once (threads, allocator arenas, DuckDB's
buffer pool); a read of the whole year after it must add far less than the year's rows take
in memory, where holding the year would add all of it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from collector_support import FROZEN_NOW_S, write_config
from daemon_support import admin_settings, live_daemon
from fake_exchange import FakeExchange, SymbolSpec
from seeding import MIN, YEAR_OF_MINUTES, seed_minutes

from tda_collector.models import JobKey

KEY = JobKey("binance", "BTC/USDT", "1m")
NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % MIN - 1441 * MIN - YEAR_OF_MINUTES * MIN
END_MS = START_MS + YEAR_OF_MINUTES * MIN
# The month is read more than once before the year: with one read first, the growth measured
# over it varied from run to run (DuckDB 4-20 MiB, BigQuery 5-26 MiB; the reads run on
# several worker threads, each with its own allocator arena), with three 2-19 and 0-14.
WARM_UP_READS = 3


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def read_parquet(daemon, start_ms: int, end_ms: int) -> io.BytesIO:
    params = {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
    params |= {"start": start_ms, "end": end_ms, "format": "parquet"}
    body = io.BytesIO()
    with daemon.get("/ohlcv", params, stream=True) as answer:
        assert answer.status_code == 200
        for part in answer.iter_content(1 << 20):
            body.write(part)
    body.seek(0)
    return body


def test_a_year_of_1m_as_parquet_streams_with_bounded_memory(tmp_path):
    close_sum = seed_minutes(str(tmp_path / "ohlcv.duckdb"), KEY, START_MS, YEAR_OF_MINUTES)
    # DuckDB keeps blocks it read cached up to its memory limit (README: the default 32MB): a
    # small one keeps that cache from hiding in the growth measured.
    duckdb = {"path": str(tmp_path / "ohlcv.duckdb"), "memory_limit": "8MB"}
    peaks, body = year_read(tmp_path, {"backend": "duckdb", "duckdb": duckdb})
    check_the_year(body, close_sum, peaks, "DuckDB")


def year_read(
    tmp_path: Path, storage: dict[str, Any]
) -> tuple[tuple[float, float, float], io.BytesIO]:
    """A live collector on the seeded `storage` (BTC/USDT 1m against a fake exchange), read as
    `reads_measured` says."""
    with FakeExchange([SymbolSpec("BTC/USDT")], clock=lambda: FROZEN_NOW_S) as fake:
        port, admin = admin_settings()
        config = write_config(
            tmp_path,
            fake.base_url,
            ["BTC/USDT"],
            ["1m"],
            admin=admin,
            # Off, so that start-up does not recompute a year of indicators: the peak measured
            # before the read is the collector's own, the growth the read's.
            indicators={"enabled": False},
            storage=storage,
        )
        with live_daemon(config, port) as daemon:
            return reads_measured(daemon)


def reads_measured(daemon) -> tuple[tuple[float, float, float], io.BytesIO]:
    """The collector's peak RSS before any read, after a month's and after the year's (read
    as Parquet), and the year's body."""
    before = peak_rss_mib(daemon.proc.pid)
    for _ in range(WARM_UP_READS):
        read_parquet(daemon, START_MS, START_MS + 30 * 1440 * MIN)
    after_month = peak_rss_mib(daemon.proc.pid)
    body = read_parquet(daemon, START_MS, END_MS)
    return (before, after_month, peak_rss_mib(daemon.proc.pid)), body


def check_the_year(
    body: io.BytesIO,
    close_sum: float,
    peaks: tuple[float, float, float],
    store: str,
    share: float = 1 / 3,
) -> None:
    """Every seeded candle, in order, with its columns; and reading the year after the month
    added less than `share` of what the year takes in memory (holding it would add all)."""
    before, after_month, after_year = peaks
    table = pq.read_table(body)
    year_in_memory_mib = table.nbytes / 2**20
    print(
        f"{store}: peak RSS {before:.1f} MiB, after a month {after_month:.1f}, after the year "
        f"{after_year:.1f}; the year in Arrow {year_in_memory_mib:.1f} MiB"
    )
    assert table.num_rows == YEAR_OF_MINUTES
    stamps = pc.cast(table.column("timestamp"), pa.int64()).to_numpy() // 1000
    assert stamps[0] == START_MS and (stamps[1:] - stamps[:-1] == MIN).all()
    assert abs(pc.sum(table.column("close")).as_py() - close_sum) < 1e-6 * close_sum
    assert table.column("rsi_14").null_count == 0  # the stored indicator columns come along
    assert after_year - after_month < year_in_memory_mib * share
