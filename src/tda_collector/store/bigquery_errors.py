"""How the BigQuery store sorts its client's errors: transient (retry) or permanent (give up).

One place for the whole store, after dlt's `_make_database_exception`. A load job's error comes
back as the exception of its HTTP status, chosen by the job's reason (`backendError` 500,
`invalid` 400, `rateLimitExceeded` 429, `quotaExceeded` 403, ...), so the same rules serve
requests and jobs. https://cloud.google.com/bigquery/docs/error-messages
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import grpc
import requests
from google.api_core import exceptions as api_errors
from google.auth import exceptions as auth_errors

from ..errors import PermanentStoreError, StoreFault, TransientStoreError
from ..observability.events import EventLog
from ..retry import Failure, RetryPolicy, retry_async
from .bigquery_schema import RETRYABLE_REASONS
from .faults import fault

_TRANSIENT = (
    # 500 backendError/internalError, 502, 503 while BigQuery is unavailable, 504. (501 is
    # not: a method that does not exist stays missing.)
    api_errors.InternalServerError,
    api_errors.BadGateway,
    api_errors.ServiceUnavailable,
    api_errors.GatewayTimeout,
    api_errors.TooManyRequests,  # 429; gRPC RESOURCE_EXHAUSTED (Write API throughput quota)
    api_errors.Aborted,  # gRPC ABORTED: the Write API's "retry this" (before Conflict below)
    api_errors.RetryError,  # the client's own retries ran out of time (ensure's calls)
    requests.ConnectionError,  # connection refused or reset
    requests.Timeout,
    auth_errors.TransportError,  # a token refresh that could not reach the server
    ConnectionError,
    TimeoutError,  # also a load job still running at `job.result(timeout=...)`
)
# Everything else the API answers is a 4xx that repeating gets again: BadRequest (an invalid
# schema or value, a column the table lacks), NotFound (the table or dataset is gone),
# Forbidden (no permission, billing off), Conflict, Unauthorized; and 501.
_PERMANENT = (api_errors.GoogleAPICallError, auth_errors.RefreshError)
# A gRPC error the client did not wrap (the Write API's channel): retried for the codes Google
# lists as retryable for AppendRows; the rest (INVALID_ARGUMENT: a schema the table does not
# match; PERMISSION_DENIED; NOT_FOUND) are permanent.
_TRANSIENT_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    }
)


def _reasons(exc: api_errors.GoogleAPICallError) -> set[str | None]:
    return {e.get("reason") for e in exc.errors or () if isinstance(e, dict)}


def bigquery_fault(exc: BaseException, doing: str) -> StoreFault | None:
    """`exc` as the store error it means, or None for an exception that is not the client's
    (a bug: it propagates as it is)."""
    if isinstance(exc, api_errors.GoogleAPICallError) and not _reasons(exc).isdisjoint(
        RETRYABLE_REASONS
    ):
        # By reason before status: quota and rate limits come as 403 Forbidden.
        return fault(TransientStoreError, doing, exc)
    if isinstance(exc, auth_errors.RefreshError) and getattr(exc, "retryable", False):
        return fault(TransientStoreError, doing, exc)  # the token server said "try again"
    if isinstance(exc, _TRANSIENT):
        return fault(TransientStoreError, doing, exc)
    if isinstance(exc, _PERMANENT):
        return fault(PermanentStoreError, doing, exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        kind = TransientStoreError if exc.code() in _TRANSIENT_GRPC else PermanentStoreError
        return fault(kind, doing, exc)
    return None


async def retry_sorted(
    doing: str,
    call: Callable[[], Awaitable[None]],
    policy: RetryPolicy,
    events: EventLog,
    rng: random.Random,
) -> None:
    """`await call()` with the client's errors sorted by `bigquery_fault`: a transient one is
    retried as `policy` says (each retry a `backoff_retry` warning), a permanent one raised at
    once, the last one raised. StoreFaults raised by `call` itself keep their kind."""

    async def sorted_call() -> None:
        try:
            await call()
        except StoreFault:
            raise
        except Exception as exc:
            failed = bigquery_fault(exc, doing)
            if failed is None:
                raise
            raise failed from exc

    def log(failure: Failure) -> None:
        if not failure.gives_up:
            events.warning(
                "backoff_retry",
                f"{doing} failed, retrying",
                attempt=failure.attempt,
                error=f"{type(failure.error).__name__}: {failure.error}"[:500],
            )

    await retry_async(
        sorted_call, policy, transient=(TransientStoreError,), on_failure=log, rng=rng
    )


def lost_creation_race(exc: BaseException) -> bool:
    """Another writer created the same dataset, table or view at the same moment: BigQuery
    answers 409 Conflict (where `exists_ok` does not cover it, e.g. a view replaced twice); the
    emulator 400 with a failed transaction commit. Asking again finds the object made."""
    if isinstance(exc, api_errors.Conflict):
        return True
    text = str(exc).lower()
    return isinstance(exc, api_errors.BadRequest) and "failed to commit" in text
