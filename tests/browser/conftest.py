"""Browser tests: skipped, with the reason, when Chromium or Playwright is missing (CI installs both)."""
from __future__ import annotations

import pytest

from drive import chromium_path


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
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
