"""A running history backfill steered over HTTP: pause, resume, cancel, restart, progress."""

from __future__ import annotations

import math
import time

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S
from fake_exchange import SymbolSpec, expected_candles
from jobs_support import Collector, free_port, history_id, ledger, saved_jobs, stored

NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS  # 2024-03-01T00:00Z
DAYS = 2
START_MS = END_MS - DAYS * DAY_MS
ARGS = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")
PAGE = 100
PAGES = math.ceil(DAYS * 1440 / PAGE)  # per 1m job


@pytest.fixture
def specs():
    return [SymbolSpec(s) for s in ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT")]


@pytest.fixture
def rig(exchange_rig, specs):
    return exchange_rig(specs, latency_s=0.03)


def start(rig, concurrency: int) -> Collector:
    port = free_port()
    config = rig.config(
        page_limit=PAGE,
        history_concurrency=concurrency,
        admin={"host": "127.0.0.1", "port": port},
    )
    collector = Collector(config, port, *ARGS)
    collector.wait_ready(len(rig.specs))
    return collector


def has_rows(collector: Collector, symbol: str) -> bool:
    return collector.job(history_id(symbol))["rows"] > 0


def requests_after(exchange, symbol: str, t: float) -> list:
    return [r for r in exchange.klines_requests(symbol) if r.time > t]


def assert_exact(tmp_path, specs) -> None:
    for spec in specs:
        assert stored(tmp_path, spec.symbol) == expected_candles(
            spec, "1m", START_MS, END_MS, NOW_MS
        ), spec.symbol


def test_pause_frees_the_slot_and_resume_goes_on_from_the_exact_point(tmp_path, rig, specs):
    collector = start(rig, concurrency=2)
    try:
        collector.wait_until(lambda: has_rows(collector, "BTC/USDT"), what="BTC rows")
        status, job = collector.api("POST", f"/jobs/{history_id('BTC/USDT')}/pause")
        paused_at = time.monotonic()
        assert (status, job["status"]) == (200, "PAUSED")
        assert job["runs_total"] == job["pages"] > 0 and job["schedule"] is None
        assert job["owner"].endswith(f"-{collector.proc.pid}") and job["last_run"].endswith("Z")

        # Its worker takes a waiting job: two jobs run while BTC waits.
        running = collector.wait_until(
            lambda: (
                {j["symbol"] for j in collector.api("GET", "/jobs?status=RUNNING")[1]["jobs"]}
                - {"ETH/USDT"}
            ),
            timeout_s=1.0,
            what="a waiting job to start",
        )
        assert running <= {"SOL/USDT", "XRP/USDT"}

        time.sleep(max(0.0, paused_at + 2.5 - time.monotonic()))
        assert requests_after(rig.fake, "BTC/USDT", paused_at + 0.5) == []  # 2 s without one
        assert requests_after(rig.fake, "SOL/USDT", paused_at + 0.5) + requests_after(
            rig.fake, "XRP/USDT", paused_at + 0.5
        )
        cursor = collector.job(history_id("BTC/USDT"))["cursor_ms"]
        assert START_MS < cursor < END_MS

        resumed_at = time.monotonic()
        status, job = collector.api("POST", f"/jobs/{history_id('BTC/USDT')}/resume")
        assert status == 200 and job["status"] in ("PENDING", "RUNNING")
        assert collector.wait_exit(60) == 0
    finally:
        collector.kill()
    after = requests_after(rig.fake, "BTC/USDT", resumed_at)
    assert int(after[0].params["startTime"]) == cursor
    starts = [int(r.params["startTime"]) for r in rig.fake.klines_requests("BTC/USDT")]
    assert len(starts) == len(set(starts)) == PAGES  # not one page asked for twice
    assert_exact(tmp_path, specs)
    assert {e["event"] for e in collector.events} >= {"job_paused", "job_resumed", "progress"}
    pages = len(collector.named("history_page_done"))
    assert len(collector.named("progress")) < pages / 20  # throttled, not one a page


def test_cancel_stops_the_job_at_once_and_saves_its_state(tmp_path, rig, specs):
    collector = start(rig, concurrency=4)
    try:
        collector.wait_until(lambda: has_rows(collector, "ETH/USDT"), what="ETH rows")
        status, job = collector.api("POST", f"/jobs/{history_id('ETH/USDT')}/cancel")
        cancelled_at = time.monotonic()
        assert (status, job["status"]) == (200, "CANCELLED")
        status, body = collector.api("POST", f"/jobs/{history_id('ETH/USDT')}/pause")
        assert (status, body) == (409, {"error": "Cannot pause job in CANCELLED state"})
        assert collector.wait_exit(60) == 0
    finally:
        collector.kill()
    assert requests_after(rig.fake, "ETH/USDT", cancelled_at + 0.2) == []
    summary = collector.named("history_complete")[-1]
    assert (summary["completed"], summary["cancelled"], summary["failed"]) == (3, 1, 0)
    assert collector.named("job_cancelled")[0]["job"] == history_id("ETH/USDT")

    saved = saved_jobs(tmp_path / "state.sqlite")
    eth = saved["ETH/USDT"]
    eth_rows = stored(tmp_path, "ETH/USDT")
    assert eth["status"] == "CANCELLED" and 0 < eth["rows"] == len(eth_rows) < DAYS * 1440
    assert ledger(tmp_path / "state.sqlite", "ETH/USDT") == [(START_MS, eth["cursor_ms"])]
    assert eth["covered_ms"] == eth["cursor_ms"] - START_MS
    assert eth_rows == expected_candles(specs[1], "1m", START_MS, eth["cursor_ms"], NOW_MS)
    for spec in (specs[0], specs[2], specs[3]):
        assert saved[spec.symbol]["status"] == "COMPLETED"
        assert saved[spec.symbol]["rows"] == len(stored(tmp_path, spec.symbol)) == DAYS * 1440


def test_progress_and_status_survive_a_restart(tmp_path, rig, specs):
    specs = specs[:3]
    collector = start(rig, concurrency=3)
    try:
        collector.wait_until(lambda: has_rows(collector, "BTC/USDT"), what="BTC rows")
        assert collector.api("POST", f"/jobs/{history_id('BTC/USDT')}/pause")[0] == 200
        collector.wait_until(
            lambda: collector.api("GET", "/progress")[1]["jobs"]["by_status"]["COMPLETED"] == 2,
            what="the other jobs to complete",
        )
        time.sleep(0.3)  # BTC's last page, if one was in flight, is stored by now
        _, before = collector.api("GET", "/progress")
        _, jobs_before = collector.api("GET", "/jobs")
        assert collector.stop() == 0
    finally:
        collector.kill()
    by_symbol = {j["symbol"]: j for j in jobs_before["jobs"]}
    # Progress agrees with the store: per job and in total.
    for symbol, job in by_symbol.items():
        assert job["rows"] == len(stored(tmp_path, symbol))
    assert before["candles"] == sum(j["rows"] for j in by_symbol.values())
    btc = by_symbol["BTC/USDT"]
    assert btc["status"] == "PAUSED" and 0 < btc["covered"] < 1
    window_ms = DAYS * DAY_MS
    assert btc["covered"] == pytest.approx((btc["cursor_ms"] - START_MS) / window_ms, abs=1e-6)

    rig.fake.reset_log()
    collector = start(rig, concurrency=3)  # the same run, restarted
    try:
        _, jobs_after = collector.api("GET", "/jobs")
        _, after = collector.api("GET", "/progress")
        for job in jobs_after["jobs"]:
            was = by_symbol[job["symbol"]]
            assert (job["status"], job["rows"], job["covered"], job["cursor_ms"]) == (
                was["status"],
                was["rows"],
                was["covered"],
                was["cursor_ms"],
            )
        assert after["candles"] == before["candles"] and after["covered"] == before["covered"]
        assert after["jobs"]["by_status"] == before["jobs"]["by_status"]
        time.sleep(0.5)
        assert rig.fake.klines_requests() == []  # paused stays paused; completed stays done
        assert collector.api("POST", f"/jobs/{history_id('BTC/USDT')}/resume")[0] == 200
        assert collector.wait_exit(60) == 0
    finally:
        collector.kill()
    first = rig.fake.klines_requests("BTC/USDT")[0]
    assert int(first.params["startTime"]) == btc["cursor_ms"]
    assert rig.fake.klines_requests("ETH/USDT") == []
    assert_exact(tmp_path, specs)
    assert saved_jobs(tmp_path / "state.sqlite")["BTC/USDT"]["rows"] == DAYS * 1440
