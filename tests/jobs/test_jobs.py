"""Jobs without a network: the state machine, ids, progress sums and rates, what survives."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import asdict, replace

import pytest

from tda_collector.jobs.control import finish_history_run, register_history_jobs
from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.model import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PAUSED,
    PENDING,
    RUNNING,
    STATUSES,
    TRANSITIONS,
    Job,
    JobPaused,
    JobRecord,
    TransitionRefused,
    job_id,
    next_status,
)
from tda_collector.jobs.progress import Progress, RateWindow
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.observability.metrics import Metrics

MIN = 60_000
DAY = 1440 * MIN
T0 = 1_709_164_800_000  # 2024-02-29T00:00Z


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def key(symbol: str, tf: str = "1m") -> JobKey:
    return JobKey("binance", symbol, tf)


def history_job(symbol: str, days: int = 1, status: str = PENDING) -> Job:
    return Job(
        JobRecord.of(
            key(symbol),
            "history",
            status=status,
            start_ms=T0,
            end_ms=T0 + days * DAY,
            cursor_ms=T0,
        )
    )


def test_pausing_a_completed_job_is_refused_with_its_state_in_the_message():
    with pytest.raises(TransitionRefused) as refused:
        next_status("pause", COMPLETED)
    assert str(refused.value) == "Cannot pause job in COMPLETED state"


@pytest.mark.parametrize(
    ("action", "allowed"),
    [
        ("pause", {PENDING: PAUSED, RUNNING: PAUSED}),
        ("resume", {PAUSED: PENDING}),
        ("cancel", {PENDING: CANCELLED, RUNNING: CANCELLED, PAUSED: CANCELLED}),
    ],
)
def test_user_actions_move_only_from_their_states(action, allowed):
    for status in STATUSES:
        if status in allowed:
            assert next_status(action, status) == allowed[status]
        else:
            with pytest.raises(TransitionRefused, match=f"Cannot {action} job in {status} state"):
                next_status(action, status)


def test_finished_jobs_never_move_again():
    for finished in (COMPLETED, FAILED, CANCELLED):
        assert all(finished not in moves for moves in TRANSITIONS.values())


def test_job_ids_are_stable_readable_and_url_safe():
    assert job_id(key("BTC/USDT"), "history") == "binance:BTC-USDT:1m:history"
    assert job_id(key("BTC/USDT"), "live") == "binance:BTC-USDT:1m:live"
    # A symbol with its own "-" (an option) or odd characters gets a hash: no two ids collide.
    option = job_id(key("BTC/USD:BTC-240329-60000-C"), "history")
    assert re.fullmatch(r"binance:BTC-USD:BTC-240329-60000-C~[0-9a-f]{8}:1m:history", option)
    assert job_id(key("A-B/C"), "live") != job_id(key("A/B-C"), "live")
    assert re.fullmatch(r"[A-Za-z0-9._:~-]+", job_id(key("ÄÖ/US DT"), "live"))


def test_a_paused_job_raises_at_its_checks():
    job = history_job("BTC/USDT", status=PAUSED)
    with pytest.raises(JobPaused):
        job.check()
    registry = JobRegistry("history")
    registry.add(job)
    with pytest.raises(JobPaused):
        registry.check(job.key)
    registry.check(key("UNKNOWN/USDT"))  # not a job of this run: not gated


def test_commands_move_counts_metrics_and_events():
    metrics = Metrics()
    registry = JobRegistry("history", metrics=metrics)
    jobs = [registry.add(history_job(s)) for s in ("A/USDT", "B/USDT", "C/USDT")]
    registry.apply(jobs[0], "start")
    registry.command(jobs[0], "pause")
    registry.command(jobs[1], "cancel")
    assert registry.counts() == {PAUSED: 1, CANCELLED: 1, PENDING: 1, RUNNING: 0}
    assert b'tda_jobs{state="PAUSED"} 1.0' in metrics.render()
    with pytest.raises(TransitionRefused, match="Cannot resume job in CANCELLED state"):
        registry.command(jobs[1], "resume")
    assert registry.command_all("pause", (PENDING, RUNNING)) == 1
    assert registry.command_all("resume", (PAUSED,)) == 2
    assert [j.status for j in jobs] == [PENDING, CANCELLED, PENDING]


def test_resume_queues_an_idle_job_but_not_one_still_queued_or_running():
    registry = JobRegistry("history")
    queued: list[Job] = []
    idle, waiting, running = (registry.add(history_job(s)) for s in ("A/X", "B/X", "C/X"))
    for job in (idle, waiting, running):
        job.requeue = queued.append
    waiting.queued = True
    registry.apply(running, "start")
    running.active = True
    for job in (idle, waiting, running):
        registry.command(job, "pause")
        registry.command(job, "resume")
    assert queued == [idle]
    assert (idle.status, waiting.status, running.status) == (PENDING, PENDING, RUNNING)


def test_progress_counts_slots_and_rates_over_a_recent_window():
    clock = Clock()
    registry = JobRegistry("history", clock_ms=lambda: int(clock.t * 1000))
    progress = Progress(registry, clock)
    one_day, two_days = registry.add(history_job("A/X", 1)), registry.add(history_job("B/X", 2))
    progress.tick()
    for job in (one_day, two_days):
        registry.apply(job, "start")
    for second in range(1, 11):  # 10 s: each job stores one 100-minute page per second
        clock.t += 1
        for job in (one_day, two_days):
            cursor = job.record.cursor_ms or 0
            registry.record_page(job, [(cursor, cursor + 100 * MIN)], rows=100)
        progress.tick()
        if second == 10:
            registry.apply(one_day, "complete")
    summary = progress.summary()
    assert summary.candles == 2000 == one_day.record.rows + two_days.record.rows
    assert summary.covered == pytest.approx(2000 / (3 * 1440))
    assert summary.candles_per_s == pytest.approx(200.0)
    assert summary.counts[COMPLETED] == 1 and summary.done == 1 and summary.total == 2
    # Left: two_days' 2880 - 1000 slots at 200 slots/s (both jobs counted in the rate).
    assert summary.eta_s == pytest.approx((2880 - 1000) / 200, rel=1e-3)
    assert one_day.record.covered == pytest.approx(1000 / 1440)
    body = summary.to_json()
    assert body["jobs"] == {"total": 2, "done": 1, "by_status": summary.counts}


def test_a_rate_forgets_samples_older_than_its_window():
    window = RateWindow(window_s=10)
    for t in range(0, 31):
        window.sample(float(t), 100.0 * t if t <= 20 else 2000.0)  # stalls after 20 s
    assert window.rate(30.0, 2000.0) == pytest.approx(0.0, abs=10)
    assert RateWindow().rate(1.0, 5.0) is None


def test_eta_is_unknown_while_nothing_moves_and_zero_when_nothing_is_left():
    clock = Clock()
    registry = JobRegistry("history")
    progress = Progress(registry, clock)
    job = registry.add(history_job("A/X"))
    progress.tick()
    clock.t += 5
    assert progress.summary().eta_s is None
    registry.record_page(job, [(T0, T0 + DAY)], rows=1440)
    registry.apply(job, "complete")
    assert progress.summary().eta_s == 0.0
    assert progress.summary().covered == 1.0


@pytest.fixture
async def state(tmp_path):
    store = SqliteState(str(tmp_path / "state.sqlite"))
    await store.open()
    yield store
    await store.close()


async def test_a_page_saves_its_job_row_with_its_ledger_interval(tmp_path):
    state = SqliteState(str(tmp_path / "state.sqlite"))
    await state.open()
    registry = JobRegistry("history", state)
    job = registry.add(history_job("A/X"))
    record = registry.record_page(job, [(T0, T0 + 500 * MIN)], rows=500)
    await state.add_coverage(job.key, [(T0, T0 + 500 * MIN)], record)
    await state.close()
    reopened = SqliteState(str(tmp_path / "state.sqlite"))
    await reopened.open()
    [saved] = await reopened.load_jobs("history")
    assert (saved.rows, saved.pages, saved.covered_ms, saved.cursor_ms) == (
        500,
        1,
        500 * MIN,
        T0 + 500 * MIN,
    )
    assert await reopened.coverage(job.key) == [(T0, T0 + 500 * MIN)]
    await reopened.close()


# The jobs table as state files written before `JobRecord` declared its columns hold it.
OLD_JOBS_TABLE = """
CREATE TABLE jobs (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL, mode TEXT NOT NULL,
    status TEXT NOT NULL, start_ms INTEGER, end_ms INTEGER, covered_ms INTEGER NOT NULL,
    cursor_ms INTEGER, rows INTEGER NOT NULL, pages INTEGER NOT NULL, last_error TEXT,
    last_run_ms INTEGER, next_run_ms INTEGER, updated_ms INTEGER NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, mode)
);
"""


async def test_an_existing_state_file_keeps_its_job_rows(tmp_path):
    path = tmp_path / "state.sqlite"
    saved = JobRecord.of(
        key("A/X"),
        "history",
        status=PAUSED,
        start_ms=T0,
        end_ms=T0 + DAY,
        covered_ms=300 * MIN,
        cursor_ms=T0 + 300 * MIN,
        rows=300,
        pages=3,
        last_error="exchange down",
        last_run_ms=T0 + 1,
        updated_ms=T0 + 2,
    )
    with closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_JOBS_TABLE)
        # The table as version 1 made it: no `runs` column (migration 5 adds it, 0 for old rows).
        old = {name: value for name, value in asdict(saved).items() if name != "runs"}
        db.execute(
            f"INSERT INTO jobs ({', '.join(old)}) VALUES ({', '.join('?' * len(old))})",
            tuple(old.values()),
        )
        db.commit()
    state = SqliteState(str(path))
    await state.open()
    assert await state.load_jobs("history") == [saved]
    await state.save_jobs([replace(saved, rows=400, pages=4)])
    assert await state.load_jobs("history") == [replace(saved, rows=400, pages=4)]
    await state.close()


async def register(state, symbols, start=T0, end=T0 + DAY, now=T0 + 10 * DAY):
    registry = JobRegistry("history", state)
    jobs = await register_history_jobs(
        registry, state, [("binance", [key(s) for s in symbols], now)], start, end
    )
    return registry, {j.key.symbol: j for j in jobs}


async def test_a_restart_of_an_unfinished_run_keeps_statuses_counts_and_coverage(state):
    registry, jobs = await register(state, ["A/X", "B/X", "C/X", "D/X"])
    for symbol, action in (("A/X", "pause"), ("B/X", "cancel")):
        registry.command(jobs[symbol], action)
    for job in jobs.values():
        if job.status == PENDING:
            registry.apply(job, "start")
        await state.add_coverage(
            job.key,
            [(T0, T0 + 300 * MIN)],
            registry.record_page(job, [(T0, T0 + 300 * MIN)], rows=300),
        )
    registry.apply(jobs["C/X"], "fail", error="exchange down")
    await registry.flush()

    _, again = await register(state, ["A/X", "B/X", "C/X", "D/X"])  # the process restarted
    assert {s: j.status for s, j in again.items()} == {
        "A/X": PAUSED,
        "B/X": CANCELLED,
        "C/X": PENDING,
        "D/X": PENDING,
    }
    assert all(j.record.rows == 300 for j in again.values())
    assert all(j.record.cursor_ms == T0 + 300 * MIN for j in again.values())
    assert again["C/X"].record.last_error == "exchange down"
    assert again["A/X"].record.covered == pytest.approx(300 / 1440)


async def test_after_a_finished_run_the_next_one_starts_afresh(state):
    registry, jobs = await register(state, ["A/X", "B/X"])
    registry.command(jobs["B/X"], "cancel")
    job = jobs["A/X"]
    registry.apply(job, "start")
    await state.add_coverage(
        job.key, [(T0, T0 + DAY)], registry.record_page(job, [(T0, T0 + DAY)], 1440)
    )
    registry.apply(job, "complete")
    await registry.flush()
    await finish_history_run(registry, state)

    _, again = await register(state, ["A/X", "B/X"])
    a, b = again["A/X"].record, again["B/X"].record
    assert (a.status, a.rows, a.covered) == (COMPLETED, 0, 1.0)
    assert (b.status, b.rows) == (PENDING, 0)
    _, other_start = await register(state, ["A/X"], start=T0 - DAY)  # a longer range: new work
    assert other_start["A/X"].status == PENDING and other_start["A/X"].record.covered == 0.5


async def test_windows_end_at_the_last_closed_candle(state):
    _, jobs = await register(state, ["A/X"], end=T0 + 10 * DAY, now=T0 + DAY + 30_000)
    assert (jobs["A/X"].record.start_ms, jobs["A/X"].record.end_ms) == (T0, T0 + DAY)
