"""`--mode=history` beside a running daemon: the range is handed to it over its admin API.

When the store is held by another process (DuckDB allows one writer), a live daemon answering
at the configured admin address is that writer. The history run then asks it to backfill each
of its live jobs that the command line selects (`POST /jobs/{id}/backfill`), follows the
backfills to their end (`GET /jobs/{id}` once a second), reporting `progress` events as a
history run does, and ends with the usual `history_complete` event and exit code: 0 when every
backfill completed, 1 when any failed. Nothing here touches the exchange or the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp

from ..config import AdminConfig
from ..errors import EXIT_JOBS_FAILED, EXIT_OK, UsageError
from ..exchange.runtime import RunRequest
from ..jobs.model import STATUSES
from ..jobs.progress import RateWindow, Summary
from ..jobs.progress_bar import ProgressBar, terminal_bar
from ..observability.events import EventLog

POLL_S = 1.0
PROGRESS_EVENT_S = 5.0
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


def daemon_url(admin: AdminConfig) -> str | None:
    """Where the daemon's admin API answers: `admin.daemon_url` when set (another container,
    another host), else the admin address on this machine (a wildcard address is reached
    through loopback); None when neither names one (the admin server is disabled)."""
    if admin.daemon_url is not None:
        return admin.daemon_url
    if admin.port == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{admin.port}"


def selected(jobs: list[dict[str, Any]], request: RunRequest) -> list[dict[str, Any]]:
    """The daemon's live jobs the command line selects (every one when it names none)."""

    def wanted(job: dict[str, Any]) -> bool:
        return all(
            not chosen or job[name] in chosen
            for name, chosen in (
                ("exchange", request.exchanges),
                ("symbol", request.symbols),
                ("timeframe", request.timeframes),
            )
        )

    return [job for job in jobs if job["mode"] == "live" and wanted(job)]


def error_of(answer: Any) -> str:
    """The one line of an API error answer (`{"error": ...}`), else the answer itself."""
    return str(answer.get("error") if isinstance(answer, dict) else answer)


def summary_of(jobs: list[dict[str, Any]], candles_per_s: float | None) -> Summary:
    """The followed backfills as a history run's progress (what its events and bar show)."""
    counts = Counter({status: 0 for status in STATUSES})
    counts.update(j["status"] for j in jobs)
    covered = sum(j["covered"] or 0.0 for j in jobs) / len(jobs) if jobs else None
    return Summary(
        mode="history",
        counts=dict(counts),
        candles=sum(j["rows"] for j in jobs),
        covered=covered,
        candles_per_s=candles_per_s,
        jobs_per_s=None,
        eta_s=None,
        exchanges=[],
        updated_ms=int(time.time() * 1000),
    )


class Handover:
    def __init__(
        self, base_url: str, token: str | None, events: EventLog, session: aiohttp.ClientSession
    ) -> None:
        self._url = base_url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._events = events
        self._session = session

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self._session.request(
            method, self._url + path, json=body, headers=self._headers
        ) as response:
            return response.status, await response.json(content_type=None)

    async def answers(self) -> bool:
        """A collector answers at the address (its health check)."""
        try:
            status, body = await self._call("GET", "/healthz")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"

    async def run(self, request: RunRequest) -> int:
        assert request.start_ms is not None and request.end_ms is not None
        status, listing = await self._call("GET", "/jobs?mode=live")
        if status != 200:  # e.g. a missing or wrong token: 401, 403
            raise UsageError(
                f"the daemon at {self._url} refused the jobs list ({status}): {error_of(listing)}"
            )
        jobs = selected(listing["jobs"], request)
        if not jobs:
            raise UsageError(f"the daemon at {self._url} has no live job the command selects")
        started = time.monotonic()
        history = []
        for job in jobs:
            body = {"start": request.start_ms, "end": request.end_ms}
            status, answer = await self._call("POST", f"/jobs/{job['id']}/backfill", body)
            if status != 202:
                raise UsageError(f"backfill of {job['id']} refused ({status}): {error_of(answer)}")
            history.append(answer["job"]["id"])
        self._events.info(
            "history_handed_over",
            f"the store is held by the daemon at {self._url}; it backfills {len(history)} jobs",
            jobs=len(history),
            url=self._url,
        )
        final = await self._follow(history)
        return self._summarise(final, time.monotonic() - started)

    async def _follow(self, ids: list[str]) -> list[dict[str, Any]]:
        """Poll the backfills once a second to their end: `progress` events every few seconds
        and, on a terminal, the usual bar."""
        bar: ProgressBar | None = terminal_bar("history", self._events.logger)
        rate = RateWindow()
        last_event: float | None = None
        try:
            while True:
                current = [await self._job(job_id) for job_id in ids]
                now = time.monotonic()
                candles = sum(j["rows"] for j in current)
                summary = summary_of(current, rate.rate(now, candles))
                rate.sample(now, candles)
                if bar is not None:
                    (bar.open if last_event is None else bar.update)(summary)
                finished = summary.done == summary.total
                if finished or last_event is None or now - last_event >= PROGRESS_EVENT_S:
                    last_event = now
                    self._events.info("progress", summary.line(), **summary.event_fields())
                if finished:
                    return current
                await asyncio.sleep(POLL_S)
        finally:
            if bar is not None:
                bar.close()

    async def _job(self, job_id: str) -> dict[str, Any]:
        status, job = await self._call("GET", f"/jobs/{job_id}")
        if status != 200:
            raise UsageError(f"the daemon lost the backfill {job_id} ({status})")
        return dict(job)

    def _summarise(self, jobs: list[dict[str, Any]], seconds: float) -> int:
        failed = [j for j in jobs if j["status"] == "FAILED"]
        cancelled = sum(j["status"] == "CANCELLED" for j in jobs)
        for job in failed:
            self._events.error(
                "job_failed",
                f"{job['id']} failed: {job['last_error']}",
                exchange=job["exchange"],
                symbol=job["symbol"],
                timeframe=job["timeframe"],
                error=job["last_error"],
            )
        rows = sum(j["rows"] for j in jobs)
        log = self._events.error if failed else self._events.info
        completed = len(jobs) - len(failed) - cancelled
        log(
            "history_complete",
            f"{completed}/{len(jobs)} jobs complete, {rows} candles stored (by the daemon)",
            jobs=len(jobs),
            completed=completed,
            failed=len(failed),
            cancelled=cancelled or None,
            failed_jobs=[j["id"] for j in failed] or None,
            rows=rows,
            duration_ms=round(seconds * 1000),
        )
        return EXIT_JOBS_FAILED if failed else EXIT_OK


async def hand_over(
    url: str, token: str | None, request: RunRequest, events: EventLog
) -> int | None:
    """Run the history request through the daemon at `url` (see `daemon_url`), sending
    `token` as the bearer token; None when no collector answers there (the caller then
    reports the held store)."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        handover = Handover(url, token, events, session)
        if not await handover.answers():
            return None
        return await handover.run(request)
