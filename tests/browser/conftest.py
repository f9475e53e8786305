"""Browser tests: skipped, with the reason, when Chromium or Playwright is missing; under ``CI=true`` (CI
installs both) a missing one fails each browser test instead, so CI can never pass without them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from drive import VIEWPORT, chromium_path, launch_browser, open_app


def pytest_collection_modifyitems(config, items):
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the python package `playwright` is not installed"
    if reason is None and chromium_path() is None:
        reason = "Chromium is not installed (/usr/bin/chromium; `apt-get install chromium`, as .ci/run does)"
    for item in items:
        if "tests/browser" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.browser)
            if reason and os.environ.get("CI") == "true":
                item.add_marker(pytest.mark.browser_missing(reason))
            elif reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    missing = item.get_closest_marker("browser_missing")
    if missing:
        pytest.fail(f"CI=true and {missing.args[0]}: the browser tests must run in CI", pytrace=False)


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    d = Path(os.environ.get("CDLAB_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(shipped_app):
    """One Chromium page per test module on the shared app (tests/conftest.py), at 1280x800, opened to the
    app's ready signal."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport=VIEWPORT)
        open_app(page, shipped_app.url)
        yield page
        browser.close()
