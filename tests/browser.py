"""Headless Chromium for the tests: open a page, collect console errors, take a screenshot.

The system's Chromium (Debian package ``chromium``) is driven through Playwright's DevTools client;
Playwright's own browser downloads are never used (they need the network). Tests skip, with the
reason, when either is missing; ``.ci/run`` installs both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("FLORENCE_KIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def require_browser() -> str:
    """The Chromium binary, or skip the test saying what is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    return path


@dataclass
class PageLog:
    """What the page said while it was open: console errors and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)


@contextmanager
def open_page(url: str, width: int = 1280, height: int = 900) -> Iterator[tuple[Any, PageLog]]:
    """A loaded page in headless Chromium and the log of its console errors and failed requests."""
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    log = PageLog()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda msg: (log.errors if msg.type == "error" else log.warnings).append(msg.text)
                    if msg.type in {"error", "warning"} else None)
            page.on("pageerror", lambda exc: log.errors.append(f"uncaught: {exc}"))
            page.on("requestfailed", lambda req: log.failed_requests.append(f"{req.url} ({req.failure})"))
            page.goto(url, wait_until="load")
            yield page, log
        finally:
            browser.close()


def screenshot_stats(png: Path) -> dict[str, float]:
    """Distinct colours and pixel standard deviation: a blank (single-colour) page has ~1 and ~0."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    flat = pixels.reshape(-1, 3)
    colours = len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0))
    return {"colours": float(colours), "std": float(pixels.std()), "height": float(pixels.shape[0])}


def assert_not_blank(png: Path) -> dict[str, float]:
    stats = screenshot_stats(png)
    assert stats["colours"] > 50 and stats["std"] > 10, f"screenshot {png} looks blank: {stats}"
    return stats
