"""Several instances on one shared state (a real Postgres), one BigQuery dataset (the emulator)
and one exchange budget (the fake exchange enforcing it with 429s and 418 bans).

Each instance is the real collector in its own process. The fake logs every request with its
arrival and answer times; the tests check that log: no 429/418, the budget used, no series
asked by two requests at once, and what a dead instance costs (at most one page per job).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import requests
from bigquery_support import (
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    emulator_grpc,
    read_latest,
    unique_dataset,
)
from collector_support import DAY_MS, FROZEN_NOW_S, free_port, parse_events, start_subprocess
from fake_exchange import SymbolSpec, expected_candles
from postgres_support import (
    PASSWORD,
    SERVER,
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)

from tda_collector.config import IndicatorsConfig
from tda_collector.indicators import compute, initial_state
from tda_collector.models import JobKey

NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % DAY_MS - 3 * DAY_MS
END_MS = START_MS + 3 * DAY_MS
ARGS = ("--mode=history", "--start=2024-02-27", "--end=2024-03-01")
# The fake's requests/s, and the fraction the collectors may use. The headroom left (2/s) is
# what absorbs requests that leave late under CPU load (three collectors, the emulator, the
# fake and Postgres on two cores): at 0.9 about one run in seven drew a 429.
BUDGET, SAFETY = 10, 0.8
PAGE = 500  # candles per request: 9 pages per job
SPECS = [SymbolSpec(f"S{i:02d}/USDT") for i in range(16)]


def _configs(
    rig,
    tmp_path: Path,
    state_url: str,
    dataset: str,
    emulator: str,
    n: int,
    port=0,
    lease_s=3.0,
    **settings,
):
    """Instance i's config (`settings`: write_config's knobs beyond these); instance 0 serves
    its admin API on `port` (0: none). Short leases (`lease_s`) let a dead instance's jobs move
    on quickly; they also lapse when a renewal is late under CPU load, and a lapsed chunk is
    fetched again by design."""
    paths = []
    for i in range(n):
        workdir = tmp_path / f"instance{i}"
        workdir.mkdir()
        knobs = {"page_limit": PAGE, "lease_chunk_pages": 3, "history_concurrency": 8, **settings}
        paths.append(
            rig.config(
                workdir=workdir,
                rps=BUDGET,
                safety=SAFETY,
                state_url=state_url,
                instance_id=f"instance-{i}",
                lease_seconds=lease_s,
                admin={"port": port if i == 0 else 0},
                **knobs,
                storage={
                    "backend": "bigquery",
                    "bigquery": {
                        "project": PROJECT,
                        "dataset": dataset,
                        "api_endpoint": emulator,
                        "write_api_endpoint": emulator_grpc(),
                        "load_batch_seconds": 0.5,
                    },
                },
            )
        )
    return paths


class Fleet:
    """Instances as subprocesses, their stdout read in threads (events, by instance)."""

    def __init__(self, configs: list[Path], args: tuple[str, ...] = ARGS) -> None:
        self.procs = [start_subprocess(c, *args) for c in configs]
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self.errors: list[list[str]] = [[] for _ in self.procs]  # stderr: read, or it blocks
        self._readers = [
            threading.Thread(target=self._read, args=(i,), daemon=True)
            for i in range(len(self.procs))
        ] + [
            threading.Thread(target=self._read_errors, args=(i,), daemon=True)
            for i in range(len(self.procs))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, i: int) -> None:
        stdout = self.procs[i].stdout
        assert stdout is not None
        for line in stdout:
            self.lines[i].append(line)

    def _read_errors(self, i: int) -> None:
        stderr = self.procs[i].stderr
        assert stderr is not None
        for line in stderr:
            self.errors[i].append(line)

    def events(self, i: int) -> list[dict]:
        return parse_events("".join(self.lines[i]))

    def pages_done(self, i: int) -> int:
        return sum('"history_page_done"' in line for line in self.lines[i])

    def wait(self, timeout_s: float = 180) -> list[int]:
        codes = [p.wait(timeout=timeout_s) for p in self.procs]
        for reader in self._readers:
            reader.join(timeout=5)
        return codes


def _watch_admin(url: str, fleet: Fleet) -> dict:
    """While instance 0 runs: the instances its API lists, the owners its /jobs shows, and
    the run's job count in its /progress."""
    seen: dict = {"instances": set(), "owners": set(), "fleet_jobs": None}
    while fleet.procs[0].poll() is None:
        try:
            instances = requests.get(url + "/instances", timeout=2).json()["instances"]
            jobs = requests.get(url + "/jobs", timeout=2).json()["jobs"]
            progress = requests.get(url + "/progress", timeout=2).json()
        except requests.RequestException:
            time.sleep(0.2)  # not listening yet, or gone
            continue
        seen["instances"] |= {i["instance_id"] for i in instances}
        seen["owners"] |= {j["owner"] for j in jobs if j["owner"]}
        if progress["fleet"]:
            seen["fleet_jobs"] = progress["fleet"]["jobs"]
        time.sleep(0.2)
    return seen


def _assert_exact(emulator: str, dataset: str) -> None:
    """Every candle as the exchange has it, and its indicators as one computation over the
    series in time order gives them, whichever instances stored its pages."""
    indicators = IndicatorsConfig().spec()
    client = emulator_client(emulator)
    try:
        for spec in SPECS:
            rows = read_latest(client, dataset, JobKey("binance", spec.symbol, "1m"))
            got = [(r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"]) for r in rows]
            want = [c[:5] for c in expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)]
            assert got == want, spec.symbol
            closes = np.array([r["close"] for r in rows])
            reference, _ = compute(closes, initial_state(indicators), indicators)
            for name, values in reference.items():
                stored = np.array([np.nan if r[name] is None else r[name] for r in rows])
                assert np.array_equal(np.isnan(stored), np.isnan(values)), (spec.symbol, name)
                ok = ~np.isnan(values)
                assert np.allclose(stored[ok], values[ok], rtol=1e-9, atol=1e-9), (
                    spec.symbol,
                    name,
                )
    finally:
        client.close()


def _assert_no_series_asked_twice_at_once(klines) -> None:
    by_series: dict[tuple[str, str], list] = {}
    for r in klines:
        by_series.setdefault((r.params["symbol"], r.params["interval"]), []).append(r)
    for series, asked in by_series.items():
        asked.sort(key=lambda r: r.time)
        for before, after in pairwise(asked):
            assert after.time >= before.answered, f"{series}: two requests at once"


def _refetched_pages(klines) -> Counter:
    seen = Counter((r.params["symbol"], r.params["startTime"]) for r in klines if r.status == 200)
    return Counter({symbol: n - 1 for (symbol, _), n in seen.items() if n > 1})


@pytest.fixture
def fleet_rig(exchange_rig, bigquery_emulator, postgres_server, tmp_path):
    rig = exchange_rig(SPECS, requests_per_second=BUDGET, ban_after=1)
    state_url, dataset = fresh_database(), unique_dataset()

    def configs(n: int, port: int = 0, lease_s: float = 3.0) -> list[Path]:
        return _configs(rig, tmp_path, state_url, dataset, bigquery_emulator, n, port, lease_s)

    return rig, configs, dataset


def test_three_instances_share_one_budget_and_split_the_jobs(fleet_rig, bigquery_emulator):
    rig, configs, dataset = fleet_rig
    port = free_port()
    fleet = Fleet(configs(3, port))
    seen = _watch_admin(f"http://127.0.0.1:{port}", fleet)
    assert fleet.wait() == [0, 0, 0], [
        [e for e in fleet.events(i) if e["level"] == "ERROR"][-3:] for i in range(3)
    ]
    # Any instance's API shows the fleet: every instance, jobs held by the others too.
    assert seen["instances"] == {"instance-0", "instance-1", "instance-2"}, seen
    assert len(seen["owners"]) >= 2, seen
    assert seen["fleet_jobs"] == len(SPECS), seen
    counters = rig.fake.counters
    assert counters["429"] == counters["418"] == 0
    log = rig.fake.request_log()
    klines = [r for r in log if r.path.endswith("/klines")]
    assert len(klines) == len(SPECS) * 9  # every page once: nothing fetched twice
    # Together, at the shared budget: from the first request to the last, >= 0.9 x B x safety.
    span = max(r.time for r in log) - min(r.time for r in log)
    rate = (len(log) - 1) / span
    assert rate >= 0.9 * BUDGET * SAFETY, rate
    assert rate <= BUDGET, rate
    _assert_no_series_asked_twice_at_once(klines)
    worked = [fleet.pages_done(i) for i in range(3)]
    assert sum(worked) == len(klines) and min(worked) > 0, worked  # the work was spread
    _assert_exact(bigquery_emulator, dataset)
    text = "".join(line for lines in fleet.lines for line in lines)
    assert PASSWORD not in text


def test_a_killed_instance_s_jobs_finish_on_the_others_refetching_at_most_a_page_each(
    fleet_rig, bigquery_emulator
):
    rig, configs, dataset = fleet_rig
    fleet = Fleet(configs(3))
    deadline = time.monotonic() + 120
    busy = None
    while busy is None:  # the first instance to have stored 10 pages dies
        assert time.monotonic() < deadline, [fleet.lines[i][-2:] for i in range(3)]
        busy = next((i for i in range(3) if fleet.pages_done(i) >= 10), None)
        time.sleep(0.05)
    os.kill(fleet.procs[busy].pid, signal.SIGKILL)
    codes = fleet.wait()
    assert codes[busy] == -signal.SIGKILL
    assert [c for i, c in enumerate(codes) if i != busy] == [0, 0]
    klines = [r for r in rig.fake.request_log() if r.path.endswith("/klines")]
    refetched = _refetched_pages(klines)
    assert all(n <= 1 for n in refetched.values()), refetched
    assert rig.fake.counters["429"] == rig.fake.counters["418"] == 0
    _assert_no_series_asked_twice_at_once(klines)
    _assert_exact(bigquery_emulator, dataset)


def test_postgres_restarted_mid_run_completes_exact_without_duplicates(
    fleet_rig, bigquery_emulator
):
    rig, configs, dataset = fleet_rig
    fleet = Fleet(configs(2))
    deadline = time.monotonic() + 120
    while fleet.pages_done(0) + fleet.pages_done(1) < 20:
        assert time.monotonic() < deadline, "nothing stored"
        time.sleep(0.05)
    SERVER.restart(down_s=2.0)
    assert fleet.wait() == [0, 0], [fleet.events(i)[-3:] for i in range(2)]
    assert any(e["event"] == "state_unavailable" for i in range(2) for e in fleet.events(i))
    klines = [r for r in rig.fake.request_log() if r.path.endswith("/klines")]
    assert all(n <= 1 for n in _refetched_pages(klines).values())
    _assert_no_series_asked_twice_at_once(klines)
    _assert_exact(bigquery_emulator, dataset)
    client = emulator_client(bigquery_emulator)
    try:
        view = f"{PROJECT}.{dataset}.market_data_ohlcv_latest"
        sql = "SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(symbol, CAST(timestamp AS STRING)))"
        sql += f" AS k FROM `{view}`"
        row = next(iter(client.query(sql).result()))
        assert row["n"] == row["k"] == len(SPECS) * 3 * 1440
    finally:
        client.close()


def test_too_many_failed_jobs_stop_a_leased_run_as_they_stop_a_lone_one(
    exchange_rig, bigquery_emulator, postgres_server, tmp_path
):
    specs = [SymbolSpec(f"F{i}/USDT") for i in range(8)]
    rig = exchange_rig(specs, fault_rate=1.0, fault_paths=["klines"], fault_kinds=["503"])
    retry = {"base_seconds": 0.01, "cap_seconds": 0.02, "attempts": 2, "exchange_failure_limit": 2}
    config = rig.config(
        state_url=fresh_database(),
        instance_id="solo",
        history_concurrency=1,
        retry=retry,
        storage={
            "backend": "bigquery",
            "bigquery": {
                "project": PROJECT,
                "dataset": unique_dataset(),
                "api_endpoint": bigquery_emulator,
                "write_api_endpoint": emulator_grpc(),
            },
        },
    )
    fleet = Fleet([config])
    assert fleet.wait() == [1]
    events = fleet.events(0)
    assert [e["event"] for e in events].count("exchange_stopped") == 1
    # Three jobs of two attempts each fail (more than the limit of 2), then nothing more.
    assert len([r for r in rig.fake.request_log() if r.path.endswith("/klines")]) == 3 * 2
    summary = next(e for e in reversed(events) if e["event"] == "history_complete")
    assert summary["failed"] == 8 and summary["completed"] == 0
