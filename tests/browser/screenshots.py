"""Screenshots of each tab for the README, taken by Debian's Chromium through Playwright.

    python tests/browser/screenshots.py [--model tiny] [--out docs/screenshots]

Serves the app on a scratch runs/adapters folder (the shipped students, a short training run) in a
1280x800 window and saves compare.png (as the page opens), compare-trajectory.png (with trajectories),
edit.png and edit-inpaint.png (the Edit tab as it opens, and the inpainting preset), train.png (once the
labelled preview shows the student at step 0 and a later step under the teacher's reference) and evaluate.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from drive import (launch_browser, open_app, pick_edit_preset, run_compare, start_training,  # noqa: E402
                   wait_compare_result, wait_edit_result, wait_loss_chart, wait_preview_rows)


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from cdlab.teachers import TINY_ID
    from cdlab.paths import REPO_ROOT, evals_dir
    from cdlab.ui.bench import make_random_students, serve_app

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "screenshots"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cdlab-shots-"))
    base = TINY_ID if args.model == "tiny" else str(Path(args.model).resolve())
    from cdlab.students import list_students

    shipped = list_students(REPO_ROOT / "adapters", base_model=base)
    if shipped:  # the real students when the repo has them, so the pictures show what users get
        import shutil

        shutil.copytree(REPO_ROOT / "adapters", work / "adapters")
        students = [c.name for c in shipped]
    else:
        students = make_random_students(base, work / "adapters", n=2)
    env = {}
    if any(evals_dir().glob("*/results.json")):
        env["CDLAB_EVALS_DIR"] = str(evals_dir())  # show the real evaluations when there are some
    with serve_app(args.model, work, env=env) as url, sync_playwright() as pw:
        browser = launch_browser(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        open_app(page, url)
        # Compare at 1280x800 as the page opens (the default comparison, no click), then with trajectories.
        wait_compare_result(page, 2 + len(students))
        page.screenshot(path=str(out / "compare.png"))
        page.locator("#show-trajectory input").check()
        run_compare(page, 2 + len(students))
        page.screenshot(path=str(out / "compare-trajectory.png"), full_page=True)
        # Edit as it opens (the first preset runs by itself), then the inpainting preset.
        page.get_by_role("tab", name="Edit").click()
        wait_edit_result(page, "sdedit", 3 + len(students))
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "edit.png"))
        pick_edit_preset(page, "Inpaint: the triangle becomes a cross", "inpaint", 3 + len(students))
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "edit-inpaint.png"))
        # Train at 1280x800 (issue 11): the labelled preview (teacher reference, student at step 0 and now) and
        # the loss chart drawn in the browser.
        start_training(page, "screenshot-student")
        wait_preview_rows(page, min_step=6)
        wait_loss_chart(page)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "train.png"), full_page=True)
        page.locator("#train-stop").click()
        page.get_by_role("tab", name="Evaluate").click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "evaluate.png"), full_page=True)
        browser.close()
    print("\n".join(str(out / f"{t}.png") for t in ("compare", "compare-trajectory", "edit", "edit-inpaint", "train",
                                                       "evaluate")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
