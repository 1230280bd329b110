"""Command-line errors: exit code 2, one readable line on stderr, no traceback."""

import subprocess
import sys
import textwrap

import pytest

from tda_collector.cli import parse_instant, parse_request
from tda_collector.errors import UsageError

NOW = 1_732_000_000_000


def test_history_range_is_parsed_as_utc_and_end_defaults_to_now():
    _, request = parse_request(["--mode", "history", "--start", "2024-01-01"], NOW)
    assert request.start_ms == 1_704_067_200_000
    assert request.end_ms == NOW
    _, request = parse_request(
        ["--mode=history", "--start=2024-01-01T00:00:00+01:00", "--end=2024-01-02T00:00Z"], NOW
    )
    assert request.start_ms == 1_704_067_200_000 - 3_600_000
    assert request.end_ms == 1_704_067_200_000 + 86_400_000


def test_narrowing_options_repeat():
    _, request = parse_request(
        ["--mode=live", "--symbol", "BTC/USDT", "--symbol=ETH/USDT", "--timeframe", "1h"], NOW
    )
    assert request.symbols == ("BTC/USDT", "ETH/USDT")
    assert request.timeframes == ("1h",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode=history"], "--start: required in history mode"),
        (["--mode=live", "--start=2024-01-01"], "--start: not allowed in live mode"),
        (["--mode=history", "--start=2024-01-02", "--end=2024-01-01"], "--start: must be before"),
        (["--mode=history", "--start=2024-01-01", "--end=2024-01-01"], "--start: must be before"),
        (["--mode=history", "--start=yesterday"], "--start: not an ISO 8601"),
        (["--mode=hist"], "invalid choice"),
        (["--mode=live", "--timeframe=2x"], "--timeframe: unsupported timeframe"),
        ([], "--mode"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_request(argv, NOW)


def test_parse_instant_accepts_z():
    assert parse_instant("2024-01-01T00:00:00Z", "--start") == 1_704_067_200_000


def run_cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tda_collector", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def assert_one_line_exit_2(result, contains):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert contains in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_config_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            """
            exchanges: [{id: binance, symbols: [BTC/USDT]}]
            storage: {backend: sqlite}
            """
        )
    )
    result = run_cli("--mode=live", cwd=tmp_path)
    assert_one_line_exit_2(result, "storage.backend: must be one of duckdb, bigquery")


def test_bad_cli_exits_2_with_one_line(tmp_path):
    result = run_cli("--mode=history", "--start=2024-02-01", "--end=2024-01-01", cwd=tmp_path)
    assert_one_line_exit_2(result, "--start: must be before --end")


def test_unknown_exchange_id_exits_2(tmp_path):
    (tmp_path / "config.yaml").write_text("exchanges: [{id: notanexchange, symbols: [BTC/USDT]}]\n")
    result = run_cli("--mode=history", "--start=2024-01-01", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "tda-collector: error: exchanges.id: unknown ccxt exchange id 'notanexchange'"
    )


def test_state_url_with_duckdb_exits_2_naming_the_field(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "exchanges: [{id: binance, symbols: [BTC/USDT]}]\n"
        "state_url: postgresql://tda:hunter2-pw@127.0.0.1:1/tda\n"
    )
    result = run_cli("--mode", "live", cwd=tmp_path)
    assert_one_line_exit_2(result, "state_url: needs storage.backend bigquery")
    assert "hunter2" not in result.stderr
