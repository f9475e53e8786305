"""The app in a real browser (Debian's Chromium via Playwright): Compare shows every column, a short training
run streams a loss point and a preview, Stop settles the status. Uses the embedded tiny teacher when it is
there, else a random tiny pipeline."""
from __future__ import annotations

from pathlib import Path

import pytest

from cdlab.ui.testing import make_random_students, serve_app
from drive import launch_browser, open_app, run_compare, start_training, stop_training


@pytest.fixture(scope="module")
def served(tiny_pipe_dir, tmp_path_factory):
    from cdlab.teachers import TINY_TEACHER_DIR, TINY_ID

    work = tmp_path_factory.mktemp("browser-app")
    if (Path(TINY_TEACHER_DIR) / "model_index.json").is_file():
        model, base = "tiny", TINY_ID
    else:
        model, base = tiny_pipe_dir, str(Path(tiny_pipe_dir).resolve())
    students = make_random_students(base, work / "adapters", n=2)
    with serve_app(model, work) as url:
        yield url, work, students


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        open_app(page, served[0])
        yield page
        browser.close()


def test_page_opens_with_header_and_tabs(page):
    assert "Teacher:" in page.locator("#header").inner_text()
    for tab in ("Compare", "Train", "Evaluate"):
        assert page.get_by_role("tab", name=tab).is_visible()


def test_compare_shows_every_column(page, served):
    n = 2 + len(served[2])
    captions = run_compare(page, n)
    assert captions.count("NFE") >= n and "teacher-50" in captions and served[2][0] in captions


def test_train_streams_loss_and_preview_then_stops(page, served):
    start_training(page, "browser-student")
    state = stop_training(page)
    assert state in ("stopped", "finished")
    runs = list((served[1] / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").stat().st_size > 0
