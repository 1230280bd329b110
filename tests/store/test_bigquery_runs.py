"""The collector as users run it, into BigQuery through the Storage Write API (the emulator):
a live run stores exactly the exchange's candles with no insertAll and no load job, and a
process killed with SIGKILL during live appends or history commits loses no candle and
writes none twice in the base table, once restarted. Indicators are on, as by default: the
restart finds series whose rows outran their saved indicator state, recomputes them and
rewrites only rows whose stored values differ, so none is written twice for that either."""

from __future__ import annotations

import re
import signal
import sqlite3
import time

import numpy as np
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
from tcp_proxy import DroppingProxy, containing, matching

from tda_collector.indicators import IndicatorSpec, compute, initial_state

MIN = 60_000
NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS
END_MS = START_MS + 2 * DAY_MS
SPEC = IndicatorSpec()  # the default indicators
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


def _assert_indicators_of_one_computation(client, dataset: str) -> None:
    """What users query holds, per symbol, the indicators of one computation over its closed
    candles from the first stored on (to 1e-9 of the value, or of the price where MACD
    crosses zero)."""
    columns = SPEC.column_names()
    sql = f"""SELECT symbol, close, {", ".join(columns)}
FROM `{PROJECT}.{dataset}.market_data_ohlcv_latest` WHERE is_closed IS NOT FALSE
ORDER BY symbol, timestamp"""
    by_symbol: dict[str, list] = {}
    for r in client.query(sql).result():
        by_symbol.setdefault(r["symbol"], []).append(r)
    for symbol, rows in by_symbol.items():
        closes = np.array([r["close"] for r in rows])
        want, _ = compute(closes, initial_state(SPEC), SPEC)
        for name in columns:
            got = np.array([np.nan if r[name] is None else r[name] for r in rows])
            assert np.array_equal(np.isnan(got), np.isnan(want[name])), (symbol, name)
            ok = ~np.isnan(got)
            close = np.allclose(got[ok], want[name][ok], rtol=1e-9, atol=1e-9 * closes.max())
            assert close, (symbol, name)


def _assert_nothing_rewritten(events: list[dict]) -> None:
    """Series the restart found dirty were recomputed, and no stored row held other values:
    the pages it fetched behind them got their final values at once."""
    recomputed = [e for e in events if e["event"] == "indicators_recomputed"]
    assert all(e["rows"] == 0 for e in recomputed), recomputed


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
    _assert_contiguous_exact_once(stored, symbols, clock())
    assert all(len(rows) >= 400 + 30 for rows in stored.values())
    _assert_indicators_of_one_computation(client, dataset)


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
            storage=_storage(dataset, rest.url, load_batch_rows=600, load_batch_seconds=0.2),
            logging={"level": "DEBUG"},
        )
        proc = start_subprocess(config, *HISTORY_ARGS)
        _kill_after(proc, "store_commit", 4)
        rerun = start_subprocess(config, *HISTORY_ARGS)
        out, err = rerun.communicate(timeout=180)
        assert rerun.returncode == 0, err
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    stored = _closed_rows(client, dataset)
    for spec in specs:
        assert stored[spec.symbol] == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert count_stored(client, dataset) == sum(len(rows) for rows in stored.values())
    _assert_indicators_of_one_computation(client, dataset)
    _assert_nothing_rewritten(parse_events(out))


def _state_rows(tmp_path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        return db.execute(sql).fetchall()


def _kill_on_drop(proxy: DroppingProxy, proc, after_s: float) -> None:
    """SIGKILL `proc` `after_s` after the proxy forwarded the request whose answer it drops."""

    def kill() -> None:
        time.sleep(after_s)  # the server has done the work; the answer never arrives
        proc.send_signal(signal.SIGKILL)

    proxy.on_drop = kill
    proxy.drop_answers = 1


def _assert_contiguous_exact_once(
    stored: dict[str, list[tuple]], symbols: list[str], now_s: float
) -> None:
    """Each symbol's closed candles: every one from the first to the newest closed at `now_s`
    (within a minute: the run may stop just as one closes), once, as the exchange serves it."""
    assert sorted(stored) == sorted(symbols)
    newest_closed = int(now_s * 1000) // MIN * MIN - MIN
    for symbol, rows in stored.items():
        stamps = [r[0] for r in rows]
        assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), "a hole or a duplicate"
        assert stamps[-1] >= newest_closed - MIN, f"{symbol}: stops short of now"
        assert rows == [candle(symbol, "1m", ms) for ms in stamps], symbol


def test_live_killed_between_an_append_and_its_answer_restarts_on_a_new_stream_losing_nothing(
    exchange_rig, client, bigquery_emulator, tmp_path
):
    symbols = ["K0/USDT", "K1/USDT", "K2/USDT"]
    clock = ShiftedClock()
    rig = exchange_rig([SymbolSpec(s) for s in symbols], clock=clock)
    dataset = unique_dataset()
    grpc = DroppingProxy(emulator_grpc(), containing(b"K1/USDT"), hold_s=2.0)
    with FaultProxy(bigquery_emulator) as rest, grpc:
        config = rig.config(
            live_initial_candles=200,
            page_limit=20,
            storage=_storage(dataset, rest.url, write_api_endpoint=grpc.address),
        )
        proc = start_subprocess(config, "--mode=live")
        _kill_on_drop(grpc, proc, after_s=0.5)
        proc.communicate(timeout=60)
        assert grpc.drops == 1 and proc.returncode == -signal.SIGKILL
        [(next_offset, in_doubt)] = _state_rows(
            tmp_path, "SELECT next_offset, in_doubt_rows FROM write_streams"
        )
        # The append reached the table; its answer never reached the process.
        assert in_doubt and count_stored(client, dataset) == next_offset + in_doubt
        clock.shift_s += 10 * 60
        proc = start_subprocess(config, "--mode=live")
        _, seen = wait_for_event(proc, "live_cycle_complete", 120)
        stop(proc)
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    _assert_contiguous_exact_once(_closed_rows(client, dataset), symbols, clock())
    _assert_indicators_of_one_computation(client, dataset)
    assert any(
        e["event"] == "store_write_stream" and "never acknowledged" in e["message"] for e in seen
    )
    # The rows in doubt had landed with their values but not their series' saved state: the
    # restart recomputed that series and found nothing to rewrite.
    recomputed = [e for e in seen if e["event"] == "indicators_recomputed"]
    assert recomputed and all(e["rows"] == 0 for e in recomputed), recomputed


def test_history_killed_between_a_commit_and_the_ledger_records_the_commit_at_restart(
    exchange_rig, client, bigquery_emulator, tmp_path
):
    specs = [SymbolSpec(f"C{i}/USDT") for i in range(3)]
    rig = exchange_rig(specs)
    dataset = unique_dataset()
    parent = f"projects/{PROJECT}/datasets/{dataset}/tables/market_data_ohlcv".encode()
    # BatchCommitWriteStreamsRequest: the parent table, then a stream's full name (field 2).
    commit_request = matching(re.escape(parent) + b"\x12.projects/")
    grpc = DroppingProxy(emulator_grpc(), commit_request, hold_s=3.0)
    with FaultProxy(bigquery_emulator) as rest, grpc:
        config = rig.config(
            page_limit=250,
            storage=_storage(
                dataset, rest.url, write_api_endpoint=grpc.address, load_batch_seconds=0.2
            ),
            logging={"level": "DEBUG"},
        )
        proc = start_subprocess(config, *HISTORY_ARGS)
        _kill_on_drop(grpc, proc, after_s=1.0)
        proc.communicate(timeout=60)
        assert grpc.drops == 1 and proc.returncode == -signal.SIGKILL
        [(intents,)] = _state_rows(tmp_path, "SELECT COUNT(*) FROM commit_intents")
        assert intents > 0  # the commit landed; the ledger never heard of it
        rerun = start_subprocess(config, *HISTORY_ARGS)
        out, err = rerun.communicate(timeout=180)
        assert rerun.returncode == 0, err
    settled = [e for e in parse_events(out) if e["event"] == "store_commit_settled"]
    assert [e["status"] for e in settled] == ["committed"]
    assert (rest.seen["insert"], rest.seen["load"]) == (0, 0)
    stored = _closed_rows(client, dataset)
    for spec in specs:
        assert stored[spec.symbol] == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert count_stored(client, dataset) == sum(len(rows) for rows in stored.values())
    _assert_indicators_of_one_computation(client, dataset)
    _assert_nothing_rewritten(parse_events(out))
