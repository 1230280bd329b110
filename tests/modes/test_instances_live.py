"""Live mode on several instances: every live job leased by one, a dead one's taken over.

Three live daemons (the real collector, each in its own process) share one Postgres, one
BigQuery dataset (the emulator) and one fake exchange running on the real clock, which logs
every request with its arrival and answer times. The tests check that log and the stored rows:
each series asked by one request at a time, no closed page asked twice but the one in flight
when an instance died, every candle exact in the `_latest` view.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import psycopg
from bigquery_support import (
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    read_latest,
    unique_dataset,
)
from collector_support import DAY_MS, FROZEN_NOW_S, parse_events
from daemon_support import storage_settings
from fake_exchange import SymbolSpec, candle, expected_candles
from jobs_support import Collector, free_port, send
from postgres_support import (
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)
from test_instances import BUDGET, Fleet, _assert_no_series_asked_twice_at_once, _configs

from tda_collector.config import IndicatorsConfig
from tda_collector.indicators import compute, initial_state
from tda_collector.models import JobKey

MIN = 60_000
NOW_MS = int(FROZEN_NOW_S * 1000)
SYMBOLS = [f"L{i}/USDT" for i in range(6)]
INSTANCES = [f"instance-{i}" for i in range(3)]  # as `_configs` names them
PAGE, INITIAL = 50, 3000  # a first catch-up of 60 pages a job: 45 s for all at the budget
# Long enough that a renewal late by seconds on a loaded machine keeps the lease (a 3 s lease
# lapsed about once in 15 runs); a dead instance's jobs move on within about this.
LEASE_S = 12.0


def _owners(state_url: str) -> dict[str, str]:
    """Live job id -> the instance holding its lease now."""
    with psycopg.connect(state_url) as conn:
        try:
            rows = conn.execute(
                "SELECT job_id, owner FROM job_leases WHERE run_id = 'live' AND owner IS NOT NULL"
                " AND locked_until >= extract(epoch FROM clock_timestamp())"
            ).fetchall()
        except psycopg.errors.UndefinedTable:  # no instance has migrated the schema yet
            return {}
    return dict(rows)


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


def _symbol_of(job: str) -> str:
    """`binance:L0-USDT:1m:live` -> `L0/USDT`."""
    return job.split(":")[1].replace("-", "/")


def _assert_indicators_of_one_computation(closed: list[dict], symbol: str) -> None:
    """The stored indicators of a series' closed rows (oldest first) as one computation over
    their closes in time order gives them."""
    spec = IndicatorsConfig().spec()
    reference, _ = compute(np.array([r["close"] for r in closed]), initial_state(spec), spec)
    for name, values in reference.items():
        stored = np.array([np.nan if r[name] is None else r[name] for r in closed])
        assert np.array_equal(np.isnan(stored), np.isnan(values)), (symbol, name)
        ok = ~np.isnan(values)
        assert np.allclose(stored[ok], values[ok], rtol=1e-9, atol=1e-9), (symbol, name)


def _assert_exact_and_caught_up(emulator: str, dataset: str, at_s: float) -> None:
    """Every closed candle of every series as the exchange has it, no hole from the first to
    one within two minutes of `at_s`, and the indicators as one computation over the series in
    time order gives them, although several instances stored and computed its parts."""
    client = emulator_client(emulator)
    try:
        for symbol in SYMBOLS:
            rows = read_latest(client, dataset, JobKey("binance", symbol, "1m"))
            closed = [r for r in rows if r["is_closed"]]
            stamps = [r["timestamp_ms"] for r in closed]
            assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), symbol
            assert stamps[-1] >= int(at_s * 1000) // MIN * MIN - 2 * MIN, symbol
            for r in closed:
                got = (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
                assert got == candle(symbol, "1m", r["timestamp_ms"]), symbol
            _assert_indicators_of_one_computation(closed, symbol)
    finally:
        client.close()


def test_live_jobs_run_on_one_instance_each_and_a_killed_one_s_resume_elsewhere(
    exchange_rig, bigquery_emulator, postgres_server, tmp_path
):
    rig = exchange_rig(
        [SymbolSpec(s) for s in SYMBOLS], clock=time.time, requests_per_second=BUDGET
    )
    state_url, dataset = fresh_database(), unique_dataset()
    configs = _configs(
        rig,
        tmp_path,
        state_url,
        dataset,
        bigquery_emulator,
        len(INSTANCES),
        lease_s=LEASE_S,
        page_limit=PAGE,
        live_initial_candles=INITIAL,
    )
    fleet = Fleet(configs, ("--mode=live",))

    def story() -> str:
        tails = [[e["event"] for e in fleet.events(i)[-6:]] for i in range(len(INSTANCES))]
        return f"owners {_owners(state_url)}; last events {tails}"

    try:
        # The six jobs spread two by two, whoever started first.
        def spread() -> bool:
            held = Counter(_owners(state_url).values())
            return sorted(held.values()) == [2, 2, 2]

        _wait_until(spread, 90, story)
        dead_jobs = [j for j, owner in _owners(state_url).items() if owner == INSTANCES[0]]
        os.kill(fleet.procs[0].pid, signal.SIGKILL)  # mid catch-up: its jobs are left halfway
        seen = [len(fleet.lines[i]) for i in range(len(INSTANCES))]  # events before the kill
        killed_at = time.monotonic()
        survivors = set(INSTANCES[1:])

        def split_over_survivors() -> bool:
            """Every job held, by the two survivors, three each (read once: the leases move
            while they are read, and a job let go of is claimed again within a look)."""
            owners = _owners(state_url)
            held = Counter(owners.values())
            return set(held) == survivors and sorted(held.values()) == [3, 3]

        _wait_until(split_over_survivors, 4 * LEASE_S, story)
        took_over_s = time.monotonic() - killed_at
        # Expired after at most a lease, seen within a third of one more, and then claimed.
        assert took_over_s < 2 * LEASE_S, took_over_s

        def repaired() -> set[str]:
            """Series whose first sync after the kill paged through a hole."""
            after = parse_events("".join(fleet.lines[1][seen[1] :] + fleet.lines[2][seen[2] :]))
            return {e["symbol"] for e in after if e["event"] == "gap_repaired"}

        dead_symbols = {_symbol_of(j) for j in dead_jobs}
        _wait_until(lambda: dead_symbols <= repaired(), 120, lambda: f"{repaired()} {story()}")
        _wait_until(  # everyone caught up: a refresh of the open candle asks for one page only
            lambda: all(
                int(r.params["startTime"]) >= (time.time() * 1000 // MIN - 3) * MIN
                for r in rig.fake.klines_requests()[-len(SYMBOLS) :]
            ),
            120,
            story,
        )
        # A clean stop hands its leases back at once: the last instance takes them on within
        # its next look (a third of a lease), not after they run out.
        fleet.procs[1].send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        _wait_until(
            lambda: (
                set(_owners(state_url).values()) == {INSTANCES[2]}
                and len(_owners(state_url)) == len(SYMBOLS)
            ),
            LEASE_S,
            story,
        )
        assert time.monotonic() - stopped_at < LEASE_S * 2 / 3
        handed = len(fleet.lines[2])

        def ran_all() -> bool:
            """The last instance ran every job in one cycle since it took them on."""
            after = parse_events("".join(fleet.lines[2][handed:]))
            cycles = [e for e in after if e["event"] == "live_cycle_complete"]
            return any(e["jobs"] == len(SYMBOLS) for e in cycles)

        _wait_until(ran_all, 90, story)
        last_cycle_s = time.time()
    finally:
        for proc in fleet.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = fleet.wait(30)
    assert codes == [-signal.SIGKILL, 0, 0], [fleet.errors[i][-3:] for i in range(3)]
    assert rig.fake.counters["429"] == rig.fake.counters["418"] == 0
    klines = rig.fake.klines_requests()
    _assert_no_series_asked_twice_at_once(klines)
    # Pages of closed candles asked twice (the open candle's refreshes left out): at most the
    # one in flight when the instance died, and only for its jobs.
    old = int(time.time() * 1000) - 5 * MIN
    pages = Counter(
        (r.params["symbol"], r.params["startTime"])
        for r in klines
        if r.status == 200 and int(r.params["startTime"]) < old
    )
    refetched = Counter(symbol for (symbol, _), n in pages.items() for _ in range(n - 1))
    assert all(n <= 1 for n in refetched.values()), refetched
    assert {s.replace("/", "") for s in dead_symbols} >= set(refetched), (refetched, dead_jobs)
    _assert_exact_and_caught_up(bigquery_emulator, dataset, last_cycle_s)


def _start_daemons(
    daemons: list[Collector],
    rig,
    tmp_path,
    state_url: str,
    storage: dict,
    lease_s: float,
    symbols: list[str] | None = None,
    **settings,
) -> None:
    """Two live daemons on one state, each with its admin API, appended to `daemons` (which
    the caller stops) and running once this returns."""
    for i in range(2):
        workdir, port = tmp_path / f"daemon{i}", free_port()
        workdir.mkdir()
        config = rig.config(
            symbols,
            workdir=workdir,
            rps=100,
            live_initial_candles=30,
            state_url=state_url,
            instance_id=f"daemon-{i}",
            lease_seconds=lease_s,
            admin={"host": "127.0.0.1", "port": port},
            storage=storage,
            **settings,
        )
        daemons.append(Collector(config, port, "--mode=live"))
    for daemon in daemons:
        daemon.wait_until(lambda d=daemon: d.named("live_started"), 60, "live")


def test_a_backfill_runs_on_the_instance_holding_the_live_job_each_page_fetched_once(
    exchange_rig, bigquery_emulator, postgres_server, tmp_path
):
    """A daemon's backfill recomputes its series' indicators, whose state the live job's
    holder keeps: asked of the other daemon, it is refused with a 409 naming the holder (it
    would leave the holder computing from a stale state); the holder runs it under the series'
    backfill lease, each page fetched once, and its live job goes on from the repaired state."""
    spec = SymbolSpec("BTC/USDT")
    rig = exchange_rig([spec], latency_s=0.01)  # the frozen clock: a fixed set of closed candles
    state_url, storage = fresh_database(), storage_settings("bigquery", tmp_path)
    start_ms = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS
    end_ms = start_ms + DAY_MS  # a day before the live jobs' candles
    live = "binance:BTC-USDT:1m:live"
    daemons: list[Collector] = []
    try:
        _start_daemons(daemons, rig, tmp_path, state_url, storage, LEASE_S, page_limit=200)
        _wait_until(lambda: live in _owners(state_url), 30, lambda: "the live lease")
        holder = int(_owners(state_url)[live].rsplit("-", 1)[1])  # `daemon-<i>`
        other = daemons[1 - holder]
        body = {"start": start_ms, "end": end_ms}
        path = f"/jobs/{live}/backfill"
        status, refused = send(other.port, "POST", path, body)
        assert status == 409 and f"daemon-{holder}" in refused["error"], refused
        status, answer = send(daemons[holder].port, "POST", path, body)
        assert status == 202, answer
        history = answer["job"]["id"]
        daemons[holder].wait_until(
            lambda: daemons[holder].job(history)["status"] == "COMPLETED", 90, "the backfill"
        )
        pages = daemons[holder].job(history)["pages"]
    finally:
        codes = [daemon.stop() for daemon in daemons]
    assert codes == [0, 0]
    assert pages == -(-DAY_MS // MIN // 200), pages
    window = [r for r in rig.fake.klines_requests() if int(r.params["startTime"]) < end_ms]
    assert max(Counter(r.params["startTime"] for r in window).values()) == 1
    _assert_no_series_asked_twice_at_once(window)
    client = emulator_client(bigquery_emulator)
    try:
        key = JobKey("binance", "BTC/USDT", "1m")
        rows = read_latest(client, storage["bigquery"]["dataset"], key)
    finally:
        client.close()
    got = [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
        for r in rows
        if start_ms <= r["timestamp_ms"] < end_ms
    ]
    assert got == expected_candles(spec, "1m", start_ms, end_ms, NOW_MS)
    _assert_indicators_of_one_computation([r for r in rows if r["is_closed"]], "BTC/USDT")


def test_a_change_through_one_instance_s_api_is_followed_by_the_others(
    exchange_rig, bigquery_emulator, postgres_server, tmp_path
):
    """One catalog for the fleet: a job added, rescheduled and deleted, and a connector
    disabled and enabled, through one daemon's API, and the other daemon runs the same."""
    rig = exchange_rig([SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")], latency_s=0.01)
    state_url, storage = fresh_database(), storage_settings("bigquery", tmp_path)
    follow_s = 2.0  # a third of the lease: how often each daemon reads the catalog
    daemons: list[Collector] = []
    try:
        _start_daemons(daemons, rig, tmp_path, state_url, storage, 3 * follow_s, ["BTC/USDT"])
        first, second = daemons
        eth, btc = "binance:ETH-USDT:1m:live", "binance:BTC-USDT:1m:live"
        body = {"exchange": "binance", "symbol": "ETH/USDT", "timeframe": "1m"}
        assert send(first.port, "POST", "/jobs", body)[0] == 201
        second.wait_until(lambda: second.api("GET", f"/jobs/{eth}")[0] == 200, 20, "ETH there")
        # Its lease goes to one of them; whichever holds it stores its candles.
        first.wait_until(
            lambda: max(d.job(eth)["rows"] for d in daemons) >= 30, 30, "ETH collected"
        )
        cron = {"mode": "cron", "cron": "*/5 * * * *"}
        assert send(second.port, "POST", "/jobs", {**body, "schedule": cron})[0] == 200
        first.wait_until(lambda: first.job(eth)["schedule"] == cron, 20, "rescheduled")
        assert send(second.port, "DELETE", f"/jobs/{eth}")[0] == 200
        first.wait_until(lambda: first.api("GET", f"/jobs/{eth}")[0] == 404, 20, "ETH gone")
        assert send(first.port, "POST", "/connectors/binance/disable")[0] == 200
        second.wait_until(lambda: second.job(btc)["status"] == "PAUSED", 20, "paused there")
        assert send(first.port, "POST", "/connectors/binance/enable")[0] == 200
        second.wait_until(lambda: second.job(btc)["status"] != "PAUSED", 20, "resumed there")
        followed = [c for e in second.named("catalog_followed") for c in e["changes"]]
        assert "binance:ETH/USDT:1m added" in followed and "binance disabled" in followed
    finally:
        codes = [daemon.stop() for daemon in daemons]
    assert codes == [0, 0]
    assert rig.fake.counters["429"] == rig.fake.counters["418"] == 0
