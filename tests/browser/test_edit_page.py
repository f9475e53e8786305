"""The Edit tab in Debian's Chromium at 1280x800 on the tiny teacher and its shipped students (issue 12): it
opens with a result, each technique runs from its preset in one click, a stroke drawn with the mouse is part
of the edited picture, and an upload is edited. Screenshots go to ``$CDLAB_SCREENSHOT_DIR`` (else a
temporary folder)."""
from __future__ import annotations

import pytest

from drive import edit_result_id, pick_edit_preset, wait_edit_result


@pytest.fixture(scope="module")
def page(page):
    """The module's page (conftest), on the Edit tab: the first visit runs the first preset."""
    page.get_by_role("tab", name="Edit").click()
    return page


def _toasts(page) -> str:
    return " | ".join(page.locator(".toast-body, [data-testid='toast-body']").all_inner_texts())


def _input_src(page) -> str:
    return page.locator('#edit-columns figure[data-label="input"] img').first.get_attribute("src")


def test_opens_with_a_result_and_runs_every_technique_from_its_preset(page, shipped_app, shots):
    from cdlab.teachers import load_teacher
    from cdlab.ui.edit_tab import presets

    n_cols = 2 + len(shipped_app.students)
    # Edit pressed as soon as the tab opens, nothing filled in: the button waits for the first visit to fill the
    # inputs from the first preset (a press before that sent an empty editor while the preset's image appeared).
    assert page.locator("#edit-btn").is_disabled()
    page.locator("#edit-btn").click()  # Playwright waits until it is enabled
    opening = edit_result_id(page)
    assert opening, "the button was enabled before the opening result was on screen"
    text = wait_edit_result(page, "sdedit", 1 + n_cols, opening)  # the press's own result
    assert "no image" not in _toasts(page) and not _toasts(page)
    assert "teacher-50 (CFG)" in text and "reads:" in text and "NFE" in text
    page.screenshot(path=str(shots / "edit.png"))
    for p in presets(load_teacher("tiny", device="cpu"))[1:]:
        uses_image = p.technique in ("sdedit", "inpaint")
        text = pick_edit_preset(page, p.name, p.technique, n_cols + (1 if uses_image else 0))
        assert "teacher-4 (naive)" in text and all(s in text for s in shipped_app.students), p.name
        if p.technique == "anagram":
            assert "flipped" in text and "reads upright" in text
        if p.technique == "inpaint":
            assert "mask" in text
        page.screenshot(path=str(shots / f"edit-{p.technique}.png"))


def test_a_stroke_drawn_on_the_canvas_is_edited(page, shipped_app):
    n = 1 + 2 + len(shipped_app.students)  # the input, the two teacher columns, every shipped student
    pick_edit_preset(page, "SDEdit: a red circle becomes blue", "sdedit", n)
    before_id, before_src = edit_result_id(page), _input_src(page)
    page.locator('#edit-image button[aria-label="Brush"]').click()
    box = page.locator("#edit-image canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.3, steps=12)
    page.mouse.up()
    page.locator("#edit-btn").click()
    wait_edit_result(page, "sdedit", n, before_id)
    assert _input_src(page) != before_src  # the stroke is in the picture the columns start from


def test_an_uploaded_image_is_edited(page, shipped_app, tmp_path):
    from cdlab.world import Caption, render

    path = tmp_path / "upload.png"
    render(Caption("large", "green", "square", "center", "black"), 3, 128).save(path)
    page.get_by_label("SDEdit: image or sketch → prompt").check()
    before = edit_result_id(page)
    page.locator('#edit-image input[type="file"]').set_input_files(str(path))
    page.wait_for_timeout(1500)
    page.locator("#edit-prompt textarea").fill("a large yellow square in the center on a black background")
    page.locator("#edit-btn").click()
    text = wait_edit_result(page, "sdedit", 1 + 2 + len(shipped_app.students), before)
    assert "reads:" in text
