"""An exchange paused past the Retry-After ceiling shows on /readyz and in /progress."""

from __future__ import annotations

import time

import aiohttp

from tda_collector.admin.jobs_api import jobs_routes
from tda_collector.admin.server import AdminServer
from tda_collector.app import Readiness
from tda_collector.exchange.throttle import Pause, Pauses
from tda_collector.jobs.progress import Progress
from tda_collector.jobs.registry import JobRegistry
from tda_collector.observability.metrics import Metrics


async def test_readyz_and_progress_name_the_paused_exchange_until_it_resumes() -> None:
    now = [time.time()]
    pauses = Pauses(lambda: now[0])
    readiness = Readiness(pauses)
    readiness.store_ready = True
    registry = JobRegistry("live")
    routes = jobs_routes(registry, Progress(registry), "127.0.0.1", None, "T", pauses)
    server = AdminServer("127.0.0.1", 0, Metrics(), readiness, routes)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> tuple[int, dict]:
                async with session.get(server.url + path) as response:
                    return response.status, await response.json()

            assert await get("/readyz") == (200, {"status": "ready"})
            assert (await get("/progress"))[1]["paused"] == []

            pauses.add(Pause("binance", 418, 1_704_070_800.0))  # 2024-01-01T01:00:00Z
            now[0] = 1_704_067_200.0
            status, body = await get("/readyz")
            assert status == 503
            assert body["reason"] == "binance paused until 2024-01-01T01:00:00Z (HTTP 418)"
            assert (await get("/progress"))[1]["paused"] == [
                {"exchange": "binance", "status": 418, "resume_at": "2024-01-01T01:00:00Z"}
            ]

            now[0] = 1_704_070_800.0  # the pause is over
            assert await get("/readyz") == (200, {"status": "ready"})
            assert (await get("/progress"))[1]["paused"] == []
    finally:
        await server.stop()
