"""A real Postgres server for the tests: Debian's `postgresql` package, one server per session.

The server runs from a temporary directory on loopback (a free port), as an unprivileged user
(`nobody` when the tests run as root: Postgres refuses to run as root), with password
authentication, so `state_url` carries a real secret. Where it cannot be installed or started
the Postgres tests skip with the cause; under CI (`CI=true`) they fail instead.

Each test gets a fresh database on the one server (`fresh_database`), and can stop and start
the server (`PostgresServer.restart`) to test what happens when the state goes away.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from debian_support import find_or_install

USER = "tda"
PASSWORD = "s3cret-pg-Pass"  # checked for in logs and answers: it must never show
_START_TIMEOUT_S = 60


def _pg_bin() -> tuple[Path | None, str]:
    """Debian's Postgres binaries (initdb, pg_ctl are not on PATH by default), installing the
    package when they are missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        _, problem = find_or_install("pg_ctlcluster", "postgresql")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            return None, problem or "postgresql installed but no pg_ctl under /usr/lib/postgresql"
    return Path(found[-1]).parent, ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One server per test session, started on first use."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.problem: str | None = None
        self._bin: Path | None = None
        self._workdir: Path | None = None
        self._lock = threading.Lock()

    def _as_owner(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "nobody", "--", *argv]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=_START_TIMEOUT_S, stdin=subprocess.DEVNULL
        )

    def _start(self) -> None:
        self._bin, problem = _pg_bin()
        if self._bin is None:
            self.problem = problem
            return
        self._workdir = Path(tempfile.mkdtemp(prefix="tda-postgres-"))
        pwfile = self._workdir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self._workdir, nobody.pw_uid, nobody.pw_gid)
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        init = self._as_owner(
            [str(self._bin / "initdb"), "-D", str(self._workdir / "data"), "-U", USER,
             "--pwfile", str(pwfile), "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"]
        )  # fmt: skip
        if init.returncode != 0:
            self.problem = f"initdb exited {init.returncode}: {init.stderr.strip()[-300:]}"
            return
        self.port = _free_port()
        self.problem = self.start()
        if self.problem is None:
            atexit.register(self.stop)
        else:
            self.port = None

    def start(self) -> str | None:
        """Start the (initialised) server; None, or why it did not start."""
        assert self._bin is not None and self._workdir is not None
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c fsync=off"
            f" -c unix_socket_directories={self._workdir} -c max_connections=200"
        )
        done = self._as_owner(
            [str(self._bin / "pg_ctl"), "-D", str(self._workdir / "data"), "-o", opts,
             "-l", str(self._workdir / "log"), "-w", "-t", str(_START_TIMEOUT_S), "start"]
        )  # fmt: skip
        if done.returncode != 0:
            return f"pg_ctl start exited {done.returncode}: {done.stderr.strip()[-300:]}"
        return None

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (`immediate`: as a crash would), leaving its data in place."""
        assert self._bin is not None and self._workdir is not None
        self._as_owner(
            [str(self._bin / "pg_ctl"), "-D", str(self._workdir / "data"), "-m", mode, "-w", "stop"]
        )

    def restart(self, down_s: float = 0.0, mode: str = "immediate") -> None:
        """Stop the server, leave it down `down_s` seconds, start it again on the same port."""
        self.stop_server(mode)
        time.sleep(down_s)
        problem = self.start()
        if problem is not None:
            raise RuntimeError(problem)

    def stop(self) -> None:
        with self._lock:
            if self._workdir is None:
                return
            if self.port is not None:
                self.stop_server()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self.port = None

    def require(self) -> int:
        with self._lock:
            if self.port is None and self.problem is None:
                self._start()
        if self.port is None:
            message = f"Postgres unavailable: {self.problem}"
            if os.environ.get("CI") == "true":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        return self.port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.require()}/{database}"


SERVER = PostgresServer()


def fresh_database() -> str:
    """The URL of a new, empty database on the session's server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return SERVER.url(name)


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture():
    """The session's server (started on first use); stopped when the session ends."""
    SERVER.require()
    yield SERVER
    SERVER.stop()


@pytest.fixture(name="state_url")
def state_url_fixture(postgres_server: PostgresServer) -> str:
    """A fresh database's URL, for one test."""
    return fresh_database()


def server_cpu_s() -> float:
    """CPU seconds the session's server has used so far: the postmaster, its children that
    exited (reaped: counted in its cutime/cstime) and those still running (the backends)."""
    assert SERVER._workdir is not None
    pid = int((SERVER._workdir / "data" / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: int) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rpartition(")")[2].split()

    own = stat(pid)
    total = sum(int(own[i]) for i in (11, 12, 13, 14))
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                fields = stat(int(child.name))
            except OSError:
                continue
            if int(fields[1]) == pid:
                total += int(fields[11]) + int(fields[12])
    return total / tick
