"""The service side of the admin API: connectors, jobs added and deleted, backfills.

    GET  /connectors                   {"connectors": [connector, ...]}
    GET  /connectors/{id}              the `exchanges[]` block, `id`, `enabled`, and the
                                       read-only `rate_limit_state`
    PUT  /connectors/{id}              idempotent upsert of such a block: 201 new, 200 otherwise
    DELETE /connectors/{id}            stops its jobs and forgets it (its candles stay)
    POST /connectors/{id}/enable|disable
    POST /jobs                         {"exchange", "symbol", "timeframe", "schedule"?}: 201
                                       {"job"} created, 200 {"job"} when the series has one
    DELETE /jobs/{id}                  stops and forgets the job; its candles stay
    POST /jobs/{id}/backfill           {"start", "end"?}: 202 {"job"}, the series' history job

Bodies are validated by the config's own models (`ExchangeConfig`, `Schedule`): a bad one is a
400 naming the field, and nothing changes. Every change needs what the jobs API's POSTs need
(`AdminAccess`: same origin; off loopback, the bearer token).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ExchangeConfig, format_validation_error
from ..jobs.catalog import Connector
from ..jobs.model import Job
from ..jobs.registry import JobRegistry
from ..jobs.schedule import Schedule
from ..models import JobKey
from ..modes.service import LiveService, Refused
from ..timeframes import iso_utc
from .jobs_api import AdminAccess, Handler, describe_job, error_response

READ_ONLY = ("id", "enabled", "rate_limit_state")
# Instants a backfill may name: from the epoch to the end of year 9999 (datetime's range).
LATEST_MS = 253_402_300_799_999


class NewJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exchange: str = Field(min_length=1, max_length=64)
    symbol: str = Field(min_length=1, max_length=100)
    timeframe: str = Field(min_length=1, max_length=8)
    # None: each close for a new job; a job that exists keeps its schedule.
    schedule: Schedule | None = None


class BackfillRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str | int
    end: str | int | None = None


def instant_ms(value: str | int, field: str) -> int:
    """An ISO 8601 date or date-time (UTC when no zone is given) or epoch ms."""
    if isinstance(value, int):
        ms = value
    else:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Refused(400, f"{field}: not an ISO 8601 date or date-time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ms = int(parsed.timestamp() * 1000)
    if not 0 <= ms <= LATEST_MS:
        raise Refused(400, f"{field}: out of range (1970 to 9999)")
    return ms


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "body: not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "body: must be a JSON object")
    return body


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Refused(400, format_validation_error(exc)) from None


class ServiceApi:
    def __init__(
        self, service: LiveService, registry: JobRegistry, access: AdminAccess, owner: str
    ) -> None:
        self._service = service
        self._registry = registry
        self._access = access
        self._owner = owner

    def routes(self) -> list[web.RouteDef]:
        """Routed before the jobs API's, whose `/jobs/{id}/{action}` would take `backfill`."""
        return [
            web.get("/connectors", self.list_connectors),
            web.get("/connectors/{id}", self.get_connector),
            web.put("/connectors/{id}", self._changing(self.put_connector)),
            web.delete("/connectors/{id}", self._changing(self.delete_connector)),
            web.post("/connectors/{id}/{action}", self._changing(self.toggle_connector)),
            web.post("/jobs", self._changing(self.add_job)),
            web.delete("/jobs/{id}", self._changing(self.delete_job)),
            web.post("/jobs/{id}/backfill", self._changing(self.backfill)),
        ]

    def _changing(self, handler: Handler) -> Handler:
        """Access checked first; a `Refused` change is its status and one line."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = self._access.refusal(request)
            if refusal is not None:
                return refusal
            try:
                return await handler(request)
            except Refused as exc:
                return error_response(exc.status, str(exc))

        return guarded

    # -- JSON of the entities
    def connector_json(self, connector: Connector) -> dict[str, Any]:
        body = connector.config.model_dump(mode="json")
        opened = self._service.opened.get(connector.id)
        state = None
        if opened is not None:
            limit, period_s, usage, start = opened.runtime.limiter.usage()
            start_wall = time.time() - (time.monotonic() - start)
            state = {
                "limit": limit,
                "period_ms": round(period_s * 1000),
                "usage": usage,
                "period_start": iso_utc(start_wall),
            }
        return {**body, "enabled": connector.enabled, "rate_limit_state": state}

    def job_json(self, job: Job) -> dict[str, object]:
        return describe_job(job, self._owner)

    # -- handlers
    async def list_connectors(self, request: web.Request) -> web.Response:
        connectors = [self.connector_json(c) for c in self._service.connectors.values()]
        return web.json_response({"connectors": connectors})

    async def get_connector(self, request: web.Request) -> web.Response:
        connector = self._service.connectors.get(request.match_info["id"])
        if connector is None:
            return error_response(404, f"no connector {request.match_info['id']}")
        return web.json_response(self.connector_json(connector))

    async def put_connector(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        block = {k: v for k, v in body.items() if k not in READ_ONLY}
        config = validated(ExchangeConfig, {**block, "id": request.match_info["id"]})
        created, connector = await self._service.put_connector(config)
        return web.json_response(self.connector_json(connector), status=201 if created else 200)

    async def delete_connector(self, request: web.Request) -> web.Response:
        connector = await self._service.delete_connector(request.match_info["id"])
        await self._registry.flush()
        return web.json_response({"connector": self.connector_json(connector)})

    async def toggle_connector(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("enable", "disable"):
            return error_response(404, f"no action {action}")
        connector = await self._service.set_enabled(request.match_info["id"], action == "enable")
        await self._registry.flush()
        return web.json_response(self.connector_json(connector))

    async def add_job(self, request: web.Request) -> web.Response:
        new = validated(NewJob, await json_body(request))
        key = JobKey(new.exchange, new.symbol, new.timeframe)
        created, job = await self._service.add_job(key, new.schedule)
        await self._registry.flush()
        return web.json_response({"job": self.job_json(job)}, status=201 if created else 200)

    def _job(self, request: web.Request) -> Job:
        job = self._registry.jobs.get(request.match_info["id"])
        if job is None:
            raise Refused(404, f"no job {request.match_info['id']}")
        return job

    async def delete_job(self, request: web.Request) -> web.Response:
        job = self._job(request)
        await self._service.delete_job(job)
        return web.json_response({"job": self.job_json(job)})

    async def backfill(self, request: web.Request) -> web.Response:
        job = self._job(request)
        wanted = validated(BackfillRange, await json_body(request))
        start = instant_ms(wanted.start, "start")
        end = instant_ms(wanted.end, "end") if wanted.end is not None else int(time.time() * 1000)
        if start >= end:
            raise Refused(400, "start: must be before end")
        history = await self._service.backfill(job.key, start, end)
        await self._registry.flush()
        return web.json_response({"job": self.job_json(history)}, status=202)
