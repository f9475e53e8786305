"""Playwright drivers shared by the browser tests and ``screenshots.py``: Debian's Chromium, headless."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

VIEWPORT = {"width": 1280, "height": 800}  # a laptop on a projector: the page tests' window
CHROMIUM = os.environ.get("CDLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# A short CPU run: small data, a loss point every step, a preview every few steps; long enough to stop.
QUICK_TRAIN = '{"max_steps": 400, "data_size": 32, "log_every": 1, "preview_every": 3, "probe_size": 4, ' \
              '"batch_size": 8, "checkpoint_every": 50}'


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


def open_app(page, url: str, timeout_ms: int = 60_000) -> None:
    """Open the app and wait for its own ready signal (``#cdlab-ready``, written by the page-load event once
    the column, run and evaluation lists are fresh). Never "network idle": a Gradio page keeps a
    server-sent-events stream open, so the network may never go idle (issue 10: CI failed on that)."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.locator("#cdlab-ready").wait_for(state="attached", timeout=timeout_ms)
    page.locator("#header").wait_for(timeout=timeout_ms)


def _text(page, selector: str) -> str:
    loc = page.locator(selector)
    return loc.inner_text() if loc.count() else ""


def compare_result_id(page) -> str:
    """The id of the Compare result on screen ('' when none): every result has its own."""
    loc = page.locator("#compare-columns")
    return (loc.get_attribute("data-result") or "") if loc.count() else ""


def wait_compare_result(page, n_columns: int, before: str = "", timeout_ms: int = 120_000) -> str:
    """Wait until a Compare result other than ``before`` shows ``n_columns`` labelled columns; return their text."""
    page.wait_for_function(
        "([n, before]) => { const r = document.querySelector('#compare-columns');"
        " return r && r.dataset.result && r.dataset.result !== before"
        " && r.querySelectorAll('figure img').length >= n"
        " && /columns in/.test((document.querySelector('#compare-info')||{}).innerText || ''); }",
        arg=[n_columns, before], timeout=timeout_ms)
    return page.locator("#compare-columns").inner_text()


def run_compare(page, n_columns: int, timeout_ms: int = 120_000) -> str:
    """Click Compare and wait until this click's result is on screen (a new result id, ``n_columns`` labelled
    columns in the row); returns the columns' labels (method, steps, NFE, seconds, speed-up)."""
    page.get_by_role("tab", name="Compare").click()
    before = compare_result_id(page)
    page.locator("#compare-btn").click()
    return wait_compare_result(page, n_columns, before, timeout_ms)


def refresh_columns(page) -> list[str]:
    """Click "↻ columns" and return the column names offered (the checkbox labels)."""
    page.get_by_role("tab", name="Compare").click()
    page.locator("#refresh-columns").click()
    page.wait_for_timeout(1500)
    return [x.strip() for x in page.locator("label:has(input[type=checkbox])").all_inner_texts()]


def run_evaluation(page, prompts: int, timeout_ms: int = 240_000) -> str:
    """On the Evaluate tab, run a new evaluation on ``prompts`` prompts; return its table's text once shown.

    Done means: the evaluations list selects a new name and the table shows that evaluation (no progress
    timer over it)."""
    page.get_by_role("tab", name="Evaluate").click()
    before = page.locator("#evals input").input_value()
    box = page.locator("#eval-prompts input")
    box.fill(str(prompts))
    box.press("Tab")
    page.locator("#eval-btn").click()
    page.wait_for_function(
        "([before, n]) => { const v = (document.querySelector('#evals input')||{}).value || '';"
        " const t = (document.querySelector('#eval-table')||{}).innerText || '';"
        " const m = (document.querySelector('#eval-summary')||{}).innerText || '';"
        " return v && v !== before && m.includes(v) && /Evaluation of/.test(t) && !/^\\s*[\\d.]+s/.test(t); }",
        arg=[before, prompts], timeout=timeout_ms)
    page.wait_for_timeout(500)
    return page.locator("#eval-table").inner_text()


def wait_status(page, pattern: str, timeout_ms: int = 240_000) -> str:
    """Wait until the Train status line matches the regular expression ``pattern``; return the line."""
    page.wait_for_function(
        "p => new RegExp(p).test((document.querySelector('#train-status')||{}).innerText || '')",
        arg=pattern, timeout=timeout_ms)
    return page.locator("#train-status").inner_text()


def fill_training(page, student: str, extra: str, overwrite: bool = False) -> None:
    """Fill the Train form (student name, advanced JSON, overwrite) and press Start."""
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("student name").fill(student)
    page.locator("#extra-config textarea").fill(extra)
    box = page.locator("#train-overwrite input")
    if box.is_checked() != overwrite:
        box.click()
    page.locator("#train-start").click()


def error_toast(page, pattern: str, timeout_ms: int = 30_000) -> str:
    """Wait for an error toast whose text matches ``pattern``; return its text."""
    page.wait_for_function(
        "p => Array.from(document.querySelectorAll('.toast-body, [data-testid=\"toast-body\"]'))"
        ".some(e => new RegExp(p, 'i').test(e.innerText))", arg=pattern, timeout=timeout_ms)
    return " | ".join(page.locator(".toast-body, [data-testid='toast-body']").all_inner_texts())


def start_training(page, student: str, timeout_ms: int = 180_000, extra: str = QUICK_TRAIN) -> None:
    """Fill the Train form for a quick run, start it, and wait for a loss point and a preview."""
    fill_training(page, student, extra)
    page.wait_for_function(
        "() => { const m = (document.querySelector('#train-status')||{}).innerText || '';"
        " const k = m.match(/loss points: (\\d+)/); return k && parseInt(k[1]) >= 1; }", timeout=timeout_ms)
    page.wait_for_function(
        "() => /preview at step \\d+/.test((document.querySelector('#preview-caption')||{}).innerText || '')"
        " && document.querySelector('#preview img') !== null", timeout=timeout_ms)


# The status line and the selected run's label in the runs list, read in one go (one DOM snapshot):
# [status state, status step, list state, list step], or null while either is not there yet.
_STATUS_AND_LIST = """() => {
  const s = (document.querySelector('#train-status') || {}).innerText || '';
  const d = (document.querySelector('#runs input') || {}).value || '';
  const a = s.match(/\\b(queued|running|stopping|finishing|finished|failed|stopped)\\b[^\\n]*?step (\\d+)\\//);
  const b = d.match(/ · (\\w+) · step (\\d+)\\//);
  return a && b ? [a[1], parseInt(a[2]), b[1], parseInt(b[2])] : null; }"""


def status_and_list(page) -> list | None:
    """[state, step] of the status line and of the selected run's label in the runs list, read at once."""
    return page.evaluate(_STATUS_AND_LIST)


def wait_status_and_list_agree(page, state: str, min_step: int = 1, timeout_ms: int = 60_000) -> list:
    """Wait until the status line and the runs list both say ``state`` at the same step (>= ``min_step``)."""
    page.wait_for_function(
        f"([st, k]) => {{ const r = ({_STATUS_AND_LIST})(); return r && r[0] === st && r[2] === st"
        " && r[1] === r[3] && r[1] >= k; }", arg=[state, min_step], timeout=timeout_ms)
    return status_and_list(page)


def wait_preview_rows(page, min_step: int = 1, timeout_ms: int = 120_000) -> str:
    """Wait until the preview caption says the student is shown at step 0 and at a step >= ``min_step`` under the
    teacher's reference, and the composed image is on the page; returns the caption."""
    page.wait_for_function(
        "k => { const t = (document.querySelector('#preview-caption')||{}).innerText || '';"
        " const m = t.match(/at step 0 and step (\\d+), under the teacher's reference/);"
        " const i = document.querySelector('#preview img');"
        " return m && parseInt(m[1]) >= k && i && i.complete && i.naturalWidth > 0; }",
        arg=min_step, timeout=timeout_ms)
    return page.locator("#preview-caption").inner_text()


def wait_loss_chart(page, timeout_ms: int = 60_000) -> int:
    """Wait until the loss LinePlot has drawn lines (svg paths) with a y axis; returns the number of paths."""
    page.wait_for_function(
        "() => { const s = document.querySelector('#loss-plot svg');"
        " return s && s.querySelectorAll('path.mark-line, g.mark-line path, path[aria-roledescription=\"line mark\"]').length >= 2"
        " && /loss/.test(s.textContent || ''); }", timeout=timeout_ms)
    return page.locator("#loss-plot svg path").count()


def stop_training(page, timeout_ms: int = 120_000) -> str:
    """Click Stop and wait until the status settles on a final state; returns it."""
    page.locator("#train-stop").click()
    page.wait_for_function(
        "() => /\\*?\\b(stopped|finished|failed)\\b/.test((document.querySelector('#train-status')||{}).innerText || '')",
        timeout=timeout_ms)
    text = page.locator("#train-status").inner_text()
    return re.search(r"\b(stopped|finished|failed)\b", text).group(1)


def edit_result_id(page) -> str:
    """The id of the Edit result on screen ('' when none)."""
    loc = page.locator("#edit-columns")
    return (loc.get_attribute("data-result") or "") if loc.count() else ""


def wait_edit_result(page, technique: str, n_figures: int, before: str = "", timeout_ms: int = 120_000) -> str:
    """Wait until an Edit result other than ``before``, of ``technique``, shows ``n_figures`` labelled
    figures (the input, then the columns); return its text."""
    try:
        page.wait_for_function(
            "([tech, n, before]) => { const r = document.querySelector('#edit-columns');"
            " return r && r.dataset.result && r.dataset.result !== before && r.dataset.technique === tech"
            " && r.querySelectorAll('figure').length === n"
            " && /columns in/.test((document.querySelector('#edit-info')||{}).innerText || ''); }",
            arg=[technique, n_figures, before], timeout=timeout_ms)
    except Exception as e:  # say what IS on screen: the result's id, technique, figures, any toast
        seen = page.evaluate(
            "() => { const r = document.querySelector('#edit-columns');"
            " const t = [...document.querySelectorAll('.toast-body, .toast-text')].map(x => x.innerText).join(' | ');"
            " return {result: r && r.dataset.result, technique: r && r.dataset.technique,"
            " figures: r ? r.querySelectorAll('figure').length : 0, toasts: t}; }")
        raise AssertionError(f"no new {technique} result with {n_figures} figures (before {before!r}); on screen: "
                             f"{seen}") from e
    return page.locator("#edit-columns").inner_text()


def pick_edit_preset(page, name: str, technique: str, n_figures: int, timeout_ms: int = 120_000) -> str:
    """Pick an Edit preset (it fills the inputs and runs the edit) and wait for its result."""
    before = edit_result_id(page)
    page.locator("#edit-preset input").click()
    page.get_by_role("option", name=name).click()
    return wait_edit_result(page, technique, n_figures, before, timeout_ms)
