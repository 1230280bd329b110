"""The admin HTTP server: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.

`/healthz` answers 200 while the process serves at all (a liveness probe: restart if not).
`/readyz` asks a readiness callable, which returns None when ready or a reason why not (the
store is unreachable, a background task died); so a dead task shows in health instead of dying
silently. More routes (the jobs API, `/ohlcv`) plug in through `routes`.

Access (`AccessPolicy`): on loopback anyone may ask anything, as before. Off loopback every
request but the probes (`/healthz`, `/readyz`, `/metrics`) and the status page's HTML shell
(`/`, which holds no data and asks for the token itself) needs `Authorization: Bearer <token>`,
reads included (the candles are the user's asset): 401 without one, 403 with a wrong one or when
no token is set (the environment variable named by `admin.token_env`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from ..config import AdminConfig
from ..observability.metrics import CONTENT_TYPE, Metrics

# Returns None when ready, else a short reason. Must not raise; if it does, that is the reason.
Readiness = Callable[[], Awaitable[str | None]]
READINESS_TIMEOUT_S = 2.0  # below a typical probe timeout, so the probe sees our 503
# Served to anyone: orchestrators' probes, Prometheus, and the page that asks for the token.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def listens_on_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refused(status: int, message: str) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


@dataclass(frozen=True)
class AccessPolicy:
    """Who may ask what: everyone when `open_to_all` (the server listens on loopback only),
    else the holders of `token` for everything but `OPEN_PATHS`."""

    open_to_all: bool
    token: str | None = None
    token_env: str = "TDA_ADMIN_TOKEN"

    @classmethod
    def for_host(cls, host: str, token: str | None, token_env: str) -> AccessPolicy:
        return cls(listens_on_loopback(host), token, token_env)

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when `request` may go on, else the one-line answer refusing it."""
        if self.open_to_all or request.path in OPEN_PATHS:
            return None
        if not self.token:
            return _refused(
                403, f"the admin API is closed off loopback until {self.token_env} is set"
            )
        given = request.headers.get("Authorization")
        if not given:
            return _refused(401, "a bearer token is required (Authorization: Bearer <token>)")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return _refused(403, "the bearer token is wrong")
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self.refusal(request)
        return refusal if refusal is not None else await handler(request)


# How long a stop waits for requests still being answered (a progress stream never ends by
# itself) before cancelling them: the process's whole stop budget is 1 s.
SHUTDOWN_TIMEOUT_S = 0.2


class AdminServer:
    """Serves until `stop()`. Port 0 binds a free port; `port` then tells which one."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        readiness: Readiness,
        routes: Iterable[web.AbstractRouteDef] = (),
        access: AccessPolicy | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._readiness = readiness
        access = access if access is not None else AccessPolicy.for_host(host, None, "")
        self.app = web.Application(middlewares=[access.middleware])
        self.app.add_routes(
            [
                web.get("/metrics", self._metrics_page),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                *routes,
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the admin server is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # No access log: stdout carries only the interface's JSON events.
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            reason = await asyncio.wait_for(self._readiness(), READINESS_TIMEOUT_S)
        except TimeoutError:
            reason = f"readiness check took longer than {READINESS_TIMEOUT_S:g}s"
        except Exception as exc:  # the check's own failure is the answer, not a 500
            reason = f"readiness check failed: {type(exc).__name__}: {exc}"
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)


def build_admin_server(
    config: AdminConfig,
    metrics: Metrics,
    readiness: Readiness,
    routes: Iterable[web.AbstractRouteDef] = (),
    token: str | None = None,
) -> AdminServer | None:
    """The configured server (not started yet), or None when `admin.port` is 0 (disabled);
    `token` is the bearer token requests need off loopback (see `AccessPolicy`)."""
    if config.port == 0:
        return None
    access = AccessPolicy.for_host(config.host, token, config.token_env)
    return AdminServer(config.host, config.port, metrics, readiness, routes, access)
