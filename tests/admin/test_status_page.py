"""The status page in a real browser: headless Chromium loads it from a running collector."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from chromium_support import RENDERED_JOBS, Browser
from fake_exchange import SymbolSpec
from jobs_support import Collector, free_port, history_id

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT", "BNB/USDT"]
ARGS = ("--mode=history", "--start=2024-02-28", "--end=2024-03-01")


@pytest.fixture
def collector(exchange_rig):
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], latency_s=0.1)
    port = free_port()
    config = rig.config(
        page_limit=100,
        history_concurrency=2,
        admin={"host": "127.0.0.1", "port": port},
    )
    running = Collector(config, port, *ARGS)
    try:
        running.wait_ready(len(SYMBOLS))
        assert running.api("POST", f"/jobs/{history_id('XRP/USDT')}/pause")[0] == 200
        assert running.api("POST", f"/jobs/{history_id('DOGE/USDT')}/cancel")[0] == 200
        rig.fake.inject("400")  # the next candle request fails for good: a job shows its error
        running.wait_until(
            lambda: running.api("GET", "/jobs?status=FAILED")[1]["jobs"], what="a failure"
        )
        yield running
        running.stop()
    finally:
        running.kill()


@pytest.mark.timeout(1200)  # the first run may install chromium
async def test_the_status_page_shows_jobs_progress_budgets_and_steers(chromium, collector):
    browser = Browser(chromium)
    try:
        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            await page.send(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.send("Page.navigate", url=f"http://127.0.0.1:{collector.port}/")
            await page.wait_for(
                f"document.querySelectorAll('#jobs tbody tr').length == {len(SYMBOLS)}"
            )
            rendered = {row["id"]: row for row in await page.evaluate(RENDERED_JOBS)}
            updated = await page.evaluate("document.getElementById('updated').textContent")
            stats = await page.evaluate("document.getElementById('stats').innerText")
            budgets = await page.evaluate("document.getElementById('budgets').innerText")
            await page.screenshot(ARTIFACTS / "status_page.png")

            [failed] = collector.api("GET", "/jobs?status=FAILED")[1]["jobs"]
            running = next(j["id"] for j in collector.api("GET", "/jobs?status=RUNNING")[1]["jobs"])
            await page.evaluate(
                f'document.querySelector(\'tr[data-id="{running}"] '
                f"button[data-action=pause]').click()"
            )
            await page.wait_for(
                f"document.querySelector('tr[data-id=\"{running}\"]')"
                f".cells[1].textContent == 'PAUSED'"
            )
            refreshed = await page.wait_for(
                f"document.getElementById('updated').textContent != {json.dumps(updated)}"
            )
            await page.close()
    finally:
        browser.close()

    assert set(rendered) == {history_id(s) for s in SYMBOLS}
    paused, cancelled = rendered[history_id("XRP/USDT")], rendered[history_id("DOGE/USDT")]
    assert (paused["status"], paused["enabled"]) == ("PAUSED", ["resume", "cancel"])
    assert (cancelled["status"], cancelled["enabled"]) == ("CANCELLED", [])
    shown = rendered[failed["id"]]
    assert shown["status"] == "FAILED" and "Illegal characters" in shown["error"]
    assert all(row["covered"].endswith("%") for row in rendered.values())
    for label in ("jobs done", "covered", "candles stored", "candles/s", "ETA", "PAUSED"):
        assert label in stats
    assert "binance" in budgets and "200" in budgets  # the configured budget, requests/s
    assert refreshed  # it refreshed itself
    assert collector.job(running)["status"] == "PAUSED"  # the button reached the collector
    assert (ARTIFACTS / "status_page.png").stat().st_size > 10_000
