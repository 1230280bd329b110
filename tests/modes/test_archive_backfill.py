"""History mode over the public archive: the bulk from files, REST only for the tail and the
holes, through the one normaliser, indicator and store path; the real collector against the
fake archive host and the fake REST exchange on loopback, into DuckDB."""

from __future__ import annotations

import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from collector_support import (
    events_named,
    free_port,
    run_in_process,
    start_subprocess,
    wait_for_event,
    write_config,
)
from fake_archive import SPOT_MICROSECONDS_FROM_MS, FakeArchive
from fake_binanceusdm import FakeBinanceUsdm
from fake_binanceusdm import ccxt_options as usdm_options
from fake_exchange import FakeExchange, SymbolSpec, expected_candles
from store_support import read_duckdb_rows

from tda_collector.cli import main
from tda_collector.models import JobKey

DAY_MS, HOUR_MS = 86_400_000, 3_600_000
JAN_2025 = SPOT_MICROSECONDS_FROM_MS
DEC_2024 = JAN_2025 - 31 * DAY_MS
FEB_2025 = JAN_2025 + 31 * DAY_MS
NOW_MS = FEB_2025 + 19 * DAY_MS + 12 * HOUR_MS  # 2025-02-20T12:00Z
TODAY = NOW_MS - 12 * HOUR_MS
SPECS = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")]
SYMBOLS = [s.symbol for s in SPECS]
TIMEFRAMES = ["1m", "1h"]
START = "2024-12-01"
# The holes the archive leaves, each a span REST must fill.
MISSING_DAY = "BTCUSDT-1m-2025-02-05.zip"  # 404
DROPPED_HOUR = (JAN_2025 + 9 * DAY_MS + 3 * HOUR_MS, JAN_2025 + 9 * DAY_MS + 4 * HOUR_MS)
BAD_CHECKSUM = "ETHUSDT-1m-2025-02-10.zip"
OHLCV = ("timestamp_ms", "open", "high", "low", "close", "volume")
PLAIN = ("timestamp", "open", "high", "low", "close", "volume", "is_closed")
INDICATORS = ("rsi_6", "rsi_14", "rsi_24", "ema_12", "ema_26", "macd", "macd_signal", "macd_hist")
HOLES = {
    ("BTCUSDT", "1m"): [(FEB_2025 + 4 * DAY_MS, FEB_2025 + 5 * DAY_MS), DROPPED_HOUR],
    ("ETHUSDT", "1m"): [(FEB_2025 + 9 * DAY_MS, FEB_2025 + 10 * DAY_MS)],
}


def archive_host(**knobs) -> FakeArchive:
    knobs.setdefault("clock", lambda: NOW_MS / 1000)
    return FakeArchive(
        SPECS,
        missing=[MISSING_DAY],
        drop={"BTCUSDT-1m-2025-01.zip": DROPPED_HOUR},
        bad_checksum=[BAD_CHECKSUM],
        **knobs,
    )


@pytest.fixture
def rest():
    with FakeExchange(SPECS, clock=lambda: NOW_MS / 1000) as fake:
        yield fake


def history(capsys, config: Path) -> tuple[int, list[dict]]:
    return run_in_process(capsys, config, "--mode=history", f"--start={START}")


def stored(db: Path, symbol: str, timeframe: str) -> list[dict]:
    rows = read_duckdb_rows(str(db), JobKey("binance", symbol, timeframe))
    return [{k: v for k, v in row.items() if k != "ingested_at"} for row in rows]


def assert_exact(db: Path) -> None:
    for spec in SPECS:
        for timeframe in TIMEFRAMES:
            rows = read_duckdb_rows(str(db), JobKey("binance", spec.symbol, timeframe))
            got = [tuple(r[k] for k in OHLCV) for r in rows]
            start = DEC_2024
            assert got == expected_candles(spec, timeframe, start, NOW_MS, NOW_MS)
            assert all(r["is_closed"] for r in rows)


def rest_spans(fake: FakeExchange) -> dict[tuple[str, str], list[tuple[int, int]]]:
    asked: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for r in fake.klines_requests():
        key = (r.params["symbol"], r.params["interval"])
        asked.setdefault(key, []).append((int(r.params["startTime"]), int(r.params["endTime"])))
    return asked


def test_a_backfill_crossing_2025_takes_files_and_asks_rest_only_for_the_tail_and_the_holes(
    tmp_path, capsys, rest
):
    with archive_host() as archive:
        config = write_config(
            tmp_path, rest.base_url, SYMBOLS, TIMEFRAMES, archive={"base_url": archive.base_url}
        )
        code, events = history(capsys, config)
        assert code == 0, events[-1]
        assert_exact(tmp_path / "ohlcv.duckdb")

        # REST was asked for today (every series) and for each hole, nothing else.
        for (market, timeframe), spans in rest_spans(rest).items():
            allowed = [(TODAY, NOW_MS), *HOLES.get((market, timeframe), [])]
            for since, until in spans:
                assert any(a <= since and until < b for a, b in allowed), (market, since)
        # A 1m day is two pages, an hour one, today one; one 1h page of today per symbol.
        assert len(rest.klines_requests()) == (1 + 2 + 1) + (1 + 2) + 2
        summary = events_named(events, "history_complete")[0]
        assert summary["requests"] == 9
        assert summary["archive_files"] == len(events_named(events, "archive_file_done"))
        assert summary["archive_bytes"] > 0

        done = events_named(events, "archive_file_done")
        assert {e["source"] for e in done} == {"archive"}
        assert (
            sum(e["rows"] for e in done)
            + sum(e["rows"] for e in events_named(events, "history_page_done"))
            == events_named(events, "history_complete")[0]["rows"]
        )
        assert [e["file"] for e in events_named(events, "archive_file_corrupt")] == [BAD_CHECKSUM]
        assert any(e["holes"] == 1 for e in done if e["file"] == "BTCUSDT-1m-2025-01.zip")

        # A rerun asks nothing of either host.
        rest.reset_log()
        archive.reset_log()
        code, events = history(capsys, config)
        assert code == 0
        assert rest.klines_requests() == [] and archive.archive_requests() == []
        rerun = events_named(events, "history_complete")[0]
        assert (rerun["requests"], rerun["archive_files"], rerun["archive_bytes"]) == (0, 0, 0)


def test_archived_candles_are_stored_exactly_as_rest_candles_indicators_and_all(
    tmp_path, capsys, rest
):
    (tmp_path / "a").mkdir()
    (tmp_path / "r").mkdir()
    with archive_host() as archive:
        by_archive = write_config(
            tmp_path / "a",
            rest.base_url,
            SYMBOLS,
            TIMEFRAMES,
            archive={"base_url": archive.base_url},
        )
        by_rest = write_config(tmp_path / "r", rest.base_url, SYMBOLS, TIMEFRAMES)
        assert history(capsys, by_archive)[0] == 0
        assert history(capsys, by_rest)[0] == 0
    for symbol in SYMBOLS:
        for timeframe in TIMEFRAMES:
            archived = stored(tmp_path / "a" / "ohlcv.duckdb", symbol, timeframe)
            fetched = stored(tmp_path / "r" / "ohlcv.duckdb", symbol, timeframe)
            assert len(archived) == len(fetched) and archived[-1]["rsi_14"] is not None
            for a, r in zip(archived, fetched, strict=True):
                # Prices, volumes, times and is_closed bit for bit; the indicators are the one
                # indicator stage's, whose blocked recurrence rounds by where batches split
                # (a REST page: 1,000 candles, a file: a day or a month), to ~1e-15 a step.
                assert {k: a[k] for k in PLAIN} == {k: r[k] for k in PLAIN}
                for k in INDICATORS:  # NULL (warm-up) on the same rows
                    assert (a[k] is None) == (r[k] is None)
                    assert a[k] is None or a[k] == pytest.approx(r[k], rel=1e-9, abs=1e-6)


def covered(state: Path, symbol: str, timeframe: str) -> list[tuple[int, int]]:
    with sqlite3.connect(state) as db:
        return db.execute(
            "SELECT start_ms, end_ms FROM coverage WHERE symbol=? AND timeframe=?",
            (symbol, timeframe),
        ).fetchall()


def test_kill_9_mid_run_then_rerun_is_exact_and_refetches_at_most_one_file_per_job(
    tmp_path, capsys, rest
):
    with archive_host(latency_s=0.05) as archive:
        config = write_config(
            tmp_path, rest.base_url, SYMBOLS, TIMEFRAMES, archive={"base_url": archive.base_url}
        )
        proc = start_subprocess(config, "--mode=history", f"--start={START}")
        try:
            for _ in range(8):
                wait_for_event(proc, "archive_file_done", timeout_s=60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        first = {r.path.rsplit("/", 1)[-1] for r in archive.archive_requests() if r.status == 200}
        archive.reset_log()
        code, _ = history(capsys, config)
        assert code == 0
        assert_exact(tmp_path / "ohlcv.duckdb")
        again = [r.path.rsplit("/", 1)[-1] for r in archive.archive_requests() if r.status == 200]
        refetched = {name for name in again if name in first} - {BAD_CHECKSUM}
        per_job: dict[tuple[str, str], int] = {}
        for name in refetched:
            market, interval, _ = name.split("-", 2)
            per_job[(market, interval)] = per_job.get((market, interval), 0) + 1
        assert all(count <= 1 for count in per_job.values()), per_job


def test_an_archive_host_that_cannot_be_reached_costs_one_event_and_rest_does_it_all(
    tmp_path, capsys, rest
):
    closed = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, rest.base_url, SYMBOLS, ["1h"], archive={"base_url": closed})
    code, events = history(capsys, config)
    assert code == 0
    assert len(events_named(events, "archive_unavailable")) == 1
    for spec in SPECS:
        rows = read_duckdb_rows(
            str(tmp_path / "ohlcv.duckdb"), JobKey("binance", spec.symbol, "1h")
        )
        assert len(rows) == len(expected_candles(spec, "1h", DEC_2024, NOW_MS, NOW_MS))


def test_usdm_futures_files_with_and_without_a_header_store_exactly_the_rest_candles(
    tmp_path, capsys
):
    may, june = 1_714_521_600_000, 1_717_200_000_000  # 2024-05-01, 2024-06-01
    april = may - 30 * DAY_MS
    btc = SymbolSpec("BTC/USDT")
    clock = {"clock": lambda: (june + 30_000) / 1000}
    with (
        FakeBinanceUsdm([btc], **clock) as fapi,
        FakeArchive(
            [btc],
            market_path="data/futures/um",
            microseconds_from_ms=None,
            header_from_ms=may,
            **clock,
        ) as archive,
    ):
        config = write_config(
            tmp_path,
            fapi.base_url,
            ["BTC/USDT:USDT"],
            ["1m", "1h"],
            exchange_id="binanceusdm",
            ccxt=usdm_options(fapi.base_url),
            archive={"base_url": archive.base_url},
        )
        code, events = run_in_process(
            capsys, config, "--mode=history", "--start=2024-04-01", "--end=2024-06-01"
        )
        assert code == 0, events[-1]
        files = [e["file"] for e in events_named(events, "archive_file_done")]
        # April as monthly files (no header), May as daily files (with one).
        assert "BTCUSDT-1m-2024-04.zip" in files and "BTCUSDT-1h-2024-05-31.zip" in files
        assert events_named(events, "history_complete")[0]["requests"] == 0
    for timeframe in ("1m", "1h"):
        rows = read_duckdb_rows(
            str(tmp_path / "ohlcv.duckdb"), JobKey("binanceusdm", "BTC/USDT:USDT", timeframe)
        )
        got = [tuple(r[k] for k in OHLCV) for r in rows]
        assert got == expected_candles(btc, timeframe, april, june, june + 30_000)


def post(port: int, path: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def test_a_job_paused_during_the_archive_pass_stops_between_files_and_resumes_exactly(
    tmp_path, rest
):
    port = free_port()
    job = "/jobs/binance:BTC-USDT:1m:history"
    with archive_host(latency_s=0.05) as archive:
        config = write_config(
            tmp_path,
            rest.base_url,
            SYMBOLS,
            TIMEFRAMES,
            archive={"base_url": archive.base_url},
            admin={"port": port},
        )
        proc = start_subprocess(config, "--mode=history", f"--start={START}")
        try:
            while True:
                event, _ = wait_for_event(proc, "archive_file_done", timeout_s=60)
                if (event["symbol"], event["timeframe"]) == ("BTC/USDT", "1m"):
                    break
            assert post(port, job + "/pause") == 200
            btc_1m = [r for r in archive.archive_requests() if "/BTCUSDT/1m/" in r.path]
            time.sleep(1.0)
            later = [r for r in archive.archive_requests() if "/BTCUSDT/1m/" in r.path]
            assert len(later) <= len(btc_1m) + 1  # at most the file in flight when paused
            assert post(port, job + "/resume") == 200
            wait_for_event(proc, "history_complete", timeout_s=120)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
    assert_exact(tmp_path / "ohlcv.duckdb")


def test_asking_for_an_archive_an_exchange_does_not_publish_is_a_usage_error(
    tmp_path, capsys, rest
):
    config = write_config(
        tmp_path, rest.base_url, SYMBOLS, ["1h"], exchange_id="binanceus", archive={"enabled": True}
    )
    capsys.readouterr()
    assert main(["--config", str(config), "--mode=history", f"--start={START}"], environ={}) == 2
    assert capsys.readouterr().err.strip() == (
        "tda-collector: error: exchanges[0].archive.enabled: no known archive for binanceus "
        "(known: binance, binancecoinm, binanceusdm)"
    )
