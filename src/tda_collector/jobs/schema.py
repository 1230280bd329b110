"""The state's one schema, as numbered migrations that both backends (SQLite, Postgres) apply.

The SQL is the subset both dialects share (`TEXT`, `BIGINT`, `INSERT ... ON CONFLICT ... DO
UPDATE`, `?` placeholders; the Postgres backend turns `?` into `%s`), so a table is declared
once. `schema_migrations` records each applied version; opening a state applies the missing
ones in order, each in one transaction with its row, so a crash mid-way leaves the previous
version whole. Migration 1 uses `IF NOT EXISTS` because state files written before versioning
already hold its tables: they are adopted as version 1.

To add a table: append a `Migration` with the next number;
never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from ..intervals import Interval
from ..models import JobKey
from ..store.write_streams import CommitIntent
from .model import JobRecord
from .state import SeriesState

# A record field's annotation -> its column type (BIGINT: epoch ms overflow Postgres' INTEGER).
_SQL_TYPES = {
    "str": "TEXT NOT NULL",
    "str | None": "TEXT",
    "int": "BIGINT NOT NULL",
    "int | None": "BIGINT",
}
JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
JOB_KEY = ("exchange", "symbol", "timeframe", "mode")  # a job's identity (see `job_id`)
JOB_COLUMNS = ", ".join(JOB_FIELDS)


def upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    """`INSERT ... ON CONFLICT (key) DO UPDATE` of every other column, with `?` placeholders."""
    updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


UPSERT_JOB = upsert("jobs", JOB_FIELDS, JOB_KEY)
SERIES_COLUMNS = ("exchange", "symbol", "timeframe", "last_ms", "state", "dirty_from_ms")
SELECT_SERIES = f"SELECT {', '.join(SERIES_COLUMNS)} FROM indicator_series"
SELECT_ONE_SERIES = SELECT_SERIES + " WHERE exchange = ? AND symbol = ? AND timeframe = ?"
UPSERT_SERIES = upsert("indicator_series", SERIES_COLUMNS, SERIES_COLUMNS[:3])
UPSERT_RUN = upsert("runs", ("mode", "start_ms", "end_ms", "started_ms", "finished_ms"), ("mode",))
UPSERT_STREAM = upsert(
    "write_streams", ("owner", "stream", "next_offset", "in_doubt_rows"), ("owner",)
)
INTENT_COLUMNS = ("stream", "exchange", "symbol", "timeframe", "start_ms", "end_ms")
SELECT_STREAM = "SELECT stream, next_offset, in_doubt_rows FROM write_streams WHERE owner = ?"
# An intent's `owner` is the instance that recorded it ('' for the one process of a SQLite
# file): an instance settles its own, and those of instances gone (see `postgres_state`), never
# the commit in flight of an instance alive.
INSERT_INTENT = (
    f"INSERT INTO commit_intents ({', '.join(INTENT_COLUMNS)}, owner) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INTENT_ORDER = " ORDER BY stream, exchange, symbol, timeframe, start_ms"
SELECT_INTENTS = f"SELECT {', '.join(INTENT_COLUMNS)} FROM commit_intents WHERE owner = ?"
SELECT_INTENTS += _INTENT_ORDER
SELECT_STREAM_INTENTS = f"SELECT {', '.join(INTENT_COLUMNS)} FROM commit_intents WHERE stream = ?"
SELECT_STREAM_INTENTS += _INTENT_ORDER


@dataclass(frozen=True)
class Migration:
    """One version of the schema: `statements` both backends run, then `postgres_only` ones
    (server-side functions) that only Postgres has, or needs."""

    version: int
    description: str
    statements: tuple[str, ...]
    postgres_only: tuple[str, ...] = ()


# The shared request budget (see `exchange/shared_budget.py`): GCRA, one row per budget group,
# times in epoch seconds of the server's clock, so the instances' clocks never matter. One call
# reserves the next slot of `cost` and answers how long to wait for it: one round trip per
# request, atomic under any number of callers (the row lock orders them).
_ACQUIRE_BUDGET = """
CREATE OR REPLACE FUNCTION tda_acquire_budget(
    grp TEXT, cost DOUBLE PRECISION, interval_s DOUBLE PRECISION, tolerance_s DOUBLE PRECISION
) RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $$
DECLARE
    now_s DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
    held DOUBLE PRECISION;
    paused DOUBLE PRECISION;
BEGIN
    SELECT tat, paused_until INTO held, paused FROM budgets WHERE budget_group = grp FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO budgets (budget_group, tat, paused_until, acquired)
        VALUES (grp, now_s, 0, 0) ON CONFLICT (budget_group) DO NOTHING;
        SELECT tat, paused_until INTO held, paused FROM budgets
        WHERE budget_group = grp FOR UPDATE;
    END IF;
    held := greatest(held, paused);
    UPDATE budgets SET tat = greatest(held, now_s) + cost * interval_s,
        acquired = acquired + cost WHERE budget_group = grp;
    RETURN greatest(0, paused - now_s, held - tolerance_s - now_s);
END $$"""

_PAUSE_BUDGET = """
CREATE OR REPLACE FUNCTION tda_pause_budget(grp TEXT, wait_s DOUBLE PRECISION)
RETURNS VOID LANGUAGE sql AS $$
    INSERT INTO budgets (budget_group, tat, paused_until, acquired)
    VALUES (grp, 0, extract(epoch FROM clock_timestamp()) + wait_s, 0)
    ON CONFLICT (budget_group) DO UPDATE SET paused_until =
        greatest(budgets.paused_until, excluded.paused_until)
$$"""


# Record fields that later migrations add to the jobs table (version 1 must stay as shipped).
_LATER_JOB_FIELDS = frozenset({"runs"})
_JOBS_TABLE = (
    "CREATE TABLE IF NOT EXISTS jobs (\n    {columns},\n    PRIMARY KEY ({key})\n)".format(
        columns=",\n    ".join(
            f"{f.name} {_SQL_TYPES[str(f.type)]}"
            for f in fields(JobRecord)
            if f.name not in _LATER_JOB_FIELDS
        ),
        key=", ".join(JOB_KEY),
    )
)

# The catalog (`catalog.py`): connectors and job definitions. Listed in the order they were
# first saved: SQLite's rowid gives it; Postgres has no rowid, hence its `position` column.
CATALOG_TABLES = (
    """CREATE TABLE IF NOT EXISTS connectors (
    id TEXT PRIMARY KEY, body TEXT NOT NULL, enabled INTEGER NOT NULL, file_body TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS job_definitions (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    kind TEXT NOT NULL, schedule TEXT NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe)
)""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "coverage ledger, jobs, runs, indicator series",
        (
            """CREATE TABLE IF NOT EXISTS coverage (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    start_ms BIGINT NOT NULL, end_ms BIGINT NOT NULL,
    PRIMARY KEY (exchange, symbol, timeframe, start_ms)
)""",
            _JOBS_TABLE,
            """CREATE TABLE IF NOT EXISTS runs (
    mode TEXT PRIMARY KEY, start_ms BIGINT, end_ms BIGINT,
    started_ms BIGINT NOT NULL, finished_ms BIGINT
)""",
            """CREATE TABLE IF NOT EXISTS indicator_series (
    exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    last_ms BIGINT, state TEXT, dirty_from_ms BIGINT,
    PRIMARY KEY (exchange, symbol, timeframe)
)""",
        ),
    ),
    Migration(
        2,
        "request budgets shared by instances",
        (
            """CREATE TABLE budgets (
    budget_group TEXT PRIMARY KEY, tat DOUBLE PRECISION NOT NULL,
    paused_until DOUBLE PRECISION NOT NULL, acquired DOUBLE PRECISION NOT NULL
)""",
        ),
        (_ACQUIRE_BUDGET, _PAUSE_BUDGET),
    ),
    Migration(
        3,
        "job leases and the instances' heartbeats",
        (
            """CREATE TABLE job_leases (
    run_id TEXT NOT NULL, job_id TEXT NOT NULL, owner TEXT,
    locked_until DOUBLE PRECISION NOT NULL, claims BIGINT NOT NULL,
    status TEXT, error TEXT,
    PRIMARY KEY (run_id, job_id)
)""",
            """CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY, mode TEXT NOT NULL,
    started_ms BIGINT NOT NULL, heartbeat_ms BIGINT NOT NULL
)""",
        ),
    ),
    # `IF NOT EXISTS`: SQLite files written before versioning may hold both tables already.
    Migration(
        4,
        "the BigQuery Storage Write API's stream positions and commit intents",
        (
            """CREATE TABLE IF NOT EXISTS write_streams (
    owner TEXT PRIMARY KEY, stream TEXT NOT NULL, next_offset BIGINT NOT NULL,
    in_doubt_rows BIGINT
)""",
            """CREATE TABLE IF NOT EXISTS commit_intents (
    stream TEXT NOT NULL, exchange TEXT NOT NULL, symbol TEXT NOT NULL, timeframe TEXT NOT NULL,
    start_ms BIGINT NOT NULL, end_ms BIGINT NOT NULL
)""",
            "ALTER TABLE commit_intents ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX IF NOT EXISTS commit_intents_stream ON commit_intents (stream)",
        ),
    ),
    Migration(
        5,
        "a live job's runs, counted across restarts",
        ("ALTER TABLE jobs ADD COLUMN runs BIGINT NOT NULL DEFAULT 0",),
    ),
    # `IF NOT EXISTS`: SQLite state files may hold the catalog's tables already (it made them
    # itself before they were part of the schema).
    Migration(
        6,
        "connectors and job definitions",
        CATALOG_TABLES,
        (
            "ALTER TABLE connectors ADD COLUMN position BIGSERIAL",
            "ALTER TABLE job_definitions ADD COLUMN position BIGSERIAL",
        ),
    ),
    Migration(
        7,
        "which jobs disabling a connector paused",
        ("ALTER TABLE connectors ADD COLUMN paused_jobs TEXT NOT NULL DEFAULT '[]'",),
    ),
)

VERSIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_ms BIGINT NOT NULL
)"""
RECORD_VERSION = "INSERT INTO schema_migrations (version, description, applied_ms) VALUES (?, ?, ?)"
APPLIED_VERSIONS = "SELECT version FROM schema_migrations"


def pending(applied: set[int]) -> list[Migration]:
    """The migrations not applied yet, in order."""
    return [m for m in MIGRATIONS if m.version not in applied]


def series_by_key(rows: Iterable[tuple[Any, ...]]) -> dict[JobKey, SeriesState]:
    """`SELECT_SERIES`'s rows by series."""
    return {JobKey(e, s, tf): SeriesState(last, st, dirty) for e, s, tf, last, st, dirty in rows}


def intents_by_stream(rows: Iterable[tuple[Any, ...]]) -> list[CommitIntent]:
    """`commit_intents` rows (`INTENT_COLUMNS`, ordered by stream) as one intent per stream."""
    found: dict[str, dict[JobKey, list[Interval]]] = {}
    for stream, exchange, symbol, timeframe, start, end in rows:
        spans = found.setdefault(stream, {})
        spans.setdefault(JobKey(exchange, symbol, timeframe), []).append((int(start), int(end)))
    return [CommitIntent(stream, spans) for stream, spans in found.items()]


def intent_rows(intent: CommitIntent, owner: str) -> list[tuple[Any, ...]]:
    """An intent as `commit_intents` rows (`INSERT_INTENT`'s columns)."""
    return [
        (intent.stream, k.exchange, k.symbol, k.timeframe, a, b, owner)
        for k, spans in intent.spans.items()
        for a, b in spans
    ]


def coverage_by_key(exchange: str, rows: Iterable[tuple[Any, ...]]) -> dict[JobKey, list[Interval]]:
    """(symbol, timeframe, start_ms, end_ms) rows of one exchange, ordered, by series."""
    found: dict[JobKey, list[Interval]] = {}
    for symbol, timeframe, start, end in rows:
        found.setdefault(JobKey(exchange, symbol, timeframe), []).append((int(start), int(end)))
    return found
