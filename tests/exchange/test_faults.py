"""Chaos: every fault an exchange throws is retried or reported; never a crash or a wrong row."""

from __future__ import annotations

import time

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S, events_named, run_in_process, write_config
from fake_exchange import SymbolSpec, expected_candles
from fake_exchange_process import FakeExchangeProcess
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % DAY_MS - DAY_MS  # 2024-02-29T00:00Z
END_MS = START_MS + DAY_MS
ARGS = ("--mode=history", "--start=2024-02-29", "--end=2024-03-01")
SPECS = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT"), SymbolSpec("SOL/USDT")]


def assert_exact(tmp_path, specs=SPECS):
    for spec in specs:
        rows = read_duckdb_rows(
            str(tmp_path / "ohlcv.duckdb"), JobKey("binance", spec.symbol, "1m")
        )
        got = [
            (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
            for r in rows
        ]
        assert got == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS), spec.symbol


@pytest.mark.parametrize("kind", ["500", "502", "503", "stall", "truncated", "garbage"])
def test_each_transient_fault_is_retried_to_exact_data(exchange_rig, tmp_path, capsys, kind):
    rig = exchange_rig(SPECS, stall_seconds=3)
    rig.fake.inject(kind, count=3)
    config = rig.config(page_limit=200, timeout_ms=500)
    code, events = run_in_process(capsys, config, *ARGS)
    assert code == 0
    assert_exact(tmp_path)
    retries = events_named(events, "backoff_retry")
    assert len(retries) == 3
    assert all(e["attempt"] >= 1 and e["error"] for e in retries)


def test_ten_percent_mixed_faults_still_complete_exactly(exchange_rig, tmp_path, capsys):
    rig = exchange_rig(SPECS, fault_rate=0.1, fault_paths=["klines"], stall_seconds=2, seed=3)
    config = rig.config(page_limit=100, timeout_ms=400)
    code, _ = run_in_process(capsys, config, *ARGS)
    faults = rig.fake.counters["faults"]
    assert code == 0
    assert faults >= 3
    assert_exact(tmp_path)


def test_a_ban_pauses_the_whole_exchange_for_its_retry_after(exchange_rig, tmp_path, capsys):
    rig = exchange_rig(SPECS)
    rig.fake.inject("418", count=1, retry_after=2)
    config = rig.config(page_limit=100)
    started = time.monotonic()
    code, events = run_in_process(capsys, config, *ARGS)
    log = rig.fake.request_log()
    assert code == 0
    assert_exact(tmp_path)
    banned = [e for e in events_named(events, "rate_limited") if e["status"] == 418]
    assert len(banned) == 1 and banned[0]["level"] == "ERROR" and banned[0]["wait_s"] == 2
    ban = next(r for r in log if r.status == 418)
    after = [r for r in log if r.time > ban.time]
    # Requests already in flight when the ban was answered may land; nothing new starts for 2 s.
    first_new = min(r.time for r in after[len(SPECS) :])
    assert first_new - ban.time >= 1.9
    assert time.monotonic() - started >= 2


def test_a_429_with_retry_after_is_waited_out_not_hammered(exchange_rig, capsys):
    rig = exchange_rig(SPECS)
    rig.fake.inject("429", count=1, retry_after=1)
    config = rig.config(["BTC/USDT"], page_limit=100)
    code, events = run_in_process(capsys, config, *ARGS)
    statuses = [r.status for r in rig.fake.klines_requests()]
    assert code == 0
    assert statuses.count(429) == 1 and 418 not in statuses
    limited = events_named(events, "rate_limited")
    assert limited[0]["status"] == 429 and limited[0]["level"] == "WARNING"


def test_the_collector_stays_inside_a_budget_the_exchange_enforces(tmp_path, capsys):
    """The fake runs in its own process: in ours, its arrival stamps would wait for the
    collector's GIL and bunch up, so its strict one-second window would count wrongly."""
    symbols = [spec.symbol for spec in SPECS]
    with FakeExchangeProcess(symbol=symbols, frozen_time=FROZEN_NOW_S, rps=10) as fake:
        config = write_config(
            tmp_path, fake.base_url, symbols, ["1m"], page_limit=100, rps=10, safety=0.9
        )
        code, _ = run_in_process(capsys, config, *ARGS)
    counters = fake.counters
    assert code == 0
    assert counters["429"] == 0 and counters["418"] == 0
    assert_exact(tmp_path)


def test_a_permanent_fault_fails_the_job_at_once_and_exits_1(exchange_rig, capsys):
    rig = exchange_rig(SPECS)
    rig.fake.inject("400", count=1)
    config = rig.config(["BTC/USDT"], page_limit=100)
    code, events = run_in_process(capsys, config, *ARGS)
    assert code == 1
    failed = events_named(events, "job_failed")
    assert len(failed) == 1 and failed[0]["symbol"] == "BTC/USDT" and failed[0]["error"]
    assert events_named(events, "backoff_retry") == []
    assert (
        events[-1]["event"] == "history_complete" and "binance:BTC/USDT:1m" in events[-1]["message"]
    )


def test_too_many_failed_jobs_stop_the_exchange_instead_of_grinding_on(exchange_rig, capsys):
    specs = [SymbolSpec(f"F{i}/USDT") for i in range(8)]
    rig = exchange_rig(specs, fault_rate=1.0, fault_paths=["klines"], fault_kinds=["503"])
    config = rig.config(
        history_concurrency=1,
        retry={
            "base_seconds": 0.01,
            "cap_seconds": 0.02,
            "attempts": 2,
            "exchange_failure_limit": 2,
        },
    )
    code, events = run_in_process(capsys, config, *ARGS)
    requests = len(rig.fake.klines_requests())
    assert code == 1
    assert len(events_named(events, "exchange_stopped")) == 1
    assert requests == 3 * 2  # three jobs of two attempts each, then nothing more
    summary = events_named(events, "history_complete")[-1]
    assert summary["failed"] == 8 and summary["completed"] == 0


def _shared_ip_run(exchange_rig, capsys, used_weight: dict) -> tuple[int, list[dict], dict]:
    """A backfill on an IP where another client spends 60 of the 100 weight each 2-second
    window allows; our own share (22.5 requests/s, 45 a window) would take the IP past it."""
    started = time.monotonic()
    rig = exchange_rig(
        SPECS,
        clock=lambda: FROZEN_NOW_S + time.monotonic() - started,
        weight_limit=100,
        weight_window_s=2.0,
        shared_weight=60,
    )
    config = rig.config(page_limit=50, rps=25, safety=0.9, used_weight=used_weight)
    code, events = run_in_process(capsys, config, *ARGS)
    return code, events, rig.fake.counters


def test_the_ips_used_weight_header_slows_down_before_a_429(exchange_rig, tmp_path, capsys):
    code, events, counters = _shared_ip_run(
        exchange_rig, capsys, {"header": "X-MBX-USED-WEIGHT-1M", "limit": 100, "window_seconds": 2}
    )
    assert code == 0
    assert counters["429"] == 0 and counters["418"] == 0
    assert_exact(tmp_path)
    slowdowns = events_named(events, "rate_slowdown")
    assert slowdowns and all(e["used_weight"] >= 95 and 0 < e["wait_s"] <= 2 for e in slowdowns)
    assert all(e["level"] == "WARNING" and e["limit"] == 100 for e in slowdowns)


def test_without_the_used_weight_guard_the_shared_ip_runs_into_429s(exchange_rig, tmp_path, capsys):
    """The control for the test above: the same run with the guard off is refused."""
    code, events, counters = _shared_ip_run(exchange_rig, capsys, {"enabled": False})
    assert code == 0  # Retry-After is waited out
    assert counters["429"] >= 1
    assert events_named(events, "rate_slowdown") == []
    assert_exact(tmp_path)
