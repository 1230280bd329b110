"""The status page off loopback, in headless Chromium: it asks for the admin token once, keeps
it for the tab, shows the jobs and steers with it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from chromium_support import Browser
from test_jobs_api import fill, ready

from tda_collector.admin.jobs_api import jobs_routes
from tda_collector.admin.server import AccessPolicy, AdminServer
from tda_collector.jobs.model import PAUSED
from tda_collector.jobs.progress import Progress
from tda_collector.jobs.registry import JobRegistry
from tda_collector.observability.metrics import Metrics

TOKEN = "s3cret-token"
ROWS = "document.querySelectorAll('#jobs tbody tr').length"


async def answer_prompt(page, text: str, timeout_s: float = 15) -> None:
    """Type `text` into the page's prompt() once it shows."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await page.send("Page.handleJavaScriptDialog", accept=True, promptText=text)
            return
        except RuntimeError:  # no dialog is showing yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.timeout(1200)  # the first run may install chromium
async def test_off_loopback_the_page_asks_for_the_token_once_and_steers_with_it(
    chromium,
):
    registry = JobRegistry("history")
    fill(registry)
    access = AccessPolicy(open_to_all=False, token=TOKEN)
    routes = jobs_routes(registry, Progress(registry), "0.0.0.0", TOKEN, "TDA_ADMIN_TOKEN")
    server = AdminServer("127.0.0.1", 0, Metrics(), ready, routes, access)
    await server.start()
    browser = Browser(chromium)
    try:
        async with aiohttp.ClientSession() as session:
            page = await browser.page(session)
            await page.send("Page.enable")
            await page.send("Page.navigate", url=server.url + "/")
            await answer_prompt(page, TOKEN)
            shown = await page.wait_for(f"{ROWS} > 0 && {ROWS}")
            kept = await page.evaluate("sessionStorage.getItem('tda-token')")
            await page.send("Page.reload")
            await page.wait_for(f"{ROWS} == {shown}")  # no second prompt: it would block this
            await page.evaluate("document.getElementById('pause-all').click()")
            await page.wait_for(
                "[...document.querySelectorAll('#jobs tbody tr')]"
                ".some((tr) => tr.cells[1].textContent == 'PAUSED')"
            )
            await page.close()
    finally:
        browser.close()
        await server.stop()
    assert shown == len(registry.jobs) and kept == TOKEN
    assert any(job.status == PAUSED for job in registry.jobs.values())
