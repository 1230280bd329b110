"""The Loki handler against a real HTTP server on loopback: format, labels, batching, and a
Loki that is down, erroring or hanging, which must never slow or break the collector."""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Iterator

import pytest
from event_support import EventRecorder
from loki_capture import LokiCapture, closed_port_url
from pydantic import ValidationError

from tda_collector.config import LokiConfig, format_validation_error
from tda_collector.errors import UsageError
from tda_collector.observability.events import FIELDS_ATTR, EventLog, build_logger
from tda_collector.observability.loki import LokiHandler, build_loki_handler
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy

FAST_RETRY = RetryPolicy(base_s=0.01, factor=2.0, cap_s=0.05, attempts=3)
CONTEXT = {"service_name": "tda-collector", "environment": "test", "mode": "live"}
_names = itertools.count()


@pytest.fixture
def stdout() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def logger(stdout: io.StringIO) -> Iterator[logging.Logger]:
    logger = build_logger(f"test-loki.{next(_names)}", "DEBUG", stdout)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


@pytest.fixture
def recorder(logger: logging.Logger) -> EventRecorder:
    """Every record the logger saw, to count what reached Loki against it."""
    recorder = EventRecorder()
    logger.addHandler(recorder)
    return recorder


def attach(logger: logging.Logger, url: str, **options) -> tuple[LokiHandler, EventLog]:
    events = EventLog(logger, CONTEXT)
    options.setdefault("batch_wait_s", 0.05)
    options.setdefault("retry", FAST_RETRY)
    handler = LokiHandler(url, events=events, **options)
    logger.addHandler(handler)
    return handler, events


def wait_until(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_push_uses_the_json_format_and_the_records_own_timestamp(logger: logging.Logger) -> None:
    with LokiCapture() as loki:
        handler, _ = attach(logger, loki.url)
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            __file__,
            1,
            "stored 5 candles",
            None,
            None,
            extra={FIELDS_ATTR: {"event": "store_write_ok", **CONTEXT, "rows": 5}},
        )
        record.created = 1_700_000_000.5  # long before the push happens
        logger.handle(record)
        [(_, ts, line)] = loki.wait_for_entries(1)
        push = loki.pushes[0]

    assert push.path == "/loki/api/v1/push"
    assert push.headers["content-type"] == "application/json"
    assert ts == "1700000000500000000"
    assert line["ts"] == "2023-11-14T22:13:20.500Z"
    assert line["event"] == "store_write_ok" and line["rows"] == 5
    assert handler.sent == 1


def test_labels_are_low_cardinality_and_symbol_stays_in_the_line(logger: logging.Logger) -> None:
    with LokiCapture() as loki:
        _, events = attach(logger, loki.url)
        events.bind(exchange="binance").warning(
            "rate_limited", "binance answered 429", symbol="BTC/USDT", timeframe="1m", status=429
        )
        events.info("config_loaded", "1 exchange(s)")
        entries = loki.wait_for_entries(2)

    by_event = {line["event"]: (labels, line) for labels, _, line in entries}
    labels, line = by_event["rate_limited"]
    assert labels == {**CONTEXT, "exchange": "binance", "level": "WARNING"}
    assert (line["symbol"], line["timeframe"], line["status"]) == ("BTC/USDT", "1m", 429)
    labels, _ = by_event["config_loaded"]
    assert labels == {**CONTEXT, "level": "INFO"}  # no exchange: the label is omitted


def test_loki_gets_the_same_line_as_stdout(logger: logging.Logger, stdout: io.StringIO) -> None:
    with LokiCapture() as loki:
        _, events = attach(logger, loki.url)
        events.bind(exchange="okx").error(
            "job_failed", "okx BTC/USDT 1h failed", symbol="BTC/USDT", timeframe="1h", error="x"
        )
        loki.wait_for_entries(1)
        raw_line = loki.pushes[0].body["streams"][0]["values"][0][1]

    assert raw_line == stdout.getvalue().strip()


def test_entries_are_batched(logger: logging.Logger) -> None:
    with LokiCapture() as loki:
        _, events = attach(logger, loki.url, batch_size=100, batch_wait_s=0.2)
        for i in range(500):
            events.info("fetch_ok", f"page {i}", exchange="binance", rows=i)
        entries = loki.wait_for_entries(500)

    assert [line["rows"] for _, _, line in entries] == list(range(500))
    assert len(loki.pushes) <= 10


def test_close_flushes_what_is_queued(logger: logging.Logger) -> None:
    with LokiCapture() as loki:
        handler, events = attach(logger, loki.url, batch_wait_s=60)
        for i in range(50):
            events.info("fetch_ok", f"page {i}")
        handler.close()
        assert len(loki.entries()) == 50
        assert handler.dropped == 0
        events.info("shutdown", "logged after close")  # counted, never queued for nobody
        assert handler.dropped == 1


def emit_many(events: EventLog, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        events.info("fetch_ok", f"page {i}", exchange="binance", symbol="BTC/USDT", rows=i)
    return time.perf_counter() - started


def test_loki_down_never_blocks_and_warns_once(
    logger: logging.Logger, recorder: EventRecorder
) -> None:
    metrics = Metrics()
    handler, events = attach(
        logger, closed_port_url(), queue_size=100, batch_size=20, on_drop=metrics.loki_dropped
    )

    assert emit_many(events, 1000) < 1.0
    wait_until(lambda: handler.dropped >= 950)  # 900 pushed out of the queue, then lost batches
    handler.close()

    [warning] = recorder.named("loki_push_failed")
    assert warning["level"] == "WARNING" and "ConnectionRefusedError" in warning["error"]
    assert handler.sent == 0
    assert handler.dropped == len(recorder.records)  # nothing got through, and all is counted
    assert f"tda_loki_dropped_entries_total {float(handler.dropped)}" in metrics.render().decode()


def test_a_hanging_loki_never_blocks_and_close_keeps_its_deadline(
    logger: logging.Logger, recorder: EventRecorder
) -> None:
    with LokiCapture(mode="hang") as loki:
        handler, events = attach(logger, loki.url, queue_size=100, timeout_s=0.2)

        assert emit_many(events, 1000) < 1.0
        wait_until(lambda: recorder.named("loki_push_failed"))
        time.sleep(0.5)  # more timed-out attempts: still one warning
        started = time.monotonic()
        handler.close()
        closing_took = time.monotonic() - started

    assert closing_took < 0.8
    assert len(recorder.named("loki_push_failed")) == 1
    assert "timed out" in recorder.named("loki_push_failed")[0]["error"]
    assert handler.dropped >= 900


def test_server_errors_warn_once_then_recovery_is_reported(
    logger: logging.Logger, recorder: EventRecorder
) -> None:
    with LokiCapture(mode="error") as loki:
        handler, events = attach(logger, loki.url)
        emit_many(events, 10)
        wait_until(lambda: handler.dropped >= 10)
        loki.mode = "ok"
        events.info("fetch_ok", "after the outage")
        wait_until(lambda: recorder.named("loki_push_recovered"))
        delivered = [line["event"] for _, _, line in loki.wait_for_entries(3)]
        handler.close()

    [failed] = recorder.named("loki_push_failed")
    assert failed["error"] == "HTTP 500: ingester unavailable"
    assert "tda_loki_dropped_entries_total" in failed["message"]
    [recovered] = recorder.named("loki_push_recovered")
    assert recovered["dropped"] >= 10
    assert "loki_push_failed" in delivered  # the outage itself reaches Loki afterwards


def flap(loki: LokiCapture, events: EventLog, outages: int) -> None:
    """Loki fails one push, then takes the next; `outages` times."""
    for i in range(outages):
        failures = loki.failures
        loki.mode = "error"
        events.info("fetch_ok", f"during outage {i}")
        wait_until(lambda failures=failures: loki.failures > failures)
        loki.mode = "ok"
        events.info("fetch_ok", f"after outage {i}")
        wait_until(lambda i=i: any(f"after outage {i}" == e[2]["message"] for e in loki.entries()))


@pytest.mark.parametrize(("warn_every_s", "warnings"), [(300.0, 1), (0.0, 3)])
def test_a_flapping_loki_is_warned_about_at_most_once_per_quiet_period(
    logger: logging.Logger, recorder: EventRecorder, warn_every_s: float, warnings: int
) -> None:
    with LokiCapture() as loki:
        handler, events = attach(logger, loki.url, warn_every_s=warn_every_s)
        flap(loki, events, outages=3)
        handler.close()

    assert len(recorder.named("loki_push_failed")) == warnings
    assert len(recorder.named("loki_push_recovered")) == warnings


def test_a_rejected_push_is_not_retried(logger: logging.Logger) -> None:
    with LokiCapture(mode="reject") as loki:
        handler, events = attach(logger, loki.url)
        events.info("fetch_ok", "one")
        wait_until(lambda: handler.dropped >= 2)
        handler.close()
    # the event, then the warning about its rejection: each tried once
    assert loki.attempts == 2 and handler.dropped == 2


def test_shutdown_holding_the_handler_lock_does_not_deadlock(logger: logging.Logger) -> None:
    """logging.shutdown() holds the handler lock around flush() and close(), while the pushing
    thread logs its warning through the same logger."""
    with LokiCapture(mode="error") as loki:
        handler, events = attach(logger, loki.url, batch_wait_s=60)
        emit_many(events, 10)
        started = time.monotonic()
        handler.acquire()
        try:
            handler.flush()
            handler.close()
        finally:
            handler.release()
        assert time.monotonic() - started < 0.8


def test_credentials_come_from_the_environment_and_never_show(
    logger: logging.Logger, stdout: io.StringIO, recorder: EventRecorder
) -> None:
    environ = {"LOKI_TENANT_ID": "team-a", "LOKI_USERNAME": "collector", "LOKI_PASSWORD": "s3cr3t"}
    with LokiCapture(mode="error") as loki:
        config = LokiConfig(url=loki.url, batch_wait_seconds=0.05)
        events = EventLog(logger, CONTEXT)
        handler = build_loki_handler(config, environ, Metrics(), events)
        assert handler is not None
        logger.addHandler(handler)
        events.info("config_loaded", "start")
        wait_until(lambda: recorder.named("loki_push_failed"))
        loki.mode = "ok"
        loki.wait_for_entries(1)
        handler.close()

    headers = loki.pushes[0].headers
    assert headers["x-scope-orgid"] == "team-a"
    assert headers["authorization"] == "Basic Y29sbGVjdG9yOnMzY3IzdA=="  # collector:s3cr3t
    assert "s3cr3t" not in stdout.getvalue()
    assert "Y29sbGVjdG9yOnMzY3IzdA" not in stdout.getvalue()


def test_no_url_means_no_handler() -> None:
    assert build_loki_handler(LokiConfig(), {}, Metrics(), EventLog(logging.getLogger())) is None


def test_half_configured_basic_auth_is_a_usage_error_naming_the_variables() -> None:
    config = LokiConfig(url="http://loki:3100/loki/api/v1/push", password_env="MY_LOKI_PASSWORD")
    events = EventLog(logging.getLogger())
    with pytest.raises(UsageError, match="LOKI_USERNAME and MY_LOKI_PASSWORD") as error:
        build_loki_handler(config, {"LOKI_USERNAME": "collector"}, Metrics(), events)
    assert "collector" not in str(error.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("loki:3100/loki/api/v1/push", "http:// or https://"),
        ("https://user:pw@loki.example/loki/api/v1/push", "must not contain credentials"),
    ],
)
def test_config_refuses_bad_loki_urls(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem) as error:
        LokiConfig(url=url)
    assert "pw" not in format_validation_error(error.value)
