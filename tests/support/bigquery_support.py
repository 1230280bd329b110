"""BigQuery test support: the local emulator, a fault-injecting proxy and a store factory.

The emulator (tests/support/tools/bq-emulator: local-bigquery in its own Python 3.13 venv,
installed on first use) is started once per test session. Where it cannot be installed or
started the BigQuery tests skip with the cause; under CI (`CI=true`) they fail instead, so a broken
emulator can never turn the BigQuery suite green by skipping it.
"""

from __future__ import annotations

import asyncio
import atexit
import email
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from event_support import recording_events
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from tda_collector.config import BigQueryConfig
from tda_collector.models import JobKey
from tda_collector.retry import RetryPolicy
from tda_collector.store.bigquery_store import BigQueryStore

PROJECT = "test-project"
SCRIPT = Path(__file__).parent / "tools" / "bq-emulator"
# The first run installs the emulator's venv from PyPI (about 30 s); stay under pytest's
# 300 s per-test timeout so a stuck install ends in a readable skip or failure.
_START_TIMEOUT_S = 280
# Retries inside one write, short enough for tests that exhaust them.
FAST_RETRY = RetryPolicy(base_s=0.01, cap_s=0.05, attempts=3)


def _emulator_venv() -> Path | None:
    """Inside the project's venv when tests run in one, so `make clean` removes it too."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bq-emulator-0.4.0"
    return None  # the script's default under /tmp


class _Emulator:
    """One emulator process per test session, started on first use."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.grpc: str | None = None  # host:port of the Storage Read/Write API
        self.problem: str | None = None
        self._workdir: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Sets `url`, or `problem` saying why there is no emulator."""
        self._workdir = tempfile.mkdtemp(prefix="tda-bq-emulator-")
        env = dict(os.environ)
        venv = _emulator_venv()
        if venv is not None:
            env.setdefault("BQEMU_VENV", str(venv))
        try:
            done = subprocess.run(
                ["bash", str(SCRIPT), "start", self._workdir],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.problem = f"{SCRIPT.name} start: {exc}"
            return
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-6:]) or "no output"
            self.problem = f"{SCRIPT.name} start exited {done.returncode}: {tail}"
            return
        self.url, port = done.stdout.split()[:2]
        self.grpc = f"127.0.0.1:{port}"
        atexit.register(self.stop)

    def stop(self) -> None:
        with self._lock:
            if self._workdir is None:
                return
            subprocess.run(["bash", str(SCRIPT), "stop", self._workdir], check=False)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self.url = None
            self.grpc = None

    def require(self) -> str:
        with self._lock:
            if self.url is None and self.problem is None:
                self.start()
                if self.url is None:
                    shutil.rmtree(self._workdir or "", ignore_errors=True)
                    self._workdir = None
        if self.url is None:
            message = f"BigQuery emulator unavailable: {self.problem}"
            if os.environ.get("CI") == "true":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        return self.url


_EMULATOR = _Emulator()


def emulator_url() -> str:
    """The running emulator's URL, starting it on first use (skips or fails if it cannot)."""
    return _EMULATOR.require()


def emulator_grpc() -> str:
    """host:port of the running emulator's gRPC side (the Storage Write API)."""
    emulator_url()
    assert _EMULATOR.grpc is not None
    return _EMULATOR.grpc


@pytest.fixture(scope="session", name="bigquery_emulator")
def bigquery_emulator_fixture():
    """The emulator's URL for this session; stopped when the session ends."""
    yield emulator_url()
    _EMULATOR.stop()


@pytest.fixture(name="client")
def client_fixture(bigquery_emulator):
    """A direct client of the emulator, to set up and inspect tables behind the store's back."""
    direct = emulator_client(bigquery_emulator)
    yield direct
    direct.close()


@pytest.fixture(name="proxy")
def proxy_fixture(bigquery_emulator):
    """A `FaultProxy` in front of the emulator's REST port (it also counts requests by kind)."""
    with FaultProxy(bigquery_emulator) as running:
        yield running


def emulator_client(url: str) -> bigquery.Client:
    return bigquery.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=url),
    )


def unique_dataset() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


LATEST_ROWS_SQL = """SELECT UNIX_MILLIS(timestamp) AS timestamp_ms, *
FROM `{view}` WHERE exchange = @exchange AND symbol = @symbol AND timeframe = @timeframe
ORDER BY timestamp"""


def _key_params(key: JobKey) -> bigquery.QueryJobConfig:
    return bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter(name, "STRING", getattr(key, name))
            for name in ("exchange", "symbol", "timeframe")
        ]
    )


def read_latest(client: bigquery.Client, dataset: str, key: JobKey) -> list[dict[str, Any]]:
    """What users query: the `_latest` view, one row per key."""
    sql = LATEST_ROWS_SQL.format(view=f"{PROJECT}.{dataset}.market_data_ohlcv_latest")
    return [dict(row) for row in client.query(sql, job_config=_key_params(key)).result()]


def count_stored(client: bigquery.Client, dataset: str) -> int:
    """Rows in the base table, every version (the emulator's `num_rows` drifts; COUNT does not)."""
    sql = f"SELECT COUNT(*) AS n FROM `{PROJECT}.{dataset}.market_data_ohlcv`"
    return next(iter(client.query(sql).result()))["n"]


@asynccontextmanager
async def bigquery_store_failing_transiently(tmp_path):
    """A store (with `FAST_RETRY`) whose writes get 503s until `clear()`: yields
    (store, rows, clear), for the contract's transient fault."""
    with FaultProxy(emulator_url()) as proxy:
        proxy.insert_faults.extend(["unavailable"] * FAST_RETRY.attempts)

        async def clear() -> None:
            proxy.insert_faults.clear()

        async with bigquery_store(tmp_path, url=proxy.url, retry=FAST_RETRY) as (store, rows):
            yield store, rows, clear


@asynccontextmanager
async def bigquery_store(
    tmp_path,
    *,
    url: str | None = None,
    dataset: str | None = None,
    grpc: str | None = None,
    **kw,
):
    """An ensured BigQueryStore on a fresh dataset of the emulator, plus a `rows(key)` reader
    of the `_latest` view. `tmp_path` is unused: the data lives in the emulator. `grpc`
    replaces the emulator's Write API address (a proxy in front of it)."""
    url = url or emulator_url()
    dataset = dataset or unique_dataset()
    kw.setdefault("events", recording_events()[0])
    config = BigQueryConfig(
        project=PROJECT,
        dataset=dataset,
        api_endpoint=url,
        write_api_endpoint=grpc or emulator_grpc(),
    )
    store = BigQueryStore(config, **kw)
    reader = emulator_client(emulator_url())

    async def rows(key: JobKey) -> list[dict[str, Any]]:
        return await asyncio.to_thread(read_latest, reader, dataset, key)

    try:
        await store.ensure()
        yield store, rows
    finally:
        await store.close()
        reader.close()


# requests decodes bodies and sets lengths itself; these must not be copied across.
_HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "accept-encoding",
        "keep-alive",
    }
)
_JSON = {"Content-Type": "application/json"}
Reply = tuple[int, dict[str, str], bytes]


class FaultProxy:
    """A loopback HTTP proxy in front of the emulator that fails chosen requests the way
    BigQuery does. Knobs are consumed one matching request at a time:

    - `insert_faults`: per insertAll request, one of
      "lost_response" (the emulator stores the rows, the client gets a 503),
      "unavailable" (not forwarded: 503, BigQuery briefly unavailable),
      "bad_request" (not forwarded: 400 `invalid`, a request BigQuery refuses for good),
      "rows_backend_error" (stored, but every row reported as backendError),
      "reject_second_row" (not forwarded: row 1 `invalid`, the others `stopped`).
    - `failed_load_jobs`: that many load-job uploads get back a job that failed with
      `load_job_error` as its reason ("backendError" unless told).
    - `refuse_all`: when set, an HTTP status that every request gets back, not forwarded.

    `seen` counts forwarded or answered requests by kind ("insert", "load", "other").
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.insert_faults: list[str] = []
        self.failed_load_jobs = 0
        self.load_job_error = "backendError"
        self.refuse_all: int | None = None
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._session.close()

    def _next_fault(self, kind: str) -> str | None:
        with self._lock:
            self.seen[kind] += 1
            if self.refuse_all is not None:
                return "refused"
            if kind == "insert" and self.insert_faults:
                return self.insert_faults.pop(0)
            if kind == "load" and self.failed_load_jobs > 0:
                self.failed_load_jobs -= 1
                return "failed_job"
        return None

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        response = self._session.request(
            method,
            self.upstream + path,
            headers={k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS},
            data=body,
            timeout=60,
        )
        kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
        return response.status_code, kept, response.content

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        fault = self._next_fault(_kind(method, path))
        if fault in _ANSWERS:
            return _ANSWERS[fault]
        if fault == "refused":
            return _error_reply(self.refuse_all or 500, "refused", "injected: refused")
        if fault == "failed_job":
            job = _failed_job(headers, body, self.load_job_error)
            return 200, _JSON, json.dumps(job).encode()
        if fault == "reject_second_row":
            count = len(json.loads(body)["rows"])
            return 200, _JSON, _insert_errors(count, lambda i: _INVALID if i == 1 else _STOPPED)
        status, reply_headers, content = self.forward(method, path, headers, body)
        if fault == "lost_response":
            return 503, _JSON, b'{"error": {"code": 503, "message": "injected"}}'
        if fault == "rows_backend_error":
            content = _insert_errors(len(json.loads(body)["rows"]), lambda i: _BACKEND_ERROR)
        return status, reply_headers, content

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, content = proxy.handle(
                    self.command, self.path, dict(self.headers), body
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _kind(method: str, path: str) -> str:
    if path.split("?")[0].endswith("/insertAll"):
        return "insert"
    if method == "POST" and path.startswith("/upload/") and "uploadType=multipart" in path:
        return "load"
    return "other"


def _error_reply(status: int, reason: str, message: str) -> Reply:
    """A request-level error answer, as the API sends it."""
    error = {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}
    return status, _JSON, json.dumps({"error": error}).encode()


_ANSWERS = {
    "unavailable": _error_reply(503, "backendError", "injected: service unavailable"),
    "bad_request": _error_reply(400, "invalid", "injected: no such field: rsi_14"),
}
_INVALID = {"reason": "invalid", "location": "open", "message": "injected: not a number"}
_STOPPED = {"reason": "stopped", "message": ""}
_BACKEND_ERROR = {"reason": "backendError", "message": "injected"}


def _insert_errors(count: int, error_of: Callable[[int], dict[str, str]]) -> bytes:
    """An insertAll answer with one error for each of `count` rows."""
    errors = [{"index": i, "errors": [error_of(i)]} for i in range(count)]
    return json.dumps(
        {"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": errors}
    ).encode()


def _failed_job(headers: dict[str, str], body: bytes, reason: str) -> dict[str, Any]:
    """The job resource of a multipart load upload, answered as DONE with error `reason`."""
    content_type = next(v for k, v in headers.items() if k.lower() == "content-type")
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    job = json.loads(message.get_payload()[0].get_payload())
    error = {"reason": reason, "message": "injected: load job failed"}
    job["status"] = {"state": "DONE", "errorResult": error, "errors": [error]}
    return job
