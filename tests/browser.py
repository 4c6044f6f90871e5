"""Headless Chromium for tests of the static pages the library writes.

Debian's ``chromium`` and ``chromedriver`` driven by Selenium: the driver's path is given, so Selenium
Manager never looks for (or downloads) a driver or a browser. Without them the test is skipped, or
fails where ``RLMUSIC_REQUIRE_BROWSER`` is set (``.ci/run`` installs them and sets it).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
)


def require_chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver; skips (or fails, in CI) the test when either or Selenium is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium
    except ImportError:
        selenium = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", selenium)) if not found]
    if missing:
        reason = (f"the browser test needs {', '.join(missing)}: `apt-get install chromium chromium-driver` (Debian) "
                  "and `pip install -e .[test]`")
        if os.environ.get("RLMUSIC_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


class RecordingHandler(SimpleHTTPRequestHandler):
    """Serves a folder and records each request's path and status in ``self.server.requests``."""

    def log_request(self, code="-", size="-") -> None:
        self.server.requests.append((self.path, int(code)))

    def log_message(self, format, *args) -> None:  # keep the test output clean
        pass


@contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Serve ``directory`` on loopback: yields its base URL and the list of (path, status) requested."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RecordingHandler, directory=str(directory)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def chromium(profile_dir: Path, width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver with a fresh profile, logging the console and the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    with mock.patch.dict(os.environ, {"SE_OFFLINE": "true"}):
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def network_events(driver) -> list[dict]:
    """The DevTools ``Network.*`` events (method and params) logged since the last call."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [event for event in events if event["method"].startswith("Network.")]
