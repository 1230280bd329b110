"""Indicators stored with every closed candle, identical however the series was ingested."""

from __future__ import annotations

import random
from contextlib import asynccontextmanager

import duckdb
import numpy as np
import pytest
from collector_support import DAY_MS, FROZEN_NOW_S, run_in_process
from event_support import recording_events
from fake_exchange import SymbolSpec, expected_candles
from memory_store import MemoryStore
from store_support import quiet_events

from tda_collector.indicators import IndicatorSpec, compute, initial_state
from tda_collector.jobs.ledger import SqliteState
from tda_collector.models import BASE_COLUMNS, TABLE_NAME, CandleBatch, JobKey
from tda_collector.modes.indicator_stage import (
    MACD_SCALE_FLOOR,
    IndicatorStage,
    indicator_columns,
)
from tda_collector.observability.events import EventLog
from tda_collector.store.duckdb_store import DuckDBStore

NOW_MS = int(FROZEN_NOW_S * 1000)
MIN = 60_000
START_MS = NOW_MS - NOW_MS % DAY_MS - 3 * DAY_MS
END_MS = START_MS + 3 * DAY_MS
SPEC = IndicatorSpec()
COLUMNS = SPEC.column_names()
GAP = (START_MS + DAY_MS + 100 * MIN, START_MS + DAY_MS + 160 * MIN)
SPECS = [SymbolSpec("BTC/USDT"), SymbolSpec("GAP/USDT", gaps=[GAP])]


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def stored(db_path, symbol):
    with duckdb.connect(str(db_path), read_only=True) as con:
        rows = con.execute(
            f"SELECT epoch_ms(timestamp), close, {', '.join(COLUMNS)} FROM {TABLE_NAME}"
            " WHERE symbol = ? AND timeframe = '1m' ORDER BY timestamp",
            [symbol],
        ).fetchall()
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def assert_matches_one_computation(db_path, spec: SymbolSpec):
    table = stored(db_path, spec.symbol)
    expected = expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
    assert table[:, 0].astype(np.int64).tolist() == [c[0] for c in expected]
    reference, _ = compute(np.array([c[4] for c in expected]), initial_state(SPEC), SPEC)
    for i, name in enumerate(COLUMNS):
        got, want = table[:, 2 + i], reference[name]
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        ok = ~np.isnan(want)
        # MACD crosses zero: there its scale is the price's (see MACD_SCALE_FLOOR).
        floor = table[ok, 1] * (MACD_SCALE_FLOOR if name.startswith("macd") else 0.0)
        scale = np.maximum(np.abs(want[ok]), floor)
        assert np.all(np.abs(got[ok] - want[ok]) <= 1e-9 * scale), name


def backfill(capsys, config, start_ms, end_ms):
    code, _ = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start_ms)}", f"--end={iso(end_ms)}"
    )
    assert code == 0


@pytest.fixture
def rig(exchange_rig):
    return exchange_rig(SPECS)


def test_one_backfill_stores_exact_indicators(rig, tmp_path, capsys):
    config = rig.config()
    backfill(capsys, config, START_MS, END_MS)
    for spec in SPECS:
        assert_matches_one_computation(tmp_path / "ohlcv.duckdb", spec)


def test_a_backfill_in_ten_pieces_in_any_order_gives_the_same_values(rig, tmp_path, capsys):
    config = rig.config(page_limit=300)
    cuts = sorted(random.Random(5).sample(range(START_MS + MIN, END_MS, MIN), 9))
    pieces = list(zip([START_MS, *cuts], [*cuts, END_MS], strict=True))
    random.Random(6).shuffle(pieces)
    for start_ms, end_ms in pieces:  # each piece is a separate run: a restart every time
        backfill(capsys, config, start_ms, end_ms)
    for spec in SPECS:
        assert_matches_one_computation(tmp_path / "ohlcv.duckdb", spec)


def test_changing_the_periods_recomputes_the_stored_series(rig, tmp_path, capsys):
    config = rig.config(["BTC/USDT"], indicators={"rsi_periods": [6, 14], "ema_periods": [12, 26]})
    backfill(capsys, config, START_MS, START_MS + DAY_MS)
    config = rig.config(["BTC/USDT"])
    backfill(capsys, config, START_MS + DAY_MS, END_MS)
    assert_matches_one_computation(tmp_path / "ohlcv.duckdb", SPECS[0])


def test_indicators_can_be_switched_off(rig, tmp_path, capsys):
    config = rig.config(["BTC/USDT"], indicators={"enabled": False})
    backfill(capsys, config, START_MS, START_MS + DAY_MS)
    with duckdb.connect(str(tmp_path / "ohlcv.duckdb"), read_only=True) as con:
        names = [r[0] for r in con.execute(f"DESCRIBE {TABLE_NAME}").fetchall()]
    assert "rsi_14" not in names and "close" in names


async def test_an_existing_duckdb_file_is_migrated_with_nullable_columns(tmp_path):
    path = str(tmp_path / "old.duckdb")
    old = DuckDBStore(path, quiet_events())
    await old.ensure()
    await old.close()
    new = DuckDBStore(path, quiet_events(), indicator_columns(SPEC))
    await new.ensure()
    await new.close()
    with duckdb.connect(path, read_only=True) as con:
        described = {r[0]: r[2] for r in con.execute(f"DESCRIBE {TABLE_NAME}").fetchall()}
    assert [c.name for c in BASE_COLUMNS] + COLUMNS == list(described)
    assert all(described[name] == "YES" for name in COLUMNS)


async def test_live_one_candle_at_a_time_with_a_restart_matches_one_computation(tmp_path):
    from live_support import TrackedState
    from test_live import Harness, key

    from tda_collector.indicators import provisional

    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")], initial_candles=40)
    k = key("BTC/USDT")
    for minutes, downtime_s in ((40, 600), (20, 0)):
        state = SqliteState(str(tmp_path / "indicators.sqlite"))
        await state.open()  # its thread work kept inside virtual time by TrackedState
        stage = IndicatorStage(SPEC, TrackedState(state, h.vt), h.store, h.events)
        await h.run_for(minutes * 60, [k], indicators=stage)
        await state.close()
        h.vt.now += downtime_s  # a restart after ten minutes down
    closed = [(ts, row) for (kk, ts), row in sorted(h.store.rows.items()) if kk == k and row[6]]
    closes = np.array([row[4] for _, row in closed])
    assert len(closed) >= 40 + 40 + 10 + 20 - 2
    reference, state = compute(closes, initial_state(SPEC), SPEC)
    for name in COLUMNS:
        got = np.array([h.store.extra[(k, ts)][name] for ts, _ in closed])
        want = reference[name]
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        ok = ~np.isnan(want)
        assert np.allclose(got[ok], want[ok], rtol=1e-9, atol=1e-9 * closes.max()), name
    open_ts, open_row = next(
        (ts, row) for (kk, ts), row in h.store.rows.items() if kk == k and not row[6]
    )
    assert h.store.extra[(k, open_ts)] == pytest.approx(provisional(open_row[4], state, SPEC))


# --- repair: only rows whose stored values are wrong are written again ----------------------

KEY = JobKey("binance", "BTC/USDT", "1m")


def walk(count: int, seed: int = 3) -> np.ndarray:
    """Closes of a random walk around 30,000 (so RSI, EMA and MACD all move)."""
    steps = np.random.default_rng(seed).normal(0.0, 1e-3, count)
    return 30_000.0 * np.exp(np.cumsum(steps))


def page(closes: np.ndarray, first: int, end: int) -> CandleBatch:
    """Closed candles `first` to `end` (exclusive) of the series `closes`, a minute apart."""
    part = closes[first:end]
    return CandleBatch(
        key=KEY,
        timestamps=START_MS + np.arange(first, end, dtype=np.int64) * MIN,
        open=part,
        high=part * 1.001,
        low=part * 0.999,
        close=part,
        volume=np.ones(len(part)),
        closed=np.ones(len(part), dtype=bool),
    )


@asynccontextmanager
async def opened_stage(tmp_path, store: MemoryStore, events: EventLog | None = None):
    """An indicator stage on a SQLite state file kept across its openings (a restart)."""
    state = SqliteState(str(tmp_path / "state.sqlite"))
    await state.open()
    try:
        yield IndicatorStage(SPEC, state, store, events or quiet_events())
    finally:
        await state.close()


async def ingest_then_crash(tmp_path, store: MemoryStore, closes: np.ndarray) -> None:
    """Pages of 100 written through the stage with their states saved, then a last page
    written whose state is never saved (the process died in between)."""
    async with opened_stage(tmp_path, store) as stage:
        await stage.load([KEY], {})
        for first in range(0, len(closes) - 100, 100):
            enriched, commit = await stage.prepare(page(closes, first, first + 100))
            await store.write(enriched)
            await commit()
        enriched, _ = await stage.prepare(page(closes, len(closes) - 100, len(closes)))
        await store.write(enriched)


async def repair_after_restart(tmp_path, store: MemoryStore) -> list[int]:
    """Restart: load the saved states, repair; the open times of the rows written again."""
    rewritten: list[int] = []

    async def write(batch: CandleBatch) -> int:
        rewritten.extend(batch.timestamps.tolist())
        return await store.write(batch)

    async with opened_stage(tmp_path, store) as stage:
        await stage.load([KEY], await store.newest([KEY]))
        assert stage.dirty() == [KEY]
        assert await stage.repair(write) == len(rewritten)
        assert stage.dirty() == []
    return rewritten


def assert_stored_as_one_computation(store: MemoryStore, closes: np.ndarray) -> None:
    reference, _ = compute(closes, initial_state(SPEC), SPEC)
    stamps = [ts for (_, ts), row in sorted(store.rows.items()) if row[6]]
    assert stamps == (START_MS + np.arange(len(closes)) * MIN).tolist()
    for name in COLUMNS:
        got = np.array([store.extra[(KEY, ts)][name] for ts in stamps])
        assert np.array_equal(np.isnan(got), np.isnan(reference[name])), name
        ok = ~np.isnan(got)
        assert np.allclose(got[ok], reference[name][ok], rtol=1e-9, atol=1e-9 * closes.max())


async def test_a_dirty_series_whose_stored_values_are_right_rewrites_nothing(tmp_path):
    store, closes = MemoryStore(), walk(900)
    await ingest_then_crash(tmp_path, store, closes)
    stored = await store.series(KEY)
    whole, _ = compute(closes, initial_state(SPEC), SPEC)
    # Computed in pages, the values differ from one computation in their last bits: an exact
    # comparison would rewrite them.
    assert any(not np.array_equal(stored.extra[n], whole[n], equal_nan=True) for n in COLUMNS)
    writes = store.writes
    assert await repair_after_restart(tmp_path, store) == []
    assert store.writes == writes
    assert_stored_as_one_computation(store, closes)


async def test_repair_rewrites_exactly_the_rows_holding_a_wrong_or_missing_value(tmp_path):
    store, closes = MemoryStore(), walk(900)
    await ingest_then_crash(tmp_path, store, closes)
    wrong, missing = START_MS + 300 * MIN, START_MS + 301 * MIN
    store.extra[(KEY, wrong)]["ema_26"] *= 1 + 1e-6
    del store.extra[(KEY, missing)]["macd_hist"]  # a row stored without that column
    assert await repair_after_restart(tmp_path, store) == [wrong, missing]
    assert_stored_as_one_computation(store, closes)


async def test_a_candle_fetched_again_with_another_close_rewrites_the_later_rows_it_changed(
    tmp_path,
):
    store, closes = MemoryStore(), walk(2000)
    await ingest_then_crash(tmp_path, store, closes)
    async with opened_stage(tmp_path, store) as stage:
        await stage.load([KEY], await store.newest([KEY]))
        await stage.repair(store.write)
        corrected = closes.copy()
        corrected[450] *= 1.01  # the exchange revised a candle; its page is fetched again
        enriched, commit = await stage.prepare(page(corrected, 400, 500))
        await store.write(enriched)  # with its values, continued from the candles before it
        await commit()
    rewritten = await repair_after_restart(tmp_path, store)
    stamps = START_MS + np.arange(len(closes)) * MIN
    # After the page, every indicator moved with the changed close, until the change decayed
    # below the tolerance (row by row, near the end): later rows are left as they were.
    assert rewritten[:100] == stamps[500:600].tolist()
    assert rewritten == sorted(rewritten) and rewritten[-1] < stamps[-1]
    assert_stored_as_one_computation(store, corrected)


async def test_pages_a_stopped_run_left_out_get_their_final_values_and_nothing_is_rewritten(
    tmp_path,
):
    store, closes = MemoryStore(), walk(1000)
    async with opened_stage(tmp_path, store) as stage:
        await stage.load([KEY], {})
        for first in range(0, 1000, 100):
            enriched, commit = await stage.prepare(page(closes, first, first + 100))
            if first != 600:  # that page's write was still under way when the process died
                await store.write(enriched)
            if first < 600:
                await commit()
    reference, _ = compute(closes, initial_state(SPEC), SPEC)
    rewritten: list[int] = []

    async def write(batch: CandleBatch) -> int:
        rewritten.extend(batch.timestamps.tolist())
        return await store.write(batch)

    async with opened_stage(tmp_path, store) as stage:  # the rerun fetches the hole again
        await stage.load([KEY], await store.newest([KEY]))
        enriched, commit = await stage.prepare(page(closes, 600, 700))
        for name in COLUMNS:
            want = reference[name][600:700]
            assert np.allclose(enriched.extra[name], want, rtol=1e-9, atol=1e-6, equal_nan=True)
        await store.write(enriched)
        await commit()
        assert stage.dirty() == [KEY]
        assert await stage.repair(write) == 0
    assert rewritten == []
    assert_stored_as_one_computation(store, closes)


async def test_a_page_behind_whose_stored_candles_cannot_be_read_is_written_then_repaired(
    tmp_path,
):
    store, closes = MemoryStore(), walk(900)
    await ingest_then_crash(tmp_path, store, closes)
    store.fail_series_reads = 1
    events, seen = recording_events()
    async with opened_stage(tmp_path, store, events) as stage:
        await stage.load([KEY], await store.newest([KEY]))
        enriched, commit = await stage.prepare(page(closes, 300, 400))  # fetched again
        assert all(np.isnan(enriched.extra[name]).all() for name in COLUMNS)
        [warning] = seen.named("indicators_read_error")
        assert warning["rows"] == 100 and "TransientStoreError" in warning["error"]
        await store.write(enriched)
        await commit()
        assert await stage.repair(store.write) == 100  # that page's rows, and only those
    assert_stored_as_one_computation(store, closes)
