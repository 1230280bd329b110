"""Downloads from an exchange's public archive host: bounded, verified, never the REST budget.

`ArchiveClient.fetch` gets one file and its `.zip.CHECKSUM` (sha256, `sha256sum -c` format) and
says what came of it (`ArchiveFetch`): the verified zip; `missing` (404: not published, REST
fills that span); `corrupt` (the checksum did not match after one refetch: a loud failure for
that file, then REST); `failed` (server errors past the retries). A host that cannot be reached
at all (DNS, refused connection, connect timeout) raises `ArchiveUnavailable` at once, so the run
costs a few seconds and goes on over REST. At most `concurrency` files are in flight (the
archive's own politeness limit; no request weight of the exchange is spent here).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from ..retry import RetryPolicy, retry_async
from .archive_layout import ArchiveFile, ArchiveLayout

Outcome = Literal["ok", "missing", "corrupt", "failed"]
_SHA256 = re.compile(rb"^\s*([0-9a-fA-F]{64})\b")
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0


class ArchiveUnavailable(Exception):
    """The archive host cannot be reached at all."""


class _Missing(Exception):
    """A 404: the file is not published."""


@dataclass(frozen=True)
class ArchiveFetch:
    """One file's download: `data` is the verified zip when `outcome` is ok; `size` counts
    every byte received for it (refetches included); `error` says why otherwise."""

    file: ArchiveFile
    outcome: Outcome
    data: bytes = b""
    size: int = 0
    error: str | None = None


class ArchiveSource(Protocol):
    """What history mode needs from an archive host (tests may put a fake here)."""

    async def fetch(self, file: ArchiveFile) -> ArchiveFetch: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ArchiveTools:
    """One exchange's archive for a history run: the host, its layout, the market ids."""

    source: ArchiveSource
    layout: ArchiveLayout
    market_ids: Mapping[str, str]  # unified symbol -> the exchange's market id (BTCUSDT)
    base_url: str


def expected_sha256(checksum_text: bytes) -> str | None:
    """The digest a `.CHECKSUM` file names (`<sha256>  <file name>`), lowercase; None if none."""
    match = _SHA256.match(checksum_text)
    return match.group(1).decode().lower() if match else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArchiveClient:
    """An aiohttp session to one archive host (`base_url` is the root the paths hang below).
    Server errors and broken transfers are retried as `policy` (the run's one policy) says."""

    def __init__(self, base_url: str, concurrency: int, policy: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self._slots = asyncio.Semaphore(concurrency)
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S
            )
            self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        return self._session

    async def _get(self, path: str) -> bytes:
        """The body of `path`; _Missing on 404, ArchiveUnavailable when the host cannot be
        reached, aiohttp.ClientError for other failures (retried by the caller)."""
        try:
            async with self._client().get(f"{self.base_url}/{path}") as response:
                if response.status == 404:
                    raise _Missing(path)
                response.raise_for_status()
                return await response.read()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ArchiveUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    async def _pair(self, file: ArchiveFile) -> tuple[bytes, bytes]:
        checksum = await self._get(file.checksum_path)
        return await self._get(file.path), checksum

    async def _download(self, file: ArchiveFile) -> tuple[bytes, bytes]:
        """(zip, checksum file); a 404 or an unreachable host is not retried."""
        return await retry_async(
            lambda: self._pair(file), self._policy, transient=(aiohttp.ClientError, TimeoutError)
        )

    async def fetch(self, file: ArchiveFile) -> ArchiveFetch:
        """Download and verify one file (see the module's docstring for the outcomes)."""
        size, matches, expected, actual = 0, False, None, ""
        async with self._slots:
            for _ in range(2):  # a file failing its checksum is fetched once more
                try:
                    data, checksum = await self._download(file)
                except _Missing:
                    return ArchiveFetch(file, "missing", size=size, error="404 not published")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = f"{type(exc).__name__}: {exc}"[:300]
                    return ArchiveFetch(file, "failed", size=size, error=error)
                size += len(data) + len(checksum)
                expected = expected_sha256(checksum)
                actual = await asyncio.to_thread(_sha256, data)
                matches = expected == actual
                if matches:
                    break
        if matches:
            return ArchiveFetch(file, "ok", data=data, size=size)
        error = f"sha256 {actual} but {file.checksum_path} says {expected}"
        return ArchiveFetch(file, "corrupt", size=size, error=error)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
