"""Live closes keep their latency bound while a backfill runs inside the daemon at the full
budget: real time, real ccxt against the fake exchange, DuckDB."""

from __future__ import annotations

import time

from collector_support import DAY_MS
from fake_exchange import SymbolSpec, candle, expected_candles
from jobs_support import Collector, free_port, send, stored

MIN = 60_000
BTC = "binance:BTC-USDT:1m:live"
SETTLE_S = 1.0
DAYS = 20  # 288 pages: 16 s at the budget


class ShiftedClock:
    """The exchange's clock: real time, shifted so that a minute closes soon after start."""

    def __init__(self, seconds_into_minute: float) -> None:
        now = time.time()
        self.shift_s = (seconds_into_minute - now % 60) % 60

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_closes_stay_within_their_bound_while_a_backfill_uses_the_budget(
    exchange_rig, tmp_path
):
    clock = ShiftedClock(seconds_into_minute=50)
    spec = SymbolSpec("BTC/USDT")
    rig = exchange_rig([spec], clock=clock, latency_s=0.02)
    port = free_port()
    config = rig.config(
        ["BTC/USDT"],
        rps=20,
        page_limit=100,
        live_initial_candles=10,
        live_settle_seconds=SETTLE_S,
        update_interval_seconds=600,  # closes only: each live run is a close
        admin={"host": "127.0.0.1", "port": port},
    )
    collector = Collector(config, port, "--mode=live")
    try:
        collector.wait_until(lambda: collector.named("live_cycle_complete"), what="live")
        now_ms = int(clock() * 1000)
        end_ms = now_ms - now_ms % DAY_MS
        start_ms = end_ms - DAYS * DAY_MS
        body = {"start": start_ms, "end": end_ms}
        status, answer = send(port, "POST", f"/jobs/{BTC}/backfill", body)
        assert status == 202
        history = answer["job"]["id"]
        cycles_before = len(collector.named("live_cycle_complete"))
        close = collector.wait_until(
            lambda: collector.named("live_cycle_complete")[cycles_before:],
            timeout_s=90,
            what="a live close during the backfill",
        )[0]
        during = collector.job(history)
        assert during["status"] == "RUNNING", "the backfill ended before the close"
        done = collector.wait_until(
            lambda: (
                collector.job(history)["status"] in ("COMPLETED", "FAILED")
                and collector.job(history)
            ),
            timeout_s=120,
            what="the backfill",
        )
        assert done["status"] == "COMPLETED"
    finally:
        assert collector.stop() == 0
    # The close was stored within the settle delay plus a few requests' time, although the
    # backfill had asked for the whole budget (about 18 requests a second) meanwhile.
    print(f"live close-to-stored lag during the backfill: {close['lag_s']:.3f} s")
    assert close["lag_s"] <= SETTLE_S + 1.0
    rows = stored(tmp_path, "BTC/USDT")
    in_range = [r for r in rows if start_ms <= r[0] < end_ms]
    assert in_range == expected_candles(spec, "1m", start_ms, end_ms, int(clock() * 1000))
    live = [r for r in rows if r[0] >= end_ms]
    stamps = [r[0] for r in live]
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps) * MIN, MIN))
    assert live[:-1] == [candle("BTC/USDT", "1m", t) for t in stamps[:-1]]


def test_a_connector_enabled_again_catches_up_the_closes_it_missed(exchange_rig, tmp_path):
    clock = ShiftedClock(seconds_into_minute=52)
    spec = SymbolSpec("BTC/USDT")
    rig = exchange_rig([spec], clock=clock)
    port = free_port()
    config = rig.config(
        ["BTC/USDT"],
        live_initial_candles=5,
        live_settle_seconds=0.5,
        update_interval_seconds=600,
        admin={"host": "127.0.0.1", "port": port},
    )
    collector = Collector(config, port, "--mode=live")
    try:
        collector.wait_until(lambda: collector.named("live_cycle_complete"), what="live")
        assert send(port, "POST", "/connectors/binance/disable")[0] == 200
        disabled_at = time.monotonic()
        missed_close = (int(clock() * 1000) // MIN + 1) * MIN  # the next candle closes here
        time.sleep(max(0.0, missed_close / 1000 - clock()) + 2.0)
        assert [r for r in rig.fake.klines_requests() if r.time > disabled_at + 0.3] == []
        assert send(port, "POST", "/connectors/binance/enable")[0] == 200
        collector.wait_until(
            lambda: collector.job(BTC)["cursor_ms"] >= missed_close - MIN, what="the catch-up"
        )
    finally:
        assert collector.stop() == 0
    closed = [r for r in stored(tmp_path, "BTC/USDT") if r[0] < missed_close]
    stamps = [r[0] for r in closed]
    assert stamps[-1] == missed_close - MIN  # the candle that closed while disabled
    assert stamps == list(range(stamps[0], missed_close, MIN))
    assert closed == [candle("BTC/USDT", "1m", t) for t in stamps]
