"""The app in a real browser (Debian's Chromium via Playwright): Compare shows every column, a short training
run streams its loss (a LinePlot drawn in the browser) and its labelled preview (the teacher's reference, the
student at step 0 and now) while the runs list agrees with the status, Stop settles the status, and the
Evaluate tab opens on the shipped evaluation. On the app the page tests share (tests/conftest.py:
``shipped_app``, the embedded tiny teacher with the shipped students)."""
from __future__ import annotations

import pytest

from drive import (launch_browser, open_app, run_compare, start_training, status_and_list, stop_training,
                   wait_loss_chart, wait_preview_rows, wait_status_and_list_agree)


@pytest.fixture(scope="module")
def page(shipped_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        open_app(page, shipped_app.url)
        yield page
        browser.close()


def test_page_opens_with_header_and_tabs(page):
    assert "Teacher:" in page.locator("#header").inner_text()
    for tab in ("Compare", "Train", "Evaluate"):
        assert page.get_by_role("tab", name=tab).is_visible()


def test_compare_shows_every_column(page, shipped_app):
    n = 2 + len(shipped_app.students)
    captions = run_compare(page, n)
    assert captions.count("NFE") >= n and "teacher-50" in captions and shipped_app.students[0] in captions


def test_train_streams_loss_and_preview_then_stops(page, shipped_app):
    from cdlab.ui import previews as P

    start_training(page, "browser-student")
    caption = wait_preview_rows(page, min_step=3)  # preview_every 3: reference, step 0, a later step
    assert "DDIM 50 steps, CFG" in caption
    width, height = page.evaluate("() => { const i = document.querySelector('#preview img');"
                                  " return [i.naturalWidth, i.naturalHeight]; }")
    assert width == P.LABEL_WIDTH + 8 * 128 + P.PAD  # 8 captions, 32 px images upscaled to 128
    assert height > 3 * 128  # a caption header above three rows
    assert wait_loss_chart(page) >= 2
    running = wait_status_and_list_agree(page, "running", min_step=2)
    assert running[1] == running[3] >= 2
    state = stop_training(page)
    assert state in ("stopped", "finished")
    final = wait_status_and_list_agree(page, state, min_step=1)
    assert final[0] == final[2] == state and final[1] == final[3]
    runs = [p for p in (shipped_app.work / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").stat().st_size > 0
    files = sorted(p.name for p in (runs[0] / "previews").glob("*.png"))
    assert files[:2] == ["reference.png", "step_000000.png"] and len(files) >= 3


def test_evaluate_opens_on_the_shipped_evaluation(page, shipped_app):
    """On page load, with no click, the Evaluate tab shows the newest evaluation (here the one the repository
    ships: no local ones yet) with its table and its plot. A fresh page of the same browser, opened at 1280x800."""
    fresh = page.context.browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        open_app(fresh, shipped_app.url)
        fresh.get_by_role("tab", name="Evaluate").click()
        fresh.wait_for_function(
            "() => /Evaluation of/.test((document.querySelector('#eval-table')||{}).innerText || '')"
            " && (document.querySelector('#eval-plot img')||{}).naturalWidth > 0", timeout=30_000)
        assert fresh.locator("#evals input").input_value() == "shipped (docs/evaluation)"
        table = fresh.locator("#eval-table").inner_text()
        assert "teacher (DDIM+CFG)" in table and "NFE" in table and "tiny-mbcd-4" in table
        assert "shipped (docs/evaluation)" in fresh.locator("#eval-summary").inner_text()
    finally:
        fresh.close()
