"""The durable writer: transient store errors are retried, permanent ones fail at once, rows are
never dropped on a guess."""

from __future__ import annotations

import asyncio
import random

import pytest
from event_support import recording_events
from memory_store import MemoryStore
from store_support import KEY, T0, batch

from tda_collector.errors import PermanentStoreError, StoreFault
from tda_collector.modes.durable_writer import DurableWriter
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy

POLICY = RetryPolicy(base_s=1, factor=2, cap_s=4, attempts=3)


class Rig:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.events, self.recorded = recording_events()
        self.metrics = Metrics()
        self.slept: list[float] = []
        self.writer = DurableWriter(
            store, POLICY, self.events, self.sleep, random.Random(5), self.metrics
        )

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def write(self, count: int = 3) -> int:
        return asyncio.run(self.writer.write(batch(KEY, T0, count)))

    def errors_counted(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "tda_store_write_errors_total", {"store": "memory"}
        )


def test_transient_failures_are_retried_until_the_rows_are_durable():
    rig = Rig(MemoryStore(fail_next_writes=2))
    assert rig.write() == 3
    assert len(rig.store.series_rows(KEY)) == 3
    failed = rig.recorded.named("store_write_error")
    assert [e["attempt"] for e in failed] == [1, 2]
    assert all(e["level"] == "ERROR" and "TransientStoreError" in e["error"] for e in failed)
    assert failed[0]["rows"] == 3 and failed[0]["symbol"] == "BTC/USDT"
    assert len(rig.slept) == 2 and rig.errors_counted() == 2


def test_an_unclassified_store_error_counts_as_transient():
    class ResetOnce(MemoryStore):
        reset = False

        async def write(self, batch):
            if not self.reset:
                self.reset = True
                raise ConnectionResetError("peer went away")  # what a client raises, untranslated
            return await super().write(batch)

    rig = Rig(ResetOnce())
    assert rig.write() == 3
    assert [e["attempt"] for e in rig.recorded.named("store_write_error")] == [1]


def test_after_the_last_attempt_a_retryable_store_fault_is_raised():
    rig = Rig(MemoryStore(fail_next_writes=10))
    with pytest.raises(StoreFault) as raised:
        rig.write()
    assert raised.value.permanent is False
    assert not isinstance(raised.value, PermanentStoreError)
    assert [e["attempt"] for e in rig.recorded.named("store_write_error")] == [1, 2, 3]
    assert len(rig.slept) == 2 and rig.store.series_rows(KEY) == []


def test_a_permanent_store_error_fails_at_once_with_the_stores_reason():
    rig = Rig(MemoryStore(fail_permanently=True))
    with pytest.raises(PermanentStoreError, match="refused") as raised:
        rig.write()
    assert raised.value.permanent is True
    failed = rig.recorded.named("store_write_error")
    assert len(failed) == 1 and failed[0]["attempt"] == 1
    assert rig.slept == [] and rig.errors_counted() == 1


def test_a_durable_write_is_a_debug_store_write_ok_with_rows_and_duration():
    rig = Rig(MemoryStore(fail_next_writes=1))
    assert rig.write(4) == 4
    [ok] = rig.recorded.named("store_write_ok")
    assert ok["level"] == "DEBUG" and ok["rows"] == 4
    assert (ok["exchange"], ok["symbol"], ok["timeframe"]) == ("binance", "BTC/USDT", "1m")
    assert ok["duration_ms"] >= 0
    assert len(rig.recorded.named("store_write_error")) == 1  # the failed attempt is not "ok"


def test_a_failed_write_is_never_a_store_write_ok():
    rig = Rig(MemoryStore(fail_next_writes=10))
    with pytest.raises(StoreFault):
        rig.write()
    assert rig.recorded.named("store_write_ok") == []
