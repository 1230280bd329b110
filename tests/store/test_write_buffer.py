"""Group commit: writers wait for the one write that carried their item, and hear its outcome."""

from __future__ import annotations

import asyncio

import pytest

from tda_collector.errors import PermanentStoreError, StoreFault, TransientStoreError
from tda_collector.store.write_buffer import WriteBuffer


class Recorder:
    """A write that records each flush's items and fails the items named in `failing`."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.flushes: list[list[str]] = []
        self.failing = failing

    async def __call__(self, items: list[str]) -> list[Exception | None]:
        self.flushes.append(items)
        return [OSError(f"{item} failed") if item in self.failing else None for item in items]


async def test_a_flush_happens_once_enough_rows_wait():
    write = Recorder()
    buffer = WriteBuffer(write, len, max_rows=6, max_wait_s=3600)
    writes = [asyncio.create_task(buffer.add(item)) for item in ("aa", "bb", "cc", "d")]
    await asyncio.wait_for(asyncio.gather(*writes[:3]), timeout=1)
    assert write.flushes == [["aa", "bb", "cc"]]
    assert not writes[3].done()
    await buffer.close()
    await writes[3]
    assert write.flushes == [["aa", "bb", "cc"], ["d"]]


async def test_a_flush_happens_when_the_first_waiting_item_has_waited_long_enough():
    write = Recorder()
    buffer = WriteBuffer(write, len, max_rows=1_000, max_wait_s=0.01)
    await asyncio.wait_for(asyncio.gather(buffer.add("a"), buffer.add("b")), timeout=1)
    assert write.flushes == [["a", "b"]]


async def test_each_writer_hears_the_outcome_of_its_own_item():
    buffer = WriteBuffer(Recorder(failing=frozenset({"b"})), len, max_rows=3, max_wait_s=3600)
    outcomes = await asyncio.gather(*(buffer.add(i) for i in "abc"), return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StoreFault) and "b failed" in str(outcomes[1])
    assert isinstance(outcomes[1].__cause__, OSError)


async def test_a_write_that_raises_fails_every_writer_of_the_flush():
    async def write(items: list[str]) -> list[Exception | None]:
        raise OSError("disk full")

    buffer = WriteBuffer(write, len, max_rows=2, max_wait_s=3600)
    outcomes = await asyncio.gather(buffer.add("a"), buffer.add("b"), return_exceptions=True)
    assert [type(o) for o in outcomes] == [StoreFault, StoreFault]
    assert outcomes[0] is not outcomes[1]


@pytest.mark.parametrize("error", [PermanentStoreError("rsi_14"), TransientStoreError("locked")])
async def test_a_sorted_store_error_reaches_every_writer_as_it_is(error):
    async def write(items: list[str]) -> list[Exception | None]:
        raise error

    buffer = WriteBuffer(write, len, max_rows=2, max_wait_s=3600)
    outcomes = await asyncio.gather(buffer.add("a"), buffer.add("b"), return_exceptions=True)
    assert [type(o) for o in outcomes] == [type(error)] * 2
    assert [(str(o), o.permanent) for o in outcomes] == [(str(error), error.permanent)] * 2
    assert outcomes[0] is not outcomes[1]  # one each: every raise adds to its traceback
    assert all(o.__cause__ is error for o in outcomes)


async def test_a_flush_happens_before_a_write_would_touch_too_many_partitions():
    write = Recorder()
    buffer = WriteBuffer(write, len, max_rows=1_000, max_wait_s=3600, max_partitions=3)
    writes = [
        asyncio.create_task(buffer.add(item, partitions))
        for item, partitions in (("a", {1, 2}), ("b", {2, 3}), ("c", {4}), ("d", {4, 5}))
    ]
    await asyncio.wait_for(writes[0], timeout=1)
    assert write.flushes == [["a", "b"]]  # {1, 2, 3} then {4, 5}: "c" would have made it four
    await buffer.close()
    await asyncio.gather(*writes)
    assert write.flushes == [["a", "b"], ["c", "d"]]


async def test_items_whose_writer_was_cancelled_are_left_out():
    write = Recorder()
    buffer = WriteBuffer(write, len, max_rows=1_000, max_wait_s=3600)
    gone = asyncio.create_task(buffer.add("gone"))
    kept = asyncio.create_task(buffer.add("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    await buffer.close()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert write.flushes == [["kept"]]


class SlowRecorder(Recorder):
    """A write that holds until `release` is set: a transaction in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, items: list[str]) -> list[Exception | None]:
        outcome = await super().__call__(items)
        await self.release.wait()
        self.release.clear()
        return outcome


async def test_with_one_write_in_flight_what_comes_due_meanwhile_goes_as_one_larger_write():
    write = SlowRecorder()
    buffer = WriteBuffer(write, len, max_rows=4, max_wait_s=3600, max_in_flight=1)
    first = [asyncio.create_task(buffer.add(item)) for item in ("a1", "a2")]
    await asyncio.sleep(0.01)
    assert write.flushes == [["a1", "a2"]]  # full: written at once
    later = [asyncio.create_task(buffer.add(f"b{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    assert write.flushes == [["a1", "a2"]]  # due twice over, held while the first is in flight
    write.release.set()
    await asyncio.wait_for(asyncio.gather(*first), timeout=1)
    await asyncio.sleep(0.01)
    assert write.flushes == [["a1", "a2"], ["b0", "b1", "b2", "b3", "b4"]]
    write.release.set()
    await asyncio.wait_for(asyncio.gather(*later), timeout=1)
    tail = asyncio.create_task(buffer.add("c"))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(buffer.close())
    await asyncio.sleep(0.01)
    write.release.set()
    await asyncio.wait_for(asyncio.gather(tail, closing), timeout=1)
    assert write.flushes[-1] == ["c"]
