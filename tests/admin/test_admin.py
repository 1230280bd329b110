"""The admin server over real loopback HTTP: metrics, liveness, readiness, extra routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tda_collector.admin.server import AdminServer, build_admin_server
from tda_collector.config import AdminConfig
from tda_collector.observability.metrics import Metrics


class Readiness:
    """A readiness check the test steers: a reason, an exception, or a hang."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.error: Exception | None = None
        self.hang = False

    async def __call__(self) -> str | None:
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return self.reason


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def server(metrics: Metrics, readiness: Readiness) -> AsyncIterator[AdminServer]:
    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": []})

    server = AdminServer("127.0.0.1", 0, metrics, readiness, routes=[web.get("/jobs", jobs)])
    await server.start()
    yield server
    await server.stop()


async def get(server: AdminServer, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path) as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


async def test_metrics_serves_prometheus_text(server: AdminServer, metrics: Metrics) -> None:
    metrics.rows_written("duckdb", 42)
    status, content_type, text = await get(server, "/metrics")

    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = [s for s in families["tda_rows_written"].samples if s.name.endswith("_total")]
    assert (sample.labels, sample.value) == ({"store": "duckdb"}, 42)


async def test_healthz_is_ok_while_the_process_serves(
    server: AdminServer, readiness: Readiness
) -> None:
    readiness.reason = "store unreachable"  # liveness does not depend on readiness
    status, _, body = await get(server, "/healthz")
    assert (status, body) == (200, '{"status": "ok"}')


async def test_readyz_is_ok_when_the_check_says_ready(server: AdminServer) -> None:
    status, content_type, body = await get(server, "/readyz")
    assert (status, content_type, body) == (
        200,
        "application/json; charset=utf-8",
        '{"status": "ready"}',
    )


@pytest.mark.parametrize(
    ("steer", "reason"),
    [
        ({"reason": "live loop task died: KeyError('x')"}, "live loop task died: KeyError('x')"),
        (
            {"error": ConnectionError("duckdb locked")},
            "readiness check failed: ConnectionError: duckdb locked",
        ),
    ],
)
async def test_readyz_is_503_with_a_json_reason(
    server: AdminServer, readiness: Readiness, steer: dict, reason: str
) -> None:
    for name, setting in steer.items():
        setattr(readiness, name, setting)
    async with aiohttp.ClientSession() as session, session.get(server.url + "/readyz") as r:
        assert r.status == 503
        assert await r.json() == {"status": "not ready", "reason": reason}


async def test_a_hanging_readiness_check_answers_503_in_bounded_time(
    server: AdminServer, readiness: Readiness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tda_collector.admin.server.READINESS_TIMEOUT_S", 0.05)
    readiness.hang = True
    status, _, body = await asyncio.wait_for(get(server, "/readyz"), 2)
    assert status == 503 and "took longer than 0.05s" in body


async def test_extra_routes_are_served(server: AdminServer) -> None:
    assert await get(server, "/jobs") == (200, "application/json; charset=utf-8", '{"jobs": []}')


async def test_stop_closes_the_port(metrics: Metrics, readiness: Readiness) -> None:
    server = AdminServer("127.0.0.1", 0, metrics, readiness)
    await server.start()
    url = server.url
    await server.stop()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url + "/healthz")


async def test_a_taken_port_fails_start(server: AdminServer, metrics: Metrics) -> None:
    assert server.port is not None
    clash = AdminServer("127.0.0.1", server.port, metrics, Readiness())
    with pytest.raises(OSError):
        await clash.start()


def test_port_zero_in_the_config_disables_the_server(
    metrics: Metrics, readiness: Readiness
) -> None:
    assert build_admin_server(AdminConfig(port=0), metrics, readiness) is None
    server = build_admin_server(AdminConfig(port=9100), metrics, readiness)
    assert server is not None and server.port is None  # built, not started
