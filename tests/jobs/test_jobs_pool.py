"""The history worker pool and the request gate, in process with an in-memory exchange."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from collector_support import DAY_MS, FROZEN_NOW_S
from fake_exchange import SymbolSpec, expected_candles
from memory_source import MemorySource
from memory_store import MemoryStore
from pipeline_support import wire

from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.model import (
    CANCELLED,
    COMPLETED,
    PAUSED,
    RUNNING,
    Job,
    JobPaused,
    JobRecord,
)
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.modes.backfill import HistoryBackfill, HistoryOutcome
from tda_collector.modes.history_pool import ExchangeHistory
from tda_collector.observability.events import EventLog
from tda_collector.observability.metrics import Metrics

NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS
START_MS = END_MS - DAY_MS
SYMBOLS = ["A/USDT", "B/USDT", "C/USDT"]
PAGE = 100


def quiet() -> EventLog:
    logger = logging.getLogger("tests.jobs_pool")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    return EventLog(logger)


class Rig:
    """One exchange's pool over a MemorySource (5 ms a request) behind the gate."""

    def __init__(self, tmp_path, concurrency: int, store: MemoryStore | None = None) -> None:
        self.specs = [SymbolSpec(s) for s in SYMBOLS]
        self.source = MemorySource(
            self.specs, lambda: FROZEN_NOW_S, asyncio.sleep, latency_s=0.005, page_size=PAGE
        )
        self.registry = JobRegistry("history")
        self.store = store or MemoryStore()
        self.state = SqliteState(str(tmp_path / "state.sqlite"))
        self.concurrency = concurrency
        pipeline = wire(self.source, self.store, quiet(), gate=self.registry.check)
        self.fetcher, self.writer = pipeline.fetcher, pipeline.writer
        self.jobs = {
            s: self.registry.add(
                Job(
                    JobRecord.of(
                        JobKey("binance", s, "1m"),
                        "history",
                        start_ms=START_MS,
                        end_ms=END_MS,
                        cursor_ms=START_MS,
                    )
                )
            )
            for s in SYMBOLS
        }

    def pool(self) -> ExchangeHistory:
        backfill = HistoryBackfill(
            self.fetcher, self.writer, self.state, quiet(), PAGE, Metrics(), self.registry
        )
        return ExchangeHistory(
            backfill, self.registry, list(self.jobs.values()), self.concurrency, 10, quiet()
        )

    def calls(self, symbol: str, after: float = 0.0) -> list[tuple]:
        return [c for c in self.source.calls if c[1] == symbol and c[0] >= after]


async def until(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


@pytest.fixture
async def rig(tmp_path):
    rig = Rig(tmp_path, concurrency=1)
    await rig.state.open()
    yield rig
    await rig.state.close()


async def test_a_paused_job_frees_its_worker_and_resumes_at_its_cursor(rig):
    a, b, c = (rig.jobs[s] for s in SYMBOLS)
    run = asyncio.create_task(rig.pool().run())
    await until(lambda: a.record.pages >= 3)
    rig.registry.command(a, "pause")
    await until(lambda: not a.active)
    cursor = a.record.cursor_ms
    await until(lambda: c.status == COMPLETED)  # one worker: B and C ran while A waited
    assert b.status == COMPLETED and a.status == PAUSED and not run.done()
    rig.registry.command(a, "resume")
    results = await asyncio.wait_for(run, 10)
    assert {r.key.symbol: r.status for r in results} == dict.fromkeys(SYMBOLS, COMPLETED)
    since = [call[3] for call in rig.calls("A/USDT")]
    assert len(since) == len(set(since)) == 15 and cursor in since  # no page twice
    assert rig.store.series_rows(a.key) and [
        r[:6] for r in rig.store.series_rows(a.key)
    ] == expected_candles(rig.specs[0], "1m", START_MS, END_MS, NOW_MS)
    assert a.record.rows == 1440 and a.record.covered == 1.0


async def test_a_cancelled_job_stops_at_once_and_the_pool_finishes(rig):
    a = rig.jobs["A/USDT"]
    run = asyncio.create_task(rig.pool().run())
    await until(lambda: a.record.pages >= 2 and rig.source.in_flight[("A/USDT", "1m")])
    rig.registry.command(a, "cancel")  # while a request is in flight
    cancelled_at = time.time()
    results = await asyncio.wait_for(run, 10)
    assert {r.key.symbol: r.status for r in results} == {
        "A/USDT": CANCELLED,
        "B/USDT": COMPLETED,
        "C/USDT": COMPLETED,
    }
    assert rig.calls("A/USDT", after=cancelled_at) == []
    assert a.record.rows == len(rig.store.series_rows(a.key)) and a.record.covered < 1


class SlowStore(MemoryStore):
    """Writes take 50 ms in a thread, as a database's do: cancelling the caller does not stop
    the write."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = 0

    async def write(self, batch):
        self.writing += 1
        try:
            return await asyncio.to_thread(self._write_slowly, batch)
        finally:
            self.writing -= 1

    def _write_slowly(self, batch) -> int:
        time.sleep(0.05)
        for ts in batch.timestamps.tolist():
            self.rows[(batch.key, ts)] = (ts,)
        return len(batch)


async def test_a_job_cancelled_mid_write_still_counts_the_page_it_stored(tmp_path):
    rig = Rig(tmp_path, concurrency=1, store=SlowStore())
    await rig.state.open()
    a = rig.jobs["A/USDT"]
    run = asyncio.create_task(rig.pool().run())
    await until(lambda: a.record.pages >= 2 and rig.store.writing)
    rig.registry.command(a, "cancel")
    await asyncio.wait_for(run, 10)
    stored = rig.store.series_rows(a.key)
    assert a.record.rows == len(stored) == a.record.pages * PAGE
    assert await rig.state.coverage(a.key) == [(START_MS, a.record.cursor_ms)]
    assert [r[0] for r in stored] == list(range(START_MS, a.record.cursor_ms, 60_000))
    await rig.state.close()


async def test_the_gate_holds_a_request_that_was_backing_off(rig):
    a = rig.jobs["A/USDT"]
    rig.registry.apply(a, "start")
    rig.source.down = True
    fetching = asyncio.create_task(rig.fetcher.candles(a.key, START_MS, END_MS - 1, PAGE))
    # The first attempt failed: the fetcher is backing off before its retry.
    await until(lambda: rig.calls("A/USDT") and not rig.source.in_flight[("A/USDT", "1m")])
    rig.registry.command(a, "pause")
    rig.source.down = False
    with pytest.raises(JobPaused):
        await fetching
    assert len(rig.calls("A/USDT")) == 1  # the retry never left
    rig.registry.command(a, "resume")
    assert rig.registry.jobs[a.id].status == "PENDING"
    rig.registry.apply(a, "start")
    assert a.status == RUNNING
    assert len(await rig.fetcher.candles(a.key, START_MS, END_MS - 1, PAGE)) == PAGE


class ResumedWhileLettingGo:
    """A backfill whose first run stops for a pause that a resume overtakes at once."""

    def __init__(self, registry: JobRegistry) -> None:
        self.registry = registry
        self.runs = 0

    async def run_job(self, job: Job, result: HistoryOutcome) -> HistoryOutcome:
        self.runs += 1
        result.status = COMPLETED
        if self.runs == 1:
            self.registry.command(job, "pause")
            self.registry.command(job, "resume")  # before its worker has let go of it
            result.status = PAUSED
        return result

    async def drain(self, timeout_s: float | None = None) -> None:
        return None


async def test_a_job_resumed_while_its_worker_lets_go_runs_again():
    registry = JobRegistry("history")
    key = JobKey("binance", "A/USDT", "1m")
    job = registry.add(Job(JobRecord.of(key, "history", start_ms=START_MS, end_ms=END_MS)))
    backfill = ResumedWhileLettingGo(registry)
    pool = ExchangeHistory(backfill, registry, [job], 1, 10, quiet())  # type: ignore[arg-type]
    [result] = await asyncio.wait_for(pool.run(), 5)
    assert (result.status, backfill.runs) == (COMPLETED, 2)
