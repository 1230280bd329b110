"""The BigQuery store's two Storage Write API paths: a committed stream (live) and pending
streams committed in batches (history).

Live: one committed stream per owner (table and instance), reused across writes and restarts.
Writes waiting while an append is under way go together in the next one (one append in flight:
an application-created stream takes one connection). Before an append, its offset and row
count are saved as in doubt; after the acknowledgement, the next offset. A retry sends the same
rows at the same offsets, so rows that had landed answer ALREADY_EXISTS and are not stored
twice. When every retry of an append failed, the next write first sends those rows again at
their offset (one more retry, however late), and their writers' own retries of the same rows
are then left out (`LandedRows`). A position in doubt left by a process that died ends that
stream: it is finalised and a new one started, since the rows are gone with the process and
whether they landed cannot be known; the caller's cursor comes from the table either way. A
stream BigQuery closes under an append (possibly after some of its requests) is replaced, and
only the rows it did not take (its row count, from FinalizeWriteStream, less the append's
offset) go to the new one.

History: writes gather in a `WriteBuffer` (rows, seconds) into one pending stream per flush,
appended, finalised and committed with BatchCommitWriteStreams: all rows or none, with no load
job and its 1,500-per-table-per-day quota. Before the commit, the candles the stream holds are
recorded as a `CommitIntent`; after it, they go into the coverage ledger. A process killed in
between has its intents settled at the next `open`: a committed stream's candles are added to
the ledger (so they are not fetched and written again), an uncommitted one's are dropped.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..errors import StoreFault
from ..intervals import Interval, merge
from ..models import CandleBatch, JobKey
from ..observability.events import EventLog
from ..retry import RetryPolicy
from .bigquery_arrow import MAX_REQUEST_BYTES, LandedRows, Payload, payloads
from .bigquery_errors import retry_sorted
from .bigquery_write_api import StreamClosed, StreamType, WriteApi
from .write_buffer import WriteBuffer
from .write_streams import CommitIntent, StreamPosition, WriteStreamState, candle_spans

# A stream closed under an append is replaced; one closed again at once is not chased further.
_NEW_STREAMS_PER_APPEND = 2
Run = Callable[..., Awaitable[Any]]


@dataclass
class StreamContext:
    """What both paths share: the API, a worker-thread runner, bookkeeping, retries."""

    api: Callable[[], WriteApi]  # the store's, made when it is ensured
    run: Run  # run(fn, *args) on the store's worker threads
    state: WriteStreamState
    events: EventLog
    retry: RetryPolicy
    rng: random.Random

    async def retried(self, doing: str, call: Callable[[], Awaitable[None]]) -> None:
        await retry_sorted(doing, call, self.retry, self.events, self.rng)


class CommittedStreamWriter:
    """Live writes: exactly once per acknowledged append into one committed stream."""

    pipeline_pages = 1
    # The largest AppendRows request (see bigquery_arrow); tests lower it to make an append
    # of a few rows take several requests.
    request_bytes = MAX_REQUEST_BYTES

    def __init__(self, context: StreamContext, owner: str) -> None:
        self._ctx = context
        self._owner = owner
        self._lock = asyncio.Lock()
        self._waiting: list[tuple[pa.Table, asyncio.Future[None]]] = []
        self._position: StreamPosition | None = None
        # The rows of the append whose every retry failed, at the position left in doubt.
        self._unacknowledged: tuple[StreamPosition, pa.Table] | None = None
        self._landed = LandedRows()
        self.appends = 0
        self.streams_created = 0

    async def open(self) -> None:
        """Nothing to settle: an in-doubt position is handled by the next write."""

    async def write(self, batch: CandleBatch, table: pa.Table) -> None:
        """Returns once an append carrying `table` is acknowledged; writes that arrive while an
        append is under way wait for the lock and go in the next one together."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((table, future))
        async with self._lock:
            if not future.done():  # else an append that held the lock before carried it
                items, self._waiting = self._waiting, []
                try:
                    await self._append([t for t, _ in items])
                except Exception as exc:
                    _settle(items, exc)
                except BaseException:  # cancelled: the others hear of it, this one stops
                    future.cancel()
                    _settle(items, StoreFault("the append carrying these rows was cancelled"))
                    raise
                else:
                    _settle(items, None)
        await future

    async def _append(self, tables: list[pa.Table]) -> None:
        position = await self._usable_position()
        table = self._landed.without(pa.concat_tables(tables))
        if table.num_rows:
            await self._append_at(position, table)

    async def _append_at(self, position: StreamPosition, table: pa.Table) -> StreamPosition:
        """Append `table` at `position`, retried; where BigQuery closes the stream, the rows
        it did not take go to a new one. Returns the position after them. Should every retry
        fail, the position stays in doubt and the table is kept for the next write to send
        again at the same offset."""
        for replaced in range(_NEW_STREAMS_PER_APPEND + 1):
            # Serialising is CPU work that grows with the rows: off the event loop.
            chunks: list[Payload] = await self._ctx.run(payloads, table, self.request_bytes)
            # In doubt until acknowledged, here as in the state store: should every retry fail,
            # no other rows may be appended at this offset (ALREADY_EXISTS would then be taken
            # for theirs).
            self._position = StreamPosition(position.stream, position.next_offset, table.num_rows)
            self._unacknowledged = (self._position, table)
            await self._ctx.state.save_stream_position(self._owner, self._position)
            try:
                await self._ctx.retried("Storage Write API append", self._sender(position, chunks))
                break
            except StreamClosed as closed:
                if replaced == _NEW_STREAMS_PER_APPEND:
                    raise
                taken = await self._rows_taken(position, table.num_rows, closed)
                position = await self._new_stream(
                    f"{position.stream} was closed by BigQuery after taking {taken} of the "
                    f"append's {table.num_rows} rows"
                )
                table = table.slice(taken)
                if not table.num_rows:
                    break
        self._unacknowledged = None
        self._position = StreamPosition(position.stream, position.next_offset + table.num_rows)
        await self._ctx.state.save_stream_position(self._owner, self._position)
        return self._position

    async def _rows_taken(self, position: StreamPosition, rows: int, closed: StreamClosed) -> int:
        """How many of an append's `rows` a stream closed under it holds: its row count
        (FinalizeWriteStream answers it, for a stream already finalised too) less the append's
        offset; if that cannot be asked, what this append's last try saw acknowledged."""
        counts: list[int] = []

        async def finalize() -> None:
            counts.append(await self._ctx.run(self._ctx.api().finalize, position.stream))

        try:
            await self._ctx.retried("FinalizeWriteStream", finalize)
        except Exception as exc:  # gone, or unreachable: fall back on what was acknowledged
            self._ctx.events.debug(
                "store_write_stream", f"finalising {position.stream} failed: {exc}"[:500]
            )
            return min(closed.acknowledged_rows, rows)
        return max(0, min(counts[-1] - position.next_offset, rows))

    def _sender(
        self, position: StreamPosition, chunks: list[Payload]
    ) -> Callable[[], Awaitable[None]]:
        """An append of `chunks` at `position`; each retry sends the same rows at the same
        offsets (what landed answers ALREADY_EXISTS)."""

        async def send() -> None:
            self.appends += 1
            await self._ctx.run(
                self._ctx.api().append, position.stream, chunks, position.next_offset
            )

        return send

    async def _usable_position(self) -> StreamPosition:
        """Where the next append goes. A position in doubt whose rows this process still holds
        (every retry of that append failed) has them sent again at their offset first, as one
        more retry: BigQuery keeps them once, and their writers' own retries are then not
        appended again (`LandedRows`). One left by a stopped process ends its stream."""
        position = self._position or await self._ctx.state.stream_position(self._owner)
        if position is None:
            return await self._new_stream(None)
        held, self._unacknowledged = self._unacknowledged, None
        if held is not None and held[0] == position:
            resend = StreamPosition(position.stream, position.next_offset)
            after = await self._append_at(resend, held[1])
            self._landed.hold(held[1])
            return after
        if position.in_doubt_rows is not None:
            await self._finalize_quietly(position.stream)
            return await self._new_stream(
                f"an append of {position.in_doubt_rows} rows to {position.stream} at offset "
                f"{position.next_offset} was never acknowledged"
            )
        return position

    async def _finalize_quietly(self, stream: str) -> None:
        try:  # ends it for good; a stream already gone needs nothing
            await self._ctx.run(self._ctx.api().finalize, stream)
        except Exception as exc:
            self._ctx.events.debug("store_write_stream", f"finalising {stream} failed: {exc}"[:500])

    async def _new_stream(self, why: str | None) -> StreamPosition:
        names: list[str] = []

        async def create() -> None:
            names.append(await self._ctx.run(self._ctx.api().create_stream, StreamType.COMMITTED))

        await self._ctx.retried("CreateWriteStream", create)
        self.streams_created += 1
        position = StreamPosition(names[-1], 0)
        await self._ctx.state.save_stream_position(self._owner, position)
        self._ctx.events.info(
            "store_write_stream",
            f"committed stream {position.stream} started" + (f": {why}" if why else ""),
            stream=position.stream,
        )
        self._position = position
        return position

    async def close(self) -> None:
        """Waits for the append under way; the stream stays open for the next start."""
        async with self._lock:
            pass


class PendingStreamWriter:
    """History writes: one pending stream per flush, committed atomically."""

    pipeline_pages = 16  # pages of a job waiting for one commit while it fetches on

    def __init__(self, context: StreamContext, flush_rows: int, flush_seconds: float) -> None:
        self._ctx = context
        self._buffer: WriteBuffer[tuple[pa.Table, CandleBatch]] = WriteBuffer(
            self._commit, lambda item: item[0].num_rows, flush_rows, flush_seconds
        )
        self.commits = 0
        self.streams_created = 0

    async def open(self) -> None:
        """Settle intents left by a process that stopped around a commit."""
        for intent in await self._ctx.state.commit_intents():
            committed = await self._was_committed(intent.stream)
            await self._ctx.state.settle_commit(intent.stream, committed)
            self._ctx.events.info(
                "store_commit_settled",
                f"pending stream {intent.stream} of a stopped run was "
                + ("committed: its candles are recorded" if committed else "not committed"),
                stream=intent.stream,
                status="committed" if committed else "dropped",
            )

    async def _was_committed(self, stream: str) -> bool:
        found: list[bool] = []

        async def check() -> None:
            found.append(await self._ctx.run(self._ctx.api().committed, stream))

        try:
            await self._ctx.retried("GetWriteStream", check)
        except StoreFault as exc:
            if not exc.permanent:
                raise
            return False  # the stream is gone (expired uncommitted): it was never committed
        return found[-1]

    async def write(self, batch: CandleBatch, table: pa.Table) -> None:
        """Returns once the pending stream carrying `table` is committed."""
        await self._buffer.add((table, batch))

    async def _commit(self, items: list[tuple[pa.Table, CandleBatch]]) -> list[None]:
        started = time.monotonic()
        chunks: list[Payload] = await self._ctx.run(
            payloads, pa.concat_tables([table for table, _ in items])
        )
        names: list[str] = []

        async def create() -> None:
            names.append(await self._ctx.run(self._ctx.api().create_stream, StreamType.PENDING))

        await self._ctx.retried("CreateWriteStream", create)
        self.streams_created += 1
        stream = names[-1]

        async def append() -> None:
            await self._ctx.run(self._ctx.api().append, stream, chunks, 0)

        async def finalize() -> None:
            await self._ctx.run(self._ctx.api().finalize, stream)

        await self._ctx.retried("Storage Write API append", append)
        await self._ctx.retried("FinalizeWriteStream", finalize)
        await self._ctx.state.save_commit_intent(CommitIntent(stream, _spans(items)))
        await self._ctx.retried("BatchCommitWriteStreams", self._committer(stream))
        await self._ctx.state.settle_commit(stream, True)
        self.commits += 1
        rows = sum(p.rows for p in chunks)
        self._ctx.events.debug(
            "store_commit",
            f"committed {rows} rows from {len(items)} writes in one pending stream",
            rows=rows,
            stream=stream,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return [None] * len(items)

    def _committer(self, stream: str) -> Callable[[], Awaitable[None]]:
        """A commit that, when repeated after a failure, first asks whether the previous try
        landed (its answer may be what got lost): never committed twice, never skipped."""
        tries = 0

        async def commit() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and await self._ctx.run(self._ctx.api().committed, stream):
                return
            await self._ctx.run(self._ctx.api().commit, [stream])

        return commit

    async def close(self) -> None:
        """Commit what is buffered and wait for it."""
        await self._buffer.close()


def _spans(items: list[tuple[pa.Table, CandleBatch]]) -> dict[JobKey, list[Interval]]:
    spans: dict[JobKey, list[Interval]] = {}
    for _, batch in items:
        spans.setdefault(batch.key, []).extend(candle_spans(batch))
    return {key: merge(found) for key, found in spans.items() if found}


def _settle(items: list[tuple[pa.Table, asyncio.Future[None]]], error: Exception | None) -> None:
    """Tell each writer whose rows went in one append how it ended (a StoreFault of its own:
    same kind and message)."""
    for _, future in items:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
            continue
        own = type(error)(str(error)) if isinstance(error, StoreFault) else StoreFault(str(error))
        own.__cause__ = error
        future.set_exception(own)
