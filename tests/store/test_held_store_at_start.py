"""A store that cannot be opened at start ends the run cleanly: `--mode=history` beside a live
collector on the same DuckDB file says who holds it, in one line and a `startup_failed` event,
exit 1, before any exchange request."""

from __future__ import annotations

import time

from collector_support import free_port, parse_events, write_config
from daemon_support import live_daemon
from fake_exchange import FakeExchange, SymbolSpec

from tda_collector.cli import main
from tda_collector.store.duckdb_errors import lock_holder

HISTORY = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")


def run_history(capsys, config) -> tuple[int, list[dict], str]:
    """The history command in this process: exit code, events (stdout) and stderr."""
    capsys.readouterr()
    code = main(["--config", str(config), *HISTORY], environ={})
    captured = capsys.readouterr()
    return code, parse_events(captured.out), captured.err


def test_history_beside_a_live_collector_names_the_holder_and_spends_no_request(tmp_path, capsys):
    specs = [SymbolSpec("BTC/USDT")]
    with FakeExchange(specs, clock=time.time) as live_fake, FakeExchange(specs) as history_fake:
        port = free_port()
        live_config = write_config(
            tmp_path, live_fake.base_url, ["BTC/USDT"], ["1m"], admin={"port": port}
        )
        with live_daemon(live_config, port) as daemon:
            history_dir = tmp_path / "history"
            history_dir.mkdir()
            history_config = write_config(
                history_dir,
                history_fake.base_url,
                ["BTC/USDT"],
                ["1m"],
                storage={"backend": "duckdb", "duckdb": {"path": str(tmp_path / "ohlcv.duckdb")}},
            )
            code, events, stderr = run_history(capsys, history_config)
            assert daemon.proc.poll() is None  # the live collector is unharmed
        assert history_fake.request_log() == []
    assert code == 1
    assert events[-1]["event"] == "startup_failed"
    assert f"PID {daemon.proc.pid}" in events[-1]["message"]
    assert "locked by another process" in events[-1]["error"]
    assert stderr.count("\n") == 1 and f"PID {daemon.proc.pid}" in stderr
    assert "Traceback" not in stderr


def test_a_state_file_that_cannot_be_opened_is_a_startup_failure(exchange_rig, capsys, tmp_path):
    rig = exchange_rig([SymbolSpec("BTC/USDT")])
    config = rig.config(state_path=str(tmp_path))  # a directory, not a file
    code, events, stderr = run_history(capsys, config)
    assert code == 1
    assert events[-1]["event"] == "startup_failed"
    assert "Traceback" not in stderr and stderr.count("\n") == 1


def test_the_lock_holder_is_read_from_duckdbs_message():
    message = (
        'IO Error: Could not set lock on file "/data/ohlcv.duckdb": Conflicting lock is held in '
        "/usr/local/bin/python3.13 (PID 4242) by user app. See also https://duckdb.org/docs"
    )
    assert lock_holder(message) == "PID 4242: /usr/local/bin/python3.13"
    assert lock_holder("IO Error: No space left on device") is None
