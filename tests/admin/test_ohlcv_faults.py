"""`GET /ohlcv` when the store fails, or is not open yet, over real loopback HTTP on the fake
store: a clean one-line answer and an event before anything is sent; a transfer cut short
(never a whole-looking file) when the store fails in the middle of a stream."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from event_support import recording_events
from memory_store import MemoryStore
from store_support import KEY, MIN, T0, batch

from tda_collector.admin.ohlcv_api import ohlcv_routes
from tda_collector.admin.server import AdminServer
from tda_collector.observability.metrics import Metrics
from tda_collector.store import reads

PARAMS = {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
PARAMS |= {"start": str(T0), "end": str(T0 + 1440 * MIN)}


async def ready() -> None:
    return None


async def serve(store: MemoryStore, catalog=lambda: {KEY}):
    events, recorded = recording_events()
    server = AdminServer("127.0.0.1", 0, Metrics(), ready, ohlcv_routes(store, catalog, events))
    await server.start()
    return server, recorded


async def get(server: AdminServer, **params: str) -> tuple[int, bytes, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/ohlcv", params={**PARAMS, **params}) as response,
    ):
        return response.status, await response.read(), response.content_type


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
async def test_a_store_that_fails_at_once_is_a_503_with_one_line_and_an_event(fmt):
    store = MemoryStore(fail_reads_after=0)
    await store.write(batch(KEY, T0, 10))
    server, recorded = await serve(store)
    try:
        status, body, content_type = await get(server, format=fmt)
    finally:
        await server.stop()
    assert (status, content_type) == (503, "application/json")
    assert body.count(b"\n") == 0 and b"the store could not be read" in body
    [event] = recorded.named("ohlcv_read_error")
    assert event["level"] == "ERROR" and event["symbol"] == "BTC/USDT"


async def test_a_store_failing_mid_stream_cuts_the_transfer_short(monkeypatch):
    monkeypatch.setattr(reads, "READ_CHUNK_ROWS", 4)
    store = MemoryStore(fail_reads_after=2)
    await store.write(batch(KEY, T0, 20))
    server, recorded = await serve(store)
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(server, format="csv")
        assert recorded.named("ohlcv_read_error")
        store.fail_reads_after = None
        status, body, _ = await get(server, format="csv")
    finally:
        await server.stop()
    assert status == 200 and body.count(b"\n") == 21  # the header and every row once healed


async def test_before_the_store_is_open_the_answer_is_a_503():
    server, _ = await serve(MemoryStore(), catalog=lambda: None)
    try:
        status, body, _ = await get(server)
    finally:
        await server.stop()
    assert status == 503 and b"starting" in body


async def test_a_client_leaving_mid_stream_ends_the_read_quietly(monkeypatch, caplog):
    monkeypatch.setattr(reads, "READ_CHUNK_ROWS", 50)
    store = MemoryStore()
    await store.write(batch(KEY, T0, 1440))
    server, recorded = await serve(store)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.url + "/ohlcv", params={**PARAMS, "format": "csv"}) as response,
        ):
            assert (await response.content.read(100)).startswith(b'"timestamp"')
            response.close()  # hang up with most of the answer unsent
        await asyncio.sleep(0.2)
        status, body, _ = await get(server, format="csv")
    finally:
        await server.stop()
    assert status == 200 and body.count(b"\n") == 1441
    assert not recorded.named("ohlcv_read_error")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
