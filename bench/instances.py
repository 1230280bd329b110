"""`python -m bench instances`: one request budget shared by 1, 2 and 4 instances (processes).

Each instance is a process taking slots from the limiter the collector uses with `state_url`
(`SharedBudget` on `PostgresState`, against a real Postgres started here) with 32 tasks at
once for `--seconds`, as fast as the limiter lets it. Two set-ups per instance count:
- one shared group (one IP): together they should get the group's rate, flat, at >= 0.9 of it;
- a group each (an IP each): each gets the whole rate, so the total grows with the instances.
Printed per run: slots/s against the limit, CPU µs and round trips per acquired slot, and, as
the baseline measured in the same run, the in-process `RateLimiter` at the same rate.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

from .harness import ROOT

TASKS = 32


async def _take(limiter, seconds: float) -> tuple[int, float, float]:
    """Slots taken by TASKS tasks until `seconds` have passed: (count, first, last) epoch s."""
    stop = time.monotonic() + seconds
    grants: list[float] = []

    async def one() -> None:
        while time.monotonic() < stop:
            await limiter.acquire()
            grants.append(time.time())

    await asyncio.gather(*(one() for _ in range(TASKS)))
    return len(grants), min(grants), max(grants)


async def _worker(url: str | None, group: str, rate: float, seconds: float) -> dict:
    from event_support import recording_events

    from tda_collector.exchange.ratelimit import RateLimiter
    from tda_collector.exchange.shared_budget import SharedBudget
    from tda_collector.jobs.postgres_fleet import PostgresFleet
    from tda_collector.jobs.postgres_state import PostgresState

    state = None
    if url is None:
        limiter = RateLimiter(rate)
    else:
        state = PostgresState(url, recording_events()[0])
        await state.open()
        limiter = SharedBudget(PostgresFleet(state), group, rate)
    cpu_before = _cpu()
    count, first, last = await _take(limiter, seconds)
    cpu = _cpu() - cpu_before
    if state is not None:
        await state.close()
    trips = getattr(limiter, "round_trips", 0)
    return {"count": count, "first": first, "last": last, "cpu_s": cpu, "round_trips": trips}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    name: str
    instances: int
    limit_per_s: float  # what the groups allow together
    slots: int
    rate: float  # slots/s, summed over the groups (each from its first slot to its last)
    cpu_s: float  # the instances' CPU
    server_cpu_s: float  # Postgres' CPU over the run
    round_trips: int

    def row(self) -> str:
        trips = f"{self.round_trips / self.slots:.2f}" if self.round_trips else "0"
        return (
            f"{self.name:<18}{self.instances:>9}{self.limit_per_s:>10.1f}{self.rate:>10.1f}"
            f"{self.rate / self.limit_per_s:>8.3f}{self.cpu_s / self.slots * 1e6:>12.0f}"
            f"{self.server_cpu_s / self.slots * 1e6:>13.0f}{trips:>12}"
        )


HEADER = (
    f"{'set-up':<18}{'instances':>9}{'limit/s':>10}{'slots/s':>10}{'÷ limit':>8}"
    f"{'CPU µs/slot':>12}{'PG µs/slot':>13}{'trips/slot':>12}"
)


def _run(name: str, url: str | None, groups: list[str], rate: float, seconds: float) -> Run:
    from postgres_support import server_cpu_s

    server_before = server_cpu_s()
    argv = [sys.executable, "-m", "bench.instances", "worker", url or "-"]
    procs = [
        subprocess.Popen(
            [*argv, group, str(rate), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for group in groups
    ]
    by_group: dict[str, list[dict]] = {}
    for group, proc in zip(groups, procs, strict=True):
        out, _ = proc.communicate(timeout=seconds + 60)
        by_group.setdefault(group, []).append(json.loads(out.strip().splitlines()[-1]))
    time.sleep(0.2)  # the backends of the finished instances exit and are reaped
    server_cpu = server_cpu_s() - server_before if url is not None else 0.0
    rates = [
        (sum(r["count"] for r in rs) - 1)
        / (max(r["last"] for r in rs) - min(r["first"] for r in rs))
        for rs in by_group.values()
    ]
    results = [r for rs in by_group.values() for r in rs]
    return Run(
        name,
        len(groups),
        rate * len(by_group),
        sum(r["count"] for r in results),
        sum(rates),
        sum(r["cpu_s"] for r in results),
        server_cpu,
        sum(r["round_trips"] for r in results),
    )


def run(budget: float, safety: float, seconds: float) -> None:
    from postgres_support import SERVER, fresh_database

    rate = budget * safety
    SERVER.require()
    try:
        print(HEADER, flush=True)
        rows = [_run("in-process", None, ["one"], rate, seconds)]
        print(rows[-1].row(), flush=True)
        for n in (1, 2, 4):
            shared = _run("one shared group", fresh_database(), ["binance"] * n, rate, seconds)
            print(shared.row(), flush=True)
            own = [f"binance-ip{i}" for i in range(n)]
            each = _run("a group each", fresh_database(), own, rate, seconds)
            print(each.row(), flush=True)
            rows += [shared, each]
        base = rows[0].cpu_s / rows[0].slots
        ratios = [f"{r.name} x{r.instances} {r.cpu_s / r.slots / base:.1f}x" for r in rows[1:]]
        print("\ninstances' CPU per slot ÷ the in-process limiter's: " + ", ".join(ratios))
    finally:
        SERVER.stop()


def main() -> None:
    url, group, rate, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    result = asyncio.run(_worker(None if url == "-" else url, group, rate, seconds))
    print(json.dumps(result), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    main()
