"""DuckDB's errors sorted into the store's transient and permanent faults, in one place."""

from __future__ import annotations

import re

import duckdb

from ..errors import PermanentStoreError, StoreFault, TransientStoreError
from .faults import fault


def duckdb_fault(exc: BaseException, doing: str) -> StoreFault | None:
    """`exc` as the store error it means, by DuckDB's exception family (PEP 249's); None for
    an exception that is not DuckDB's or the file system's (a bug: it propagates as it is)."""
    if isinstance(exc, duckdb.ConnectionException):
        # "Connection already closed": no repeat on this connection can succeed.
        return fault(PermanentStoreError, doing, exc)
    if isinstance(exc, (duckdb.OperationalError, duckdb.InterruptException)):
        # The database's state, not the statement: IOException (the file locked by another
        # process, a full disk, a failed read or write; also a file that is not a DuckDB
        # database, which only `ensure` meets and reports once), TransactionException and
        # SerializationException (a conflicting transaction), OutOfMemoryException (memory
        # held by other work), an interrupted statement. The same write may succeed later.
        return fault(TransientStoreError, doing, exc)
    if isinstance(exc, duckdb.Error):
        # The statement or the table is wrong, and repeating it gets the same answer:
        # Catalog/Binder (an unknown table or column), Conversion/TypeMismatch/OutOfRange (a
        # value the column's type cannot hold), Constraint (NULL in a NOT NULL column),
        # NotImplemented, and Internal/Fatal (the database is invalidated until reopened).
        return fault(PermanentStoreError, doing, exc)
    if isinstance(exc, (PermissionError, FileExistsError, NotADirectoryError)):
        # Creating the file's directory: the path itself is wrong.
        return fault(PermanentStoreError, doing, exc)
    if isinstance(exc, OSError):
        return fault(TransientStoreError, doing, exc)  # a full disk, a failing mount
    return None


_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


def lock_holder(message: str) -> str | None:
    """`PID 123: /usr/bin/python3` from DuckDB's lock conflict message; None for another
    error."""
    found = _LOCK_HOLDER.search(message)
    return f"PID {found['pid']}: {found['program']}" if found else None


def held_by_another_process(exc: BaseException) -> bool:
    """`exc` (a fault from `ensure`, or its cause) says another process holds the file's
    lock: a running daemon, to which history mode can hand its range."""
    return lock_holder(str(exc.__cause__ or exc)) is not None
