"""What several instances share besides the state, in Postgres: request budgets and leases.

`PostgresFleet` implements `exchange.shared_budget.BudgetStore` and `leases.LeaseStore` on a
`PostgresState`'s connections (and its retries: while the server is away, claims, renewals and
budget slots wait, so no instance works or requests without the database's word). Times are
the server's clock, in epoch seconds, so the instances' clocks never matter.
"""

from __future__ import annotations

from .leases import InstanceInfo
from .postgres_catalog import PostgresCatalog
from .postgres_state import Conn, PostgresState

_NOW = "extract(epoch FROM clock_timestamp())"
# One statement: the next job of the list that is not over and that nobody holds (or whose
# holder's lease ran out), least recently let go first; locked rows are skipped, not waited on.
_CLAIM = f"""
WITH next AS (
    SELECT run_id, job_id FROM job_leases
    WHERE run_id = %s AND job_id = ANY(%s) AND status IS NULL
      AND (owner IS NULL OR locked_until < {_NOW})
    ORDER BY locked_until, job_id
    LIMIT 1 FOR UPDATE SKIP LOCKED
)
UPDATE job_leases AS l SET owner = %s, locked_until = {_NOW} + %s, claims = l.claims + 1
FROM next WHERE l.run_id = next.run_id AND l.job_id = next.job_id
RETURNING l.job_id"""


class PostgresFleet:
    def __init__(self, state: PostgresState) -> None:
        self._state = state

    def catalog(self) -> PostgresCatalog:
        """The fleet's one catalog of connectors and jobs, in the shared state."""
        return PostgresCatalog(self._state)

    async def acquire_budget(
        self, group: str, cost: float, interval_s: float, tolerance_s: float
    ) -> float:
        """Reserve the next slot of `cost` in the shared budget `group` (GCRA, one statement);
        seconds to wait before the request may start."""
        rows = await self._state.rows(
            "SELECT tda_acquire_budget(%s, %s, %s, %s)", (group, cost, interval_s, tolerance_s)
        )
        return float(rows[0][0])

    async def pause_budget(self, group: str, wait_s: float) -> None:
        """Nobody, in any instance, starts a request of `group` for `wait_s` seconds."""
        await self._state.rows("SELECT tda_pause_budget(%s, %s)", (group, wait_s))

    # Leases (see `leases.py`). `locked_until` is in epoch seconds of the server's clock.

    async def offer_jobs(self, run_id: str, job_ids: list[str], done: list[str]) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO job_leases (run_id, job_id, locked_until, claims, status)"
                    " VALUES (%s, %s, 0, 0, %s) ON CONFLICT (run_id, job_id) DO NOTHING",
                    [(run_id, j, "COMPLETED" if j in done else None) for j in job_ids],
                )

        await self._state.call(work)

    async def claim_job(
        self, run_id: str, owner: str, lease_s: float, job_ids: list[str]
    ) -> str | None:
        rows = await self._state.rows(_CLAIM, (run_id, job_ids, owner, lease_s))
        return str(rows[0][0]) if rows else None

    async def release_job(self, run_id: str, job: str, owner: str) -> None:
        # locked_until: now, so that jobs nobody has had yet come first at the next claim
        await self._state.rows(
            "UPDATE job_leases SET owner = NULL, locked_until = "
            + _NOW
            + " WHERE run_id = %s AND job_id = %s AND owner = %s RETURNING 1",
            (run_id, job, owner),
        )

    async def finish_job(
        self, run_id: str, job: str, owner: str, status: str, error: str | None
    ) -> None:
        await self._state.rows(
            "UPDATE job_leases SET owner = NULL, status = %s, error = %s"
            " WHERE run_id = %s AND job_id = %s RETURNING 1",
            (status, error, run_id, job),
        )

    async def job_outcomes(
        self, run_id: str, job_ids: list[str]
    ) -> dict[str, tuple[str, str | None]]:
        rows = await self._state.rows(
            "SELECT job_id, status, error FROM job_leases"
            " WHERE run_id = %s AND job_id = ANY(%s) AND status IS NOT NULL",
            (run_id, job_ids),
        )
        return {str(j): (str(s), e) for j, s, e in rows}

    async def renew(self, owner: str, mode: str, started_ms: int, lease_s: float) -> set[str]:
        async def work(conn: Conn) -> set[str]:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO instances VALUES (%s, %s, %s, (" + _NOW + " * 1000)::BIGINT)"
                    " ON CONFLICT (instance_id) DO UPDATE SET mode = excluded.mode,"
                    " heartbeat_ms = excluded.heartbeat_ms",
                    (owner, mode, started_ms),
                )
                await conn.execute(  # instances gone for a day drop out of the list
                    "DELETE FROM instances WHERE heartbeat_ms < (" + _NOW + " * 1000)::BIGINT"
                    " - 86400000"
                )
                cur = await conn.execute(
                    "UPDATE job_leases SET locked_until = " + _NOW + " + %s"
                    " WHERE owner = %s AND status IS NULL RETURNING job_id",
                    (lease_s, owner),
                )
                return {str(j) for (j,) in await cur.fetchall()}

        return await self._state.call(work)

    async def instances(self) -> list[InstanceInfo]:
        rows = await self._state.rows(
            "SELECT instance_id, mode, started_ms, heartbeat_ms FROM instances"
            " ORDER BY instance_id",
            (),
        )
        return [InstanceInfo(*row) for row in rows]

    async def active_instances(self, mode: str, within_s: float) -> int:
        rows = await self._state.rows(
            "SELECT count(*) FROM instances WHERE mode = %s"
            " AND heartbeat_ms >= ((" + _NOW + " - %s) * 1000)::BIGINT",
            (mode, within_s),
        )
        return int(rows[0][0])

    async def owners(self, run_id: str) -> dict[str, str]:
        rows = await self._state.rows(
            "SELECT job_id, owner FROM job_leases WHERE run_id = %s AND owner IS NOT NULL"
            " AND status IS NULL AND locked_until >= " + _NOW,
            (run_id,),
        )
        return {str(j): str(o) for j, o in rows}

    async def run_totals(self, run_id: str) -> dict[str, int]:
        rows = await self._state.rows(
            "SELECT count(*),"
            " count(*) FILTER (WHERE status = 'COMPLETED'),"
            " count(*) FILTER (WHERE status = 'FAILED'),"
            " count(*) FILTER (WHERE status IS NULL AND owner IS NOT NULL"
            " AND locked_until >= " + _NOW + ")"
            " FROM job_leases WHERE run_id = %s",
            (run_id,),
        )
        jobs, completed, failed, running = (int(v) for v in rows[0])
        return {
            "jobs": jobs,
            "completed": completed,
            "failed": failed,
            "running": running,
            "waiting": jobs - completed - failed - running,
        }

    async def release_all(self, owner: str) -> None:
        async def work(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE job_leases SET owner = NULL, locked_until = "
                    + _NOW
                    + " WHERE owner = %s AND status IS NULL",
                    (owner,),
                )
                # Gone for good: the others' fair shares grow at once, not a lease later.
                await conn.execute("DELETE FROM instances WHERE instance_id = %s", (owner,))

        await self._state.call(work)
