"""Durable job state in SQLite: which parts of each series' time range are already stored.

The ledger holds merged half-open intervals per (exchange, symbol, timeframe). An interval is
added only after the store has made its rows durable, so after a crash the worst case is one
page fetched again per job. Intervals also record the exchange's own holes (maintenance), so
those are asked for once and never again.

Beside it, one row per job (exchange, symbol, timeframe, mode) holds what the jobs API shows:
status, counts, cursor, last error, last and next run. A history page updates its job row in
the same transaction as its ledger interval, so the two never disagree after a crash; other
changes (status, live runs) are saved in batches. A `runs` row per mode tells whether the last
run finished, which decides what a restart carries over (see `control.py`).

The `jobs` table's columns, and the column lists that write and read it, are derived from the
fields of `JobRecord` (names and SQLite types), so a field is declared in one place; the table
is the one existing state files hold.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ..intervals import Interval, merge
from ..models import JobKey
from ..store.write_streams import CommitIntent, StreamPosition
from .model import JobRecord

# A record field's annotation -> its column type.
_SQL_TYPES = {
    "str": "TEXT NOT NULL",
    "str | None": "TEXT",
    "int": "INTEGER NOT NULL",
    "int | None": "INTEGER",
}
_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
_JOB_KEY = ("exchange", "symbol", "timeframe", "mode")  # a job's identity (see `job_id`)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coverage (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, start_ms)
);
CREATE TABLE IF NOT EXISTS jobs (
    {columns},
    PRIMARY KEY ({key})
);
CREATE TABLE IF NOT EXISTS runs (
    mode TEXT PRIMARY KEY, start_ms INTEGER, end_ms INTEGER,
    started_ms INTEGER NOT NULL, finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS write_streams (
    owner TEXT PRIMARY KEY, stream TEXT NOT NULL, next_offset INTEGER NOT NULL,
    in_doubt_rows INTEGER
);
CREATE TABLE IF NOT EXISTS commit_intents (
    stream TEXT NOT NULL, exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL
);
""".format(
    columns=",\n    ".join(f"{f.name} {_SQL_TYPES[str(f.type)]}" for f in fields(JobRecord)),
    key=", ".join(_JOB_KEY),
)
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_UPSERT_JOB = (
    f"INSERT OR REPLACE INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * len(_JOB_FIELDS))})"
)

T = TypeVar("T")


@dataclass(frozen=True)
class RunRecord:
    """The newest run of a mode: its requested range, and when it finished (None: it did not,
    so the next start is a restart of it)."""

    mode: str
    start_ms: int | None
    end_ms: int | None
    started_ms: int
    finished_ms: int | None


def connect_sqlite(path: str, schema: str) -> sqlite3.Connection:
    """A connection for one worker thread, in WAL mode (readers never block the writer), with
    `schema` applied. Several components share the state file, each with its own connection."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


class StateStore:
    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        self._db = connect_sqlite(self._path, _SCHEMA)

    async def open(self) -> None:
        await self._run(self._open)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("state store used before open()")
        return self._db

    def _coverage(self, key: JobKey) -> list[Interval]:
        rows = self._conn.execute(
            "SELECT start_ms, end_ms FROM coverage WHERE exchange=? AND symbol=? AND timeframe=?"
            " ORDER BY start_ms",
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
        found: dict[JobKey, list[Interval]] = {}
        for symbol, timeframe, start, end in rows:
            found.setdefault(JobKey(exchange, symbol, timeframe), []).append((int(start), int(end)))
        return found

    async def coverage_of_exchange(self, exchange: str) -> dict[JobKey, list[Interval]]:
        """Every series' ledger of one exchange in one query (thousands of jobs at start)."""
        return await self._run(self._coverage_of_exchange, exchange)

    def _add_coverage_in_transaction(self, key: JobKey, intervals: list[Interval]) -> None:
        merged = merge([*self._coverage(key), *intervals])
        where = (key.exchange, key.symbol, key.timeframe)
        self._conn.execute(
            "DELETE FROM coverage WHERE exchange=? AND symbol=? AND timeframe=?", where
        )
        self._conn.executemany(
            "INSERT INTO coverage VALUES (?, ?, ?, ?, ?)", [(*where, a, b) for a, b in merged]
        )

    def _add_coverage(self, key: JobKey, intervals: list[Interval], job: JobRecord | None) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._add_coverage_in_transaction(key, intervals)
            if job is not None:
                self._conn.execute(_UPSERT_JOB, astuple(job))

    def add_coverage(
        self, key: JobKey, intervals: list[Interval], job: JobRecord | None = None
    ) -> asyncio.Future[None]:
        """Record that these [start_ms, end_ms) parts of the series are durably stored (or have
        no candles), and with them, in the same transaction, the job row that counts the page.

        Submitted at once, in call order with every other write here; await the returned
        future (it can be shielded: the write goes on when the caller is cancelled)."""
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
            self._conn.execute(
                "DELETE FROM coverage WHERE exchange=? AND symbol=? AND timeframe=?", where
            )
            self._conn.execute(
                "DELETE FROM jobs WHERE exchange=? AND symbol=? AND timeframe=?", where
            )

    async def forget(self, key: JobKey) -> None:
        """Drop a series' ledger and job rows (its store lost the rows), so the next run fetches
        them again and counts from zero."""
        await self._run(self._forget, key)

    def _save_jobs(self, records: list[JobRecord]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(_UPSERT_JOB, [astuple(r) for r in records])

    async def save_jobs(self, records: list[JobRecord]) -> None:
        """Upsert job rows, all in one transaction."""
        if records:
            await self._run(self._save_jobs, records)

    def _load_jobs(self, mode: str) -> list[JobRecord]:
        rows = self._conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE mode=?", (mode,)
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
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)", astuple(run))

    async def save_run(self, run: RunRecord) -> None:
        await self._run(self._save_run, run)

    # --- the Storage Write API's bookkeeping (store.write_streams.WriteStreamState) ---------

    def _stream_position(self, owner: str) -> StreamPosition | None:
        row = self._conn.execute(
            "SELECT stream, next_offset, in_doubt_rows FROM write_streams WHERE owner=?", (owner,)
        ).fetchone()
        return StreamPosition(*row) if row else None

    async def stream_position(self, owner: str) -> StreamPosition | None:
        """The committed stream `owner` writes to, and its next offset."""
        return await self._run(self._stream_position, owner)

    def _save_stream_position(self, owner: str, position: StreamPosition) -> None:
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO write_streams VALUES (?, ?, ?, ?)",
                (owner, *astuple(position)),
            )

    async def save_stream_position(self, owner: str, position: StreamPosition) -> None:
        """Replace `owner`'s position durably (WAL: it survives the process being killed)."""
        await self._run(self._save_stream_position, owner, position)

    def _save_commit_intent(self, intent: CommitIntent) -> None:
        rows = [
            (intent.stream, k.exchange, k.symbol, k.timeframe, a, b)
            for k, spans in intent.spans.items()
            for a, b in spans
        ]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO commit_intents VALUES (?, ?, ?, ?, ?, ?)", rows)

    async def save_commit_intent(self, intent: CommitIntent) -> None:
        """Record, before its commit, which candles a pending stream holds."""
        await self._run(self._save_commit_intent, intent)

    def _commit_intents(self) -> list[CommitIntent]:
        found: dict[str, dict[JobKey, list[Interval]]] = {}
        for stream, exchange, symbol, timeframe, a, b in self._conn.execute(
            "SELECT * FROM commit_intents ORDER BY stream, exchange, symbol, timeframe, start_ms"
        ):
            spans = found.setdefault(stream, {})
            spans.setdefault(JobKey(exchange, symbol, timeframe), []).append((int(a), int(b)))
        return [CommitIntent(stream, spans) for stream, spans in found.items()]

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

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)
