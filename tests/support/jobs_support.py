"""A collector process steered over its admin API while its output is drained in a thread."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from collector_support import start_subprocess
from store_support import read_duckdb_rows

from tda_collector.models import JobKey


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = None,
):
    """A JSON request (or `raw` bytes) to the admin API, with `token` as the bearer token if
    given; returns status and decoded answer."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def call(port: int, method: str, path: str) -> tuple[int, Any]:
    return send(port, method, path)


def history_id(symbol: str, timeframe: str = "1m") -> str:
    return f"binance:{symbol.replace('/', '-')}:{timeframe}:history"


class Collector:
    """`tda-collector` in a subprocess; its JSON events are collected as they come."""

    def __init__(self, config: Path, port: int, *args: str) -> None:
        self.port = port
        self.proc = start_subprocess(config, *args)
        self.events: list[dict[str, Any]] = []
        self.stderr = ""
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._lock:
                    self.events.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == name]

    def api(self, method: str, path: str) -> tuple[int, Any]:
        return call(self.port, method, path)

    def job(self, job_id: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/jobs/{job_id}")
        assert status == 200, body
        return body

    def wait_until(self, predicate, timeout_s: float = 30, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not what.startswith("exit"):
                raise AssertionError(
                    f"collector exited ({self.proc.returncode}) before {what}: "
                    f"{self.stderr[-2000:]}"
                )
            try:
                value = predicate()
            except (urllib.error.URLError, ConnectionError, AssertionError):
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last events {self.events[-3:]}")

    def wait_ready(self, jobs: int) -> None:
        self.wait_until(
            lambda: self.api("GET", "/progress")[1]["jobs"]["total"] == jobs, what="the jobs API"
        )

    def wait_exit(self, timeout_s: float = 60) -> int:
        code = self.proc.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait_exit(10)


def saved_jobs(state_path: Path) -> dict[str, dict[str, Any]]:
    """Job rows as saved in the state store, by symbol (history mode)."""
    with sqlite3.connect(state_path) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM jobs WHERE mode = 'history'").fetchall()
    return {row["symbol"]: dict(row) for row in rows}


def ledger(state_path: Path, symbol: str) -> list[tuple[int, int]]:
    with sqlite3.connect(state_path) as db:
        return db.execute(
            "SELECT start_ms, end_ms FROM coverage WHERE symbol = ? ORDER BY start_ms", (symbol,)
        ).fetchall()


def stored(tmp_path: Path, symbol: str, timeframe: str = "1m") -> list[tuple]:
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("binance", symbol, timeframe))
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]
