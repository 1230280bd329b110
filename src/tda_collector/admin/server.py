"""The admin HTTP server: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.

`/healthz` answers 200 while the process serves at all (a liveness probe: restart if not).
`/readyz` asks a readiness callable, which returns None when ready or a reason why not (the
store is unreachable, a background task died); so a dead task shows in health instead of dying
silently. More routes (the jobs API) plug in through `routes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from ..config import AdminConfig
from ..observability.metrics import CONTENT_TYPE, Metrics

# Returns None when ready, else a short reason. Must not raise; if it does, that is the reason.
Readiness = Callable[[], Awaitable[str | None]]
READINESS_TIMEOUT_S = 2.0  # below a typical probe timeout, so the probe sees our 503
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
    ) -> None:
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._readiness = readiness
        self.app = web.Application()
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
) -> AdminServer | None:
    """The configured server (not started yet), or None when `admin.port` is 0 (disabled)."""
    if config.port == 0:
        return None
    return AdminServer(config.host, config.port, metrics, readiness, routes)
