"""``status.json`` and ``metrics.jsonl``: what a trainer says about its run, in the shape the Train tab reads
(`cdlab.ui.runs`).

Written by the distillation trainer (`cdlab.train.trainer.Trainer.status`) and the flow teacher's
(`cdlab.flow.train_teacher`): ``state`` (running / stopping, then finished / stopped / failed), ``step``,
``max_steps``, ``pid`` (the app reads a dead pid under an active state as "failed"), ``message``, ``student`` (the
student it publishes; "" for a teacher run), ``updated`` and ``run_name``. `MetricsWriter` appends the loss
rows (one JSON object a line with ``step`` and ``loss``) of the flow trainers, flushed often enough that the
page's curve moves live. Light: no torch.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cdlab.paths import write_json_atomic

__all__ = ["STATES", "FLOW_TEACHER_RUN", "FLOW_STUDENT_RUN", "write_status", "MetricsWriter"]

STATES = ("running", "stopping", "finished", "stopped", "failed")
# config.json's "kind" of a flow run, how the Train tab tells it from a distillation run (which has none): the flow
# teacher's (`cdlab.flow.train_teacher`) and a flow student's (`cdlab.flow.distill --run-dir`).
FLOW_TEACHER_RUN, FLOW_STUDENT_RUN = "flow-teacher", "flow-student"


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


class MetricsWriter:
    """Appends rows to ``run_dir/metrics.jsonl`` (a context manager); flushed every ``every_steps`` rows or
    ``every_s`` seconds, and at the end. `write` returns whether it flushed (a moment to update the status too)."""

    def __init__(self, run_dir: str | os.PathLike, every_steps: int = 10, every_s: float = 2.0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.every_steps, self.every_s = every_steps, every_s

    def __enter__(self) -> "MetricsWriter":
        self.file = open(self.path, "a", encoding="utf-8")
        self.rows, self.flushed = 0, time.monotonic()
        return self

    def write(self, row: dict[str, Any]) -> bool:
        self.file.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.rows % self.every_steps == 0 or time.monotonic() - self.flushed > self.every_s:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        self.file.flush()
        self.flushed = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.file.close()
