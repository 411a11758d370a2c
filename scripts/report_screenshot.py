"""Refresh docs/report.png: the report of a fresh `florence-kit demo` run, in headless Chromium.

    florence-kit demo --output-dir /tmp/demo && florence-kit report /tmp/demo
    python scripts/report_screenshot.py /tmp/demo/report.html docs/report.png

Uses the system's Chromium (apt-get install chromium) through Playwright, as the browser tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import CHROMIUM_ARGS, chromium_path  # noqa: E402


def main(report: Path, out: Path, width: int = 1280, height: int = 1100) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise SystemExit("headless Chromium not found: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(out))
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
