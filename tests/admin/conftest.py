"""Fixtures of the admin tests: the headless browser that loads the status page."""

from __future__ import annotations

import os
import warnings

import pytest
from chromium_support import find_chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (installed when missing and allowed); without one the test is skipped,
    loudly, or under CI (`CI=true`) fails."""
    binary, reason = find_chromium()
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail(f"no headless Chromium under CI: {reason}")
    if binary is None:
        warnings.warn(f"SKIPPING the browser test: {reason}", stacklevel=1)
        pytest.skip(f"no headless Chromium: {reason}")
    return binary
