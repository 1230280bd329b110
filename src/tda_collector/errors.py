"""The project's own small set of errors.

Everything that crosses a layer boundary is one of these, so callers decide what to do by type:
a usage error ends the process with exit code 2; an exchange fault is transient (retry with
backoff), rate-limited (every task of that exchange waits) or permanent (the job fails at once).
A store's errors are sorted the same way (after dlt's transient/terminal split): each store
translates its client's exceptions into `TransientStoreError` or `PermanentStoreError`, the
durable writer retries only the transient ones, and gives up with a `StoreFault`.
"""

from __future__ import annotations

# The process's exit codes (the interface's contract): done or stopped cleanly; a job failed
# or the exchange or store could not be opened; bad configuration or command line.
EXIT_OK, EXIT_JOBS_FAILED, EXIT_USAGE = 0, 1, 2


class CollectorError(Exception):
    """Base of every error the collector raises on purpose."""


class UsageError(CollectorError):
    """Bad configuration or command line: one readable line, exit code 2, no traceback."""


class ExchangeFault(CollectorError):
    """A request to an exchange did not give usable data."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientFault(ExchangeFault):
    """Network errors, timeouts, 5xx, unparsable bodies: worth retrying after a backoff."""


class RateLimited(ExchangeFault):
    """HTTP 429/418 or an exchange's own throttling answer: the whole exchange must wait."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class PermanentFault(ExchangeFault):
    """Bad symbol, bad request, authentication: retrying cannot help, the job fails."""


class CalendarMismatch(PermanentFault):
    """A series whose candles all open off the grid we expect (a week origin or month rule
    that differs from the exchange's): nothing of it could be stored, so the job fails."""


class StoreFault(CollectorError):
    """A store could not make rows durable: the job's cursor does not move, its rows are
    fetched again on the next run, never marked stored. `permanent` says retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class TransientStoreError(StoreFault):
    """A store call that may succeed if repeated: connection resets, timeouts, throttling, a
    lock held by another writer for a moment."""


class PermanentStoreError(StoreFault):
    """A store call that cannot succeed as it is: an unknown or mistyped column, rows the
    store rejected for good, missing permissions. Fails the job at once, with this reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)
