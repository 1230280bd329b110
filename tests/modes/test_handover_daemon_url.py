"""`--mode=history` finding the daemon by `admin.daemon_url`, as a one-off container must (its
loopback is its own): the daemon listens off loopback with a token, the history run names it
by URL and sends the token; a URL nobody answers at is one line and exit 1."""

from __future__ import annotations

from collector_support import DAY_MS, FROZEN_NOW_S, parse_events
from fake_exchange import SymbolSpec, expected_candles
from jobs_support import Collector, free_port, send, stored
from store_support import LockHolder

from tda_collector.cli import main

NOW_MS = int(FROZEN_NOW_S * 1000)
END_MS = NOW_MS - NOW_MS % DAY_MS  # 2024-03-01T00:00Z
START_MS = END_MS - 2 * DAY_MS
RANGE = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")
TOKEN = "handover-token-5c1e"


def run_history(capsys, config, environ, *args: str) -> tuple[int, list[dict], str]:
    """The history run in this process with `environ` as its environment."""
    capsys.readouterr()
    code = main(["--config", str(config), *RANGE, *args], environ=environ)
    captured = capsys.readouterr()
    return code, parse_events(captured.out), captured.out + captured.err


def test_history_reaches_a_daemon_named_by_daemon_url_and_sends_the_token(
    exchange_rig, tmp_path, capsys, monkeypatch
):
    specs = [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")]
    rig = exchange_rig(specs)
    port = free_port()
    monkeypatch.setenv("TDA_ADMIN_TOKEN", TOKEN)  # the daemon subprocess inherits it
    # Off loopback (a wildcard), so every request but the probes needs the token.
    daemon_config = rig.config(
        live_initial_candles=10, page_limit=200, admin={"host": "0.0.0.0", "port": port}
    )
    # The history run's own admin address answers nothing: only daemon_url leads to the daemon
    # (127.0.0.2 reaches the wildcard listener; its own loopback address would not be it).
    (tmp_path / "oneoff").mkdir()
    history_config = rig.config(
        workdir=tmp_path / "oneoff",
        page_limit=200,
        storage={"backend": "duckdb", "duckdb": {"path": str(tmp_path / "ohlcv.duckdb")}},
        state_path=str(tmp_path / "state.sqlite"),
        admin={"host": "127.0.0.1", "port": free_port(), "daemon_url": f"http://127.0.0.2:{port}"},
    )
    daemon = Collector(daemon_config, port, "--mode=live")
    try:
        daemon.wait_until(lambda: daemon.named("live_started"), what="the daemon")
        assert send(port, "GET", "/jobs")[0] == 401  # the token is needed indeed
        wrong = {"TDA_ADMIN_TOKEN": "not-" + TOKEN}
        code, _, output = run_history(capsys, history_config, wrong, "--symbol=ETH/USDT")
        assert code == 2
        assert output.strip().splitlines()[-1] == (
            f"tda-collector: error: the daemon at http://127.0.0.2:{port} refused the jobs"
            " list (403): the bearer token is wrong"
        )
        assert TOKEN not in output
        environ = {"TDA_ADMIN_TOKEN": TOKEN}
        code, events, output = run_history(capsys, history_config, environ, "--symbol=ETH/USDT")
        assert code == 0, events[-3:]
        [handed] = [e for e in events if e["event"] == "history_handed_over"]
        assert handed["url"] == f"http://127.0.0.2:{port}"
        summary = events[-1]
        assert summary["event"] == "history_complete"
        assert (summary["jobs"], summary["completed"], summary["failed"]) == (1, 1, 0)
        assert "startup_failed" not in [e["event"] for e in events]
        assert TOKEN not in output  # sent, never logged
        status, history = send(port, "GET", "/jobs/binance:ETH-USDT:1m:history", token=TOKEN)
        assert status == 200 and history["status"] == "COMPLETED"
    finally:
        assert daemon.stop() == 0
    assert TOKEN not in daemon.stderr and TOKEN not in str(daemon.events)
    rows = [r for r in stored(tmp_path, "ETH/USDT") if START_MS <= r[0] < END_MS]
    assert rows == expected_candles(specs[1], "1m", START_MS, END_MS, NOW_MS)


def test_a_daemon_url_nobody_answers_at_is_one_line_and_exit_1(exchange_rig, tmp_path, capsys):
    rig = exchange_rig([SymbolSpec("BTC/USDT")])
    silent = f"http://127.0.0.1:{free_port()}"
    config = rig.config(admin={"port": 0, "daemon_url": silent})
    holder = LockHolder(str(tmp_path / "ohlcv.duckdb"))
    try:
        capsys.readouterr()
        code = main(["--config", str(config), *RANGE], environ={})
        captured = capsys.readouterr()
    finally:
        holder.release()
    assert code == 1
    failure = parse_events(captured.out)[-1]
    assert failure["event"] == "startup_failed"
    assert "lock" in failure["error"].lower() and silent in failure["error"]
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert rig.fake.request_log() == []  # not one exchange request spent


def test_a_malformed_daemon_url_is_a_usage_error_naming_the_field(exchange_rig, capsys):
    config = exchange_rig([SymbolSpec("BTC/USDT")], started=False).config()
    for bad in ("collector:8080", "ftp://collector", "http://user:pw@collector:8080"):
        capsys.readouterr()
        code = main(["--config", str(config), *RANGE], environ={"TDA__ADMIN__DAEMON_URL": bad})
        err = capsys.readouterr().err
        assert code == 2, bad
        assert err.startswith("tda-collector: error: admin.daemon_url: must be an http")
        assert err.count("\n") == 1
