"""What the Storage Write API paths keep in the state store, as a seam (`WriteStreamState`).

Live writes go to a committed stream at offsets the client chooses: BigQuery never writes two
appends at one offset, so an append re-sent after a lost acknowledgement is answered
ALREADY_EXISTS instead of stored twice. That holds across restarts only if the stream and its
next offset outlive the process, and if an append that was sent but never acknowledged is known
as such: `StreamPosition` records both. History commits pending streams; `CommitIntent` records,
before the commit, which candles a stream carries, so that a commit whose process died before
the ledger moved is still added to the ledger on the next start (and not fetched and written a
second time).

`jobs/ledger.py`'s StateStore implements this on SQLite; `MemoryStreamState` keeps it in the
process (a store without a state file: tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..intervals import Interval
from ..models import CandleBatch, JobKey
from ..timeframes import grid_of


@dataclass(frozen=True)
class StreamPosition:
    """A committed stream and where its next append goes. `in_doubt_rows` is set while an
    append of that many rows at `next_offset` is sent but not acknowledged: after a crash it may
    or may not be in the table, so the stream is finalised and a new one started (the rows of
    the lost append are fetched again or were stored; the cursor comes from the table)."""

    stream: str
    next_offset: int
    in_doubt_rows: int | None = None


@dataclass(frozen=True)
class CommitIntent:
    """A pending stream about to be committed, and the candles (per series, as intervals of
    open time, each candle's own span) whose rows it holds."""

    stream: str
    spans: dict[JobKey, list[Interval]]


class WriteStreamState(Protocol):
    """Durable bookkeeping of the Storage Write API paths (see the module's docstring)."""

    async def stream_position(self, owner: str) -> StreamPosition | None:
        """The committed stream `owner` (a table and instance) writes to, if any."""
        ...

    async def save_stream_position(self, owner: str, position: StreamPosition) -> None:
        """Durably replace `owner`'s position; returns once it is durable."""
        ...

    async def save_commit_intent(self, intent: CommitIntent) -> None:
        """Durably record `intent` before its stream's commit is sent."""
        ...

    async def commit_intents(self) -> list[CommitIntent]:
        """Intents not yet settled (their process stopped between recording and settling)."""
        ...

    async def settle_commit(self, stream: str, committed: bool) -> None:
        """Forget the intent of `stream`; if `committed`, first add its spans to the coverage
        ledger, in the same transaction."""
        ...


class MemoryStreamState:
    """`WriteStreamState` in this process only: a restart starts a new stream, and a commit
    is settled only by the caller's own ledger update."""

    def __init__(self) -> None:
        self._positions: dict[str, StreamPosition] = {}
        self._intents: dict[str, CommitIntent] = {}

    async def stream_position(self, owner: str) -> StreamPosition | None:
        return self._positions.get(owner)

    async def save_stream_position(self, owner: str, position: StreamPosition) -> None:
        self._positions[owner] = position

    async def save_commit_intent(self, intent: CommitIntent) -> None:
        self._intents[intent.stream] = intent

    async def commit_intents(self) -> list[CommitIntent]:
        return list(self._intents.values())

    async def settle_commit(self, stream: str, committed: bool) -> None:
        self._intents.pop(stream, None)


def candle_spans(batch: CandleBatch) -> list[Interval]:
    """The batch's closed candles as merged [open, close) intervals: exactly what its rows
    prove stored (never the holes between them, which a page may or may not have proved)."""
    opens = batch.timestamps[batch.closed]
    if not len(opens):
        return []
    grid = grid_of(batch.key.timeframe)
    if grid.months:
        closes = np.array([grid.close_of(int(t)) for t in opens], dtype=np.int64)
    else:
        closes = opens + grid.step_ms
    breaks = np.flatnonzero(opens[1:] != closes[:-1]) + 1
    starts = opens[np.concatenate(([0], breaks))]
    ends = closes[np.concatenate((breaks - 1, [len(opens) - 1]))]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]
