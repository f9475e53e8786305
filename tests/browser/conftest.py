"""Browser tests: skipped, with the reason, when Chromium or Playwright is missing (CI installs both)."""
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
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """The app on the embedded tiny teacher with the shipped students (a copy), shared by the page tests."""
    from cdlab.students import list_students
    from cdlab.teachers import TINY_ID, TINY_TEACHER_DIR
    from cdlab.paths import REPO_ROOT

    if not (Path(TINY_TEACHER_DIR) / "model_index.json").is_file():
        pytest.skip("the embedded tiny teacher is not in this checkout")
    shipped = [c.name for c in list_students(root=REPO_ROOT / "adapters", base_model=TINY_ID)]
    work = tmp_path_factory.mktemp("tiny-app")
    shutil.copytree(REPO_ROOT / "adapters", work / "adapters", dirs_exist_ok=True)
    from cdlab.ui.testing import serve_app

    with serve_app("tiny", work) as url:
        yield url, shipped


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    d = Path(os.environ.get("CDLAB_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(served):
    """One Chromium page per test module on the shared app, at 1280x800, opened to the app's ready signal."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport=VIEWPORT)
        open_app(page, served[0])
        yield page
        browser.close()
