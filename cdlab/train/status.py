"""``status.json``: what a trainer says about its run, in the one shape the app's Train tab reads (`cdlab.ui.runs`).

Written by the distillation trainer (`cdlab.train.trainer.Trainer.status`) and the flow teacher's
(`cdlab.flow.train_teacher`): ``state`` (running / stopping, then finished / stopped / failed), ``step``,
``max_steps``, ``pid`` (the app reads a dead pid under an active state as "failed"), ``message``, ``student`` (the
student it publishes; "" for a teacher run), ``updated`` and ``run_name``. Light: no torch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from cdlab.paths import write_json_atomic

__all__ = ["STATES", "write_status"]

STATES = ("running", "stopping", "finished", "stopped", "failed")


def write_status(run_dir: str | os.PathLike, state: str, *, step: int, max_steps: int, message: str = "",
                 student: str = "", run_name: str | None = None) -> None:
    """Replace ``run_dir/status.json`` atomically (a poll never reads half of it).

    Raises:
        ValueError: ``state`` is not one of `STATES`.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "status.json", {
        "state": state, "step": step, "max_steps": max_steps, "pid": os.getpid(), "message": message,
        "student": student or "", "updated": time.time(), "run_name": run_name or run_dir.name})
