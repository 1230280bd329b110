"""Real parts from Debian's packages (Chromium, Prometheus): found on PATH, or installed."""

from __future__ import annotations

import os
import shutil
import subprocess

INSTALL_TIMEOUT_S = 500


def find_or_install(binary: str, package: str, *extra_args: str) -> tuple[str | None, str]:
    """The path of `binary`, installing Debian's `package` (apt-get as root) if it is missing;
    else None and the reason, for the caller to skip with (or, under CI, to fail with)."""
    found = shutil.which(binary)
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, f"{binary} is not installed and apt-get cannot run here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *extra_args, package]
    for argv in (["apt-get", "update", "-qq"], install):
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return None, f"{' '.join(argv)} took longer than {INSTALL_TIMEOUT_S}s"
        if done.returncode != 0:
            return None, f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}"
    found = shutil.which(binary)
    return found, "" if found else f"apt-get installed {package} but {binary} is not on PATH"
