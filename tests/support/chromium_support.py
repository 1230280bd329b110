"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol.

`find_chromium` installs the package when it is missing and the machine allows it (root with
apt-get); the caller skips, loudly, when there is still none. Only loopback is ever loaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from debian_support import find_or_install

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> tuple[str | None, str]:
    """The chromium binary, installing Debian's package if needed; else None and why."""
    return find_or_install("chromium", "chromium")


class Browser:
    """One headless Chromium with a fresh profile; `page()` opens a tab to drive."""

    def __init__(self, binary: str) -> None:
        self._profile = tempfile.TemporaryDirectory(
            prefix="tda-chromium-", ignore_cleanup_errors=True
        )
        self.proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes too are stopped by `close`
        )
        self.port = self._devtools_port()

    def _devtools_port(self) -> int:
        marker = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().splitlines()[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")

    async def page(self, session: aiohttp.ClientSession) -> Page:
        async with session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            targets = await response.json(content_type=None)
        target = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        return Page(ws)

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self._profile.cleanup()


class Page:
    """A tab over DevTools. `events` keeps the notifications (e.g. `Network.requestWillBeSent`
    once `Network.enable` was sent) that arrived while a command waited for its answer."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self._ws.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), 30)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 15) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"page never satisfied: {expression}")

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        await self._ws.close()


# Each rendered job row: id, status, covered text, candles, last error, enabled buttons.
RENDERED_JOBS = """
        [...document.querySelectorAll('#jobs tbody tr')].map((tr) => ({
            id: tr.dataset.id,
            status: tr.cells[1].textContent,
            covered: tr.cells[2].textContent,
            candles: tr.cells[3].textContent,
            error: tr.cells[6].textContent,
            enabled: [...tr.querySelectorAll('button')].filter((b) => !b.disabled)
                .map((b) => b.dataset.action),
        }))"""
