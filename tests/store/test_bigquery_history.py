"""History mode into BigQuery (the local emulator): exact rows in the view, few load jobs."""

from __future__ import annotations

from bigquery_support import (
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    read_latest,
    unique_dataset,
)
from collector_support import DAY_MS, FROZEN_NOW_S, events_named, run_in_process
from fake_exchange import SymbolSpec, expected_candles

from tda_collector.models import JobKey

NOW_MS = int(FROZEN_NOW_S * 1000)
MIN = 60_000
START_MS = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS
END_MS = START_MS + 2 * DAY_MS
ARGS = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")
SPECS = [
    SymbolSpec("BTC/USDT"),
    SymbolSpec("LATE/USDT", listed_at_ms=START_MS + DAY_MS + 7 * MIN),
    SymbolSpec("GAP/USDT", gaps=[(START_MS + 600 * MIN, START_MS + 2100 * MIN)]),
]


def test_history_backfill_into_bigquery_is_exact_with_far_fewer_load_jobs_than_pages(
    bigquery_emulator, exchange_rig, capsys
):
    dataset = unique_dataset()
    rig = exchange_rig(SPECS)
    config = rig.config(
        timeframes=["1m", "1h"],
        page_limit=250,
        storage={
            "backend": "bigquery",
            "bigquery": {
                "project": PROJECT,
                "dataset": dataset,
                "api_endpoint": bigquery_emulator,
                "load_batch_seconds": 1.0,
            },
        },
        logging={"level": "DEBUG"},
    )
    code, events = run_in_process(capsys, config, *ARGS)
    assert code == 0
    rig.fake.reset_log()
    rerun_code, _ = run_in_process(capsys, config, *ARGS)
    assert rerun_code == 0 and rig.fake.klines_requests() == []
    client = emulator_client(bigquery_emulator)
    try:
        for spec in SPECS:
            for tf in ("1m", "1h"):
                rows = read_latest(client, dataset, JobKey("binance", spec.symbol, tf))
                got = [
                    (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
                    for r in rows
                ]
                assert got == expected_candles(spec, tf, START_MS, END_MS, NOW_MS), spec.symbol
    finally:
        client.close()
    pages = len(events_named(events, "history_page_done"))
    load_jobs = len(events_named(events, "store_load_job"))
    assert 1 <= load_jobs <= pages / 4, (load_jobs, pages)
