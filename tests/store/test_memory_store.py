"""The in-memory fake's fault knobs (the contract itself runs in test_store_contract.py)."""

from __future__ import annotations

import pytest
from memory_store import MemoryStore
from store_support import KEY, T0, batch

from tda_collector.errors import PermanentStoreError, TransientStoreError


async def test_the_next_writes_fail_transiently_then_writes_succeed():
    store = MemoryStore(fail_next_writes=2)
    for _ in range(2):
        with pytest.raises(TransientStoreError):
            await store.write(batch(KEY, T0, 2))
    assert (store.rows, store.writes) == ({}, 0)
    assert await store.write(batch(KEY, T0, 2)) == 2
    assert store.writes == 1


async def test_a_permanent_fault_fails_every_write_until_cleared():
    store = MemoryStore(fail_permanently=True)
    for _ in range(3):
        with pytest.raises(PermanentStoreError, match="injected"):
            await store.write(batch(KEY, T0, 2))
    assert store.rows == {}
    store.fail_permanently = False
    assert await store.write(batch(KEY, T0, 2)) == 2


async def test_each_write_waits_its_delay_on_the_injected_sleep():
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    store = MemoryStore(write_delay_s=0.25, sleep=sleep, fail_next_writes=1)
    with pytest.raises(TransientStoreError):
        await store.write(batch(KEY, T0, 2))
    await store.write(batch(KEY, T0, 2))
    assert slept == [0.25, 0.25]  # a failing write takes its time too
