"""A store that cannot be opened at start: one `startup_failed` event, exit 1, no traceback."""

from __future__ import annotations

from collector_support import run_in_process, write_config
from fake_exchange import FakeExchange, SymbolSpec
from store_support import LockHolder

NOW_S = 1_709_337_600.0  # 2024-03-02T00:00:00Z


def test_a_duckdb_file_held_by_another_process_is_reported_not_a_traceback(tmp_path, capsys):
    with FakeExchange([SymbolSpec("BTC/USDT")], clock=lambda: NOW_S) as fake:
        config = write_config(tmp_path, fake.base_url, ["BTC/USDT"], ["1h"])
        holder = LockHolder(str(tmp_path / "ohlcv.duckdb"))
        try:
            code, events = run_in_process(
                capsys, config, "--mode=history", "--start=2024-03-01", "--end=2024-03-02"
            )
        finally:
            holder.release()
    assert code == 1
    assert events[-1]["event"] == "startup_failed"
    assert "lock" in events[-1]["error"].lower()
    assert "Traceback" not in capsys.readouterr().err
