"""Live mode on several instances: every live job leased by one, a dead one's taken over."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from itertools import pairwise

import numpy as np
import psycopg
from bigquery_support import (
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    read_latest,
    unique_dataset,
)
from collector_support import stop
from fake_exchange import SymbolSpec, candle
from postgres_support import (
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)
from test_instances import Fleet

from tda_collector.config import IndicatorsConfig
from tda_collector.indicators import compute, initial_state
from tda_collector.models import JobKey

MIN = 60_000
SYMBOLS = [f"L{i}/USDT" for i in range(4)]


def _owners(state_url: str) -> dict[str, str | None]:
    with psycopg.connect(state_url) as conn:
        try:
            rows = conn.execute(
                "SELECT job_id, owner FROM job_leases WHERE run_id = 'live' ORDER BY job_id"
            ).fetchall()
        except psycopg.errors.UndefinedTable:  # no instance has migrated the schema yet
            return {}
    return dict(rows)


def _assert_indicators_exact(closed: list[dict], symbol: str) -> None:
    """The closed candles' indicators as one computation over the series in time order gives
    them, although two instances computed its parts."""
    spec = IndicatorsConfig().spec()
    reference, _ = compute(np.array([r["close"] for r in closed]), initial_state(spec), spec)
    for name, values in reference.items():
        stored = np.array([np.nan if r[name] is None else r[name] for r in closed])
        assert np.array_equal(np.isnan(stored), np.isnan(values)), (symbol, name)
        ok = ~np.isnan(values)
        assert np.allclose(stored[ok], values[ok], rtol=1e-9, atol=1e-9), (symbol, name)


def _wait_until(condition, timeout_s: float, what) -> None:
    """Until `condition()`; else fail with `what()`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


def test_live_jobs_are_leased_one_instance_each_and_a_dead_one_s_resume_elsewhere(
    exchange_rig, bigquery_emulator, postgres_server, tmp_path
):
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], clock=time.time, requests_per_second=10)
    state_url, dataset = fresh_database(), unique_dataset()
    configs = []
    for i in range(2):
        workdir = tmp_path / f"live{i}"
        workdir.mkdir()
        configs.append(
            rig.config(
                workdir=workdir,
                rps=10,
                live_initial_candles=2000,  # a catch-up of 40 pages a job, at 9 requests/s
                page_limit=50,
                state_url=state_url,
                instance_id=f"live-{i}",
                lease_seconds=3,
                storage={
                    "backend": "bigquery",
                    "bigquery": {
                        "project": PROJECT,
                        "dataset": dataset,
                        "api_endpoint": bigquery_emulator,
                    },
                },
            )
        )
    fleet = Fleet(configs, ("--mode=live",))
    try:
        # Both instances hold a share: the four jobs split two and two.
        def split() -> bool:
            owners = list(_owners(state_url).values())
            return len(owners) == 4 and owners.count("live-0") == owners.count("live-1") == 2

        def story() -> str:
            tails = [[e["event"] for e in fleet.events(i)[-8:]] for i in range(2)]
            return f"owners {_owners(state_url)}; last events {tails}"

        _wait_until(split, 60, story)
        _wait_until(lambda: len(rig.fake.klines_requests()) >= 30, 60, story)
        os.kill(fleet.procs[0].pid, signal.SIGKILL)  # mid catch-up: its jobs are left halfway
        _wait_until(
            lambda: set(_owners(state_url).values()) == {"live-1"},
            30,
            story,
        )

        def repaired() -> set[str]:
            return {e["symbol"] for e in fleet.events(1) if e["event"] == "gap_repaired"}

        _wait_until(lambda: repaired() == set(SYMBOLS), 90, lambda: f"{repaired()} {story()}")
    finally:
        for proc in fleet.procs:
            if proc.poll() is None:
                stop(proc)
        fleet.wait()
    assert fleet.procs[1].returncode == 0
    client = emulator_client(bigquery_emulator)
    try:
        for symbol in SYMBOLS:
            rows = read_latest(client, dataset, JobKey("binance", symbol, "1m"))
            closed = [r for r in rows if r["is_closed"]]
            stamps = [r["timestamp_ms"] for r in closed]
            assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), symbol
            assert stamps[-1] >= int(time.time() * 1000) // MIN * MIN - 2 * MIN  # caught up
            for r in closed:
                got = (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
                assert got == candle(symbol, "1m", r["timestamp_ms"])
            _assert_indicators_exact(closed, symbol)
    finally:
        client.close()
    klines = [r for r in rig.fake.request_log() if r.path.endswith("/klines")]
    assert rig.fake.counters["429"] == rig.fake.counters["418"] == 0
    # Pages of closed history asked twice (the open candle's refreshes left out): at most the
    # one in flight when the instance died, per job.
    old = int(time.time() * 1000) - 5 * MIN
    pages = Counter(
        (r.params["symbol"], r.params["startTime"])
        for r in klines
        if int(r.params["startTime"]) < old
    )
    refetched = Counter(symbol for (symbol, _), n in pages.items() for _ in range(n - 1))
    assert all(n <= 1 for n in refetched.values()), refetched
    by_series: dict[str, list] = {}
    for r in klines:
        by_series.setdefault(r.params["symbol"], []).append(r)
    for series, requests in by_series.items():
        requests.sort(key=lambda r: r.time)
        for before, after in pairwise(requests):
            assert after.time >= before.answered, f"{series}: two requests at once"
