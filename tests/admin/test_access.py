"""Secure by default: off loopback every request but the probes needs the bearer token (reads
too); on loopback nothing changes. Over real HTTP, on the admin server and a live collector."""

from __future__ import annotations

import time

import aiohttp
import pytest
from collector_support import write_config
from daemon_support import admin_settings, live_daemon
from fake_exchange import FakeExchange, SymbolSpec
from test_jobs_api import fill, ready

from tda_collector.admin.jobs_api import jobs_routes
from tda_collector.admin.server import AccessPolicy, AdminServer
from tda_collector.jobs.model import PAUSED
from tda_collector.jobs.progress import Progress
from tda_collector.jobs.registry import JobRegistry
from tda_collector.observability.metrics import Metrics

TOKEN = "s3cret-token"
PROTECTED = [("GET", "/jobs"), ("GET", "/progress"), ("GET", "/jobs/x"), ("POST", "/pause")]


async def serve(access: AccessPolicy) -> tuple[AdminServer, JobRegistry]:
    registry = JobRegistry("history")
    fill(registry)
    routes = jobs_routes(registry, Progress(registry), "0.0.0.0", access.token, access.token_env)
    server = AdminServer("127.0.0.1", 0, Metrics(), ready, routes, access)
    await server.start()
    return server, registry


async def call(server: AdminServer, method: str, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, headers=headers) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


def paused(registry: JobRegistry) -> int:
    return sum(job.status == PAUSED for job in registry.jobs.values())


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_off_loopback_a_request_without_the_token_is_401_and_changes_nothing(method, path):
    server, registry = await serve(AccessPolicy(open_to_all=False, token=TOKEN))
    try:
        status, body, headers = await call(server, method, path)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert list(body) == ["error"] and "\n" not in body["error"]
        status, body, _ = await call(server, method, path, token="wrong")
        assert status == 403 and body["error"] == "the bearer token is wrong"
        assert paused(registry) == 0
    finally:
        await server.stop()


async def test_off_loopback_the_token_opens_reads_and_changes():
    server, registry = await serve(AccessPolicy(open_to_all=False, token=TOKEN))
    try:
        assert (await call(server, "GET", "/jobs", TOKEN))[0] == 200
        assert (await call(server, "POST", "/pause", TOKEN))[0] == 200
        assert paused(registry) > 0
    finally:
        await server.stop()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/"])
async def test_probes_metrics_and_the_page_shell_need_no_token(path):
    server, _ = await serve(AccessPolicy(open_to_all=False, token=TOKEN))
    try:
        assert (await call(server, "GET", path))[0] == 200
    finally:
        await server.stop()


async def test_off_loopback_without_a_token_set_everything_but_the_probes_is_closed():
    server, _ = await serve(AccessPolicy(open_to_all=False, token=None, token_env="MY_TOKEN"))
    try:
        status, body, _ = await call(server, "GET", "/jobs", "anything")
        assert status == 403 and "MY_TOKEN" in body["error"]
        assert (await call(server, "GET", "/healthz"))[0] == 200
    finally:
        await server.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_on_loopback_nothing_needs_a_token(host):
    server, _ = await serve(AccessPolicy.for_host(host, TOKEN, "TDA_ADMIN_TOKEN"))
    try:
        assert (await call(server, "GET", "/jobs"))[0] == 200
    finally:
        await server.stop()


def test_a_collector_listening_off_loopback_guards_its_candles(tmp_path, monkeypatch):
    monkeypatch.setenv("TDA_ADMIN_TOKEN", TOKEN)  # the child collector inherits it
    with FakeExchange([SymbolSpec("BTC/USDT")], clock=time.time) as fake:
        port, admin = admin_settings(host="0.0.0.0")
        config = write_config(tmp_path, fake.base_url, ["BTC/USDT"], ["1m"], admin=admin)
        with live_daemon(config, port) as daemon:
            params = {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
            params |= {"start": "2024-01-01", "end": "2999-01-01"}
            missing = daemon.get("/ohlcv", params)
            wrong = daemon.get("/ohlcv", params, headers={"Authorization": "Bearer nope"})
            right = daemon.get("/ohlcv", params, headers={"Authorization": f"Bearer {TOKEN}"})
            probe = daemon.get("/healthz")
    assert (missing.status_code, wrong.status_code, probe.status_code) == (401, 403, 200)
    assert list(missing.json()) == ["error"] and TOKEN not in missing.text + wrong.text
    assert right.status_code == 200 and right.json()["rows"]
