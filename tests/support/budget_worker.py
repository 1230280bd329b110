"""One process taking slots from a shared budget: `python budget_worker.py URL GROUP RATE N`.

Prints the epoch time (s) at which each of its N acquisitions was granted, one per line; the
budget tests run several at once and check the union of their grants."""

from __future__ import annotations

import asyncio
import sys
import time

from event_support import recording_events

from tda_collector.exchange.shared_budget import SharedBudget
from tda_collector.jobs.postgres_fleet import PostgresFleet
from tda_collector.jobs.postgres_state import PostgresState


async def main(url: str, group: str, rate: float, n: int) -> None:
    state = PostgresState(url, recording_events()[0])
    await state.open()
    budget = SharedBudget(PostgresFleet(state), group, rate)
    grants = []

    async def one() -> None:
        await budget.acquire()
        grants.append(time.time())

    await asyncio.gather(*(one() for _ in range(n)))
    await state.close()
    print("\n".join(f"{t:.6f}" for t in grants), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
