"""A real headless Chromium for the page tests (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium), kept off the network: the flags stop its own background traffic, and
every request the page makes is read back from the DevTools performance log, so a test can
say that nothing left the machine."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@contextmanager
def browser(width: int = 1400, height: int = 1800) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sweeprun-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    """What the page wrote to the console at level SEVERE (uncaught errors among them)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver: Any) -> list[str]:
    """Every URL requested since the last call (from the DevTools performance log), but the
    browser's own ``chrome://`` pages (its new-tab page loads them at start), which never
    leave the machine."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith("chrome://"):
                urls.append(url)
    return urls


def origins(urls: list[str]) -> set[str]:
    """Where ``urls`` go: ``scheme://host:port`` for the web, the scheme alone for what never
    leaves the browser (``file``, ``data``, ``blob``)."""
    out = set()
    for url in urls:
        parts = urlsplit(url)
        out.add(f"{parts.scheme}://{parts.netloc}" if parts.netloc else parts.scheme)
    return out


def table(driver: Any) -> dict[str, dict[str, str]]:
    """The page's runs table: run id -> column -> the cell's text."""
    rows = driver.execute_script("""
        return [...document.querySelectorAll('#runs tbody tr')].map(tr => [tr.dataset.run,
            Object.fromEntries([...tr.querySelectorAll('td')].filter(td => td.dataset.col !== 'param')
                .map(td => [td.dataset.col, td.textContent]))]);""")
    return dict((run, cells) for run, cells in rows)


def drawn(png: bytes) -> int:
    """How many distinct colours a screenshot holds (a blank page has one or two)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").reduce(4)
    return len(image.getcolors(1 << 24) or ())
