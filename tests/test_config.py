import textwrap

import pytest

from tda_collector.config import load_config
from tda_collector.errors import UsageError

MINIMAL = """
exchanges:
  - id: binance
    symbols: [BTC/USDT]
"""


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_line(tmp_path, text, environ=None):
    with pytest.raises(UsageError) as info:
        load_config(write(tmp_path, text), environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_config_gets_the_interface_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.storage.backend == "duckdb"
    assert config.storage.duckdb.path == "data/ohlcv.duckdb"
    assert config.history_page_limit == 1000
    assert config.admin.port == 8080
    assert config.exchanges[0].rate_limit.safety == 0.9
    assert config.exchanges[0].rate_limit.requests_per_second is None  # ccxt's default


def test_the_shipped_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "config.yaml", {})
    assert config.exchanges[0].id == "binance"
    assert set(config.exchanges[0].timeframes) == {"1m", "1h"}


def test_config_path_comes_from_the_environment(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_config(None, {"CONFIG_PATH": str(path)}).exchanges[0].id == "binance"


def test_bad_backend_names_the_field_and_the_choices(tmp_path):
    text = MINIMAL + "storage:\n  backend: sqlite\n"
    assert error_line(tmp_path, text) == "storage.backend: must be one of duckdb, bigquery"


def test_duckdb_group_commit_defaults_and_limits_name_the_field(tmp_path):
    duckdb = load_config(write(tmp_path, MINIMAL), {}).storage.duckdb
    assert (duckdb.batch_rows, duckdb.batch_seconds) == (262_144, 0.05)
    text = MINIMAL + "storage:\n  duckdb: {batch_rows: 0, batch_seconds: 0}\n"
    assert error_line(tmp_path, text) == (
        "storage.duckdb.batch_rows: Input should be greater than 0; "
        "storage.duckdb.batch_seconds: Input should be greater than 0"
    )


def test_unknown_key_is_an_error(tmp_path):
    assert error_line(tmp_path, MINIMAL + "stroage: {}\n") == "stroage: unknown key"


def test_nested_list_errors_name_the_item(tmp_path):
    text = """
    exchanges:
      - id: binance
        symbols: [BTC/USDT]
        rate_limit: {safety: 1.5}
    """
    assert error_line(tmp_path, text).startswith("exchanges[0].rate_limit.safety:")


def test_used_weight_settings_are_checked_and_named(tmp_path):
    text = """
    exchanges:
      - id: binance
        symbols: [BTC/USDT]
        rate_limit: {used_weight: {limit: 0, window: 60}}
    """
    assert error_line(tmp_path, text) == (
        "exchanges[0].rate_limit.used_weight.limit: Input should be greater than 0; "
        "exchanges[0].rate_limit.used_weight.window: unknown key"
    )


def test_bad_timeframe_is_named(tmp_path):
    text = MINIMAL + "    timeframes: [1m, 7x]\n"
    assert "exchanges[0].timeframes: unsupported timeframe '7x'" in error_line(tmp_path, text)


def test_exchange_without_symbols_or_markets(tmp_path):
    assert "needs symbols or a markets block" in error_line(
        tmp_path, "exchanges:\n  - id: binance\n"
    )


def test_secrets_in_the_file_are_refused(tmp_path):
    text = MINIMAL + "    ccxt: {apiKey: abc}\n"
    assert "apiKey must not be in the config file" in error_line(tmp_path, text)


def test_environment_overrides_nested_keys_and_list_items(tmp_path):
    env = {
        "TDA__STORAGE__BACKEND": "bigquery",
        "TDA__HISTORY_PAGE_LIMIT": "500",
        "TDA__EXCHANGES__0__SYMBOLS": "[ETH/USDT, SOL/USDT]",
        "TDA__LOGGING__LOKI__URL": "http://loki:3100/loki/api/v1/push",
        "UNRELATED": "x",
    }
    config = load_config(write(tmp_path, MINIMAL), env)
    assert config.storage.backend == "bigquery"
    assert config.history_page_limit == 500
    assert config.exchanges[0].symbols == ["ETH/USDT", "SOL/USDT"]
    assert config.logging.loki.url == "http://loki:3100/loki/api/v1/push"


def test_environment_override_errors_name_the_field(tmp_path):
    message = error_line(tmp_path, MINIMAL, {"TDA__STORAGE__BACKEND": "mysql"})
    assert message == "storage.backend: must be one of duckdb, bigquery"
    assert error_line(tmp_path, MINIMAL, {"TDA__NOPE": "1"}) == "nope: unknown key"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        load_config(tmp_path / "absent.yaml", {})
    assert "not valid YAML at line" in error_line(tmp_path, "exchanges: [\n")


def test_an_emulator_without_its_write_api_endpoint_is_an_error_naming_the_field(tmp_path):
    env = {
        "TDA__STORAGE__BACKEND": "bigquery",
        "TDA__STORAGE__BIGQUERY__API_ENDPOINT": "http://127.0.0.1:9050",
    }
    message = error_line(tmp_path, MINIMAL, env)
    assert message.startswith("storage.bigquery: write_api_endpoint: required with api_endpoint")
    legacy = {**env, "TDA__STORAGE__BIGQUERY__WRITE_PATH": "legacy"}
    assert load_config(write(tmp_path, MINIMAL), legacy).storage.bigquery.write_path == "legacy"


def test_state_url_is_a_secret_and_instance_id_defaults_to_none(tmp_path):
    url = "postgresql://tda:hunter2-pw@db:5432/tda"
    text = MINIMAL + "storage: {backend: bigquery}\n"
    config = load_config(write(tmp_path, text), {"TDA__STATE_URL": url})
    assert config.state_url is not None and config.state_url.get_secret_value() == url
    assert "hunter2" not in repr(config) and "hunter2" not in config.model_dump_json()
    assert config.instance_id is None


def test_live_instances_sharing_state_each_key_a_committed_stream_of_their_own(tmp_path):
    """Two live instances on one Postgres must never append to one BigQuery stream."""
    from tda_collector.app import live_stream_owner

    assert live_stream_owner(load_config(write(tmp_path, MINIMAL), {})) == "live"
    text = MINIMAL + "storage: {backend: bigquery}\ninstance_id: collector-2\n"
    env = {"TDA__STATE_URL": "postgresql://tda@db/tda"}
    assert live_stream_owner(load_config(write(tmp_path, text), env)) == "live:collector-2"


def test_state_url_with_duckdb_names_the_field_without_echoing_it(tmp_path):
    text = MINIMAL + "state_url: postgresql://tda:hunter2-pw@db/tda\n"
    message = error_line(tmp_path, text)
    assert message.startswith("state_url: needs storage.backend bigquery")
    assert "hunter2" not in message


def test_state_url_must_be_a_postgres_url(tmp_path):
    text = MINIMAL + "storage: {backend: bigquery}\nstate_url: mysql://u:hunter2@db/x\n"
    message = error_line(tmp_path, text)
    assert message == "state_url: must be a postgresql:// URL"
