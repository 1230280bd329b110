"""`--mode=history` beside a running live daemon: the store is held, so the range is handed
to the daemon over its admin API and followed to the end; exit 0 and exact data."""

from __future__ import annotations

from collector_support import DAY_MS, FROZEN_NOW_S, run_in_process
from fake_exchange import SymbolSpec, expected_candles
from jobs_support import Collector, free_port, stored
from store_support import LockHolder

NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS  # 2024-03-01T00:00Z
START_MS = END_MS - 2 * DAY_MS
RANGE = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")


def test_history_beside_a_daemon_completes_through_it(exchange_rig, tmp_path, capsys):
    specs = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")]
    rig = exchange_rig(specs)
    port = free_port()
    config = rig.config(
        live_initial_candles=10, page_limit=200, admin={"host": "127.0.0.1", "port": port}
    )
    daemon = Collector(config, port, "--mode=live")
    try:
        daemon.wait_until(lambda: daemon.named("live_started"), what="the daemon")
        klines_before = len(rig.fake.klines_requests())
        code, events = run_in_process(capsys, config, *RANGE, "--symbol=ETH/USDT")
        assert code == 0, events[-3:]
        names = [e["event"] for e in events]
        assert "history_handed_over" in names and names[-1] == "history_complete"
        assert "startup_failed" not in names and "admin_started" not in names
        summary = events[-1]
        assert (summary["jobs"], summary["completed"], summary["failed"]) == (1, 1, 0)
        # What live mode stored first (its 10 initial candles lie in the range) is in the
        # ledger already and not asked again.
        assert 2 * 1440 - 10 <= summary["rows"] <= 2 * 1440
        assert any(e["event"] == "progress" and e["done"] == 1 for e in events)
        asked = rig.fake.klines_requests()[klines_before:]
        assert {r.params["symbol"] for r in asked if int(r.params["startTime"]) < END_MS - DAY_MS}
        history = daemon.job("binance:ETH-USDT:1m:history")
        assert history["status"] == "COMPLETED"
        assert "binance:BTC-USDT:1m:history" not in [
            j["id"] for j in daemon.api("GET", "/jobs")[1]["jobs"]
        ]
    finally:
        assert daemon.stop() == 0
    rows = [r for r in stored(tmp_path, "ETH/USDT") if START_MS <= r[0] < END_MS]
    assert rows == expected_candles(specs[1], "1m", START_MS, END_MS, NOW_MS)


def test_history_with_the_store_held_and_no_daemon_answering_is_one_line_exit_1(
    exchange_rig, tmp_path, capsys
):
    rig = exchange_rig([SymbolSpec("BTC/USDT")])
    config = rig.config(admin={"host": "127.0.0.1", "port": free_port()})
    holder = LockHolder(str(tmp_path / "ohlcv.duckdb"))
    try:
        code, events = run_in_process(capsys, config, *RANGE)
    finally:
        holder.release()
    assert code == 1
    failure = events[-1]
    assert failure["event"] == "startup_failed" and "lock" in failure["error"].lower()
    assert "PID" in failure["error"]  # DuckDB names the holder
    assert rig.fake.request_log() == []  # the store first: not one exchange request spent
    assert "Traceback" not in capsys.readouterr().err
