"""Smoke-test the built image with buildah (no Docker engine): `image_smoke.py IMAGE`.

Run by deploy/image-check as root with the project's venv. Chroot isolation shares the host's
network namespace, so the container reaches the test suite's fake exchange on 127.0.0.1, and
the host reaches the container's admin server. What it checks, each a line of its report:

1. history: `ENTRYPOINT --mode=history` as the image's USER into the image's /data; the rows
   are exactly the fake's candles, and the files on /data belong to uid 10001;
2. live: the image's own ENTRYPOINT and CMD; the image's HEALTHCHECK command fails before the
   daemon listens and succeeds while it runs; SIGTERM to the daemon (what `docker stop` sends
   to the container's main process) ends it with exit code 0 within 1 s;
3. the image's size and the size of the layer that `pip install -r requirements.txt` made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # as pytest's pythonpath has it

from collector_support import ccxt_options, free_port  # noqa: E402
from fake_exchange import SymbolSpec, expected_candles  # noqa: E402
from fake_exchange_process import FakeExchangeProcess  # noqa: E402

BUILDAH = ["buildah", "--storage-driver", "vfs"]
STORAGE = Path("/var/lib/containers/storage")
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
TIMEFRAMES = ["1m", "1h"]
START, END = "2024-01-01", "2024-01-03"
IMAGE_UID = 10001
STOP_LIMIT_S = 1.0


class SmokeFailure(Exception):
    """One check failed; the message says which and why."""


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*BUILDAH, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise SmokeFailure(f"buildah {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def report(check: str, detail: str) -> None:
    print(f"image-check: ok  {check}: {detail}", flush=True)


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * 1000)


def write_config(folder: Path, base_url: str) -> Path:
    """The collector's config pointing at the fake; the image's ENV still puts the DuckDB file
    and the state on /data and picks the admin port."""
    config = {
        "service_name": "tda-image-check",
        "environment": "image-check",
        "exchanges": [
            {
                "id": "binance",
                "symbols": SYMBOLS,
                "timeframes": TIMEFRAMES,
                "ccxt": ccxt_options(base_url),
                "rate_limit": {"requests_per_second": 200, "safety": 0.9},
            }
        ],
        "live_initial_candles": 100,
        "retry": {"base_seconds": 0.05, "cap_seconds": 0.2, "attempts": 5},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o644)
    return path


def run_args(container: str, config: Path, port: int) -> list[str]:
    """`buildah run` of the container with the config mounted and the volume at /data."""
    return [
        *BUILDAH,
        "run",
        "--isolation",
        "chroot",
        "-v",
        f"{config}:/etc/tda/config.yaml:ro",
        "-v",
        f"{config.parent / 'data'}:/data",
        "-e",
        "CONFIG_PATH=/etc/tda/config.yaml",
        "-e",
        f"TDA__ADMIN__PORT={port}",
        container,
        "--",
    ]


def new_volume(container: str, volume: Path) -> None:
    """An empty folder for /data that takes the owner and mode of the image's /data, as a new
    named volume does in Docker (buildah run would give the VOLUME a throwaway folder)."""
    mount = Path(buildah("mount", container))
    try:
        image_data = (mount / "data").stat()
    finally:
        buildah("umount", container)
    if image_data.st_uid != IMAGE_UID:
        raise SmokeFailure(f"the image's /data belongs to uid {image_data.st_uid}")
    volume.mkdir()
    os.chown(volume, image_data.st_uid, image_data.st_gid)
    volume.chmod(image_data.st_mode & 0o7777)


def check_history(container: str, config: Path, port: int, image: dict[str, Any]) -> None:
    new_volume(container, config.parent / "data")
    argv = [*image["Entrypoint"], "--mode=history", f"--start={START}", f"--end={END}"]
    started = time.monotonic()
    done = subprocess.run(
        run_args(container, config, port) + argv,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SmokeFailure(f"history exited {done.returncode}: {done.stdout[-2000:]}{done.stderr}")
    data = config.parent / "data"
    owners = {p.name: p.stat().st_uid for p in data.iterdir()}
    if not owners or set(owners.values()) != {IMAGE_UID}:
        raise SmokeFailure(f"files on /data should belong to uid {IMAGE_UID}: {owners}")
    rows = compare_rows(data / "ohlcv.duckdb")
    report(
        "history",
        f"{rows} rows in {seconds:.1f} s equal the fake's candles; "
        f"/data/{{{', '.join(sorted(owners))}}} owned by uid {IMAGE_UID}",
    )


def compare_rows(path: Path) -> int:
    now_ms = int(time.time() * 1000)
    total = 0
    with duckdb.connect(str(path), read_only=True) as con:
        for symbol in SYMBOLS:
            for timeframe in TIMEFRAMES:
                stored = con.execute(
                    "SELECT epoch_ms(timestamp), open, high, low, close, volume"
                    " FROM market_data_ohlcv WHERE exchange = 'binance' AND symbol = ?"
                    " AND timeframe = ? ORDER BY timestamp",
                    [symbol, timeframe],
                ).fetchall()
                want = expected_candles(SymbolSpec(symbol), timeframe, ms(START), ms(END), now_ms)
                if [tuple(row) for row in stored] != [tuple(row) for row in want]:
                    raise SmokeFailure(
                        f"{symbol} {timeframe}: {len(stored)} rows stored, {len(want)} expected,"
                        " or their values differ"
                    )
                total += len(stored)
    return total


def healthcheck(container: str, config: Path, port: int, test: Sequence[str]) -> int:
    """Run the image's HEALTHCHECK command in the container; its exit code."""
    if test[0] != "CMD":
        raise SmokeFailure(f"HEALTHCHECK should be an exec-form CMD: {test}")
    done = subprocess.run(
        run_args(container, config, port) + list(test[1:]),
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode


def wait_ready(port: int, proc: subprocess.Popen[str], limit_s: float = 60) -> float:
    """Seconds until the daemon has written rows (its /metrics counts them)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if proc.poll() is not None:
            raise SmokeFailure(f"live mode exited {proc.returncode} on its own")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
            if any(
                line.startswith("tda_rows_written_total") and float(line.split()[-1]) > 0
                for line in text.splitlines()
            ):
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise SmokeFailure(f"live mode stored nothing within {limit_s:.0f} s")


def daemon_pid(parent: int) -> int:
    """The collector's process among `parent`'s descendants (the container's main process)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # buildah-chroot-exec, the container's process's parent, holds the same arguments.
        if Path(argv[0].decode()).name.startswith("python") and b"tda_collector" in argv:
            return pid
        todo += children.get(pid, [])
    raise SmokeFailure("the collector's process was not found under buildah run")


def check_live(container: str, config: Path, port: int, image: dict[str, Any]) -> None:
    test = image["Healthcheck"]["Test"]
    if healthcheck(container, config, port, test) == 0:
        raise SmokeFailure("HEALTHCHECK passed with no daemon running")
    argv = [*image["Entrypoint"], *image["Cmd"]]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            run_args(container, config, port) + argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            ready_s = wait_ready(port, proc)
            health = healthcheck(container, config, port, test)
            if health != 0:
                raise SmokeFailure(f"HEALTHCHECK failed with exit {health} while live runs")
            pid = daemon_pid(proc.pid)
            signalled = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            while Path(f"/proc/{pid}").exists() and time.monotonic() - signalled < 30:
                time.sleep(0.01)
            stop_s = time.monotonic() - signalled
            code = proc.wait(timeout=30)  # buildah run answers the daemon's exit code
            teardown_s = time.monotonic() - signalled - stop_s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        lines = log.read().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    names = {event.get("event") for event in events}
    if code != 0 or stop_s > STOP_LIMIT_S or "shutdown" not in names:
        other = [line for line in lines if not line.startswith("{")][-20:]  # a traceback, say
        raise SmokeFailure(
            f"SIGTERM: exit {code} after {stop_s:.2f} s; events {sorted(names)}; "
            f"other output: {other}"
        )
    report(
        "live",
        f"`{' '.join(argv)}` stored rows after {ready_s:.1f} s; HEALTHCHECK failed before it "
        f"listened and passed while it ran; SIGTERM -> exit 0 in {stop_s:.2f} s "
        f"(buildah's teardown {teardown_s:.2f} s more)",
    )


def layer_sizes(image: str) -> tuple[int, list[tuple[str, int]]]:
    """The image's size and (instruction, bytes) of each layer it made on top of the base."""
    info = json.loads(buildah("inspect", "--type", "image", image))
    diff_ids = info["OCIv1"]["rootfs"]["diff_ids"]
    layers = json.loads((STORAGE / "vfs-layers" / "layers.json").read_text())
    size = {layer.get("diff-digest"): layer.get("diff-size", 0) for layer in layers}
    made = [h for h in info["Docker"]["history"] if not h.get("empty_layer")]
    steps = [h.get("created_by", "?") for h in made]
    sizes = [size.get(d, 0) for d in diff_ids]
    total = sum(sizes)
    # The last len(steps) layers belong to this build's history (the base has its own entries).
    return total, list(zip(steps[-len(sizes) :], sizes, strict=False))


def check_sizes(image: str) -> None:
    total, layers = layer_sizes(image)
    deps = [(step, n) for step, n in layers if "-r requirements.txt" in step]
    if not deps:
        raise SmokeFailure("no layer made by `pip install -r requirements.txt`")
    report(
        "size",
        f"image {total / 1e6:.0f} MB uncompressed: the base stand-in {layers[0][1] / 1e6:.0f} MB"
        f" (the official slim image is smaller), the dependency layer {deps[0][1] / 1e6:.0f} MB",
    )


def main(argv: Sequence[str]) -> int:
    image_name = argv[0]
    image = json.loads(buildah("inspect", "--type", "image", image_name))["Docker"]["config"]
    with FakeExchangeProcess(symbol=SYMBOLS) as fake, tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), fake.base_url)
        port = free_port()
        container = buildah("from", "--pull=never", image_name)
        try:
            check_history(container, config, port, image)
            check_live(container, config, port, image)
        finally:
            buildah("rm", container)
    check_sizes(image_name)
    print("image-check: 3 passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SmokeFailure as failure:
        print(f"image-check: FAILED {failure}", file=sys.stderr)
        sys.exit(1)
