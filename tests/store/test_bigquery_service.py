"""The live daemon steered over HTTP with BigQuery (the local emulator) as its store: a job
added at run time is collected and a backfill inside the daemon is exact in the view."""

from __future__ import annotations

from bigquery_support import (
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    emulator_grpc,
    read_latest,
    unique_dataset,
)
from collector_support import DAY_MS, FROZEN_NOW_S
from fake_exchange import SymbolSpec, expected_candles
from jobs_support import Collector, free_port, send

from tda_collector.models import JobKey

NOW_MS = int(FROZEN_NOW_S * 1000)
MIN = 60_000
START_MS = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS  # 2024-02-28
END_MS = START_MS + DAY_MS
BTC, ETH = "binance:BTC-USDT:1m:live", "binance:ETH-USDT:1m:live"


def prices(rows: list[dict]) -> list[tuple]:
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]


def test_jobs_added_and_backfilled_at_run_time_land_exactly_in_bigquery(
    bigquery_emulator, exchange_rig
):
    specs = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")]
    rig = exchange_rig(specs)
    dataset = unique_dataset()
    port = free_port()
    config = rig.config(
        ["BTC/USDT"],
        live_initial_candles=20,
        page_limit=500,
        admin={"host": "127.0.0.1", "port": port},
        storage={
            "backend": "bigquery",
            "bigquery": {
                "project": PROJECT,
                "dataset": dataset,
                "api_endpoint": bigquery_emulator,
                "write_api_endpoint": emulator_grpc(),
            },
        },
    )
    daemon = Collector(config, port, "--mode=live")
    try:
        daemon.wait_until(lambda: daemon.named("live_started"), timeout_s=60, what="live")
        job = {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m"}
        assert send(port, "POST", "/jobs", job)[0] == 201
        daemon.wait_until(lambda: daemon.job(ETH)["rows"] >= 20, timeout_s=60, what="ETH rows")
        status, answer = send(
            port, "POST", f"/jobs/{BTC}/backfill", {"start": START_MS, "end": END_MS}
        )
        assert status == 202
        history = answer["job"]["id"]
        done = daemon.wait_until(
            lambda: (
                daemon.job(history)["status"] in ("COMPLETED", "FAILED") and daemon.job(history)
            ),
            timeout_s=120,
            what="the backfill",
        )
        assert done["status"] == "COMPLETED", done["last_error"]
    finally:
        assert daemon.stop() == 0
    client = emulator_client(bigquery_emulator)
    try:
        btc = prices(read_latest(client, dataset, JobKey("binance", "BTC/USDT", "1m")))
        eth = read_latest(client, dataset, JobKey("binance", "ETH/USDT", "1m"))
    finally:
        client.close()
    assert [r for r in btc if START_MS <= r[0] < END_MS] == expected_candles(
        specs[0], "1m", START_MS, END_MS, NOW_MS
    )
    boundary = NOW_MS - NOW_MS % MIN
    closed = prices([r for r in eth if r["is_closed"]])
    assert closed == expected_candles(specs[1], "1m", boundary - 20 * MIN, boundary, NOW_MS)
