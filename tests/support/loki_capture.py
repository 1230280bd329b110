"""A fake Loki on 127.0.0.1: a real HTTP server in a thread that records push requests.

`mode` says how it answers: "ok" (204, like Loki), "error" (500), "reject" (400, as for entries
too old), or "hang" (holds the request open until the server stops), so tests can watch the
handler against every kind of Loki.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PUSH_PATH = "/loki/api/v1/push"
_FAILURES = {"error": (500, b"ingester unavailable"), "reject": (400, b"entry too far behind")}


@dataclass
class Push:
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any]

    @property
    def entries(self) -> list[tuple[dict[str, str], str, dict[str, Any]]]:
        """(labels, ns timestamp, parsed JSON line) of every entry, in push order."""
        return [
            (stream["stream"], ts, json.loads(line))
            for stream in self.body["streams"]
            for ts, line in stream["values"]
        ]


class LokiCapture:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.pushes: list[Push] = []
        self.attempts = 0
        self.failures = 0  # requests answered with an error status
        self._release = threading.Event()
        self._lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with capture._lock:
                    capture.attempts += 1
                    mode = capture.mode
                if mode == "hang":
                    capture._release.wait()
                    return
                if mode in _FAILURES:
                    with capture._lock:
                        capture.failures += 1
                    self._answer(*_FAILURES[mode])
                    return
                with capture._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    capture.pushes.append(Push(self.path, headers, json.loads(raw)))
                self._answer(204, b"")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{PUSH_PATH}"

    def entries(self) -> list[tuple[dict[str, str], str, dict[str, Any]]]:
        with self._lock:
            return [entry for push in self.pushes for entry in push.entries]

    def wait_for_entries(self, count: int, timeout: float = 5.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.entries()
            if len(entries) >= count:
                return entries
            time.sleep(0.01)
        raise AssertionError(f"Loki got {len(self.entries())} entries, expected {count}")

    def __enter__(self) -> LokiCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{PUSH_PATH}"
