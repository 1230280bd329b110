"""The jobs API on the admin server: watch jobs and progress, pause, resume and cancel them.

    GET  /                      the status page (HTML, refreshes itself)
    GET  /jobs                  {"total", "offset", "jobs": [job, ...]}; filters: status (comma-
                                separated), exchange, symbol, timeframe, mode, q (part of the id);
                                paging: limit, offset
    GET  /jobs/{id}             one job (404 if unknown)
    GET  /progress/stream       server-sent events, one a second: {"progress": ..., "jobs": ...}
                                (the two answers above; the jobs filters apply)
    GET  /progress              the run's totals, rates, ETA and each exchange's budget use;
                                "paused": [{"exchange", "status", "resume_at"}] for exchanges
                                that asked to be left alone past retry.retry_after_max_seconds;
                                "fleet": the run's jobs over every instance (state_url), or null
    GET  /instances             {"instances": [{"instance_id", "mode", "started_at",
                                "heartbeat_at", "heartbeat_ms"}]}: every instance sharing the
                                state (empty without state_url)

A job's JSON holds `owner`: in a run under leases (history with state_url), the instance
holding the job's lease now (null while nobody does); otherwise the instance serving the API
(null where the API is built without one).
    POST /jobs/{id}/pause|resume|cancel   the job after the move; 409 {"error"} when refused
    POST /pause, POST /resume   every job that can move; {"changed": n}

A POST answers only once the changed job rows are saved. POSTs from another web origin are
refused (a page elsewhere must not steer a collector on this machine). When the server listens
on anything but loopback, POSTs also need `Authorization: Bearer <token>`, the token coming from
the environment variable named by `admin.token_env`; without one set they are refused.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..exchange.throttle import Pauses
from ..jobs.leases import LeaseStore
from ..jobs.model import (
    PAUSED,
    PENDING,
    RUNNING,
    STATUSES,
    USER_ACTIONS,
    Job,
    TransitionRefused,
)
from ..jobs.progress import Progress
from ..jobs.registry import JobRegistry
from ..jobs.schedule import EACH_CLOSE
from ..timeframes import iso_utc
from .server import listens_on_loopback
from .status_page import STATUS_PAGE

_FILTERS = ("exchange", "symbol", "timeframe", "mode", "q")
STREAM_S = 1.0  # the progress stream's period
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JobJson = Callable[[Job], dict[str, object]]  # a job as the API shows it
ResumeGuard = Callable[[Job], str | None]  # why a job may not be resumed now, or None


def record_json(job: Job) -> dict[str, object]:
    return job.record.to_json()


def describe_job(job: Job, owner: str) -> dict[str, object]:
    """The job as the API shows it: its record, with times as ISO too, its schedule (live), its
    runs so far (live: runs started, across restarts; history: pages stored) and its `owner`,
    the instance running it."""
    record = job.record
    live = record.mode == "live"
    return {
        **record.to_json(),
        "schedule": (job.schedule or EACH_CLOSE.to_json()) if live else None,
        "last_run": iso_ms(record.last_run_ms),
        "next_run": iso_ms(record.next_run_ms),
        "runs_total": record.runs if live else record.pages,
        "owner": owner,
    }


def iso_ms(ms: int | None) -> str | None:
    return None if ms is None else iso_utc(ms / 1000)


def no_guard(job: Job) -> str | None:
    return None


@dataclass(frozen=True)
class AdminAccess:
    """Who may POST: anyone on loopback; elsewhere only holders of the token."""

    loopback: bool
    token: str | None = None
    token_env: str = "TDA_ADMIN_TOKEN"

    def refusal(self, request: web.Request) -> web.Response | None:
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return _error(403, "cross-origin requests may not change jobs")
        if self.loopback:
            return None
        if not self.token:
            return _error(403, f"POST is disabled off loopback until {self.token_env} is set")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            response = _error(401, "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None


@dataclass(frozen=True)
class Fleet:
    """The instances sharing the state, as this one's API shows them: `run_id` names this
    instance's run in the leases."""

    store: LeaseStore
    run_id: str
    mode: str
    lease_s: float  # an instance without a heartbeat for longer is not counted as running

    async def owners(self) -> dict[str, str]:
        return await self.store.owners(self.run_id)


def error_response(status: int, message: str) -> web.Response:
    """The API's error answer: `{"error": "one line"}`."""
    return web.json_response({"error": message}, status=status)


_error = error_response


class JobsApi:
    def __init__(
        self,
        registry: JobRegistry,
        progress: Progress,
        access: AdminAccess,
        pauses: Pauses | None = None,
        job_json: JobJson = record_json,
        resume_guard: ResumeGuard = no_guard,
        fleet: Fleet | None = None,
    ) -> None:
        """`job_json` shows a job; with `fleet` (shared state), its `owner` is the instance
        holding its lease now (None while nobody does)."""
        self._registry = registry
        self._progress = progress
        self._access = access
        self._pauses = pauses if pauses is not None else Pauses()
        self._describe = job_json
        self._resume_guard = resume_guard
        self._fleet = fleet

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.page),
            web.get("/jobs", self.list_jobs),
            web.get("/jobs/{id}", self.get_job),
            web.get("/progress", self.progress),
            web.get("/progress/stream", self.stream),
            web.get("/instances", self.instances),
            web.post("/jobs/{id}/{action}", self._guarded(self.command)),
            web.post("/pause", self._guarded(self.pause_all)),
            web.post("/resume", self._guarded(self.resume_all)),
        ]

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = self._access.refusal(request)
            return refusal if refusal is not None else await handler(request)

        return guarded

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=STATUS_PAGE, content_type="text/html", charset="utf-8")

    async def _progress_json(self) -> dict[str, object]:
        paused = [p.to_json() for p in self._pauses.active()]
        fleet = None
        if self._fleet is not None:
            fleet = await self._fleet.store.run_totals(self._fleet.run_id)
            fleet["instances"] = await self._fleet.store.active_instances(
                self._fleet.mode, self._fleet.lease_s
            )
        return {**self._progress.summary().to_json(), "paused": paused, "fleet": fleet}

    async def instances(self, request: web.Request) -> web.Response:
        found = await self._fleet.store.instances() if self._fleet is not None else []
        return web.json_response({"instances": [i.to_json() for i in found]})

    async def _owners(self) -> dict[str, str] | None:
        return await self._fleet.owners() if self._fleet is not None else None

    def _job_json(self, job: Job, owners: dict[str, str] | None) -> dict[str, object]:
        body: dict[str, object] = {"owner": None, **self._describe(job)}
        if owners is not None:
            body["owner"] = owners.get(job.id)
        return body

    async def progress(self, request: web.Request) -> web.Response:
        return web.json_response(await self._progress_json())

    async def _listing(self, query: Mapping[str, str]) -> dict[str, object]:
        """The jobs the query selects, as `GET /jobs` answers; ValueError naming a bad one."""
        statuses = [s for s in query.get("status", "").upper().split(",") if s]
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            wanted = ", ".join(STATUSES)
            raise ValueError(f"status: unknown {', '.join(unknown)}; one of {wanted}")
        try:
            limit = int(query.get("limit", "0")) or None
            offset = int(query.get("offset", "0"))
        except ValueError:
            raise ValueError("limit and offset must be integers") from None
        jobs = self._registry.select(**{name: query.get(name) for name in _FILTERS})
        if statuses:
            jobs = [job for job in jobs if job.status in statuses]
        chosen = jobs[offset : None if limit is None else offset + limit]
        owners = await self._owners()
        listed = [self._job_json(job, owners) for job in chosen]
        return {"total": len(jobs), "offset": offset, "jobs": listed}

    async def list_jobs(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self._listing(request.query))
        except ValueError as exc:
            return _error(400, str(exc))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Progress and the selected jobs pushed once a second until the client leaves (the
        status page's "progress streamer"); a bad filter is a 400 before the stream starts."""
        try:
            await self._listing(request.query)
        except ValueError as exc:
            return _error(400, str(exc))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")
        try:
            while True:
                progress, jobs = await self._progress_json(), await self._listing(request.query)
                body = {"progress": progress, "jobs": jobs}
                await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")
                await asyncio.sleep(STREAM_S)
        except ConnectionError:  # the page went away
            return response

    async def get_job(self, request: web.Request) -> web.Response:
        job = self._registry.jobs.get(request.match_info["id"])
        if job is None:
            return _error(404, f"no job {request.match_info['id']}")
        return web.json_response(self._job_json(job, await self._owners()))

    async def command(self, request: web.Request) -> web.Response:
        job = self._registry.jobs.get(request.match_info["id"])
        action = request.match_info["action"]
        if job is None or action not in USER_ACTIONS:
            return _error(404, f"no job {request.match_info['id']} or no action {action}")
        refused = self._resume_guard(job) if action == "resume" else None
        if refused is not None:
            return _error(409, refused)
        try:
            self._registry.command(job, action)
        except TransitionRefused as exc:
            return _error(409, str(exc))
        await self._registry.flush()
        return web.json_response(self._job_json(job, await self._owners()))

    async def pause_all(self, request: web.Request) -> web.Response:
        changed = self._registry.command_all("pause", (PENDING, RUNNING))
        await self._registry.flush()
        return web.json_response({"changed": changed})

    async def resume_all(self, request: web.Request) -> web.Response:
        changed = self._registry.command_all("resume", (PAUSED,))
        await self._registry.flush()
        return web.json_response({"changed": changed})


def jobs_routes(
    registry: JobRegistry,
    progress: Progress,
    host: str,
    token: str | None,
    token_env: str,
    pauses: Pauses | None = None,
    job_json: JobJson = record_json,
    resume_guard: ResumeGuard = no_guard,
    fleet: Fleet | None = None,
) -> list[web.RouteDef]:
    access = routes_access(host, token, token_env)
    return JobsApi(registry, progress, access, pauses, job_json, resume_guard, fleet).routes()


def routes_access(host: str, token: str | None, token_env: str) -> AdminAccess:
    """Who may change things on a server listening on `host`."""
    return AdminAccess(listens_on_loopback(host), token, token_env)
