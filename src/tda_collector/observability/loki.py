"""Ships every event to Grafana Loki's push API without ever slowing or breaking the collector.

Our own small handler rather than a library: `python-logging-loki` (unmaintained since 2019)
and its forks POST once per record on the logging thread with no request timeout; the batched
`loki-logger-handler` has an unbounded queue, no request timeout and no retries. None of them
bounds memory, retries with backoff, or counts what it loses.

`emit` only formats the record (the same JSON line as stdout) and appends it to a bounded
deque; when the deque is full the oldest entry is dropped and counted. A daemon thread sends
batches (when `batch_size` entries wait, else every `batch_wait_s`) with a request timeout and
retries with backoff. Loki failing is reported once (`loki_push_failed`) and its recovery once
(`loki_push_recovered`), at most once per 5 minutes; those events go through the same logger,
so Loki gets them too once it is back.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping

from ..config import LokiConfig
from ..errors import UsageError
from ..retry import RetryPolicy
from .events import FIELDS_ATTR, EventLog, JsonLineFormatter
from .metrics import Metrics

# The interface's stream labels: low-cardinality only. `level` comes from the record itself.
LABEL_FIELDS = ("service_name", "environment", "exchange", "mode")
CLOSE_TIMEOUT_S = 0.5  # half of the daemon's 1 s stop budget
WARN_EVERY_S = 300.0
DEFAULT_RETRY = RetryPolicy(base_s=0.5, factor=2.0, cap_s=4.0, attempts=3)
_ERROR_BODY_CHARS = 200

Labels = tuple[tuple[str, str], ...]
Entry = tuple[Labels, str, str]  # labels, timestamp in ns as a decimal string, line


def stream_labels(record: logging.LogRecord) -> Labels:
    fields = getattr(record, FIELDS_ATTR, {})
    labels = {k: str(fields[k]) for k in LABEL_FIELDS if fields.get(k) is not None}
    labels["level"] = record.levelname
    return tuple(sorted(labels.items()))


def push_body(entries: list[Entry]) -> bytes:
    """Loki's JSON push format, one stream per distinct label set."""
    streams: dict[Labels, list[list[str]]] = {}
    for labels, ts_ns, line in entries:
        streams.setdefault(labels, []).append([ts_ns, line])
    payload = {
        "streams": [
            {"stream": dict(labels), "values": values} for labels, values in streams.items()
        ]
    }
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


class _PushFailed(Exception):
    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


def _describe_http_error(exc: urllib.error.HTTPError) -> _PushFailed:
    try:
        body = exc.read(_ERROR_BODY_CHARS).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        body = ""
    # 4xx (bad labels, entries too old, auth) will fail again; 429 and 5xx may not.
    permanent = 400 <= exc.code < 500 and exc.code != 429
    return _PushFailed(
        f"HTTP {exc.code}: {body}" if body else f"HTTP {exc.code}", permanent=permanent
    )


class _OutageReport:
    """One warning when pushing starts failing, one note when it works again. A flapping Loki
    is warned about at most once per `quiet_s`, so it cannot flood the log it feeds."""

    def __init__(self, events: EventLog, quiet_s: float) -> None:
        self._events = events
        self._quiet_s = quiet_s
        self._last_warning: float | None = None
        self.failing = False
        self._warned = False
        self.dropped = 0  # during the current outage

    def failed(self, reason: str) -> None:
        if self.failing:
            return
        self.failing, self.dropped = True, 0
        now = time.monotonic()
        self._warned = self._last_warning is None or now - self._last_warning >= self._quiet_s
        if self._warned:
            self._last_warning = now
            self._events.warning(
                "loki_push_failed",
                f"cannot push logs to Loki ({reason}); entries that cannot be pushed are "
                "dropped and counted in tda_loki_dropped_entries_total",
                error=reason,
            )

    def succeeded(self) -> None:
        if not self.failing:
            return
        self.failing = False
        if self._warned:
            self._events.info(
                "loki_push_recovered",
                f"pushing logs to Loki again; {self.dropped} entries were dropped",
                dropped=self.dropped,
            )


class LokiHandler(logging.Handler):
    """A logging handler whose `emit` is O(1) and never does I/O; a thread does the pushing.

    `headers` may carry secrets (basic auth, tenant); they are only ever sent to Loki.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        queue_size: int = 10_000,
        batch_size: int = 500,
        batch_wait_s: float = 1.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        events: EventLog,
        on_drop: Callable[[int], None] = lambda count: None,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        super().__init__()
        self.setFormatter(JsonLineFormatter())
        self._url = url
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._timeout_s = timeout_s
        self._retry = retry
        self._close_timeout_s = close_timeout_s
        self._on_drop = on_drop
        self._outage = _OutageReport(events, warn_every_s)
        self._rng = random.Random()
        self._queue: deque[Entry] = deque(maxlen=queue_size)
        self._cond = threading.Condition(threading.Lock())  # guards the queue and _in_flight
        self._in_flight = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.dropped = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="loki-push", daemon=True)
        self._thread.start()

    # -- the logging side: never blocks on the network
    def handle(self, record: logging.LogRecord) -> bool:
        """Like `Handler.handle` but without the handler lock: `emit` is thread-safe on its
        own, and `logging.shutdown` holds that lock around `flush`/`close`, which would make
        the pushing thread's own warning events wait for the flush they are part of."""
        accepted = self.filter(record)
        if isinstance(accepted, logging.LogRecord):  # 3.12+: a filter may replace the record
            record = accepted
        if accepted:
            self.emit(record)
        return bool(accepted)  # nothing in logging reads a handler's answer beyond its truth

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = (stream_labels(record), str(round(record.created * 1e9)), self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self._closing.is_set():  # logged after close(): nobody will push it
            self._count_dropped(1)
            return
        with self._cond:
            full = len(self._queue) == self._queue.maxlen
            self._queue.append(entry)
            waiting = len(self._queue)
        if full:
            self._count_dropped(1)
        if waiting >= self._batch_size:
            self._wake.set()

    def flush(self, timeout: float | None = None) -> None:
        """Best effort: wait until everything queued so far is pushed, at most `timeout`
        seconds (default the close timeout); returns on time even if Loki hangs."""
        deadline = time.monotonic() + (self._close_timeout_s if timeout is None else timeout)
        self._wake.set()
        with self._cond:
            while (self._queue or self._in_flight) and not self._closing.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def close(self) -> None:
        """Flush within the close timeout, stop the thread, count what is left as dropped.
        Safe to call twice (logging.shutdown calls it again at exit)."""
        if not self._closing.is_set():
            deadline = time.monotonic() + self._close_timeout_s
            self.flush(self._close_timeout_s)
            self._closing.set()
            self._wake.set()
            self._thread.join(max(0.0, deadline - time.monotonic()))
            with self._cond:
                left = len(self._queue)
                self._queue.clear()
            if left:
                self._count_dropped(left)
        super().close()

    # -- the pushing thread
    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self._batch_wait_s)
            self._wake.clear()
            while not self._closing.is_set():
                batch = self._take_batch()
                if not batch:
                    break
                self._deliver(batch)
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _take_batch(self) -> list[Entry]:
        with self._cond:
            size = min(self._batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(size)]
            self._in_flight = size
        return batch

    def _deliver(self, batch: list[Entry]) -> None:
        """Push one batch, retrying with backoff; a batch that cannot be pushed is dropped."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._post(push_body(batch))
            except _PushFailed as exc:
                self._outage.failed(str(exc))
                if exc.permanent or self._retry.gives_up_after(attempt):
                    self._count_dropped(len(batch))
                    return
                if self._closing.wait(self._retry.delay(attempt, self._rng)):
                    self._count_dropped(len(batch))
                    return
            else:
                self.sent += len(batch)
                self._outage.succeeded()
                return

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self._url, body, self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise _describe_http_error(exc) from None
        except urllib.error.URLError as exc:
            raise _PushFailed(f"{type(exc.reason).__name__}: {exc.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _PushFailed(f"{type(exc).__name__}: {exc}") from None

    def _count_dropped(self, count: int) -> None:
        with self._cond:
            self.dropped += count
            if self._outage.failing:
                self._outage.dropped += count
        self._on_drop(count)


def build_loki_handler(
    config: LokiConfig, environ: Mapping[str, str], metrics: Metrics, events: EventLog
) -> LokiHandler | None:
    """The configured handler, or None when `logging.loki.url` is not set.

    Tenant and basic-auth credentials come from the environment variables the config names.
    """
    if config.url is None:
        return None
    headers: dict[str, str] = {}
    tenant = environ.get(config.tenant_env)
    if tenant:
        headers["X-Scope-OrgID"] = tenant
    username, password = environ.get(config.username_env), environ.get(config.password_env)
    if bool(username) != bool(password):
        raise UsageError(
            f"logging.loki: set both {config.username_env} and {config.password_env}, or neither"
        )
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    return LokiHandler(
        config.url,
        headers=headers,
        queue_size=config.queue_size,
        batch_size=config.batch_size,
        batch_wait_s=config.batch_wait_seconds,
        timeout_s=config.timeout_seconds,
        on_drop=metrics.loki_dropped,
        events=events,
    )
