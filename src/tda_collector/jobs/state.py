"""The state seam: what the collector keeps between runs and shares between instances.

One `StateStore` holds, per series, the coverage ledger (merged half-open intervals that are
durably stored or proven empty), the job rows the jobs API shows, the newest run of each mode,
each series' indicator state, and the BigQuery Storage Write API's stream positions and commit
intents (`store.write_streams.WriteStreamState`). Two backends implement it on one schema
(`schema.py`): SQLite (`ledger.SqliteState`, the embedded default, one process) and Postgres
(`postgres_state.PostgresState`, when `state_url` is set: any number of instances).

Contract both keep (tests/jobs/test_state_contract.py runs against both):
- `add_coverage` is submitted at once and applied in call order with every other write of
  this instance; its future can be shielded (the write goes on when the caller is cancelled).
  The ledger is a set: adding an interval twice, or out of order, changes nothing more.
- A page's ledger interval and its job row are written in one transaction.
- Writes are idempotent, so a backend may retry one whose outcome it did not hear.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..intervals import Interval
from ..models import JobKey
from ..observability.events import EventLog
from ..store.write_streams import WriteStreamState
from .model import JobRecord

if TYPE_CHECKING:
    from .postgres_fleet import PostgresFleet


@dataclass(frozen=True)
class RunRecord:
    """The newest run of a mode: its requested range, and when it finished (None: it did not,
    so the next start is a restart of it)."""

    mode: str
    start_ms: int | None
    end_ms: int | None
    started_ms: int
    finished_ms: int | None


@dataclass(frozen=True)
class SeriesState:
    """A series' saved indicator state: the newest closed candle it has seen, the state
    (`IndicatorState.to_json`), and the earliest candle whose values need a recompute."""

    last_ms: int | None
    state: str | None
    dirty_from_ms: int | None


class StateStore(WriteStreamState, Protocol):
    async def open(self) -> None:
        """Connect and bring the schema to the newest version."""

    async def close(self) -> None: ...

    async def coverage(self, key: JobKey) -> list[Interval]:
        """The series' ledger, merged, oldest first."""

    async def coverage_of_exchange(self, exchange: str) -> dict[JobKey, list[Interval]]:
        """Every series' ledger of one exchange in one query (thousands of jobs at start)."""

    def add_coverage(
        self, key: JobKey, intervals: list[Interval], job: JobRecord | None = None
    ) -> asyncio.Future[None]:
        """Record that these [start_ms, end_ms) parts of the series are durably stored (or have
        no candles), and with them, in the same transaction, the job row that counts the page.
        Submitted at once, in call order with every other write; await the returned future."""

    async def forget(self, key: JobKey) -> None:
        """Drop a series' ledger and job rows (its store lost the rows), so the next run fetches
        them again and counts from zero."""

    async def save_jobs(self, records: list[JobRecord]) -> None:
        """Upsert job rows, all in one transaction."""

    async def load_jobs(self, mode: str) -> list[JobRecord]: ...

    async def last_run(self, mode: str) -> RunRecord | None: ...

    async def save_run(self, run: RunRecord) -> None: ...

    async def load_indicator_series(self, key: JobKey | None = None) -> dict[JobKey, SeriesState]:
        """Every saved indicator state, or only `key`'s."""

    async def save_indicator_series(self, key: JobKey, series: SeriesState) -> None: ...


def build_state(
    state_path: str, state_url: str | None, events: EventLog, instance: str = ""
) -> tuple[StateStore, PostgresFleet | None]:
    """Postgres when `state_url` is set, with what the instances share beside it (budgets,
    leases), as `instance`; else the SQLite file at `state_path`, alone."""
    # Imported here: psycopg is loaded only by deployments that use it, and the backends
    # import this module for its value types.
    if state_url is not None:
        from .postgres_fleet import PostgresFleet
        from .postgres_state import PostgresState

        state = PostgresState(state_url, events, instance=instance)
        return state, PostgresFleet(state)
    from .ledger import SqliteState

    return SqliteState(state_path), None
