"""History mode into BigQuery (the local emulator): exact rows in the view, committed in few
pending streams of the Storage Write API, with no load job and no insertAll request."""

from __future__ import annotations

from bigquery_support import (
    PROJECT,
    FaultProxy,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    count_stored,
    emulator_client,
    emulator_grpc,
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


def test_history_backfill_into_bigquery_is_exact_in_few_commits_without_load_jobs(
    bigquery_emulator, exchange_rig, capsys
):
    dataset = unique_dataset()
    rig = exchange_rig(SPECS)
    with FaultProxy(bigquery_emulator) as rest:  # counts the REST requests
        config = rig.config(
            timeframes=["1m", "1h"],
            page_limit=250,
            storage={
                "backend": "bigquery",
                "bigquery": {
                    "project": PROJECT,
                    "dataset": dataset,
                    "api_endpoint": rest.url,
                    "write_api_endpoint": emulator_grpc(),
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
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    client = emulator_client(bigquery_emulator)
    try:
        expected_rows = 0
        for spec in SPECS:
            for tf in ("1m", "1h"):
                rows = read_latest(client, dataset, JobKey("binance", spec.symbol, tf))
                got = [
                    (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
                    for r in rows
                ]
                assert got == expected_candles(spec, tf, START_MS, END_MS, NOW_MS), spec.symbol
                expected_rows += len(got)
        assert count_stored(client, dataset) == expected_rows  # each candle once in the table
    finally:
        client.close()
    pages = len(events_named(events, "history_page_done"))
    commits = len(events_named(events, "store_commit"))
    assert 1 <= commits <= pages / 4, (commits, pages)
    assert events_named(events, "store_load_job") == []
