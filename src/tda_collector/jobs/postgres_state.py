"""The shared state backend: `StateStore` in Postgres (`state_url`), for several instances.

psycopg 3 with its async pool: native asyncio (no worker threads), a typed API that mypy
--strict checks (asyncpg ships no type information), and the same SQL text as SQLite once `?`
becomes `%s` (`schema.py` holds the one schema).

Postgres going away (a restart, a network cut) never loses a write nor crashes the run: every
call is retried with capped backoff until the server answers again, each failure reported as a
`state_unavailable` event, and meanwhile the callers wait (a page's ledger write, a job's row),
which stops their jobs from moving on. Every write is idempotent (the ledger is a set, rows are
upserts), so a write whose commit was lost with the connection is simply sent again. Errors
that waiting cannot cure (a wrong password, a missing database) are raised at once as
`PermanentStoreError`.

Writes of one instance are applied in call order (one writer lock, FIFO); a series' ledger is
merged under a transaction-scoped advisory lock on the series, so instances adding pages of
the same series at once never lose one another's intervals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import astuple
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import PermanentStoreError, TransientStoreError
from ..intervals import Interval, merge
from ..models import JobKey
from ..observability.events import EventLog
from ..retry import Failure, RetryPolicy, retry_async
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
    SELECT_STREAM_INTENTS,
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
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

# Capped backoff while the server is away; forever, since losing a write is not an option.
STATE_RETRY = RetryPolicy(base_s=0.2, factor=2.0, cap_s=5.0, attempts=1)
# Server answers that waiting cannot cure: bad credentials (28), no such database (3D). A
# refused connection carries no SQLSTATE, only the server's FATAL line, hence the phrases.
_PERMANENT_CLASSES = ("28", "3D")
_PERMANENT_PHRASES = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "no password supplied",
)
_MIGRATION_LOCK = 0x7DA_0001  # one instance migrates at a time
# An instance without a heartbeat for this long is gone: its commit intents are settled by
# whichever instance starts next. Heartbeats come every third of a lease (15 s by default).
ORPHANED_AFTER_S = 120.0
_WHERE_SERIES = "exchange=%s AND symbol=%s AND timeframe=%s"


def pg(sql: str) -> str:
    """`schema.py`'s portable SQL with Postgres placeholders."""
    return sql.replace("?", "%s")


_SELECT_SETTLEABLE = pg(
    SELECT_INTENTS.replace(
        "WHERE owner = ?",
        "WHERE (owner = ? OR owner NOT IN (SELECT instance_id FROM instances"
        " WHERE heartbeat_ms >= ((extract(epoch FROM clock_timestamp()) - ?) * 1000)::BIGINT))",
    )
)


def _series(key: JobKey) -> tuple[str, str, str]:
    return (key.exchange, key.symbol, key.timeframe)


async def _merge_coverage(conn: Conn, key: JobKey, intervals: list[Interval]) -> None:
    """Add `intervals` to the series' ledger inside the caller's transaction, under an advisory
    lock on the series so that instances adding to it at once never lose each other's."""
    if not intervals:
        return
    where = _series(key)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (str(key),))
    cur = await conn.execute(f"SELECT start_ms, end_ms FROM coverage WHERE {_WHERE_SERIES}", where)
    merged = merge([*((int(a), int(b)) for a, b in await cur.fetchall()), *intervals])
    await conn.execute(f"DELETE FROM coverage WHERE {_WHERE_SERIES}", where)
    async with conn.cursor() as insert:
        await insert.executemany(
            "INSERT INTO coverage VALUES (%s, %s, %s, %s, %s)", [(*where, a, b) for a, b in merged]
        )


def _translated(exc: psycopg.Error) -> Exception:
    state = exc.sqlstate or ""
    message = f"state database: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    if state[:2] in _PERMANENT_CLASSES or any(p in message for p in _PERMANENT_PHRASES):
        return PermanentStoreError(message)
    return TransientStoreError(message)


async def migrate_postgres(conn: Conn) -> None:
    """Apply the schema's missing migrations in one transaction, one instance at a time."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(VERSIONS_TABLE)
        cur = await conn.execute(APPLIED_VERSIONS)
        applied = {int(v) for (v,) in await cur.fetchall()}
        for migration in pending(applied):
            for statement in (*migration.statements, *migration.postgres_only):
                await conn.execute(statement)
            row = (migration.version, migration.description, round(time.time() * 1000))
            await conn.execute(pg(RECORD_VERSION), row)


class PostgresState:
    """`StateStore` in the Postgres database at `url` (see `state.py` for the contract)."""

    def __init__(
        self,
        url: str,
        events: EventLog,
        *,
        pool_size: int = 4,
        policy: RetryPolicy = STATE_RETRY,
        instance: str = "",
    ) -> None:
        """`instance` owns the commit intents this state records and settles (see schema)."""
        self._url = url
        self._instance = instance
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            timeout=10.0,
            name="tda-state",
        )
        self._events = events
        self._policy = policy
        self._write_lock = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()

    def _report(self, failure: Failure) -> None:
        self._events.warning(
            "state_unavailable",
            f"the state database did not answer; retrying in {failure.wait_s:.1f}s",
            attempt=failure.attempt,
            wait_s=round(failure.wait_s, 3),
            error=str(failure.error)[:300],
        )

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until the server answers (see the module), its errors translated."""

        async def translated() -> T:
            try:
                return await attempt()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise _translated(exc) from exc
            except PoolTimeout as exc:
                raise TransientStoreError(f"state database: {exc}") from exc

        return await retry_async(
            translated,
            self._policy,
            transient=(TransientStoreError,),
            on_failure=self._report,
            forever=True,
        )

    async def call(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """`work` on a pooled connection, retried until the server answers."""

        async def attempt() -> T:
            async with self._pool.connection() as conn:
                return await work(conn)

        return await self._retrying(attempt)

    async def open(self) -> None:
        """Connect (waiting for a server that is not up yet; failing at once on credentials
        or a database it refuses), bring the schema up to date, then fill the pool."""
        await self._retrying(self._migrate)
        await self._pool.open(wait=False)

    async def _migrate(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
            await migrate_postgres(conn)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._pool.close()

    async def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows `sql` answers, retried as every call."""

        async def read(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

        return await self.call(read)

    def _write(self, work: Callable[[Conn], Awaitable[None]]) -> asyncio.Future[None]:
        """Start a write now; writes take the writer lock in call order (asyncio's is FIFO)."""

        async def write() -> None:
            async with self._write_lock:
                await self.call(work)

        task = asyncio.ensure_future(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def coverage(self, key: JobKey) -> list[Interval]:
        rows = await self.rows(
            f"SELECT start_ms, end_ms FROM coverage WHERE {_WHERE_SERIES} ORDER BY start_ms",
            _series(key),
        )
        return [(int(a), int(b)) for a, b in rows]

    async def coverage_of_exchange(self, exchange: str) -> dict[JobKey, list[Interval]]:
        rows = await self.rows(
            "SELECT symbol, timeframe, start_ms, end_ms FROM coverage WHERE exchange=%s"
            " ORDER BY symbol, timeframe, start_ms",
            (exchange,),
        )
        return coverage_by_key(exchange, rows)

    def add_coverage(
        self, key: JobKey, intervals: list[Interval], job: JobRecord | None = None
    ) -> asyncio.Future[None]:
        intervals = [i for i in intervals if i[0] < i[1]]

        async def work(conn: Conn) -> None:
            async with conn.transaction():
                await _merge_coverage(conn, key, intervals)
                if job is not None:
                    await conn.execute(pg(UPSERT_JOB), astuple(job))

        return self._write(work)

    async def forget(self, key: JobKey) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute(f"DELETE FROM coverage WHERE {_WHERE_SERIES}", _series(key))
                await conn.execute(f"DELETE FROM jobs WHERE {_WHERE_SERIES}", _series(key))

        await self._write(work)

    async def save_jobs(self, records: list[JobRecord]) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(pg(UPSERT_JOB), [astuple(r) for r in records])

        if records:
            await self._write(work)

    async def load_jobs(self, mode: str) -> list[JobRecord]:
        rows = await self.rows(f"SELECT {JOB_COLUMNS} FROM jobs WHERE mode=%s", (mode,))
        return [JobRecord(*row) for row in rows]

    async def last_run(self, mode: str) -> RunRecord | None:
        rows = await self.rows(
            "SELECT mode, start_ms, end_ms, started_ms, finished_ms FROM runs WHERE mode=%s",
            (mode,),
        )
        return RunRecord(*rows[0]) if rows else None

    async def save_run(self, run: RunRecord) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(pg(UPSERT_RUN), astuple(run))

        await self._write(work)

    async def load_indicator_series(self, key: JobKey | None = None) -> dict[JobKey, SeriesState]:
        if key is None:
            return series_by_key(await self.rows(SELECT_SERIES, ()))
        return series_by_key(await self.rows(pg(SELECT_ONE_SERIES), _series(key)))

    async def save_indicator_series(self, key: JobKey, series: SeriesState) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(pg(UPSERT_SERIES), (*_series(key), *astuple(series)))

        await self._write(work)

    # --- the Storage Write API's bookkeeping (store.write_streams.WriteStreamState) ---------

    async def stream_position(self, owner: str) -> StreamPosition | None:
        rows = await self.rows(pg(SELECT_STREAM), (owner,))
        return StreamPosition(*rows[0]) if rows else None

    async def save_stream_position(self, owner: str, position: StreamPosition) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(pg(UPSERT_STREAM), (owner, *astuple(position)))

        await self._write(work)

    async def save_commit_intent(self, intent: CommitIntent) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(pg(INSERT_INTENT), intent_rows(intent, self._instance))

        await self._write(work)

    async def commit_intents(self) -> list[CommitIntent]:
        """This instance's unsettled intents, and those of instances gone: no heartbeat for
        `ORPHANED_AFTER_S` (the default `instance_id` changes at every start, so a killed
        instance's intents would otherwise wait forever, and a commit whose ledger update died
        with it would be fetched and written again)."""
        rows = await self.rows(_SELECT_SETTLEABLE, (self._instance, ORPHANED_AFTER_S))
        return intents_by_stream(rows)

    async def settle_commit(self, stream: str, committed: bool) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction():
                cur = await conn.execute(pg(SELECT_STREAM_INTENTS), (stream,))
                for intent in intents_by_stream(await cur.fetchall()) if committed else []:
                    for key, spans in intent.spans.items():
                        await _merge_coverage(conn, key, spans)
                await conn.execute("DELETE FROM commit_intents WHERE stream = %s", (stream,))

        await self._write(work)
