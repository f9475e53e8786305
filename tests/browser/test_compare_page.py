"""The Compare page as an instructor projects it (issue 11), in Debian's Chromium at 1280x800 on the tiny
teacher and its shipped students: it opens with a result, every column in one row with its full label,
a legend, the off-grammar notice with the nearest caption in one click, and trajectories aligned by
timestep. Each check leaves a screenshot (``$CDLAB_SCREENSHOT_DIR``, else the test's temporary folder)."""
from __future__ import annotations

from drive import VIEWPORT, compare_result_id, run_compare, wait_compare_result


def _geometry(page) -> list[dict]:
    return page.evaluate(
        "() => [...document.querySelectorAll('#compare-columns figure')].map(f => { const r = f.getBoundingClientRect();"
        " const c = f.querySelector('figcaption'); const i = f.querySelector('img').getBoundingClientRect();"
        " return {top: r.top, left: r.left, right: r.right, bottom: r.bottom, imgw: i.width,"
        " text: c.innerText, clipped: [...c.querySelectorAll('span')].some(s => s.scrollWidth > s.clientWidth + 1)}; })")


def test_opens_with_a_result_in_one_row_with_full_labels(page, shipped_app, shots):
    """No click: the default preset's comparison is on screen, every column (seven with the shipped students)
    side by side within 1280 px and above the fold, each image at least 3x the tiny world's 32 px, each labelled
    in full (method, steps, NFE, seconds, speed-up), with the legend."""
    n = 2 + len(shipped_app.students)
    assert n >= 5
    wait_compare_result(page, n)  # the page-load comparison, before any click
    page.screenshot(path=str(shots / "compare-open.png"))
    cells = _geometry(page)
    assert len(cells) == n
    assert max(c["top"] for c in cells) - min(c["top"] for c in cells) < 1  # one row
    assert max(c["right"] for c in cells) <= VIEWPORT["width"] and min(c["imgw"] for c in cells) >= 96
    assert max(c["bottom"] for c in cells) <= VIEWPORT["height"]  # labels included, no scrolling
    for c in cells:
        assert not c["clipped"] and "NFE" in c["text"] and " s" in c["text"] and "speed-up" in c["text"], c
    assert "teacher-50" in cells[0]["text"] and "NFE 100" in cells[0]["text"]
    legend = page.locator("#compare-legend").inner_text()
    assert "teacher-50" in legend and "students" in legend and "speed-up" in legend
    assert page.locator("#compare-legend").is_visible()


def test_off_grammar_prompt_gets_a_notice_and_the_nearest_caption_in_one_click(page, shipped_app, shots):
    n = 2 + len(shipped_app.students)
    box = page.locator("#prompt textarea")
    box.fill("a photo of a cat")
    notice = page.locator("#prompt-notice")
    notice.wait_for(state="visible", timeout=30_000)
    text = notice.inner_text()
    assert "“photo”" in text and "“cat”" in text and "Nearest caption" in text
    page.screenshot(path=str(shots / "compare-notice.png"))
    before = compare_result_id(page)
    page.locator("#use-nearest").click()
    wait_compare_result(page, n, before)
    assert box.input_value() == "a large red circle in the center on a white background"
    page.wait_for_function("() => { const e = document.querySelector('#prompt-notice');"
                           " return !e || e.offsetParent === null || !e.innerText.trim(); }", timeout=30_000)
    assert not page.locator("#use-nearest").is_visible()


def test_trajectories_are_aligned_by_timestep_without_empty_space(page, shipped_app, shots):
    n = 2 + len(shipped_app.students)
    page.locator("#prompt textarea").fill("a large yellow triangle at the top right on a gray background")
    page.locator("#show-trajectory input").check()
    run_compare(page, n)
    grid = page.locator("#trajectory-grid")
    grid.wait_for(timeout=30_000)
    heads = [h.strip() for h in grid.locator("thead th").all_inner_texts()]
    assert heads == ["", "t = 999", "t = 750", "t = 500", "t = 250", "final"]
    rows = grid.locator("tbody tr")
    assert rows.count() == n
    first = rows.nth(0).inner_text()
    assert "teacher-50" in first and "t=759" in first  # its step nearest 750, from its own 50
    assert "t=749" in rows.nth(1).inner_text()  # the naive teacher's own timesteps
    # no tall empty box: the trajectory block is as tall as its table
    box = page.locator("#trajectory").bounding_box()
    table = grid.bounding_box()
    assert box["height"] <= table["height"] + 40
    grid.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "compare-trajectory.png"), full_page=True)
    page.locator("#show-trajectory input").uncheck()


def test_the_flow_section_compares_a_class_with_its_students(page, shipped_app, shots):
    """The flow-matching section (issue 24): opened, it shows the flow teacher's opening comparison (teacher-50
    by Euler with CFG, naive Euler-4, the shipped reflow, DMD and CD students) with NFE; a class picked from the dropdown
    and Compare give a new result for it."""
    page.get_by_role("tab", name="Flow matching (Fashion-MNIST)").click()
    row = page.locator("#flow-compare-columns")
    row.wait_for(timeout=30_000)
    text = row.inner_text()
    assert "Euler 50 steps" in text and "NFE 100" in text and "NFE 8" in text and "fashion-reflow-4" in text
    assert "fashion-reflow-1 (1 step)" in text and "fashion-dmd-1 (1 step)" in text  # each student as trained
    assert "fashion-mbcd-4 (4 steps)" in text
    before = row.get_attribute("data-result")
    page.locator("#flow-prompt input").click()
    page.get_by_role("option", name="Ankle boot").click()
    page.locator("#flow-compare-btn").click()
    page.wait_for_function(
        "(b) => { const r = document.querySelector('#flow-compare-columns'); return r && r.dataset.result !== b"
        " && /columns in/.test((document.querySelector('#flow-compare-info') || {}).innerText || ''); }",
        arg=before, timeout=60_000)
    assert page.locator("#flow-compare-columns figure img").count() == 7  # the teacher twice, five students
    page.screenshot(path=str(shots / "flow-compare.png"))
    # its Edit tab opens with its first preset run in every column (SDEdit: a sneaker into an ankle boot): seven
    page.get_by_role("tab", name="Edit (flow)").click()
    page.wait_for_function("() => /7 columns in/.test((document.querySelector('#flow-edit-info') || {}).innerText"
                           " || '')", timeout=60_000)
    assert "NFE 60" in page.locator("#flow-edit-columns").inner_text()  # teacher-50 from strength 0.6: 30 steps
    legend = page.locator("#flow-edit-legend").inner_text()  # in the flow teacher's terms, no tiny-world checker
    assert "Euler" in legend and "DDIM" not in legend and "checker" not in legend
    page.screenshot(path=str(shots / "flow-edit.png"))
    page.get_by_role("tab", name="Compare (flow)").click()
    page.get_by_role("tab", name="Compare", exact=True).click()  # the next test finds the main tab as it was
