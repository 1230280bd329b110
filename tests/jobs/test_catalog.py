"""Connectors and job definitions persisted in the state (a SQLite file, or Postgres shared by
instances); the file-vs-API rule."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

import pytest
from event_support import recording_events
from postgres_support import (
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)
from pydantic import ValidationError

from tda_collector.config import ExchangeConfig
from tda_collector.jobs.catalog import (
    ADDED,
    DISMISSED,
    Catalog,
    Connector,
    JobDefinition,
    SqliteCatalog,
    config_body,
    reconcile,
    secrets_refusal,
)
from tda_collector.jobs.postgres_catalog import PostgresCatalog
from tda_collector.jobs.postgres_state import PostgresState
from tda_collector.jobs.schedule import Schedule, next_cron_ms
from tda_collector.models import JobKey

T0 = 1_709_251_200_000  # 2024-03-01T00:00:00Z


def block(exchange: str = "binance", *symbols: str) -> ExchangeConfig:
    return ExchangeConfig(id=exchange, symbols=list(symbols or ["BTC/USDT"]))


@pytest.fixture(params=["sqlite", "postgres"])
def open_catalog(request, tmp_path):
    """`open_catalog()` opens the catalog on this test's state (the same one on every call, as
    a restart or another instance would see it) and returns it with its closer."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_server")
        url = fresh_database()

    async def make() -> tuple[Catalog, Callable[[], Awaitable[None]]]:
        if request.param == "sqlite":
            catalog: Catalog = SqliteCatalog(str(tmp_path / "state.sqlite"))
            await catalog.open()
            return catalog, catalog.close
        state = PostgresState(url, recording_events()[0])
        await state.open()  # its migrations make the catalog's tables
        catalog = PostgresCatalog(state)
        await catalog.open()
        return catalog, state.close

    return make


async def test_connectors_and_definitions_survive_a_reopen(open_catalog):
    catalog, close = await open_catalog()
    okx = Connector(block("okx", "ETH/USDT"), enabled=False, paused_jobs=("okx:ETH-USDT:1m:live",))
    gone = Connector(block("kraken", "BTC/USD"), True, None, deleted=True)
    await catalog.save_connectors([Connector(block(), True, config_body(block())), okx, gone])
    cron = Schedule(mode="cron", cron="*/5 * * * *")
    await catalog.save_definition(JobDefinition(JobKey("binance", "SOL/USDT", "1h"), ADDED, cron))
    await catalog.save_definition(JobDefinition(JobKey("binance", "BTC/USDT", "1m"), DISMISSED))
    await close()

    again, close = await open_catalog()
    assert [c.paused_jobs for c in await again.connectors()] == [(), okx.paused_jobs, ()]
    assert [(c.id, c.enabled, c.config, c.deleted) for c in await again.connectors()] == [
        ("binance", True, block(), False),
        ("okx", False, block("okx", "ETH/USDT"), False),
        ("kraken", True, block("kraken", "BTC/USD"), True),
    ]
    definitions = await again.definitions()
    assert definitions[0] == JobDefinition(JobKey("binance", "SOL/USDT", "1h"), ADDED, cron)
    # An upsert keeps a connector's place; a definition saved again moves to the end.
    await again.save_connectors([Connector(block("binance", "ETH/USDT"), False)])
    assert [(c.id, c.enabled) for c in await again.connectors()][:2] == [
        ("binance", False),
        ("okx", False),
    ]
    await again.save_definition(JobDefinition(JobKey("binance", "SOL/USDT", "1h"), ADDED))
    assert [d.key.symbol for d in await again.definitions()] == ["BTC/USDT", "SOL/USDT"]
    await again.drop_definitions([JobKey("binance", "BTC/USDT", "1m")])
    assert len(await again.definitions()) == 1
    await close()


def test_an_unchanged_file_block_leaves_the_api_change_and_an_edited_one_wins():
    filed = block("binance", "BTC/USDT")
    changed_by_api = Connector(block("binance", "ETH/USDT"), False, config_body(filed))
    api_only = Connector(block("okx", "ETH/USDT"))
    kept = reconcile([changed_by_api, api_only], [filed])
    assert kept == [changed_by_api, api_only]  # the API's change and its disable survive

    edited = block("binance", "XRP/USDT")
    [binance, okx] = reconcile([changed_by_api, api_only], [edited])
    assert binance == Connector(edited, False, config_body(edited))  # still disabled
    assert okx == api_only
    [fresh] = reconcile([], [filed])
    assert fresh == Connector(filed, True, config_body(filed))


def test_cron_instants_are_strictly_after_now_in_utc():
    assert next_cron_ms("*/5 * * * *", T0) == T0 + 300_000
    assert next_cron_ms("*/5 * * * *", T0 - 1) == T0
    assert next_cron_ms("0 0 * * *", T0 + 1) == T0 + 86_400_000


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "cron"},
        {"mode": "cron", "cron": "* * * * * *"},
        {"mode": "cron", "cron": "61 * * * *"},
        {"mode": "cron", "cron": "@reboot"},
        {"mode": "timeframe", "cron": "* * * * *"},
        {"mode": "hourly"},
        {"mode": "cron", "cron": "* * * * *", "extra": 1},
    ],
)
def test_bad_schedules_are_refused(body):
    with pytest.raises(ValidationError):
        Schedule.model_validate(body)


def test_the_api_can_neither_name_credential_variables_nor_re_point_a_connector_with_them():
    with_keys = ExchangeConfig(
        id="binance", symbols=["BTC/USDT"], credentials_env={"apiKey": "BINANCE_KEY"}
    )
    filed = Connector(with_keys, True, config_body(with_keys))
    elsewhere = with_keys.model_copy(update={"ccxt": {"urls": {"api": "http://evil.example"}}})
    more_symbols = with_keys.model_copy(update={"symbols": ["BTC/USDT", "ETH/USDT"]})
    assert secrets_refusal(filed, more_symbols) is None  # the file's variables, kept
    assert secrets_refusal(filed, elsewhere).startswith("ccxt:")
    assert secrets_refusal(filed, block()).startswith("credentials_env:")  # dropped
    assert secrets_refusal(None, with_keys).startswith("credentials_env:")  # new, via the API
    assert secrets_refusal(Connector(block()), elsewhere).startswith("credentials_env:")
    assert secrets_refusal(Connector(block()), block("binance", "ETH/USDT")) is None


def test_a_deleted_connector_stays_deleted_until_its_file_block_is_edited():
    filed = block("binance", "BTC/USDT")
    tombstone = Connector(filed, True, config_body(filed), deleted=True)
    assert reconcile([tombstone], [filed]) == [tombstone]
    edited = block("binance", "ETH/USDT")
    assert reconcile([tombstone], [edited]) == [Connector(edited, True, config_body(edited))]


async def test_what_disabling_paused_is_kept_and_an_older_state_file_gains_the_column(tmp_path):
    path = tmp_path / "state.sqlite"
    with sqlite3.connect(path) as old:  # the connectors table as first shipped
        old.execute(
            "CREATE TABLE connectors (id TEXT PRIMARY KEY, body TEXT NOT NULL,"
            " enabled INTEGER NOT NULL, file_body TEXT, deleted INTEGER NOT NULL DEFAULT 0)"
        )
        body = config_body(block())
        old.execute("INSERT INTO connectors VALUES ('binance', ?, 0, NULL, 0)", (body,))
    old.close()
    catalog = SqliteCatalog(str(path))
    await catalog.open()
    assert await catalog.connectors() == [Connector(block(), enabled=False)]
    paused = ("binance:BTC-USDT:1m:live", "binance:ETH-USDT:1m:live")
    await catalog.save_connectors([Connector(block(), enabled=False, paused_jobs=paused)])
    await catalog.close()
    again = SqliteCatalog(str(path))
    await again.open()
    assert [c.paused_jobs for c in await again.connectors()] == [paused]
    await again.close()
