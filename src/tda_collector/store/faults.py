"""What the stores' error sorting shares: a fault of the right kind, named in one line.

Each store sorts its client's exceptions in one function (`duckdb_fault`, `bigquery_fault`);
this builds what they return.
"""

from __future__ import annotations

from ..errors import StoreFault


def reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (DuckDB's
    messages go on with hints and a caret under the SQL)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def fault(kind: type[StoreFault], doing: str, cause: BaseException) -> StoreFault:
    """A `kind` fault saying what failed and why, caused by `cause`."""
    made = kind(f"{doing} failed: {reason(cause)}")
    made.__cause__ = cause
    return made
