"""Reading training run directories (written by ``cdlab.train``): metrics, status, previews, the loss chart's data.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per line with ``step``,
``loss``, ``lr``, ``samples_per_s``, ``elapsed_s``, ``peak_mem_mb``, ``max_steps``), ``previews/``
(``reference.png`` and ``step_XXXXXX.png``: see `cdlab.ui.previews`), ``checkpoints/ckpt_XXXXXX/`` and
``status.json``. Runs started from the CLI and from the app look the same, so the app lists both.

A flow teacher's run (``python -m cdlab.flow.train_teacher``, `run_kind` ``"flow-teacher"``) speaks the same
protocol (``status.json``, ``metrics.jsonl``, ``previews/step_*.png``, ``config.json``); its checkpoint is the
folder's own ``state.json`` and ``unet.safetensors`` instead of ``checkpoints/`` (`resumable`).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cdlab.paths import read_json
from cdlab.train.checkpoints import CKPT_RE, evenly_spaced, latest_checkpoint  # latest_checkpoint: re-exported
from cdlab.train.status import FLOW_STUDENT_RUN as FLOW_STUDENT
from cdlab.train.status import FLOW_TEACHER_RUN as FLOW_TEACHER
from cdlab.ui.previews import student_previews

ACTIVE_STATES = ("queued", "running", "stopping", "finishing")
FINAL_STATES = ("finished", "failed", "stopped")
_CKPT_RE = CKPT_RE  # the one checkpoint-name pattern, from cdlab.train.checkpoints


@dataclass
class RunInfo:
    """One run directory, summarised for the runs list."""

    name: str
    path: Path
    state: str
    step: int = 0
    max_steps: int = 0
    student: str = ""
    message: str = ""
    updated: float = 0.0
    pid: int | None = None

    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.updated)) if self.updated else "?"
        return f"{self.name} · {self.state} · step {self.step}/{self.max_steps or '?'} · {when}"


@dataclass
class Progress:
    """Where a run stands, from its newest metrics line and status."""

    step: int = 0
    max_steps: int = 0
    samples_per_s: float | None = None
    eta_s: float | None = None
    peak_mem_mb: float | None = None
    loss: float | None = None
    points: int = 0
    resumes: list[int] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists (and is not a zombie we could reap)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); /proc tells the truth on Linux
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def read_status(run_dir: Path) -> dict[str, Any]:
    """``status.json`` corrected for dead processes: an active state whose pid is gone reads "failed".

    A run that never wrote a status (the trainer still importing) reads "queued".
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / "status.json")
    if status is None:
        return {"state": "queued", "step": 0, "max_steps": 0, "message": "", "student": "", "updated": 0.0}
    status = dict(status)
    state = str(status.get("state", "queued"))
    if state in ACTIVE_STATES and status.get("pid") and not pid_alive(int(status["pid"])):
        status["state"] = "failed"
        status["message"] = (status.get("message") or "") + " (the trainer process is gone)"
    return status


@dataclass
class _MetricsReader:
    """What has been read of one ``metrics.jsonl``: up to ``offset`` (a whole number of lines), and its rows."""

    inode: int = -1
    offset: int = 0
    by_step: dict[int, dict[str, Any]] = field(default_factory=dict)
    resumed_at: set[int] = field(default_factory=set)
    last: int = -1

    def feed(self, data: bytes) -> None:
        """Parse whole lines of ``data`` (read from ``offset``); a trailing half-written line waits for the next read."""
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
                float(row["loss"])
            except (ValueError, KeyError, TypeError):
                continue
            if step <= self.last:
                self.resumed_at.add(step)
            self.last = step
            self.by_step[step] = row
        self.offset += end


_READERS: dict[str, _MetricsReader] = {}  # path -> what was read: each poll reads only the new lines
_MAX_READERS = 64


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics of a run, one dict per step, sorted by step.

    After a resume the trainer replays steps past the checkpoint; for a step logged twice the later
    line wins, so the curve stays a function of the step. Malformed or half-written lines are skipped.
    Each row gets ``resumed: True`` where the file went back in steps (a resume point).

    The file is read incrementally: a poll (every open Train tab, each second) reads only the lines added since
    the last one; a file that was replaced or shrank is read again from the start.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = str(path.resolve())
            reader = _READERS.get(key)
            if reader is None or reader.inode != st.st_ino or st.st_size < reader.offset:
                if len(_READERS) >= _MAX_READERS:
                    _READERS.clear()
                reader = _READERS[key] = _MetricsReader(inode=st.st_ino)
            if st.st_size > reader.offset:
                f.seek(reader.offset)
                reader.feed(f.read(st.st_size - reader.offset))
    except OSError:
        return []
    return [dict(reader.by_step[s], resumed=s in reader.resumed_at) for s in sorted(reader.by_step)]


def run_kind(run_dir: Path) -> str:
    """What a run trains, from its ``config.json`` (or before that the app's ``ui_config.json``): ``"flow-teacher"``
    (``python -m cdlab.flow.train_teacher``), ``"flow-student"`` (``python -m cdlab.flow.distill --run-dir``) or
    ``"distill"`` (``python -m cdlab train``: a LoRA student of the diffusion teachers)."""
    for name in ("config.json", "ui_config.json"):
        cfg = read_json(Path(run_dir) / name)
        if cfg is not None:
            return cfg["kind"] if cfg.get("kind") in (FLOW_TEACHER, FLOW_STUDENT) else "distill"
    return "distill"


def resumable(run_dir: Path) -> bool:
    """Whether a run has a checkpoint to continue from: a flow teacher's ``state.json`` and weights, a
    distillation run's newest ``checkpoints/ckpt_*``; a flow student's run has none here (its Stop saves the
    student; its ``checkpoint/`` is for ``python -m cdlab.flow.distill --resume`` after a kill)."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if kind == FLOW_TEACHER:
        return (run_dir / "state.json").is_file() and (run_dir / "unet.safetensors").is_file()
    return kind == "distill" and latest_checkpoint(run_dir) is not None


def resume_points(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("resumed")]


def ema(values: list[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average, debiased like Adam's moments so the start is not pulled to 0.

    ``alpha`` defaults to a window of about a tenth of the points (at least 1, at most 0.5 weight).
    """
    if not values:
        return []
    if alpha is None:
        alpha = min(0.5, max(2.0 / (len(values) / 10 + 1), 0.02))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        norm = (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def progress(rows: list[dict[str, Any]], status: dict[str, Any] | None = None) -> Progress:
    """Step, rate, ETA and memory from the newest metrics row (the status fills in before any metric)."""
    status = status or {}
    p = Progress(step=int(status.get("step") or 0), max_steps=int(status.get("max_steps") or 0))
    if rows:
        r = rows[-1]
        p.step = max(p.step, int(r["step"])) if status.get("state") != "finished" else int(r["step"])
        p.max_steps = int(r.get("max_steps") or p.max_steps or 0)
        p.loss = float(r["loss"])
        if r.get("samples_per_s") is not None:
            p.samples_per_s = float(r["samples_per_s"])
        if r.get("peak_mem_mb") is not None:
            p.peak_mem_mb = float(r["peak_mem_mb"])
        p.points = len(rows)
        p.resumes = resume_points(rows)
        # ETA from the step rate over the newest stretch (after the last resume, elapsed restarts).
        tail = [x for x in rows if x.get("elapsed_s") is not None and int(x["step"]) >= (p.resumes[-1] if p.resumes else 0)]
        if len(tail) >= 2 and p.max_steps:
            dt = float(tail[-1]["elapsed_s"]) - float(tail[0]["elapsed_s"])
            ds = int(tail[-1]["step"]) - int(tail[0]["step"])
            if dt > 0 and ds > 0:
                p.eta_s = max(0.0, (p.max_steps - p.step) * dt / ds)
    return p


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_markdown(p: Progress, state: str) -> str:
    """One line for the page: state, step, rate, ETA, peak memory, number of loss points."""
    pct = f"{100 * p.fraction:.0f}%"
    parts = [
        f"**{state}**",
        f"step {p.step}/{p.max_steps or '?'} ({pct})",
        f"{p.samples_per_s:.1f} samples/s" if p.samples_per_s is not None else "– samples/s",
        f"ETA {format_duration(p.eta_s)}" if state in ACTIVE_STATES else "",
        f"peak memory {p.peak_mem_mb:.0f} MB" if p.peak_mem_mb is not None else "",
        f"loss points: {p.points}",
        f"last loss {p.loss:.4f}" if p.loss is not None else "",
    ]
    return " · ".join(x for x in parts if x)


def progress_html(p: Progress, state: str) -> str:
    """A progress bar that needs no JavaScript."""
    color = {"failed": "#d33", "stopped": "#c80", "finished": "#2a2"}.get(state, "#36c")
    pct = 100 * p.fraction
    return (
        f'<div class="cdlab-progress" data-state="{state}" style="border:1px solid #888;border-radius:4px;height:14px">'
        f'<div style="width:{pct:.1f}%;height:100%;background:{color};border-radius:3px"></div></div>'
    )


LOSS_SERIES = ("loss", "loss (EMA)", "probe loss")
MAX_PLOT_POINTS = 1500  # raw points per series sent to the browser each poll (the EMA is over every row)


_thin = evenly_spaced  # the loss chart's points: at most a limit, first and last kept


def loss_frame(rows: list[dict[str, Any]], max_points: int = MAX_PLOT_POINTS):
    """The loss chart's data as a long pandas DataFrame: columns ``step`` (int), ``loss`` (float), ``series``.

    Series: ``"loss"`` (each logged point), ``"loss (EMA)"`` (`ema` of it), ``"probe loss"`` (the trainer's
    fixed probe batch, when logged) and, for each resume point S, ``"resumed at step S"``: two rows at step S
    spanning the loss range, drawn as a vertical line. ``rows`` come from `read_metrics`, one per step (a
    resumed run's replayed steps appear once), so every series is a function of the step. Long runs are
    thinned to ``max_points`` rows per series (first and last kept)."""
    cols = {"step": [], "loss": [], "series": []}

    def add(series: str, steps: list[int], values: list[float]) -> None:
        cols["step"] += steps
        cols["loss"] += values
        cols["series"] += [series] * len(steps)

    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    keep = _thin(list(range(len(rows))), max_points)
    smooth = ema(loss)
    add("loss", [steps[i] for i in keep], [loss[i] for i in keep])
    add("loss (EMA)", [steps[i] for i in keep], [smooth[i] for i in keep])
    probe = [i for i, r in enumerate(rows) if r.get("probe_loss") is not None and math.isfinite(float(r["probe_loss"]))]
    if probe:
        probe = _thin(probe, max_points)
        add("probe loss", [steps[i] for i in probe], [float(rows[i]["probe_loss"]) for i in probe])
    finite = [v for v in cols["loss"] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        for s in resume_points(rows):
            add(f"resumed at step {s}", [s, s], [lo, hi])
    return pd.DataFrame({"step": pd.Series(cols["step"], dtype="int64"),
                         "loss": pd.Series(cols["loss"], dtype="float64"),
                         "series": pd.Series(cols["series"], dtype="object")})


def latest_preview(run_dir: Path) -> tuple[Path, int] | None:
    """The newest preview image of a run and its step, or None."""
    found = student_previews(run_dir)
    return (found[-1][1], found[-1][0]) if found else None


def run_info(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    st = read_status(run_dir)
    try:
        updated = float(st.get("updated") or run_dir.stat().st_mtime)
    except OSError:
        updated = 0.0
    return RunInfo(
        name=run_dir.name, path=run_dir, state=str(st.get("state", "queued")), step=int(st.get("step") or 0),
        max_steps=int(st.get("max_steps") or 0), student=str(st.get("student") or ""),
        message=str(st.get("message") or ""), updated=updated, pid=st.get("pid"),
    )


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Every run directory under ``runs_dir`` (a folder with config.json, status.json or metrics), newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    for d in runs_dir.iterdir():
        if d.is_dir() and any((d / f).exists() for f in ("config.json", "status.json", "metrics.jsonl", "ui_launch.json")):
            out.append(run_info(d))
    return sorted(out, key=lambda r: r.updated, reverse=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' when missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
