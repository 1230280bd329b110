"""The jobs API over real loopback HTTP, on a registry the test steers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tda_collector.admin.jobs_api import jobs_routes
from tda_collector.admin.server import AdminServer
from tda_collector.jobs.model import PAUSED, PENDING, RUNNING, Job, JobRecord
from tda_collector.jobs.progress import Progress
from tda_collector.jobs.registry import JobRegistry
from tda_collector.models import JobKey
from tda_collector.observability.metrics import Metrics

MIN = 60_000
T0 = 1_709_164_800_000


async def ready() -> None:
    return None


def fill(registry: JobRegistry) -> None:
    for i, symbol in enumerate(("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT")):
        for tf in ("1m", "1h"):
            job = Job(
                JobRecord.of(
                    JobKey("binance", symbol, tf),
                    "history",
                    start_ms=T0,
                    end_ms=T0 + 1440 * MIN,
                    cursor_ms=T0,
                )
            )
            registry.add(job)
            if i == 0:
                registry.apply(job, "start")
    btc = registry.jobs["binance:BTC-USDT:1m:history"]
    registry.record_page(btc, [(T0, T0 + 720 * MIN)], rows=700)
    registry.apply(registry.jobs["binance:ETH-USDT:1m:history"], "complete")


@pytest.fixture
def registry() -> JobRegistry:
    registry = JobRegistry("history")
    fill(registry)
    return registry


async def serve(
    registry: JobRegistry, host: str = "127.0.0.1", token: str | None = None
) -> AdminServer:
    """The admin server on loopback, with the jobs routes as they would be for `host`."""
    routes = jobs_routes(registry, Progress(registry), host, token, "TDA_ADMIN_TOKEN")
    server = AdminServer("127.0.0.1", 0, Metrics(), ready, routes)
    await server.start()
    return server


@pytest.fixture
async def server(registry: JobRegistry) -> AsyncIterator[AdminServer]:
    server = await serve(registry)
    yield server
    await server.stop()


async def call(server: AdminServer, method: str, path: str, **kwargs) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, **kwargs) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def test_jobs_lists_every_job_and_filters(server: AdminServer) -> None:
    status, body = await call(server, "GET", "/jobs")
    assert status == 200 and body["total"] == 8 and len(body["jobs"]) == 8
    btc = next(j for j in body["jobs"] if j["id"] == "binance:BTC-USDT:1m:history")
    assert btc == {
        "id": "binance:BTC-USDT:1m:history",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
        "mode": "history",
        "status": RUNNING,
        "start_ms": T0,
        "end_ms": T0 + 1440 * MIN,
        "covered": 0.5,
        "cursor_ms": T0 + 720 * MIN,
        "rows": 700,
        "pages": 1,
        "last_error": None,
        "last_run_ms": btc["last_run_ms"],
        "next_run_ms": None,
        "updated_ms": btc["updated_ms"],
        "owner": None,  # one instance: nobody holds a lease
    }
    _, running = await call(server, "GET", "/jobs?status=running,completed&timeframe=1m")
    assert [j["id"] for j in running["jobs"]] == [
        "binance:BTC-USDT:1m:history",
        "binance:ETH-USDT:1m:history",
    ]
    _, page = await call(server, "GET", "/jobs?q=usdt:1h&limit=2&offset=1")
    assert page["total"] == 4 and [j["symbol"] for j in page["jobs"]] == ["ETH/USDT", "SOL/USDT"]
    assert (await call(server, "GET", "/jobs?status=NAPPING"))[0] == 400


async def test_one_job_by_id_or_404(server: AdminServer) -> None:
    status, job = await call(server, "GET", "/jobs/binance:SOL-USDT:1h:history")
    assert status == 200 and job["status"] == PENDING and job["covered"] == 0.0
    status, body = await call(server, "GET", "/jobs/binance:NOPE-USDT:1h:history")
    assert status == 404 and "no job" in body["error"]


async def test_pause_resume_cancel_and_refusals(server: AdminServer, registry) -> None:
    job_path = "/jobs/binance:BTC-USDT:1m:history"
    status, job = await call(server, "POST", job_path + "/pause")
    assert (status, job["status"]) == (200, PAUSED)
    status, body = await call(server, "POST", job_path + "/pause")
    assert (status, body) == (409, {"error": "Cannot pause job in PAUSED state"})
    status, body = await call(server, "POST", "/jobs/binance:ETH-USDT:1m:history/pause")
    assert (status, body) == (409, {"error": "Cannot pause job in COMPLETED state"})
    assert (await call(server, "POST", job_path + "/resume"))[1]["status"] == PENDING
    assert (await call(server, "POST", job_path + "/cancel"))[1]["status"] == "CANCELLED"
    assert (await call(server, "POST", job_path + "/explode"))[0] == 404


async def test_pause_and_resume_everything(server: AdminServer, registry) -> None:
    status, body = await call(server, "POST", "/pause")
    assert (status, body) == (200, {"changed": 7})  # all but the completed one
    assert registry.counts()[PAUSED] == 7
    assert (await call(server, "POST", "/resume"))[1] == {"changed": 7}
    assert registry.counts()[PAUSED] == 0


async def test_progress_answers_totals_from_memory(server: AdminServer) -> None:
    status, body = await call(server, "GET", "/progress")
    assert status == 200
    assert body["jobs"]["total"] == 8 and body["jobs"]["done"] == 1
    assert body["jobs"]["by_status"] == {
        "PENDING": 5,
        "RUNNING": 2,
        "PAUSED": 0,
        "COMPLETED": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    assert body["candles"] == 700 and body["mode"] == "history" and body["running"] is True
    assert set(body["rate"]) == {"candles_per_s", "jobs_per_s", "window_s"}
    assert [x["id"] for x in body["exchanges"]] == ["binance"]


async def test_the_status_page_is_html(server: AdminServer) -> None:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/") as response:
        text = await response.text()
    assert response.status == 200 and response.content_type == "text/html"
    assert "<title>tda-collector jobs</title>" in text and "/progress" in text


async def test_a_post_from_another_origin_is_refused(server: AdminServer, registry) -> None:
    status, body = await call(server, "POST", "/pause", headers={"Origin": "http://evil.test"})
    assert status == 403 and "cross-origin" in body["error"]
    assert registry.counts()[PAUSED] == 0
    same = {"Origin": server.url}
    assert (await call(server, "POST", "/pause", headers=same))[0] == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "collector.internal"])
async def test_off_loopback_a_post_needs_the_bearer_token(registry, host) -> None:
    server = await serve(registry, host=host, token="s3cret-token")
    try:
        status, _ = await call(server, "POST", "/pause")
        assert status == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await call(server, "POST", "/pause", headers=bad))[0] == 401
        assert (await call(server, "GET", "/jobs"))[0] == 200  # reading needs no token
        good = {"Authorization": "Bearer s3cret-token"}
        assert (await call(server, "POST", "/pause", headers=good))[0] == 200
    finally:
        await server.stop()


async def test_off_loopback_without_a_token_posts_are_disabled(registry) -> None:
    server = await serve(registry, host="0.0.0.0", token=None)
    try:
        status, body = await call(server, "POST", "/pause")
        assert status == 403 and "TDA_ADMIN_TOKEN" in body["error"]
    finally:
        await server.stop()


async def test_on_loopback_no_token_is_needed(registry) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        server = await serve(registry, host=host, token="unused")
        try:
            assert (await call(server, "POST", "/resume"))[0] == 200
        finally:
            await server.stop()


async def test_the_progress_stream_pushes_progress_and_jobs_once_a_second_and_ends_on_stop(
    registry: JobRegistry,
) -> None:
    server = await serve(registry)
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/progress/stream?status=RUNNING") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        loop = asyncio.get_running_loop()
        pushes: list[tuple[float, dict]] = []
        async for line in response.content:
            if line.startswith(b"data: "):
                pushes.append((loop.time(), json.loads(line[6:])))
            if len(pushes) == 2:
                break
        stopping = loop.time()
        await server.stop()
        stopped = loop.time() - stopping
    (first_at, first), (second_at, _) = pushes
    assert 0.8 <= second_at - first_at <= 1.5
    assert first["progress"]["jobs"]["total"] == 8
    assert {j["id"] for j in first["jobs"]["jobs"]} == {
        "binance:BTC-USDT:1m:history",
        "binance:BTC-USDT:1h:history",
    }
    assert stopped < 0.5  # a stream never ends by itself; stopping does not wait for it


async def test_a_progress_stream_with_a_bad_filter_is_a_400(server: AdminServer) -> None:
    status, body = await call(server, "GET", "/progress/stream?status=SLEEPING")
    assert status == 400 and body["error"].startswith("status: unknown SLEEPING")
