"""Whole sessions in Debian's Chromium (issue 10): one person going from tab to tab, and two people at once.

Each tab passing alone once hid a crash here (Compare, then Evaluate: adapters loaded under inference mode
could not be re-activated), so these tests only ever use the app the way a person does, one step after
the other, on the embedded tiny teacher. They wait for the app's own signals, never for network idle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cdlab.ui.bench import make_random_students
from drive import (error_toast, fill_training, launch_browser, open_app, refresh_columns, run_compare,
                   run_evaluation, wait_edit_result, wait_status)

# Long enough to be stopped part-way (stop is pressed once a step is logged and lands on the next checkpoint), then
# resumed to its end: three checkpoint intervals, so a stop lands before the end. Batch 4: the run is the
# session's largest cost, and its loss curve only has to continue across the resume.
STOPPABLE_STEPS = 12
STOPPABLE = f'{{"max_steps": {STOPPABLE_STEPS}, "data_size": 32, "log_every": 1, "preview_every": 0, "probe_size": 4, ' \
            '"batch_size": 4, "checkpoint_every": 4}'


@pytest.fixture(scope="module")
def journey_app(tmp_path_factory, start_app):
    """Its own app (these tests train students into it): the embedded tiny teacher and one random student."""
    from cdlab.teachers import TINY_ID

    work = tmp_path_factory.mktemp("journey")
    students = make_random_students(TINY_ID, work / "adapters", n=1)
    with start_app("tiny", work, students, TINY_ID) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


def _step(status: str) -> int:
    m = re.search(r"step (\d+)/", status)
    return int(m.group(1)) if m else -1


def test_one_persons_whole_session(browser, journey_app):
    url, work, students = journey_app.url, journey_app.work, journey_app.students
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_app(page, url)

    # 1. Compare: the teacher at 50 and 4 steps and the student.
    captions = run_compare(page, 2 + len(students))
    assert "teacher-50" in captions and students[0] in captions

    # 2. Train a run, stop it half-way and resume it to its end: one curve, and the student lands in adapters/.
    fill_training(page, "journey-student", STOPPABLE)
    wait_status(page, rf"\brunning\b.*step ([1-9]\d*)/{STOPPABLE_STEPS}")
    page.locator("#train-stop").click()
    stopped = wait_status(page, r"\bstopped\b")
    at_stop = _step(stopped)
    assert 0 < at_stop < STOPPABLE_STEPS
    page.locator("#train-resume").click()
    done = wait_status(page, r"\bfinished\b")
    assert "journey-student" in done and _step(done) == STOPPABLE_STEPS
    run_dir = next(p for p in (work / "runs").iterdir() if p.name.startswith("journey-student"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert steps == sorted(steps) and steps[-1] == STOPPABLE_STEPS  # one curve across the resume
    assert (work / "adapters" / "journey-student" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "adapters" / "journey-student" / "card.json").is_file()

    # 3. Compare shows the new student, without a restart.
    assert "journey-student" in refresh_columns(page)
    captions = run_compare(page, 3 + len(students))
    assert "journey-student" in captions

    # 4. Evaluate right after Compare (this crashed with an inference-tensor error before issue 10) includes it.
    table = run_evaluation(page, prompts=1)
    assert "journey-student" in table and students[0] in table and "teacher" in table

    # 5. Edit, first visit: its first preset runs by itself, with the new student among the columns.
    page.get_by_role("tab", name="Edit").click()
    edited = wait_edit_result(page, "sdedit", 1 + 3 + len(students))
    assert "journey-student" in edited and "teacher-50" in edited

    # 6. Nothing lost by default: the same name again is refused, the first student untouched.
    before = (work / "adapters" / "journey-student" / "pytorch_lora_weights.safetensors").read_bytes()
    fill_training(page, "journey-student", STOPPABLE)
    assert "already exists" in error_toast(page, "already exists")
    assert (work / "adapters" / "journey-student" / "pytorch_lora_weights.safetensors").read_bytes() == before
    page.close()


def test_two_people_at_once(browser, journey_app):
    """One person trains while another compares; the second cannot stop the first one's run."""
    url, work, students = journey_app.url, journey_app.work, journey_app.students
    trainer = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    viewer = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    open_app(trainer, url)
    open_app(viewer, url)

    fill_training(trainer, "two-users", STOPPABLE.replace(f'"max_steps": {STOPPABLE_STEPS}', '"max_steps": 2000'))
    wait_status(trainer, r"\brunning\b.*step [1-9]")
    captions = run_compare(viewer, 2 + len(students))  # Compare keeps working while the trainer runs
    assert "teacher-50" in captions
    # The viewer sees the run but cannot stop it.
    viewer.get_by_role("tab", name="Train").click()
    viewer.reload()
    open_app(viewer, url)
    viewer.get_by_role("tab", name="Train").click()
    viewer.locator("#train-stop").click()
    assert "another browser session" in error_toast(viewer, "another browser session")
    status = wait_status(trainer, r"\brunning\b")
    assert "two-users" in status
    # Its owner can.
    trainer.locator("#train-stop").click()
    assert _step(wait_status(trainer, r"\bstopped\b")) > 0
    trainer.context.close()
    viewer.context.close()
