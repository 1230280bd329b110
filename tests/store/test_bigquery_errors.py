"""How the BigQuery store sorts its client's errors, without a server: each exception the
client raises is transient (retried) or permanent (the job fails at once), and insertAll's
per-row errors are split into rows to send again and rows rejected for good."""

from __future__ import annotations

import grpc
import pytest
import requests
from google.api_core import exceptions as api_errors
from google.auth import exceptions as auth_errors

from tda_collector.errors import PermanentStoreError, TransientStoreError, UsageError
from tda_collector.store.bigquery_errors import bigquery_fault
from tda_collector.store.bigquery_schema import RowErrors


def _grpc_error(code: grpc.StatusCode) -> api_errors.GoogleAPICallError:
    return api_errors.from_grpc_status(code, "injected")


def _api_error(kind: type[api_errors.GoogleAPICallError], reason: str | None = None):
    return kind("injected", errors=[{"reason": reason}] if reason else ())


@pytest.mark.parametrize(
    ("error", "sorted_as"),
    [
        (_api_error(api_errors.ServiceUnavailable), TransientStoreError),
        (_api_error(api_errors.InternalServerError, "backendError"), TransientStoreError),
        (_api_error(api_errors.BadGateway), TransientStoreError),
        (_api_error(api_errors.GatewayTimeout), TransientStoreError),
        (_api_error(api_errors.TooManyRequests), TransientStoreError),
        (_api_error(api_errors.Forbidden, "rateLimitExceeded"), TransientStoreError),
        (_api_error(api_errors.Forbidden, "quotaExceeded"), TransientStoreError),
        (api_errors.RetryError("deadline", cause=None), TransientStoreError),
        (requests.ConnectionError("connection reset by peer"), TransientStoreError),
        (requests.ReadTimeout("read timed out"), TransientStoreError),
        (ConnectionResetError("reset"), TransientStoreError),
        (TimeoutError(), TransientStoreError),
        (auth_errors.TransportError("token server unreachable"), TransientStoreError),
        (_api_error(api_errors.BadRequest, "invalid"), PermanentStoreError),
        (_api_error(api_errors.NotFound, "notFound"), PermanentStoreError),
        (_api_error(api_errors.Forbidden, "accessDenied"), PermanentStoreError),
        (_api_error(api_errors.Unauthorized), PermanentStoreError),
        (_api_error(api_errors.Conflict, "duplicate"), PermanentStoreError),
        (_api_error(api_errors.MethodNotImplemented, "notImplemented"), PermanentStoreError),
        (auth_errors.RefreshError("invalid_grant"), PermanentStoreError),
        # The Storage Write API's gRPC statuses, as the client raises them.
        (_grpc_error(grpc.StatusCode.UNAVAILABLE), TransientStoreError),
        (_grpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), TransientStoreError),
        (_grpc_error(grpc.StatusCode.ABORTED), TransientStoreError),
        (_grpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), TransientStoreError),
        (_grpc_error(grpc.StatusCode.INVALID_ARGUMENT), PermanentStoreError),
        (_grpc_error(grpc.StatusCode.PERMISSION_DENIED), PermanentStoreError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_client_errors_are_sorted_into_transient_and_permanent(error, sorted_as):
    fault = bigquery_fault(error, "load job")
    assert type(fault) is sorted_as
    assert fault.__cause__ is error
    assert str(fault).startswith(f"load job failed: {type(error).__name__}")


def test_errors_that_are_not_the_clients_are_left_to_propagate():
    assert bigquery_fault(ValueError("a bug"), "load job") is None
    assert bigquery_fault(UsageError("bad config"), "load job") is None


def test_row_errors_split_into_retry_and_rejected():
    triage = RowErrors.of(
        [
            {"index": 0, "errors": [{"reason": "stopped"}]},
            {"index": 2, "errors": [{"reason": "invalid", "location": "open", "message": "nan"}]},
            {"index": 3, "errors": [{"reason": "backendError"}, {"reason": "timeout"}]},
        ]
    )
    assert triage.retry == [0, 3]
    assert triage.rejected == {2: "invalid at open: nan"}


class _RawRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


@pytest.mark.parametrize(
    ("code", "sorted_as"),
    [
        (grpc.StatusCode.UNAVAILABLE, TransientStoreError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TransientStoreError),
        (grpc.StatusCode.INVALID_ARGUMENT, PermanentStoreError),
    ],
)
def test_grpc_errors_the_client_did_not_wrap_are_sorted_by_code(code, sorted_as):
    assert type(bigquery_fault(_RawRpcError(code), "append")) is sorted_as
