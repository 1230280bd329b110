"""The catalog (connectors and job definitions, see `catalog.py`) in the shared Postgres state.

With `state_url` every instance reads and changes one catalog: a connector or job added through
any instance's API is the fleet's, and survives any instance's restart. Calls go through the
`PostgresState`'s pool and its retries (while the server is away they wait, as every state
call does); a multi-row save is one transaction.
"""

from __future__ import annotations

from ..models import JobKey
from .catalog import (
    CONNECTOR_COLUMNS,
    DEFINITION_COLUMNS,
    Connector,
    JobDefinition,
    connector_of,
    connector_row,
    definition_of,
    definition_row,
)
from .postgres_state import Conn, PostgresState

_UPSERT_CONNECTOR = (
    f"INSERT INTO connectors ({CONNECTOR_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO UPDATE SET body=excluded.body, enabled=excluded.enabled,"
    " file_body=excluded.file_body, deleted=excluded.deleted, paused_jobs=excluded.paused_jobs"
)
_INSERT_DEFINITION = (
    f"INSERT INTO job_definitions ({DEFINITION_COLUMNS}) VALUES (%s, %s, %s, %s, %s)"
)
_DROP_DEFINITION = "DELETE FROM job_definitions WHERE exchange=%s AND symbol=%s AND timeframe=%s"


class PostgresCatalog:
    """`catalog.Catalog` on a `PostgresState` (opened and closed by its owner, not here)."""

    def __init__(self, state: PostgresState) -> None:
        self._state = state

    async def open(self) -> None:
        """Nothing to do: the state's migrations made the tables."""

    async def close(self) -> None:
        """Nothing to do: the state's pool is its owner's to close."""

    async def connectors(self) -> list[Connector]:
        rows = await self._state.rows(
            "SELECT body, enabled, file_body, deleted, paused_jobs FROM connectors"
            " ORDER BY position",
            (),
        )
        return [connector_of(row) for row in rows]

    async def save_connectors(self, connectors: list[Connector]) -> None:
        """Upsert these connectors, all in one transaction."""
        rows = [connector_row(c) for c in connectors]

        async def save(conn: Conn) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_UPSERT_CONNECTOR, rows)

        await self._state.call(save)

    async def definitions(self) -> list[JobDefinition]:
        rows = await self._state.rows(
            f"SELECT {DEFINITION_COLUMNS} FROM job_definitions ORDER BY position", ()
        )
        return [definition_of(row) for row in rows]

    async def save_definition(self, definition: JobDefinition) -> None:
        row = definition_row(definition)

        async def save(conn: Conn) -> None:
            # As SQLite's INSERT OR REPLACE: saved again, it moves to the end of the listing.
            async with conn.transaction():
                await conn.execute(_DROP_DEFINITION, row[:3])
                await conn.execute(_INSERT_DEFINITION, row)

        await self._state.call(save)

    async def drop_definitions(self, keys: list[JobKey]) -> None:
        rows = [(k.exchange, k.symbol, k.timeframe) for k in keys]

        async def drop(conn: Conn) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_DROP_DEFINITION, rows)

        if rows:
            await self._state.call(drop)
