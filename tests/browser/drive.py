"""Playwright drivers shared by the browser tests and ``screenshots.py``: Debian's Chromium, headless."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

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


def open_app(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    page.locator("#header").wait_for(timeout=30_000)


def run_compare(page, n_columns: int, timeout_ms: int = 120_000) -> None:
    """Click Compare and wait until the gallery shows ``n_columns`` images."""
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-btn").click()
    page.wait_for_function(
        "n => document.querySelectorAll('#compare-gallery img').length >= n", arg=n_columns, timeout=timeout_ms)


def start_training(page, student: str, timeout_ms: int = 180_000) -> None:
    """Fill the Train form for a quick run, start it, and wait for a loss point and a preview."""
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("student name").fill(student)
    page.locator("#extra-config textarea").fill(QUICK_TRAIN)
    page.locator("#train-start").click()
    page.wait_for_function(
        "() => { const m = (document.querySelector('#train-status')||{}).innerText || '';"
        " const k = m.match(/loss points: (\\d+)/); return k && parseInt(k[1]) >= 1; }", timeout=timeout_ms)
    page.wait_for_function(
        "() => /preview at step \\d+/.test((document.querySelector('#preview-caption')||{}).innerText || '')"
        " && document.querySelector('#preview img') !== null", timeout=timeout_ms)


def stop_training(page, timeout_ms: int = 120_000) -> str:
    """Click Stop and wait until the status settles on a final state; returns it."""
    page.locator("#train-stop").click()
    page.wait_for_function(
        "() => /\\*?\\b(stopped|finished|failed)\\b/.test((document.querySelector('#train-status')||{}).innerText || '')",
        timeout=timeout_ms)
    text = page.locator("#train-status").inner_text()
    return re.search(r"\b(stopped|finished|failed)\b", text).group(1)
