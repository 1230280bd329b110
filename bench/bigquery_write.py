"""`python -m bench bigquery_write`: the BigQuery store's write paths against the emulator.

Each path runs in a child process of its own (so its CPU and peak RSS are its own; the emulator
is another process): live paths write many small writes (5 rows per write, every series at
once), history paths write pages of 1,000 rows from 8 jobs at once, each with the daemon's
SQLite state store (the live offsets and commit intents are written there). Printed per path: rows/s
and CPU µs per row over the writes alone (import and ensure excluded), and the child's peak RSS;
then each Storage Write API path against the legacy path it replaces, as ratios.

The emulator (local-bigquery) does the server's work on this machine too: rows/s is bounded by
it, not by BigQuery. CPU µs per row is the collector's own cost, the figure that carries over.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .harness import ROOT, run_measured

SCRIPT = ROOT / "tests" / "support" / "tools" / "bq-emulator"
# (path, store mode, series, writes per series, rows per write)
LIVE = [("committed stream", "committed"), ("insertAll", "stream")]
HISTORY = [("pending streams", "pending"), ("load jobs", "load")]


@dataclass
class PathResult:
    name: str
    rows: int
    seconds: float
    cpu_s: float
    peak_rss_mib: float

    def line(self) -> str:
        return (
            f"{self.name:<18} {self.rows:>8} {self.rows / self.seconds:>10.0f} "
            f"{self.cpu_s / self.rows * 1e6:>10.1f} {self.peak_rss_mib:>9.0f}"
        )


HEADER = f"{'path':<18} {'rows':>8} {'rows/s':>10} {'CPU µs/row':>10} {'peak MiB':>9}"


def _start_emulator(workdir: str) -> tuple[str, str]:
    venv = Path(sys.prefix) / "bq-emulator-0.4.0"
    done = subprocess.run(
        ["bash", str(SCRIPT), "start", workdir],
        env={**__import__("os").environ, "BQEMU_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=280,
        check=True,
    )
    url, port = done.stdout.split()[:2]
    return url, f"127.0.0.1:{port}"


def run_path(
    name: str, mode: str, url: str, grpc: str, series: int, writes: int, rows: int
) -> PathResult:
    argv = [sys.executable, "-m", "bench.bigquery_write", mode, url, grpc]
    argv += [str(series), str(writes), str(rows)]
    measured = run_measured(argv)
    if measured.returncode != 0:
        raise SystemExit(f"{name}: child exited {measured.returncode}: {measured.stdout[-500:]}")
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    return PathResult(
        name, result["rows"], result["seconds"], result["cpu_s"], measured.max_rss_mib
    )


def main(live_series: int, live_writes: int, history_jobs: int, history_pages: int) -> None:
    workdir = tempfile.mkdtemp(prefix="bench-bq-")
    try:
        url, grpc = _start_emulator(workdir)
        print(HEADER, flush=True)
        results: dict[str, PathResult] = {}
        for name, mode in LIVE:
            results[name] = run_path(name, mode, url, grpc, live_series, live_writes, 5)
            print(results[name].line(), flush=True)
        for name, mode in HISTORY:
            results[name] = run_path(name, mode, url, grpc, history_jobs, history_pages, 1000)
            print(results[name].line(), flush=True)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", workdir], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    for new, old in (("committed stream", "insertAll"), ("pending streams", "load jobs")):
        a, b = results[new], results[old]
        print(
            f"{new} ÷ {old}: rows/s {(a.rows / a.seconds) / (b.rows / b.seconds):.2f}x, "
            f"CPU per row {(a.cpu_s / a.rows) / (b.cpu_s / b.rows):.2f}x, "
            f"peak RSS {a.peak_rss_mib / b.peak_rss_mib:.2f}x"
        )


# --- the child: one path's writes ------------------------------------------------------------


async def _child(mode: str, url: str, grpc: str, series: int, writes: int, rows: int) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from store_support import MIN, T0, batch, quiet_events

    from tda_collector.config import BigQueryConfig
    from tda_collector.jobs.ledger import SqliteState
    from tda_collector.models import JobKey
    from tda_collector.store.bigquery_store import BigQueryStore

    config = BigQueryConfig(
        project="test-project",
        dataset=f"bench_{uuid.uuid4().hex[:12]}",
        api_endpoint=url,
        write_api_endpoint=grpc,
    )
    # The state store the daemon uses: live offsets and commit intents cost their SQLite writes.
    state_dir = tempfile.mkdtemp(prefix="bench-bq-state-")
    state = SqliteState(str(Path(state_dir) / "state.sqlite"))
    await state.open()
    store = BigQueryStore(
        config,
        quiet_events(),
        mode,  # type: ignore[arg-type]
        flush_rows=50_000,
        flush_seconds=1.0,
        state=state,
    )
    await store.ensure()

    async def one_series(i: int) -> None:
        key = JobKey("binance", f"S{i:04d}/USDT", "1m")
        for w in range(writes):
            await store.write(batch(key, T0 + w * rows * MIN, rows))

    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await asyncio.gather(*(one_series(i) for i in range(series)))
    await store.close()
    cpu1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await state.close()
    shutil.rmtree(state_dir, ignore_errors=True)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(json.dumps({"rows": series * writes * rows, "seconds": wall1 - wall0, "cpu_s": cpu}))


if __name__ == "__main__":
    mode, url, grpc, *counts = sys.argv[1:]
    series, writes, rows = (int(c) for c in counts)
    asyncio.run(_child(mode, url, grpc, series, writes, rows))
