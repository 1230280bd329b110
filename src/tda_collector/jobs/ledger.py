"""The embedded state backend: one process's `StateStore` in a SQLite file (the default).

The ledger holds merged half-open intervals per (exchange, symbol, timeframe). An interval is
added only after the store has made its rows durable, so after a crash the worst case is one
page fetched again per job. Intervals also record the exchange's own holes (maintenance), so
those are asked for once and never again.

Beside it, one row per job (exchange, symbol, timeframe, mode) holds what the jobs API shows:
status, counts, cursor, last error, last and next run. A history page updates its job row in
the same transaction as its ledger interval, so the two never disagree after a crash; other
changes (status, live runs) are saved in batches. A `runs` row per mode tells whether the last
run finished, which decides what a restart carries over (see `control.py`). Every call runs on
one worker thread, in call order. The tables are `schema.py`'s, shared with Postgres.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path
from typing import Any, TypeVar

from ..intervals import Interval, merge
from ..models import JobKey
from ..store.write_streams import CommitIntent, StreamPosition
from .model import JobRecord
from .schema import (
    APPLIED_VERSIONS,
    INSERT_INTENT,
    JOB_COLUMNS,
    RECORD_VERSION,
    SELECT_INTENTS,
    SELECT_ONE_SERIES,
    SELECT_SERIES,
    SELECT_STREAM,
    UPSERT_JOB,
    UPSERT_RUN,
    UPSERT_SERIES,
    UPSERT_STREAM,
    VERSIONS_TABLE,
    coverage_by_key,
    intent_rows,
    intents_by_stream,
    pending,
    series_by_key,
)
from .state import RunRecord, SeriesState

T = TypeVar("T")


def migrate_sqlite(db: sqlite3.Connection) -> None:
    """Apply the schema's missing migrations, each in one transaction with its version row."""
    db.execute(VERSIONS_TABLE)
    applied = {int(v) for (v,) in db.execute(APPLIED_VERSIONS).fetchall()}
    for migration in pending(applied):
        with db:
            db.execute("BEGIN IMMEDIATE")
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                RECORD_VERSION,
                (migration.version, migration.description, round(time.time() * 1000)),
            )


def open_sqlite(path: str) -> sqlite3.Connection:
    """A connection for one worker thread in WAL mode (readers never block the writer). Several
    components share the state file (the state, the catalog), each with its own connection."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
    db.execute("PRAGMA busy_timeout=5000")
    return db


def connect_sqlite(path: str) -> sqlite3.Connection:
    """`open_sqlite`, with the state's schema brought up to date."""
    db = open_sqlite(path)
    migrate_sqlite(db)
    return db


_WHERE_SERIES = "exchange=? AND symbol=? AND timeframe=?"


class SqliteState:
    """`StateStore` in a SQLite file at `path` (see `state.py` for the contract)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        self._db = connect_sqlite(self._path)

    async def open(self) -> None:
        await self._run(self._open)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("state store used before open()")
        return self._db

    def _coverage(self, key: JobKey) -> list[Interval]:
        rows = self._conn.execute(
            f"SELECT start_ms, end_ms FROM coverage WHERE {_WHERE_SERIES} ORDER BY start_ms",
            (key.exchange, key.symbol, key.timeframe),
        ).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    async def coverage(self, key: JobKey) -> list[Interval]:
        return await self._run(self._coverage, key)

    def _coverage_of_exchange(self, exchange: str) -> dict[JobKey, list[Interval]]:
        rows = self._conn.execute(
            "SELECT symbol, timeframe, start_ms, end_ms FROM coverage WHERE exchange=?"
            " ORDER BY symbol, timeframe, start_ms",
            (exchange,),
        ).fetchall()
        return coverage_by_key(exchange, rows)

    async def coverage_of_exchange(self, exchange: str) -> dict[JobKey, list[Interval]]:
        return await self._run(self._coverage_of_exchange, exchange)

    def _add_coverage_in_transaction(self, key: JobKey, intervals: list[Interval]) -> None:
        merged = merge([*self._coverage(key), *intervals])
        where = (key.exchange, key.symbol, key.timeframe)
        self._conn.execute(f"DELETE FROM coverage WHERE {_WHERE_SERIES}", where)
        self._conn.executemany(
            "INSERT INTO coverage VALUES (?, ?, ?, ?, ?)", [(*where, a, b) for a, b in merged]
        )

    def _add_coverage(self, key: JobKey, intervals: list[Interval], job: JobRecord | None) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._add_coverage_in_transaction(key, intervals)
            if job is not None:
                self._conn.execute(UPSERT_JOB, astuple(job))

    def add_coverage(
        self, key: JobKey, intervals: list[Interval], job: JobRecord | None = None
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        intervals = [i for i in intervals if i[0] < i[1]]
        if intervals:
            return loop.run_in_executor(self._executor, self._add_coverage, key, intervals, job)
        if job is not None:
            return loop.run_in_executor(self._executor, self._save_jobs, [job])
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return done

    def _forget(self, key: JobKey) -> None:
        where = (key.exchange, key.symbol, key.timeframe)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(f"DELETE FROM coverage WHERE {_WHERE_SERIES}", where)
            self._conn.execute(f"DELETE FROM jobs WHERE {_WHERE_SERIES}", where)

    async def forget(self, key: JobKey) -> None:
        await self._run(self._forget, key)

    def _save_jobs(self, records: list[JobRecord]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(UPSERT_JOB, [astuple(r) for r in records])

    async def save_jobs(self, records: list[JobRecord]) -> None:
        if records:
            await self._run(self._save_jobs, records)

    def _load_jobs(self, mode: str) -> list[JobRecord]:
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE mode=?", (mode,)
        ).fetchall()
        return [JobRecord(*row) for row in rows]

    async def load_jobs(self, mode: str) -> list[JobRecord]:
        return await self._run(self._load_jobs, mode)

    def _last_run(self, mode: str) -> RunRecord | None:
        row = self._conn.execute(
            "SELECT mode, start_ms, end_ms, started_ms, finished_ms FROM runs WHERE mode=?",
            (mode,),
        ).fetchone()
        return RunRecord(*row) if row else None

    async def last_run(self, mode: str) -> RunRecord | None:
        return await self._run(self._last_run, mode)

    def _save_run(self, run: RunRecord) -> None:
        self._conn.execute(UPSERT_RUN, astuple(run))

    async def save_run(self, run: RunRecord) -> None:
        await self._run(self._save_run, run)

    # --- the Storage Write API's bookkeeping (store.write_streams.WriteStreamState) ---------

    def _stream_position(self, owner: str) -> StreamPosition | None:
        row = self._conn.execute(SELECT_STREAM, (owner,)).fetchone()
        return StreamPosition(*row) if row else None

    async def stream_position(self, owner: str) -> StreamPosition | None:
        """The committed stream `owner` writes to, and its next offset."""
        return await self._run(self._stream_position, owner)

    def _save_stream_position(self, owner: str, position: StreamPosition) -> None:
        with self._conn:
            self._conn.execute(UPSERT_STREAM, (owner, *astuple(position)))

    async def save_stream_position(self, owner: str, position: StreamPosition) -> None:
        """Replace `owner`'s position durably (WAL: it survives the process being killed)."""
        await self._run(self._save_stream_position, owner, position)

    def _save_commit_intent(self, intent: CommitIntent) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(INSERT_INTENT, intent_rows(intent, ""))

    async def save_commit_intent(self, intent: CommitIntent) -> None:
        """Record, before its commit, which candles a pending stream holds."""
        await self._run(self._save_commit_intent, intent)

    def _commit_intents(self) -> list[CommitIntent]:
        return intents_by_stream(self._conn.execute(SELECT_INTENTS, ("",)).fetchall())

    async def commit_intents(self) -> list[CommitIntent]:
        """Intents recorded and not settled: their process stopped around the commit."""
        return await self._run(self._commit_intents)

    def _settle_commit(self, stream: str, committed: bool) -> None:
        intents = [i for i in self._commit_intents() if i.stream == stream]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for intent in intents if committed else []:
                for key, spans in intent.spans.items():
                    self._add_coverage_in_transaction(key, spans)
            self._conn.execute("DELETE FROM commit_intents WHERE stream=?", (stream,))

    async def settle_commit(self, stream: str, committed: bool) -> None:
        """Forget `stream`'s intent; if it was `committed`, add its candles to the coverage
        ledger in the same transaction (the candles are in the table: never fetch them again)."""
        await self._run(self._settle_commit, stream, committed)

    def _load_series(self, key: JobKey | None) -> dict[JobKey, SeriesState]:
        if key is None:
            return series_by_key(self._conn.execute(SELECT_SERIES).fetchall())
        where = (key.exchange, key.symbol, key.timeframe)
        return series_by_key(self._conn.execute(SELECT_ONE_SERIES, where).fetchall())

    async def load_indicator_series(self, key: JobKey | None = None) -> dict[JobKey, SeriesState]:
        return await self._run(self._load_series, key)

    def _save_series(self, key: JobKey, series: SeriesState) -> None:
        self._conn.execute(
            UPSERT_SERIES, (key.exchange, key.symbol, key.timeframe, *astuple(series))
        )

    async def save_indicator_series(self, key: JobKey, series: SeriesState) -> None:
        await self._run(self._save_series, key, series)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)
