"""`GET /ohlcv` from a running live collector, over real HTTP, on DuckDB and on BigQuery (the
emulator): the fake exchange's candles exactly, with the indicators as stored, as JSON pages,
CSV and Parquet; bad input answered with one line and nothing changed."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from bigquery_support import (
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    emulator_url,
    read_latest,
)
from collector_support import write_config
from daemon_support import (
    admin_settings,
    live_daemon,
    parse_csv,
    parse_parquet,
    storage_settings,
)
from fake_exchange import FakeExchange, SymbolSpec, expected_candles
from multidict import MultiDict
from store_support import read_duckdb_rows

from tda_collector.admin.ohlcv_api import MAX_PAGE_ROWS, parse_request
from tda_collector.models import JobKey

MIN = 60_000
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
BACKENDS = ["duckdb", "bigquery"]
SERIES = {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
PRICES = ("open", "high", "low", "close", "volume")
INDICATORS = ("rsi_6", "rsi_14", "rsi_24", "ema_12", "ema_26", "macd", "macd_signal", "macd_hist")


def start_collector(backend: str, tmp_path, fake: FakeExchange, **settings: Any):
    port, admin = admin_settings()
    config = write_config(
        tmp_path,
        fake.base_url,
        SYMBOLS,
        ["1m", "1h"],
        storage=storage_settings(backend, tmp_path),
        admin=admin,
        live_initial_candles=200,
        update_interval_seconds=1,  # the candle in progress is rewritten every second
        **settings,
    )
    return live_daemon(config, port), config


def ms_of(value: Any) -> int:
    """Epoch ms of an ISO string (the API), an aware datetime (a parsed file) or ms."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as comparable dicts: times in epoch ms, the series columns left out."""
    skip = {"exchange", "symbol", "timeframe", "timestamp_ms"}
    out = []
    for row in rows:
        item = {k: v for k, v in row.items() if k not in skip}
        item["timestamp"] = ms_of(row["timestamp"])
        item["ingested_at"] = ms_of(row["ingested_at"])
        out.append(item)
    return out


def json_pages(daemon, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Every row of a range through the JSON pages, following `next`; and the page count."""
    rows, pages, start = [], 0, params["start"]
    while start is not None:
        answer = daemon.get("/ohlcv", {**params, "start": start})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert {k: body[k] for k in SERIES} == {k: params[k] for k in SERIES}
        rows += body["rows"]
        pages += 1
        start = body["next"]
    return rows, pages


def stored(backend: str, config_storage: dict[str, Any], tmp_path, key: JobKey) -> list[dict]:
    if backend == "duckdb":
        return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), key)
    dataset = config_storage["bigquery"]["dataset"]
    return read_latest(emulator_client(emulator_url()), dataset, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_range_reads_back_exactly_as_json_pages_csv_and_parquet_while_live_runs(
    backend, tmp_path, request
):
    if backend == "bigquery":
        request.getfixturevalue("bigquery_emulator")
    with FakeExchange([SymbolSpec(s) for s in SYMBOLS], clock=time.time) as fake:
        daemon_cm, config = start_collector(backend, tmp_path, fake)
        with daemon_cm as daemon:
            now_ms = int(time.time() * 1000)
            end = now_ms - now_ms % MIN - 2 * MIN  # closed for sure: no later version comes
            start = end - 150 * MIN
            params = {**SERIES, "start": start, "end": end, "closed_only": "true", "limit": 40}
            rows, pages = json_pages(daemon, params)
            whole = {**SERIES, "start": start, "end": end}
            csv_table = parse_csv(daemon.get("/ohlcv", {**whole, "format": "csv"}).content)
            parquet_answer = daemon.get("/ohlcv", {**whole, "format": "parquet"})
            assert daemon.stop() == 0
        storage = __import__("yaml").safe_load(config.read_text())["storage"]
        truth = stored(backend, storage, tmp_path, JobKey("binance", "BTC/USDT", "1m"))

    expected = expected_candles(SymbolSpec("BTC/USDT"), "1m", start, end, now_ms)
    assert pages == 4 and len(expected) == 150
    assert [(ms_of(r["timestamp"]), *(r[p] for p in PRICES)) for r in rows] == expected
    assert all(r["is_closed"] is True for r in rows)
    assert all(r[name] is not None for r in rows[-100:] for name in INDICATORS)
    in_range = [r for r in truth if start <= r["timestamp_ms"] < end]
    assert normalized(rows) == normalized(in_range)  # every column, exactly as stored
    assert normalized(csv_table.to_pylist()) == normalized(in_range)
    assert parquet_answer.headers["Content-Type"] == "application/vnd.apache.parquet"
    assert normalized(parse_parquet(parquet_answer.content).to_pylist()) == normalized(in_range)


@pytest.fixture(scope="module", params=BACKENDS)
def running(request, tmp_path_factory):
    """One live collector per store for the tests below, with its fake exchange."""
    if request.param == "bigquery":
        request.getfixturevalue("bigquery_emulator")
    tmp_path = tmp_path_factory.mktemp(request.param)
    with FakeExchange([SymbolSpec(s) for s in SYMBOLS], clock=time.time) as fake:
        daemon_cm, _ = start_collector(request.param, tmp_path, fake)
        with daemon_cm as daemon:
            yield daemon


def window(minutes: int = 60) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    end = now_ms - now_ms % MIN - 2 * MIN
    return {**SERIES, "start": end - minutes * MIN, "end": end}


def settled_minute() -> None:
    """Wait until the minute in progress is some seconds old and not about to turn: the live
    loop has written its candle (on a loaded machine BigQuery takes seconds to show it)."""
    second = time.time() % 60
    if not 10 <= second <= 45:
        time.sleep((70 - second) % 60)


def test_iso_and_epoch_ms_ask_for_the_same_rows_and_the_open_candle_is_marked(running):
    settled_minute()
    params = window()
    iso = {
        **params,
        "start": datetime.fromtimestamp(params["start"] / 1000).astimezone().isoformat(),
        "end": "2999-01-01",  # the future: up to the candle in progress
    }
    by_ms = running.get("/ohlcv", {**params, "end": 32_503_680_000_000}).json()["rows"]
    by_iso = running.get("/ohlcv", iso).json()["rows"]
    ms_stamps, iso_stamps = [r["timestamp"] for r in by_ms], [r["timestamp"] for r in by_iso]
    assert iso_stamps[: len(ms_stamps)] == ms_stamps and len(iso_stamps) - len(ms_stamps) in (0, 1)
    # 60 closed minutes, the 2 after them, and the one in progress (one more if a minute
    # turned between the two calls)
    assert by_iso[0]["timestamp"].endswith(":00Z") and len(by_iso) in (63, 64)
    assert by_iso[-1]["is_closed"] is False
    assert all(r["is_closed"] for r in by_iso[:-1])
    closed = running.get("/ohlcv", {**iso, "closed_only": "true"}).json()["rows"]
    assert all(r["is_closed"] for r in closed) and len(closed) in (len(by_iso) - 1, len(by_iso))


def test_a_known_series_with_nothing_stored_is_200_with_no_rows(running):
    old = {**SERIES, "start": "2020-01-01", "end": "2020-02-01"}
    answer = running.get("/ohlcv", old)
    assert answer.status_code == 200
    assert answer.json() == {**SERIES, "rows": [], "next": None}
    csv = running.get("/ohlcv", {**old, "format": "csv"})
    assert csv.status_code == 200 and csv.content.startswith(b'"timestamp"')
    assert csv.content.count(b"\n") == 1  # the header row alone
    parquet = running.get("/ohlcv", {**old, "format": "parquet"})
    table = parse_parquet(parquet.content)
    assert table.num_rows == 0 and "rsi_14" in table.column_names


def test_a_limit_above_the_cap_is_answered_with_a_capped_page(running):
    answer = running.get("/ohlcv", {**window(60 * 24), "limit": 10**12})
    assert answer.status_code == 200 and answer.json()["rows"]
    known = {JobKey("binance", "BTC/USDT", "1m")}
    query = MultiDict({**SERIES, "start": "2024-01-01", "end": "2024-02-01", "limit": "10000000"})
    assert parse_request(query, known).query.limit == MAX_PAGE_ROWS + 1  # one more: the next


INJECTED = [
    "BTC/USDT' OR '1'='1",
    'BTC/USDT"; DROP TABLE market_data_ohlcv; --',
    "BTC/USDT') UNION SELECT * FROM market_data_ohlcv --",
]
BAD = [
    ({"exchange": "kraken"}, "exchange"),
    ({"symbol": "DOGE/USDT"}, "symbol"),
    ({"timeframe": "5m"}, "timeframe"),
    ({"timeframe": "1x"}, "timeframe"),
    *(({"symbol": text}, "symbol") for text in INJECTED),
    ({"exchange": "binance' OR 1=1 --"}, "exchange"),
    ({"start": "yesterday"}, "start"),
    ({"start": "2024-13-45"}, "start"),
    ({"end": "99999999999999999999"}, "end"),
    ({"end": "-5"}, "end"),
    ({"start": "2024-03-01", "end": "2024-03-01"}, "start"),
    ({"start": "2024-03-02", "end": "2024-03-01"}, "start"),
    ({"limit": "0"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "1e400"}, "limit"),
    ({"limit": "10", "format": "csv"}, "limit"),
    ({"format": "xml"}, "format"),
    ({"closed_only": "maybe"}, "closed_only"),
    ({"timefame": "1m"}, "timefame"),
    ({"start": None}, "start"),
    ({"exchange": None}, "exchange"),
]


def test_bad_input_is_a_400_naming_the_parameter_and_changes_nothing(running):
    base = {**SERIES, "start": "2024-01-01", "end": "2999-01-01"}
    stored = {**base, "closed_only": "true", "end": window()["end"]}  # closed: no new version
    before = running.get("/ohlcv", stored)
    for change, named in BAD:
        params = {k: v for k, v in {**base, **change}.items() if v is not None}
        answer = running.get("/ohlcv", params)
        assert answer.status_code == 400, (change, answer.text)
        assert answer.headers["Content-Type"].startswith("application/json")
        error = answer.json()["error"]
        assert list(answer.json()) == ["error"] and "\n" not in error
        assert error.startswith(f"{named}:"), (change, error)
    twice = running.get("/ohlcv?" + "&".join(f"{k}={v}" for k, v in base.items()) + "&limit=5")
    assert twice.status_code == 200
    doubled = running.get("/ohlcv", [*base.items(), ("symbol", "ETH/USDT")])
    assert doubled.status_code == 400 and doubled.json()["error"].startswith("symbol:")
    after = running.get("/ohlcv", stored)
    assert after.json() == before.json()
    assert running.get("/healthz").status_code == 200
