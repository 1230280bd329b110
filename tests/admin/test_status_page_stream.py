"""The status page of a daemon serving off loopback with a token, in headless Chromium: the page
asks for the token once, and progress is still pushed by the stream (read with fetch(), the
token in the Authorization header), never polled; the token lands in no URL and no log."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp
import pytest
from chromium_support import Browser
from fake_exchange import SymbolSpec
from jobs_support import send
from test_status_page_service import cell, page_daemon
from test_status_page_token import answer_prompt

TOKEN = "stream-token-9f2d41"
BTC, HISTORY = "binance:BTC-USDT:1m:live", "binance:BTC-USDT:1m:history"


@pytest.fixture
def daemon(exchange_rig, monkeypatch):
    """A live daemon on the wildcard address (off loopback: the token is needed)."""
    monkeypatch.setenv("TDA_ADMIN_TOKEN", TOKEN)  # the subprocess inherits it
    with page_daemon(exchange_rig([SymbolSpec("BTC/USDT")]), "0.0.0.0") as running:
        yield running


def requests_sent(page) -> list[dict]:
    sent = [e for e in page.events if e["method"] == "Network.requestWillBeSent"]
    return [e["params"]["request"] for e in sent]


def path_of(request: dict) -> str:
    return urlsplit(request["url"]).path


@pytest.mark.timeout(1200)  # the first run may install chromium
async def test_off_loopback_progress_is_pushed_with_the_token_in_a_header(chromium, daemon):
    assert send(daemon.port, "GET", "/progress")[0] == 401
    browser = Browser(chromium)
    try:
        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            await page.send("Network.enable")
            await page.send("Page.enable")
            await page.send("Page.navigate", url=f"http://127.0.0.1:{daemon.port}/")
            await answer_prompt(page, TOKEN)
            await page.wait_for(f"{cell(BTC, 1)} == 'RUNNING'")
            await page.wait_for("following !== null")
            while "/jobs" not in [path_of(r) for r in requests_sent(page)]:  # the first load
                await page.evaluate("1")  # let the notifications in
            polled_before = len(requests_sent(page))

            # A backfill started elsewhere (not by the page, which would refresh itself): the
            # page sees it appear and finish only through the stream.
            status, _ = send(
                daemon.port,
                "POST",
                f"/jobs/{BTC}/backfill",
                {"start": "2024-02-28", "end": "2024-02-29"},
                token=TOKEN,
            )
            assert status == 202
            await page.wait_for(f"{cell(HISTORY, 1)} == 'COMPLETED'", timeout_s=60)
            covered = await page.evaluate(cell(HISTORY, 2))
            streaming = await page.evaluate("following !== null && polling === null")
            prompts = [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
            sent = requests_sent(page)
            await page.close()
    finally:
        browser.close()

    assert streaming and covered == "100.0%"
    assert len(prompts) == 1  # asked once, though several requests were refused at first
    streams = [r for r in sent if path_of(r) == "/progress/stream"]
    assert streams and streams[-1]["headers"].get("Authorization") == f"Bearer {TOKEN}"
    # After the stream began, nothing polled progress or jobs: the updates were pushed.
    later = [path_of(r) for r in sent[polled_before:]]
    assert "/progress" not in later and "/jobs" not in later
    assert not [r["url"] for r in sent if TOKEN in r["url"]]  # never in a URL
    status, history = send(daemon.port, "GET", f"/jobs/{HISTORY}", token=TOKEN)
    assert status == 200 and history["status"] == "COMPLETED"
    assert daemon.stop() == 0
    assert TOKEN not in daemon.stderr and TOKEN not in str(daemon.events)  # nor in a log
