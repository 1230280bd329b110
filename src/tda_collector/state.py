"""Durable job state in SQLite: which parts of each series' time range are already stored.

The ledger holds merged half-open intervals per (exchange, symbol, timeframe). An interval is
added only after the store has made its rows durable, so after a crash the worst case is one
page fetched again per job. Intervals also record the exchange's own holes (maintenance), so
those are asked for once and never again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .intervals import Interval, merge
from .models import JobKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coverage (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, start_ms)
);
"""


class StateStore:
    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process crashes
        self._db.executescript(_SCHEMA)

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

    def _add_coverage(self, key: JobKey, interval: Interval) -> None:
        merged = merge([*self._coverage(key), interval])
        where = (key.exchange, key.symbol, key.timeframe)
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "DELETE FROM coverage WHERE exchange=? AND symbol=? AND timeframe=?", where
            )
            self._conn.executemany(
                "INSERT INTO coverage VALUES (?, ?, ?, ?, ?)", [(*where, a, b) for a, b in merged]
            )

    async def add_coverage(self, key: JobKey, start_ms: int, end_ms: int) -> None:
        """Record that [start_ms, end_ms) of this series is durably stored (or has no candles)."""
        if start_ms < end_ms:
            await self._run(self._add_coverage, key, (start_ms, end_ms))

    def _forget(self, key: JobKey) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "DELETE FROM coverage WHERE exchange=? AND symbol=? AND timeframe=?",
                (key.exchange, key.symbol, key.timeframe),
            )

    async def forget(self, key: JobKey) -> None:
        """Drop a series' ledger (its store lost the rows), so the next run fetches them again."""
        await self._run(self._forget, key)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)
