"""A flow student's run folder, the one the app's Train tab reads: ``python -m cdlab.flow.distill ... --run-dir``.

    python -m cdlab.flow.distill --teacher runs/flow-teacher --method reflow --run-dir runs/s --name s
    python -m cdlab.flow.distill --teacher runs/flow-teacher --method reflow --run-dir runs/s --name s --resume

The training is :func:`cdlab.flow.distill.distill` (passed in by its CLI, which calls this module); this module
adds the protocol every trainer of the lab writes (`cdlab.train.status`) and its stop rules
(`cdlab.train.stopping`).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from cdlab.flow.student_checkpoint import branches_of
from cdlab.paths import cache_dir, shown_path, write_json_atomic
from cdlab.train.status import FLOW_STUDENT_RUN, MetricsWriter, write_status
from cdlab.train.stopping import StopFlag, watch_parent

__all__ = ["STUDENT_RUN_KIND", "run_in_folder"]

STUDENT_RUN_KIND = FLOW_STUDENT_RUN  # config.json's "kind" in a --run-dir (the app's Train tab)


def run_in_folder(args: argparse.Namespace, cfg: Any, *, distill: Callable, save_flow_student: Callable) -> int:
    """`cdlab.flow.distill.main` with ``--run-dir`` (``distill``, ``save_flow_student``: that module's): the same
    training, with the run-folder protocol of the Train tab
    (`cdlab.train.status`: ``config.json`` with ``"kind": "flow-student"``, ``status.json``, ``metrics.jsonl``) and
    the trainers' stop rules (`cdlab.train.stopping`). Stop saves the student as trained so far ("stopped"); a run
    whose app is gone saves no student. Either way, and every 100 steps, ``checkpoint/`` keeps the run's state,
    which ``--resume`` continues (a run cut off by a closed session loses at most 100 steps)."""
    run = Path(args.run_dir)
    if (run / "config.json").exists() and not args.resume:
        raise SystemExit(f"{run} already holds a run; continue it with --resume, or choose a new --run-dir")
    if args.resume and not (run / "config.json").exists():
        raise SystemExit(f"{run} holds no run to resume")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", {"kind": STUDENT_RUN_KIND, "run_name": run.name, "teacher": str(args.teacher),
                                            "config": asdict(cfg), "max_steps": cfg.steps})

    def status(state: str, message: str, step: int = 0) -> None:
        write_status(run, state, step=step, max_steps=cfg.steps, message=message, student=args.name)

    stop, t0 = StopFlag(), time.monotonic()
    with stop.installed(), MetricsWriter(run) as metrics:
        watch_parent(stop.on_orphaned)

        def log(line: str) -> None:
            print(line, flush=True)
            if line.startswith("reflow pairs:"):  # minutes of teacher sampling before the first step: say so
                status("running", f"drawing the teacher's pairs: {line.removeprefix('reflow pairs: ')}")

        def on_step(step: int, loss: float) -> bool:
            if metrics.write({"step": step, "loss": loss, "max_steps": cfg.steps,
                              "elapsed_s": round(time.monotonic() - t0, 3)}):
                status("running", f"step {step}", step)
            return stop.requested

        try:
            status("running", "loading the teacher" + (" and drawing its pairs" if cfg.method != "cd" else ""))
            unet, done = distill(args.teacher, cfg, init=args.init, root=args.root, device=args.device,
                                 max_seconds=args.max_seconds, on_step=on_step, checkpoint=run / "checkpoint",
                                 pair_cache=args.pair_cache or cache_dir(), log=log,
                                 should_stop=lambda: stop.requested, branch=getattr(args, "branch", False))
        except BaseException as e:
            status("failed", f"{type(e).__name__}: {e}")
            raise
    if stop.orphaned:
        status("stopped", f"stopped at step {done}: the app that started it is gone; nothing saved", done)
        return 0
    if done == 0:
        status("stopped", "stopped before its first step; nothing saved (the pairs drawn so far are cached)")
        return 0
    saved = save_flow_student(unet, args.name, cfg, args.root, teacher=args.teacher, trained_steps=done,
                              init=args.init, branches=branches_of(run / "checkpoint"))
    status("stopped" if stop.requested else "finished", f"saved {shown_path(saved)} after {done} steps", done)
    return 0
