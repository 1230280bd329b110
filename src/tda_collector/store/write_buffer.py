"""Group commit: many writers, one durable write.

Each durable write has a fixed cost as large as a page of rows or larger (a DuckDB statement
and commit, 2–3 ms of CPU; a BigQuery load job, of which a table gets 1,500 a day), so writers
hand their item to a buffer and wait; the buffer writes what is waiting in one go and tells
each writer the outcome of the write that carried its item. `write` still returns only once
its rows are durable.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import Generic, TypeVar

from ..errors import StoreFault

T = TypeVar("T")


class WriteBuffer(Generic[T]):
    """Items waiting for one write. A flush happens at `max_rows` rows (`rows(item)` each),
    `max_wait_s` after the first buffered item, before an item that would take the flush past
    `max_partitions` distinct partitions (when a limit is given), and on `close`. With
    `max_in_flight`, a flush due while that many writes are in flight waits until one ends and
    then carries everything waiting by then: a writer that serialises its writes anyway (one
    DuckDB connection) gets fewer, larger transactions under load instead of a queue of small
    ones, and no later ones when idle.

    `write(items)` makes the items durable and returns one outcome per item, in order: None,
    or the error its writer gets; raising fails every item. A StoreFault reaches each writer
    as it is (its type, so whether it is transient or permanent, and its message); any other
    error as a StoreFault saying so. Items whose writer was cancelled before the flush are
    left out."""

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[Exception | None]]],
        rows: Callable[[T], int],
        max_rows: int,
        max_wait_s: float,
        max_partitions: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self._write = write
        self._max_in_flight = max_in_flight
        self._flush_due = False  # a flush came due while the writes in flight were at the limit
        self._writing = 0  # writes in flight
        self._rows_of = rows
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._max_partitions = max_partitions
        self._items: list[tuple[T, asyncio.Future[None]]] = []
        self._rows = 0
        self._partitions: set[object] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def add(self, item: T, partitions: Set[object] = frozenset()) -> None:
        """Returns when the write holding `item` succeeded; raises StoreFault if it failed."""
        loop = asyncio.get_running_loop()
        if (
            self._max_partitions is not None
            and self._items
            and len(self._partitions | partitions) > self._max_partitions
        ):
            self._flush()
        future: asyncio.Future[None] = loop.create_future()
        self._items.append((item, future))
        self._rows += self._rows_of(item)
        self._partitions |= partitions
        if self._rows >= self._max_rows:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait_s, self._flush)
        await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._max_in_flight is not None and self._writing >= self._max_in_flight:
            self._flush_due = True  # `_settle` flushes when a write in flight ends
            return
        self._flush_due = False
        items, self._items, self._rows, self._partitions = self._items, [], 0, set()
        # A cancelled writer (shutdown) moved no cursor: its rows will be fetched again.
        items = [(item, future) for item, future in items if not future.done()]
        if items:
            self._writing += 1
            task = asyncio.get_running_loop().create_task(self._settle(items))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _settle(self, items: list[tuple[T, asyncio.Future[None]]]) -> None:
        outcomes: Sequence[Exception | None]
        try:
            outcomes = await self._write([item for item, _ in items])
        except Exception as exc:  # every writer of this write must hear of it
            outcomes = [exc] * len(items)
        finally:
            self._writing -= 1
        if self._flush_due:  # held back while this write was in flight
            self._flush()
        for (_, future), error in zip(items, outcomes, strict=True):
            if future.done():  # its writer was cancelled during the write
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(_for_one_writer(error))

    async def close(self) -> None:
        """Flush what is buffered and wait for every write in flight."""
        self._flush()
        while self._flushes:
            # Remove them here: on Python >= 3.12 gathering finished tasks never yields to the
            # loop, so their done-callbacks would not run before the next check.
            finished = list(self._flushes)
            await asyncio.gather(*finished)
            self._flushes.difference_update(finished)
            if self._items:  # held back while those were in flight
                self._flush()


def _for_one_writer(error: Exception) -> StoreFault:
    """A StoreFault of its own for one writer (each raise adds to its traceback): a copy of
    `error` when it is one (same type, message and `permanent`), else a StoreFault naming it.
    Caused by `error`, which keeps the traceback of the failed write."""
    fault = copy.copy(error) if isinstance(error, StoreFault) else StoreFault(str(error))
    fault.__cause__ = error
    return fault
