"""The status page of a live daemon in headless Chromium: add a job, start a backfill and see
it finish, disable a connector, delete a job; all through the page's own controls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from chromium_support import Browser
from fake_exchange import SymbolSpec
from jobs_support import Collector, free_port

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BTC, ETH = "binance:BTC-USDT:1m:live", "binance:ETH-USDT:1m:live"
HISTORY = "binance:BTC-USDT:1m:history"


@contextmanager
def page_daemon(rig, host: str = "127.0.0.1") -> Iterator[Collector]:
    """A live daemon collecting BTC/USDT 1m, its admin server on `host`; stopped (exit 0) at
    the end."""
    port = free_port()
    config = rig.config(
        ["BTC/USDT"],
        live_initial_candles=20,
        update_interval_seconds=1,
        live_settle_seconds=0,
        page_limit=500,
        admin={"host": host, "port": port},
    )
    running = Collector(config, port, "--mode=live")
    try:
        running.wait_until(lambda: running.named("live_started"), what="the daemon")
        yield running
        assert running.stop() == 0
    finally:
        running.kill()


@pytest.fixture
def daemon(exchange_rig):
    with page_daemon(exchange_rig([SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])) as running:
        yield running


def cell(job_id: str, index: int) -> str:
    return f"document.querySelector('tr[data-id=\"{job_id}\"]')?.cells[{index}].textContent"


def set_value(element: str, value: str) -> str:
    return f"document.getElementById('{element}').value = {json.dumps(value)}"


@pytest.mark.timeout(1200)  # the first run may install chromium
async def test_the_page_adds_a_job_backfills_disables_and_deletes(chromium, daemon):
    browser = Browser(chromium)
    try:
        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            await page.send("Page.navigate", url=f"http://127.0.0.1:{daemon.port}/")
            await page.wait_for("document.getElementById('service')?.hidden === false")
            await page.wait_for(f"{cell(BTC, 1)} == 'RUNNING'")

            # Add a job with the form.
            await page.evaluate(set_value("aj-symbol", "ETH/USDT"))
            await page.evaluate("document.getElementById('aj-add').click()")
            await page.wait_for(f"{cell(ETH, 1)} == 'RUNNING'")
            await page.wait_for(f"Number({cell(ETH, 3)}) >= 20")
            assert await page.evaluate(cell(ETH, 7)) == "each close"

            # Start a backfill from the job's row and the dates, and see it finish.
            await page.evaluate(
                f'document.querySelector(\'tr[data-id="{BTC}"] '
                "button[data-action=backfill]').click()"
            )
            assert await page.evaluate("document.getElementById('bf-job').value") == BTC
            await page.evaluate(set_value("bf-start", "2024-02-28"))
            await page.evaluate(set_value("bf-end", "2024-02-29"))
            await page.evaluate("document.getElementById('bf-go').click()")
            await page.wait_for(f"{cell(HISTORY, 1)} == 'COMPLETED'", timeout_s=60)
            covered = await page.evaluate(cell(HISTORY, 2))
            await page.screenshot(ARTIFACTS / "status_page_service.png")

            # Disable the connector: its jobs pause.
            await page.evaluate(
                'document.querySelector(\'#connectors tr[data-id="binance"] '
                "button[data-action=disable]').click()"
            )
            await page.wait_for(f"{cell(BTC, 1)} == 'PAUSED' && {cell(ETH, 1)} == 'PAUSED'")
            await page.wait_for(
                "document.querySelector('#connectors tr[data-id=\"binance\"]')"
                ".cells[1].textContent == 'disabled'"
            )

            # Delete the added job.
            await page.evaluate(
                f'document.querySelector(\'tr[data-id="{ETH}"] '
                "button[data-action=delete]').click()"
            )
            await page.wait_for(f"document.querySelector('tr[data-id=\"{ETH}\"]') === null")
            streamed = await page.evaluate("following !== null && polling === null")
            await page.close()
    finally:
        browser.close()

    assert covered == "100.0%"
    assert daemon.job(HISTORY)["status"] == "COMPLETED" and daemon.job(HISTORY)["rows"] == 1440
    assert daemon.api("GET", f"/jobs/{ETH}")[0] == 404
    assert daemon.api("GET", "/connectors/binance")[1]["enabled"] is False
    assert streamed  # progress came pushed, not polled
