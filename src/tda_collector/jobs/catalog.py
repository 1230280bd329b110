"""Connectors and job definitions as persisted entities: what the daemon should collect.

A connector is one `exchanges[]` block of the config (validated by the same `ExchangeConfig`)
plus whether it is enabled. It declares live jobs for its symbols x timeframes. Beside the
connectors, a job definition per series records what the jobs API changed: a job added with
`POST /jobs` (with its schedule), or a declared job dismissed with `DELETE /jobs/{id}` (it comes
back only when a PUT of its connector declares it again).

What wins when `config.yaml` and the API disagree (`reconcile`): the newest change. At start a
file block is applied as an upsert only when it differs from what the file said the last time
it was applied; an unchanged file block leaves the connector as the API last set it. So an edit
of the file takes effect at the next start, and an API change survives restarts until the file's
block for that connector is edited. Connectors the API created stay when the file does not name
them; `enabled` lives only here (the file has no such key), so a disabled connector stays
disabled across restarts, and so does which of its jobs disabling paused (`paused_jobs`:
enabling resumes those only, never one a user had paused). A deleted connector is kept as a
tombstone (`deleted`) with the file block it was deleted under: the same file block does not
bring it back, an edited one does.

Where it lives: `SqliteCatalog` in the SQLite state file (its own connection and worker thread,
so blocking SQLite calls never run on the event loop); `postgres_catalog.PostgresCatalog` in the
Postgres state that instances share (`state_url`). Both hold the tables of `schema.py`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from ..config import ExchangeConfig
from ..models import JobKey
from .ledger import migrate_sqlite, open_sqlite
from .schedule import EACH_CLOSE, Schedule

DefinitionKind = Literal["added", "dismissed"]
ADDED: DefinitionKind = "added"
DISMISSED: DefinitionKind = "dismissed"

T = TypeVar("T")


def config_body(config: ExchangeConfig) -> str:
    """The block as canonical JSON: equal blocks give equal text (the idempotence check)."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Connector:
    """One exchange's connector. `file_body` is the config file's block for it as last applied
    (None: the API created it); `deleted`: a tombstone, shown nowhere; `paused_jobs`: the ids
    of the jobs that disabling it paused, which enabling resumes."""

    config: ExchangeConfig
    enabled: bool = True
    file_body: str | None = None
    deleted: bool = False
    paused_jobs: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.config.id


@dataclass(frozen=True)
class JobDefinition:
    key: JobKey
    kind: DefinitionKind
    schedule: Schedule = EACH_CLOSE


def reconcile(stored: list[Connector], file_blocks: list[ExchangeConfig]) -> list[Connector]:
    """The connectors after applying the file at start (see the module's rule): the stored ones
    in their order, then the file's new ones in the file's order."""
    by_id = {c.id: c for c in stored}
    for block in file_blocks:
        body = config_body(block)
        known = by_id.get(block.id)
        if known is None or (known.deleted and known.file_body != body):
            by_id[block.id] = Connector(block, True, body)
        elif known.file_body != body:
            by_id[block.id] = replace(known, config=block, file_body=body)
    return list(by_id.values())


def secrets_refusal(known: Connector | None, config: ExchangeConfig) -> str | None:
    """Why an API change to `known` (None: a new connector) may not take `config`, or None.
    Credentials come only from variables the config file names: the API may neither name
    others (their values would be sent to the exchange) nor re-point a connector that has
    credentials (`ccxt`: its URLs), so no change through the API can send a secret anywhere."""
    allowed: dict[str, str] = {}
    if known is not None and known.file_body is not None:
        allowed = ExchangeConfig.model_validate_json(known.file_body).credentials_env
    if config.credentials_env != allowed:
        return "credentials_env: only the config file may name credential variables"
    if allowed and known is not None and config.ccxt != known.config.ccxt:
        return "ccxt: not changeable through the API on a connector with credentials"
    return None


class Catalog(Protocol):
    """Persisted connectors and job definitions. Every call is one transaction."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def connectors(self) -> list[Connector]: ...

    async def save_connectors(self, connectors: list[Connector]) -> None: ...

    async def definitions(self) -> list[JobDefinition]: ...

    async def save_definition(self, definition: JobDefinition) -> None: ...

    async def drop_definitions(self, keys: list[JobKey]) -> None: ...


# Rows of the catalog's tables (`schema.CATALOG_TABLES`), as both backends read and write them.
CONNECTOR_COLUMNS = "id, body, enabled, file_body, deleted, paused_jobs"
DEFINITION_COLUMNS = "exchange, symbol, timeframe, kind, schedule"


def connector_row(c: Connector) -> tuple[str, str, int, str | None, int, str]:
    """A connector as a `connectors` row (`CONNECTOR_COLUMNS`)."""
    paused = json.dumps(list(c.paused_jobs))
    return (c.id, config_body(c.config), int(c.enabled), c.file_body, int(c.deleted), paused)


def connector_of(row: tuple[Any, ...]) -> Connector:
    """A `connectors` row read as (body, enabled, file_body, deleted, paused_jobs)."""
    body, on, file_body, gone, paused = row
    config = ExchangeConfig.model_validate_json(body)
    return Connector(config, bool(on), file_body, bool(gone), tuple(json.loads(paused)))


def definition_row(d: JobDefinition) -> tuple[str, str, str, str, str]:
    k = d.key
    return (k.exchange, k.symbol, k.timeframe, d.kind, d.schedule.model_dump_json())


def definition_of(row: tuple[Any, ...]) -> JobDefinition:
    """A `job_definitions` row (`DEFINITION_COLUMNS`)."""
    exchange, symbol, timeframe, kind, schedule = row
    key = JobKey(exchange, symbol, timeframe)
    return JobDefinition(key, kind, Schedule.model_validate_json(schedule))


class SqliteCatalog:
    """The catalog in the SQLite state file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("catalog used before open()")
        return self._db

    def _open(self) -> None:
        self._db = open_sqlite(self._path)
        migrate_sqlite(self._db)  # the state's schema: the catalog's tables are in it

    async def open(self) -> None:
        await self._run(self._open)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _connectors(self) -> list[Connector]:
        rows = self._conn.execute(
            "SELECT body, enabled, file_body, deleted, paused_jobs FROM connectors ORDER BY rowid"
        ).fetchall()
        return [connector_of(row) for row in rows]

    async def connectors(self) -> list[Connector]:
        return await self._run(self._connectors)

    def _save_connectors(self, connectors: list[Connector]) -> None:
        rows = [connector_row(c) for c in connectors]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            # An upsert keeps the row (and so the listing order) of a known connector.
            self._conn.executemany(
                f"INSERT INTO connectors ({CONNECTOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET body=excluded.body, enabled=excluded.enabled,"
                " deleted=excluded.deleted, file_body=excluded.file_body,"
                " paused_jobs=excluded.paused_jobs",
                rows,
            )

    async def save_connectors(self, connectors: list[Connector]) -> None:
        """Upsert these connectors, all in one transaction."""
        await self._run(self._save_connectors, connectors)

    def _definitions(self) -> list[JobDefinition]:
        rows = self._conn.execute(
            "SELECT exchange, symbol, timeframe, kind, schedule FROM job_definitions ORDER BY rowid"
        ).fetchall()
        return [definition_of(row) for row in rows]

    async def definitions(self) -> list[JobDefinition]:
        return await self._run(self._definitions)

    def _save_definition(self, d: JobDefinition) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT OR REPLACE INTO job_definitions VALUES (?, ?, ?, ?, ?)", definition_row(d)
            )

    async def save_definition(self, definition: JobDefinition) -> None:
        await self._run(self._save_definition, definition)

    def _drop_definitions(self, keys: list[JobKey]) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany(
                "DELETE FROM job_definitions WHERE exchange=? AND symbol=? AND timeframe=?",
                [(k.exchange, k.symbol, k.timeframe) for k in keys],
            )

    async def drop_definitions(self, keys: list[JobKey]) -> None:
        if keys:
            await self._run(self._drop_definitions, keys)
