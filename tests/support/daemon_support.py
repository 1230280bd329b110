"""A live collector process with its admin API, on DuckDB or BigQuery (the emulator), and the
HTTP calls tests make to it."""

from __future__ import annotations

import io
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import requests
from bigquery_support import PROJECT, emulator_grpc, emulator_url, unique_dataset
from collector_support import free_port, start_subprocess, stop, wait_for_event


def storage_settings(backend: str, tmp_path: Path) -> dict[str, Any]:
    """The `storage` block for `backend`: DuckDB in tmp_path, or a fresh emulator dataset."""
    if backend == "duckdb":
        return {"backend": "duckdb", "duckdb": {"path": str(tmp_path / "ohlcv.duckdb")}}
    return {
        "backend": "bigquery",
        "bigquery": {
            "project": PROJECT,
            "dataset": unique_dataset(),
            "api_endpoint": emulator_url(),
            "write_api_endpoint": emulator_grpc(),
        },
    }


@dataclass
class Daemon:
    """A running `--mode=live` collector; its stdout is drained into `events`."""

    proc: subprocess.Popen[str]
    url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def drain(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("{"):
                    self.events.append(json.loads(line))

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def get(self, path: str, params: Any = None, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=60, **kw)

    def stop(self) -> int:
        self.proc.send_signal(15)
        code = self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code


@contextmanager
def live_daemon(
    config: Path, port: int, *, ready_event: str = "live_cycle_complete"
) -> Iterator[Daemon]:
    """`tda-collector --mode=live` on `config` (its admin server on `port`), once it logged
    `ready_event`; stopped (SIGTERM) when the block ends."""
    proc = start_subprocess(config, "--mode=live")
    try:
        _, seen = wait_for_event(proc, ready_event, 120)
    except BaseException:
        stop(proc)
        raise
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", list(seen))
    daemon.drain()
    try:
        yield daemon
    finally:
        if proc.poll() is None:
            daemon.stop()


def admin_settings(host: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    port = free_port()
    return port, {"host": host, "port": port}


def parse_csv(body: bytes) -> pa.Table:
    return pa_csv.read_csv(io.BytesIO(body))


def parse_parquet(body: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(body))
