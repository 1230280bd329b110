"""A loopback TCP proxy that can lose an answer: for gRPC faults between request and reply.

`DroppingProxy(upstream, matches)` forwards every connection to `upstream` (host:port). Each
time `drop_answers` is above zero, the next client data that `matches` (a predicate on the
bytes, such as `containing(symbol)`: only a request's rows hold a symbol, never a ping, settings
or header frame) is forwarded, whatever the server sends back during the following `hold_s` is
swallowed, and then both sides of the connection are closed: the server did the work, the client
never hears of it and sees its connection reset. `on_drop`, when set, is called (on the proxy's
thread) once the matching data has been forwarded: a test kills the client there, between the
request and its answer. `drops` counts the answers lost.

`pause_before = (marker, hook)`: before forwarding the first client data holding `marker`, the
bytes before it are forwarded and `hook()` is called (on the proxy's thread, holding up that
connection), then the rest goes on. A marker found only in the second request of a call lets a
test act after the server had the first request whole and before it has the second.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable


def containing(marker: bytes) -> Callable[[bytes], bool]:
    return lambda data: marker in data


def matching(pattern: bytes) -> Callable[[bytes], bool]:
    compiled = re.compile(pattern, re.DOTALL)
    return lambda data: compiled.search(data) is not None


class DroppingProxy:
    def __init__(
        self, upstream: str, matches: Callable[[bytes], bool], hold_s: float = 0.5
    ) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.matches = matches
        self.hold_s = hold_s
        self.drop_answers = 0
        self.drops = 0
        self.on_drop: Callable[[], None] | None = None
        self.pause_before: tuple[bytes, Callable[[], None]] | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            link = _Link(self, client, server)
            threading.Thread(target=link.pump_up, daemon=True).start()
            threading.Thread(target=link.pump_down, daemon=True).start()

    def take_pause(self, data: bytes) -> tuple[int, Callable[[], None]] | None:
        """Where in `data` to pause and what to call there, once."""
        with self._lock:
            if self.pause_before is None or (index := data.find(self.pause_before[0])) < 0:
                return None
            hook, self.pause_before = self.pause_before[1], None
            return index, hook

    def arm(self, data: bytes) -> bool:
        """Take one drop for `data`, if it matches and one is asked for."""
        with self._lock:
            if self.drop_answers <= 0 or not self.matches(data):
                return False
            self.drop_answers -= 1
            self.drops += 1
            return True


class _Link:
    """One proxied connection."""

    def __init__(self, proxy: DroppingProxy, client: socket.socket, server: socket.socket):
        self._proxy = proxy
        self._client = client
        self._server = server
        self._swallowing = threading.Event()

    def pump_up(self) -> None:
        try:
            while data := self._client.recv(65536):
                paused = self._proxy.take_pause(data)
                if paused is not None:
                    index, hook = paused
                    self._server.sendall(data[:index])
                    hook()
                    data = data[index:]
                # Swallow before forwarding: a quick answer must not slip through.
                armed = self._proxy.arm(data)
                if armed:
                    self._swallowing.set()
                    threading.Timer(self._proxy.hold_s, self.cut).start()
                self._server.sendall(data)
                if armed and self._proxy.on_drop is not None:
                    self._proxy.on_drop()
        except OSError:
            pass
        self.cut()

    def pump_down(self) -> None:
        try:
            while data := self._server.recv(65536):
                if not self._swallowing.is_set():
                    self._client.sendall(data)
        except OSError:
            pass
        self.cut()

    def cut(self) -> None:
        for sock in (self._client, self._server):
            with contextlib.suppress(OSError):  # already closed by the other pump
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
