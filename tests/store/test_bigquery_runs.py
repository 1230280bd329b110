"""The collector as users run it, into BigQuery through the Storage Write API (the emulator):
a live run stores exactly the exchange's candles with no insertAll and no load job, and a
process killed with SIGKILL during live appends or history commits loses no candle and
writes none twice in the base table, once restarted."""

from __future__ import annotations

import signal
import time

from bigquery_support import (
    PROJECT,
    FaultProxy,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    client_fixture,  # noqa: F401 (registers the fixture)
    count_stored,
    emulator_grpc,
    unique_dataset,
)
from collector_support import (
    DAY_MS,
    FROZEN_NOW_S,
    parse_events,
    start_subprocess,
    stop,
    wait_for_event,
)
from fake_exchange import SymbolSpec, candle, expected_candles

MIN = 60_000
NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS
END_MS = START_MS + 2 * DAY_MS
# Off: after a crash between a write and its indicator state, the indicator stage rewrites the
# series' stored candles with recomputed values on purpose (new versions, see indicator_stage);
# these tests count the versions the store itself writes.
NO_INDICATORS = {"enabled": False}
HISTORY_ARGS = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")


class ShiftedClock:
    """Real time plus a shift the test can move (the world went on while we were down)."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def _storage(dataset: str, rest_url: str, **bigquery) -> dict:
    return {
        "backend": "bigquery",
        "bigquery": {
            "project": PROJECT,
            "dataset": dataset,
            "api_endpoint": rest_url,
            "write_api_endpoint": emulator_grpc(),
            **bigquery,
        },
    }


def _closed_rows(client, dataset: str) -> dict[str, list[tuple]]:
    """Every closed row of the base table (every version), per symbol, in time order."""
    sql = f"""SELECT symbol, UNIX_MILLIS(timestamp) AS ms, open, high, low, close, volume
FROM `{PROJECT}.{dataset}.market_data_ohlcv` WHERE is_closed IS NOT FALSE
ORDER BY symbol, timestamp"""
    found: dict[str, list[tuple]] = {}
    for r in client.query(sql).result():
        found.setdefault(r["symbol"], []).append(
            (r["ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
        )
    return found


def _kill_after(proc, event: str, count: int, timeout_s: float = 90) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.extend(parse_events(line))
        if sum(e["event"] == event for e in seen) >= count:
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert sum(e["event"] == event for e in seen) >= count, seen[-3:]
    return seen


def _latest(client, dataset: str, symbol: str) -> list[dict]:
    """What users query: the view, one row per key."""
    sql = f"""SELECT UNIX_MILLIS(timestamp) AS ms, open, high, low, close, volume, is_closed
FROM `{PROJECT}.{dataset}.market_data_ohlcv_latest` WHERE symbol = '{symbol}'
ORDER BY timestamp"""
    return [dict(r) for r in client.query(sql).result()]


def test_a_live_run_stores_the_exchanges_candles_without_insert_all_or_load_jobs(
    exchange_rig, client, bigquery_emulator
):
    symbols = ["BTC/USDT", "ETH/USDT"]
    rig = exchange_rig([SymbolSpec(s) for s in symbols], clock=time.time)
    dataset = unique_dataset()
    with FaultProxy(bigquery_emulator) as rest:
        config = rig.config(live_initial_candles=50, storage=_storage(dataset, rest.url))
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
    assert proc.returncode == 0
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    for symbol in symbols:
        rows = _latest(client, dataset, symbol)
        closed = [r for r in rows if r["is_closed"]]
        assert len(closed) >= 50 and [r for r in rows if not r["is_closed"]] == rows[len(closed) :]
        assert [tuple(list(r.values())[:6]) for r in closed] == [
            candle(symbol, "1m", r["ms"]) for r in closed
        ]
    for symbol, rows in _closed_rows(client, dataset).items():  # every closed version
        stamps = [r[0] for r in rows]
        assert len(stamps) == len(set(stamps)), f"{symbol}: a closed candle stored twice"


def test_live_killed_during_appends_then_restarted_stores_each_candle_once(
    exchange_rig, client, bigquery_emulator
):
    symbols = [f"S{i}/USDT" for i in range(6)]
    clock = ShiftedClock()
    rig = exchange_rig([SymbolSpec(s) for s in symbols], clock=clock, latency_s=0.01)
    dataset = unique_dataset()
    with FaultProxy(bigquery_emulator) as rest:
        config = rig.config(
            live_initial_candles=400,
            page_limit=20,
            storage=_storage(dataset, rest.url),
            indicators=NO_INDICATORS,
            logging={"level": "DEBUG"},
        )
        proc = start_subprocess(config, "--mode=live")
        _kill_after(proc, "store_write_ok", 15)  # mid first sync: pages still being appended
        clock.shift_s += 30 * 60  # half an hour passes while the daemon is down
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 120)
        stop(proc)
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    stored = _closed_rows(client, dataset)
    assert sorted(stored) == symbols
    for symbol, rows in stored.items():
        stamps = [r[0] for r in rows]
        assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), "a hole or a duplicate"
        assert len(rows) >= 400 + 30, symbol
        assert rows == [candle(symbol, "1m", ms) for ms in stamps], symbol


def test_history_killed_during_commits_then_rerun_stores_each_candle_once(
    exchange_rig, client, bigquery_emulator, tmp_path
):
    specs = [SymbolSpec(f"H{i}/USDT") for i in range(4)]
    rig = exchange_rig(specs, latency_s=0.01)
    dataset = unique_dataset()
    with FaultProxy(bigquery_emulator) as rest:
        config = rig.config(
            page_limit=100,
            history_concurrency=4,
            indicators=NO_INDICATORS,
            storage=_storage(dataset, rest.url, load_batch_rows=600, load_batch_seconds=0.2),
            logging={"level": "DEBUG"},
        )
        proc = start_subprocess(config, *HISTORY_ARGS)
        _kill_after(proc, "store_commit", 4)
        rerun = start_subprocess(config, *HISTORY_ARGS)
        _, err = rerun.communicate(timeout=180)
        assert rerun.returncode == 0, err
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    stored = _closed_rows(client, dataset)
    for spec in specs:
        assert stored[spec.symbol] == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert count_stored(client, dataset) == sum(len(rows) for rows in stored.values())
