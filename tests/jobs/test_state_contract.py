"""The state seam's contract, run against both backends: SQLite (a file) and a real Postgres."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import replace

import psycopg
import pytest
from event_support import recording_events
from postgres_support import (
    PASSWORD,
    SERVER,
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)

from tda_collector.errors import PermanentStoreError
from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.model import COMPLETED, JobRecord
from tda_collector.jobs.postgres_fleet import PostgresFleet
from tda_collector.jobs.postgres_state import PostgresState
from tda_collector.jobs.schema import MIGRATIONS
from tda_collector.jobs.state import RunRecord, SeriesState, StateStore, build_state
from tda_collector.models import JobKey
from tda_collector.retry import RetryPolicy
from tda_collector.store.write_streams import CommitIntent, StreamPosition

KEY = JobKey("binance", "BTC/USDT", "1m")
OTHER = JobKey("binance", "ETH/USDT", "1h")
MIN = 60_000
FAST = RetryPolicy(base_s=0.05, factor=2.0, cap_s=0.2, attempts=1)


@pytest.fixture(params=["sqlite", "postgres"])
def make_state(request, tmp_path):
    """`make_state()` opens a state on this test's database (the same one on every call, as a
    second instance or a restart would see it); the test closes what it opened."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_server")
        url = fresh_database()
    events, _ = recording_events()

    async def make() -> StateStore:
        if request.param == "postgres":
            state: StateStore = PostgresState(url, events, policy=FAST)
        else:
            state = SqliteState(str(tmp_path / "state.sqlite"))
        await state.open()
        return state

    return make


async def _closing(states):
    for state in states:
        await state.close()


async def test_the_ledger_is_a_merged_set_and_its_job_row_lands_with_it(make_state):
    state = await make_state()
    record = JobRecord.of(KEY, "history", start_ms=0, end_ms=10 * MIN, rows=3, pages=1)
    await state.add_coverage(KEY, [(0, 3 * MIN)], record)
    await state.add_coverage(KEY, [(5 * MIN, 6 * MIN), (3 * MIN, 4 * MIN)])
    await state.add_coverage(KEY, [(0, 3 * MIN)])  # again: nothing more
    await state.add_coverage(OTHER, [(0, 60 * MIN)])
    assert await state.coverage(KEY) == [(0, 4 * MIN), (5 * MIN, 6 * MIN)]
    assert await state.coverage_of_exchange("binance") == {
        KEY: [(0, 4 * MIN), (5 * MIN, 6 * MIN)],
        OTHER: [(0, 60 * MIN)],
    }
    assert await state.coverage_of_exchange("okx") == {}
    assert await state.load_jobs("history") == [record]
    await state.close()


async def test_writes_apply_in_call_order(make_state):
    state = await make_state()
    base = JobRecord.of(KEY, "history", start_ms=0, end_ms=100 * MIN)
    futures = [
        state.add_coverage(KEY, [(i * MIN, (i + 1) * MIN)], replace(base, pages=i + 1))
        for i in range(20)
    ]
    await asyncio.gather(*futures)
    [saved] = await state.load_jobs("history")
    assert saved.pages == 20
    assert await state.coverage(KEY) == [(0, 20 * MIN)]
    await state.close()


async def test_jobs_runs_and_indicator_series_round_trip_and_survive_a_reopen(make_state):
    state = await make_state()
    live = JobRecord.of(KEY, "live", cursor_ms=7 * MIN, last_error="boom", rows=5, runs=4)
    done = JobRecord.of(OTHER, "history", status=COMPLETED, start_ms=0, end_ms=MIN)
    await state.save_jobs([live, done])
    await state.save_jobs([replace(live, rows=6)])
    run = RunRecord("history", 0, MIN, 123, None)
    await state.save_run(run)
    await state.save_run(replace(run, finished_ms=456))
    await state.save_indicator_series(KEY, SeriesState(7 * MIN, '{"x": 1}', None))
    await state.save_indicator_series(KEY, SeriesState(8 * MIN, '{"x": 2}', 3 * MIN))
    await state.close()
    again = await make_state()
    assert await again.load_jobs("live") == [replace(live, rows=6)]
    assert await again.load_jobs("history") == [done]
    assert await again.last_run("history") == replace(run, finished_ms=456)
    assert await again.last_run("live") is None
    assert await again.load_indicator_series() == {KEY: SeriesState(8 * MIN, '{"x": 2}', 3 * MIN)}
    await again.forget(KEY)
    assert await again.coverage(KEY) == []
    assert await again.load_jobs("live") == []
    assert await again.load_jobs("history") == [done]
    await again.close()


async def test_epoch_ms_beyond_32_bits_are_kept(make_state):
    state = await make_state()
    far = 4_102_444_800_000  # 2100-01-01
    await state.add_coverage(KEY, [(far, far + MIN)], JobRecord.of(KEY, "live", cursor_ms=far))
    assert await state.coverage(KEY) == [(far, far + MIN)]
    assert (await state.load_jobs("live"))[0].cursor_ms == far
    await state.close()


async def test_write_api_positions_and_commit_intents_round_trip(make_state):
    """`WriteStreamState` on both backends: a position per owner, replaced; an intent settled
    as committed lands in the ledger, one settled as not committed is only forgotten."""
    state = await make_state()
    assert await state.stream_position("live:a") is None
    await state.save_stream_position("live:a", StreamPosition("s1", 10, 5))
    await state.save_stream_position("live:a", StreamPosition("s1", 15))
    await state.save_stream_position("live:b", StreamPosition("s2", 0))
    kept = CommitIntent("p1", {KEY: [(0, 2 * MIN), (3 * MIN, 4 * MIN)], OTHER: [(0, 60 * MIN)]})
    dropped = CommitIntent("p2", {KEY: [(10 * MIN, 11 * MIN)]})
    await state.save_commit_intent(kept)
    await state.save_commit_intent(dropped)
    await state.close()
    state = await make_state()  # a restart finds both
    assert await state.stream_position("live:a") == StreamPosition("s1", 15, None)
    assert await state.stream_position("live:b") == StreamPosition("s2", 0, None)
    assert await state.commit_intents() == [kept, dropped]
    await state.settle_commit("p1", committed=True)
    await state.settle_commit("p2", committed=False)
    assert await state.commit_intents() == []
    assert await state.coverage(KEY) == [(0, 2 * MIN), (3 * MIN, 4 * MIN)]
    assert await state.coverage(OTHER) == [(0, 60 * MIN)]
    await state.close()


async def test_an_instance_settles_its_own_and_gone_instances_commit_intents_never_a_live_one(
    postgres_server,
):
    """Another instance's pending stream may be committing right now: never settle it while
    that instance has a heartbeat; once it is gone (a killed instance restarts under a new
    default `instance_id`), whichever instance starts next settles its intents."""
    url, events = fresh_database(), recording_events()[0]
    mine, theirs, gone = (PostgresState(url, events, instance=i) for i in ("a", "b", "c"))
    await asyncio.gather(mine.open(), theirs.open(), gone.open())
    await PostgresFleet(theirs).renew("b", "history", 0, 15.0)  # "b" is alive; "c" never was
    live, orphaned = CommitIntent("p-b", {KEY: [(0, MIN)]}), CommitIntent("p-c", {OTHER: [(0, 1)]})
    await theirs.save_commit_intent(live)
    await gone.save_commit_intent(orphaned)
    assert await mine.commit_intents() == [orphaned]
    await mine.settle_commit("p-c", committed=True)
    assert await mine.coverage(OTHER) == [(0, 1)]
    assert await mine.commit_intents() == []
    assert await theirs.commit_intents() == [live]
    await theirs.settle_commit("p-b", committed=True)
    assert await mine.coverage(KEY) == [(0, MIN)]
    await asyncio.gather(mine.close(), theirs.close(), gone.close())


def test_a_state_file_of_the_write_api_before_versioning_keeps_its_streams(tmp_path):
    """A file written by the unversioned schema with the Write API's two tables is adopted."""
    path = tmp_path / "state.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE write_streams (owner TEXT PRIMARY KEY, stream TEXT NOT NULL,"
        " next_offset INTEGER NOT NULL, in_doubt_rows INTEGER);"
        "CREATE TABLE commit_intents (stream TEXT NOT NULL, exchange TEXT NOT NULL,"
        " symbol TEXT NOT NULL, timeframe TEXT NOT NULL, start_ms INTEGER NOT NULL,"
        " end_ms INTEGER NOT NULL);"
        "INSERT INTO write_streams VALUES ('live', 's1', 7, NULL);"
        "INSERT INTO commit_intents VALUES ('p1', 'binance', 'BTC/USDT', '1m', 0, 60000);"
    )
    old.close()

    async def check() -> None:
        state = SqliteState(str(path))
        await state.open()
        assert await state.stream_position("live") == StreamPosition("s1", 7)
        assert await state.commit_intents() == [CommitIntent("p1", {KEY: [(0, MIN)]})]
        await state.close()

    asyncio.run(check())


def test_an_unversioned_state_file_is_adopted_and_keeps_its_rows(tmp_path):
    """State files written before migrations existed hold version 1's tables, unrecorded."""
    path = tmp_path / "state.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE coverage (exchange TEXT NOT NULL, symbol TEXT NOT NULL,"
        " timeframe TEXT NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,"
        " PRIMARY KEY (exchange, symbol, timeframe, start_ms));"
        "INSERT INTO coverage VALUES ('binance', 'BTC/USDT', '1m', 0, 60000);"
    )
    old.close()

    async def check() -> None:
        state = SqliteState(str(path))
        await state.open()
        assert await state.coverage(KEY) == [(0, MIN)]
        await state.close()

    asyncio.run(check())
    db = sqlite3.connect(path)
    versions = [v for (v,) in db.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_every_migration_is_recorded_once_when_instances_open_together(postgres_server):
    url = fresh_database()
    events, _ = recording_events()
    states = [PostgresState(url, events) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in states))
    await _closing(states)
    with psycopg.connect(url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_instances_adding_pages_of_one_series_at_once_lose_none(postgres_server):
    url = fresh_database()
    events, _ = recording_events()
    states = [PostgresState(url, events) for _ in range(3)]
    for s in states:
        await s.open()
    writes = [
        states[i % 3].add_coverage(KEY, [(2 * i * MIN, (2 * i + 1) * MIN)]) for i in range(60)
    ]
    await asyncio.gather(*writes)
    assert await states[0].coverage(KEY) == [(2 * i * MIN, (2 * i + 1) * MIN) for i in range(60)]
    await _closing(states)


async def test_postgres_restarted_mid_run_loses_no_write_and_duplicates_none(postgres_server):
    url = fresh_database()
    events, recorded = recording_events()
    state = PostgresState(url, events, policy=FAST)
    await state.open()
    restart = threading.Thread(target=SERVER.restart, kwargs={"down_s": 1.0})
    pending = []
    base = JobRecord.of(KEY, "history", start_ms=0, end_ms=400 * MIN)
    for i in range(400):
        if i == 50:
            restart.start()
        pending.append(state.add_coverage(KEY, [(i * MIN, (i + 1) * MIN)], replace(base, pages=i)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*pending)
    restart.join()
    assert await state.coverage(KEY) == [(0, 400 * MIN)]
    assert [r.pages for r in await state.load_jobs("history")] == [399]
    await state.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM coverage").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    unavailable = recorded.named("state_unavailable")
    assert unavailable, "the restart went unnoticed: it did not happen while writes ran"
    assert all(PASSWORD not in str(e) for e in recorded)


async def test_a_wrong_password_is_a_permanent_error_naming_no_secret(postgres_server):
    events, _recorded = recording_events()
    url = SERVER.url().replace(PASSWORD, "wrong-pass")
    state = PostgresState(url, events, policy=FAST)
    with pytest.raises(PermanentStoreError) as raised:
        await asyncio.wait_for(state.open(), 30)
    assert "wrong-pass" not in str(raised.value)
    await state.close()


def test_build_state_picks_the_backend(tmp_path):
    events, _ = recording_events()
    sqlite, none = build_state(str(tmp_path / "s.sqlite"), None, events)
    assert isinstance(sqlite, SqliteState) and none is None
    postgres, fleet = build_state("unused", "postgresql://u@127.0.0.1:1/db", events)
    assert isinstance(postgres, PostgresState) and isinstance(fleet, PostgresFleet)
