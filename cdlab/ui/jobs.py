"""The training job manager: one trainer subprocess at a time, watched through its run directory.

The trainer runs as ``python -m cdlab train ...`` (a LoRA student) or ``python -m cdlab.flow.train_teacher ...`` (the
flow teacher from scratch; `JobManager.start_flow_teacher`) in its own process group, so a crash or an
out-of-memory kill ends that process, not the app; the app reports it with the last lines of the
log. Stop sends SIGTERM (the trainer saves a checkpoint and exits) and kills the group after a
timeout; a run is never left "stopping".

The trainer dies with the app: it gets the app's pid (``CDLAB_PARENT_PID``) and stops at a checkpoint, without
publishing its student, once its parent is gone (`cdlab.train.stopping.watch_parent`), even after a SIGKILL of the
app. ``runs/.trainer.lock`` names the app and the trainer holding the one training slot: taken before a Start's
checks (two Starts at once: one wins, the other leaves nothing behind), released when the trainer exits, and read
by a restarted app, which stops an orphan it finds (`JobManager.reap_orphan`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch

from cdlab.flow.student_config import StudentConfig, config_flags
from cdlab.paths import REPO_ROOT, adapters_dir, read_json, shown_text, write_json_atomic
from cdlab.train.config import RUN_NAME_RE
from cdlab.train.stopping import PARENT_ENV  # the app's pid, given to its trainer: it stops when that is gone
from cdlab.ui import runs as runs_mod

LOG_NAME = "train.log"
LAUNCH_NAME = "ui_launch.json"  # what the app started: command, pid, start time, owner digest
LOCK_NAME = ".trainer.lock"     # runs/.trainer.lock: {"app_pid", "trainer_pid", "run_name", "started"}


class JobError(RuntimeError):
    """A training request the manager refuses (another job running, nothing to resume, ...)."""


@dataclass
class Job:
    run_name: str
    run_dir: Path
    proc: subprocess.Popen
    started: float
    stop_requested: float | None = None
    killed: bool = False
    owner: str | None = None  # sha256 of the starting browser session's token (None: no owner given)
    capped: bool = False  # stopped at the wall-clock cap (``max_seconds``)
    finalised: bool = False  # its final status is written (`JobManager._finalise`: once, by whoever sees the end first)


def owner_digest(token: str | None) -> str | None:
    """What is stored of a session's owner token: its SHA-256, never the token itself."""
    if not token:
        return None
    return hashlib.sha256(str(token).encode()).hexdigest()


def new_owner_token() -> str:
    """A fresh, unguessable token for one browser session (kept in its browser)."""
    return secrets.token_urlsafe(24)


class JobManager:
    """Starts, stops, resumes and reports training runs.

    Args:
        runs_dir: where run directories live (``$CDLAB_RUNS_DIR`` or ``runs/``).
        model: the ``--model`` the trainer gets (the app's teacher: ``tiny``, ``sd15`` or a path).
        python: the interpreter for the subprocess.
        stop_timeout: seconds between SIGTERM and SIGKILL.
        env: extra environment for the subprocess.
        cwd: the subprocess's working directory (default: the repository root).
        max_seconds: a run's wall-clock cap (a shared host): then it is stopped at a checkpoint. None: no cap.
    """

    def __init__(self, runs_dir: Path, model: str, python: str | None = None, stop_timeout: float = 60.0,
                 env: dict[str, str] | None = None, cwd: Path | None = None, max_seconds: float | None = None):
        self.runs_dir = Path(runs_dir)
        self.model = model
        self.python = python or sys.executable
        self.stop_timeout = stop_timeout
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self.max_seconds = max_seconds
        self._job: Job | None = None
        self._lock = threading.Lock()  # held through a Start's or Resume's checks and launch
        self._finalise_lock = threading.Lock()  # the exit watcher, the stop watcher and _reap may all finalise
        self.reap_orphan()

    # -- queries -----------------------------------------------------------------------------
    def adapters_root(self) -> Path:
        """Where this manager's trainers save their students: ``CDLAB_ADAPTERS_DIR`` as their environment has it."""
        value = self.env.get("CDLAB_ADAPTERS_DIR")
        return Path(value) if value else adapters_dir()

    def flow_teacher_run(self, name: Any) -> Path | None:
        """The folder of the flow teacher run ``name`` in ``runs/`` when it has saved weights (a student can be
        distilled from it), else None: not a run name (``fullmatch``), not a flow teacher's run, or no weights yet."""
        if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name):
            return None
        folder = self.runs_dir / name
        ok = runs_mod.run_kind(folder) == runs_mod.FLOW_TEACHER and runs_mod.resumable(folder)
        return folder if ok else None

    @property
    def job(self) -> Job | None:
        return self._job

    def active(self) -> Job | None:
        """The job this app started, if its process is still alive."""
        j = self._job
        return j if j is not None and j.proc.poll() is None else None

    def busy_elsewhere(self) -> runs_mod.RunInfo | None:
        """A run started outside this app (the CLI) whose trainer process is alive."""
        mine = self._job.run_name if self._job else None
        for r in runs_mod.list_runs(self.runs_dir):
            if r.name != mine and r.state in ("running", "stopping") and runs_mod.pid_alive(r.pid):
                return r
        return None

    def state(self, run_name: str) -> dict[str, Any]:
        """The run's status, with this app's knowledge of its own process layered on top.

        Returns a dict with ``state`` (queued/running/stopping/finished/failed/stopped), ``message``,
        ``step``, ``max_steps`` and ``log_tail`` (set for failures).
        """
        run_dir = self.runs_dir / run_name
        self._reap()
        status = runs_mod.read_status(run_dir)
        j = self._job
        if j is not None and j.run_name == run_name and j.proc.poll() is None:
            if j.stop_requested is not None:
                status["state"] = "stopping"
            elif float(status.get("updated") or 0) < j.started - 1:
                status["state"] = "queued"  # no status from this process yet (an old one is from a past attempt)
            elif status.get("state") in runs_mod.FINAL_STATES:
                # The trainer wrote its last status but its process is still exiting: the slot is not free
                # yet, so the page must not say "finished" and then refuse the next Start.
                status["state"] = "finishing"
        if status.get("state") == "failed":
            status["log_tail"] = runs_mod.tail(run_dir / LOG_NAME, 20)
        return status

    # -- actions -----------------------------------------------------------------------------
    def start(self, config: dict[str, Any], extra_args: list[str] | None = None, owner: str | None = None) -> Job:
        """Write ``config`` (a resolved trainer config, with ``run_name``) to its run directory and launch
        ``python -m cdlab train --model M --config FILE`` on it. ``owner`` is the starting session's token:
        only a request with the same token may stop or resume the run (`stop`, `resume`)."""
        return self._start_new({**config, "model": self.model}, lambda cfg_path, run_dir: [
            self.python, "-m", "cdlab", "train", "--model", self.model, "--config", str(cfg_path), *(extra_args or [])],
            owner)

    def start_flow_teacher(self, settings: dict[str, Any], owner: str | None = None) -> Job:
        """Launch ``python -m cdlab.flow.train_teacher`` on a new run folder: the class-conditioned flow teacher from
        scratch. ``settings`` are checked ones (`cdlab.ui.flow_train.form_to_settings`): ``run_name``, ``minutes``,
        ``grid_steps`` and `cdlab.flow.train_teacher.TeacherConfig` fields; the same slot, owner and stop rules as
        `start`."""
        return self._start_new({**settings, "kind": runs_mod.FLOW_TEACHER},
                               lambda cfg_path, run_dir: flow_teacher_command(self.python, run_dir, settings), owner)

    def start_flow_student(self, settings: dict[str, Any], owner: str | None = None) -> Job:
        """Launch ``python -m cdlab.flow.distill --run-dir`` on a new run folder: a few-step student of the flow
        teacher run ``settings["teacher_run"]`` (checked ones: `cdlab.ui.flow_train.student_settings`), saved as
        every student is, ``adapters/<run name>/`` with its card (never replacing one: a name taken is refused); the
        same slot, owner and stop rules as `start` (a student run has no Resume)."""
        name = str(settings.get("teacher_run") or "")
        teacher = self.flow_teacher_run(name)
        if teacher is None:
            raise JobError(f"No flow teacher run named {name[:40]!r} with saved weights in runs/.")
        if settings.get("init"):  # the student it starts from: one of this teacher run's, of no larger rank
            from cdlab.flow.distill import init_card
            from cdlab.students import StudentError

            try:
                init_card(settings["init"], self.adapters_root(), teacher, lora_rank=settings.get("lora_rank"))
            except StudentError as e:
                raise JobError(f"Start from student: {shown_text(str(e))}") from None
        return self._start_new({**settings, "kind": runs_mod.FLOW_STUDENT},
                               lambda cfg_path, run_dir: flow_student_command(self.python, teacher, run_dir, settings),
                               owner)

    def _start_new(self, ui_config: dict[str, Any], command, owner: str | None) -> Job:
        """A new run: its folder (refused when it holds anything), the slot, ``ui_config.json`` and the launch of
        ``command(cfg_path, run_dir)``; on any failure the slot is released and a folder made here removed."""
        run_name = str(ui_config.get("run_name") or "")
        if not RUN_NAME_RE.fullmatch(run_name):
            raise JobError(f"Invalid run name {run_name[:40]!r}.")
        run_dir = self.runs_dir / run_name
        with self._lock:  # the checks and the launch as one: a second Start waits, then is refused
            if run_dir.exists() and any(run_dir.iterdir()):
                raise JobError(f"A run named {run_name!r} already exists in runs/; pick another name.")
            self._check_free()
            made = not run_dir.exists()
            self._claim_slot(run_name)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg_path = run_dir / "ui_config.json"
                write_json_atomic(cfg_path, ui_config)
                return self._launch(run_name, run_dir, command(cfg_path, run_dir), owner_digest(owner))
            except BaseException:
                self._release_slot(None)
                if made:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise

    def run_owner(self, run_name: str) -> str | None:
        """The owner digest recorded when the app first started ``run_name`` (None: a CLI run, or no owner)."""
        info = read_json(self.runs_dir / run_name / LAUNCH_NAME) or {}
        owner = info.get("owner")
        return owner if isinstance(owner, str) else None

    def student_owner(self, student: str, adapters_root: Path) -> str | None:
        """The owner digest of student ``student``: its card names the run that made it
        (``training_config.run_name``), whose `run_owner` it is. None: not trained from this app, or no card."""
        card = read_json(Path(adapters_root) / student / "card.json") or {}
        run = (card.get("training_config") or {}).get("run_name") if isinstance(card.get("training_config"), dict) \
            else None
        return self.run_owner(run) if isinstance(run, str) and RUN_NAME_RE.fullmatch(run) else None

    def check_replace(self, student: str, adapters_root: Path, owner: str | None, allow_unowned: bool = True,
                      override: bool = False) -> None:
        """Refuse to overwrite student ``student`` from any session but the one whose run made it (``override``:
        the instructor may). A student not trained from this app is replaced only when ``allow_unowned``."""
        if override or not (Path(adapters_root) / student).exists():
            return
        recorded = self.student_owner(student, adapters_root)
        if recorded is None and not allow_unowned:
            raise JobError(f"Student {student!r} was not trained from this app; on a shared host only the instructor "
                           "can replace it. Pick another name.")
        if recorded is not None and owner_digest(owner) != recorded:
            raise JobError(f"Student {student!r} was trained from another browser session; only that session (or the "
                           "instructor) can replace it. Pick another name.")

    def check_owner(self, run_name: str, owner: str | None, allow_unowned: bool = True,
                    override: bool = False) -> None:
        """Refuse a stop/resume of ``run_name`` from any session but the one that started it (``override``: the
        instructor may).

        Runs with no recorded owner (started by the CLI) are allowed only when ``allow_unowned``
        (a local host); a public host passes False.
        """
        if override:
            return
        recorded = self.run_owner(run_name)
        if recorded is None:
            if not allow_unowned:
                raise JobError(f"Run {run_name!r} was not started from this app; on a public host only the "
                               "browser session that started a run can stop or resume it.")
            return
        if owner_digest(owner) != recorded:
            raise JobError(f"Run {run_name!r} was started from another browser session; only that session "
                           "can stop or resume it.")

    def resume(self, run_name: str, owner: str | None = None, allow_unowned: bool = True,
               override: bool = False) -> Job:
        """Continue ``run_name`` from its newest complete checkpoint (owner rules: `check_owner`)."""
        if not isinstance(run_name, str) or not RUN_NAME_RE.fullmatch(run_name):
            raise JobError(f"Invalid run name {str(run_name)[:40]!r}.")
        run_dir = self.runs_dir / run_name
        if not run_dir.is_dir():
            raise JobError(f"No run named {run_name!r} in runs/.")
        self.check_owner(run_name, owner, allow_unowned, override)
        if not runs_mod.resumable(run_dir):
            raise JobError(f"Run {run_name!r} has no complete checkpoint to resume from.")
        st = runs_mod.read_status(run_dir)
        if st.get("state") == "finished":
            raise JobError(f"Run {run_name!r} already finished; start a new run to train further.")
        with self._lock:
            self._check_free()
            self._claim_slot(run_name)
            try:
                cmd = flow_teacher_command(self.python, run_dir, None) \
                    if runs_mod.run_kind(run_dir) == runs_mod.FLOW_TEACHER else \
                    [self.python, "-m", "cdlab", "train", "--model", self.model, "--resume", str(run_dir)]
                return self._launch(run_name, run_dir, cmd, self.run_owner(run_name))
            except BaseException:
                self._release_slot(None)
                raise

    def stop(self, run_name: str | None = None, wait: bool = False, owner: str | None = None,
             check_owner: bool = False) -> str:
        """SIGTERM the trainer (it checkpoints and exits); SIGKILL its group after ``stop_timeout`` s. Returns
        the run's name.

        With ``check_owner`` (every request from the app) only the session whose token started the run
        may stop it; the app's own shutdown stops without.
        """
        j = self._job
        if j is None or (run_name and j.run_name != run_name) or j.proc.poll() is not None:
            raise JobError("No training job of this app is running.")
        if check_owner and j.owner is not None and owner_digest(owner) != j.owner:
            raise JobError(f"Run {j.run_name!r} was started from another browser session; only that session "
                           "can stop it.")
        if j.stop_requested is None:
            j.stop_requested = time.time()
            _signal_group(j.proc, signal.SIGTERM)
            threading.Thread(target=self._watch_stop, args=(j,), daemon=True).start()
        if wait:
            j.proc.wait()
            self._reap()
        return j.run_name

    def _launch(self, run_name: str, run_dir: Path, cmd: list[str], owner: str | None = None) -> Job:
        """Start the trainer (the caller holds ``_lock`` and the slot): its log, ``ui_launch.json``, the lock's
        trainer pid, the exit watcher and the wall-clock cap."""
        env = {**os.environ, **trainer_thread_env(), **self.env, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        log = open(run_dir / LOG_NAME, "ab")
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(self.cwd), start_new_session=True)
        finally:
            log.close()
        started = time.time()
        write_json_atomic(run_dir / LAUNCH_NAME, {"cmd": cmd, "pid": proc.pid, "started": started, "owner": owner})
        write_json_atomic(self.runs_dir / LOCK_NAME, {"app_pid": os.getpid(), "trainer_pid": proc.pid,
                                                      "run_name": run_name, "started": started})
        self._job = job = Job(run_name, run_dir, proc, started, owner=owner)
        threading.Thread(target=self._watch_exit, args=(job,), daemon=True).start()
        if self.max_seconds:
            cap = threading.Timer(self.max_seconds, self._time_up, args=(job,))
            cap.daemon = True
            cap.start()
        return job

    def _time_up(self, j: Job) -> None:
        """The wall-clock cap: stop the run at a checkpoint, as Stop does."""
        if self._job is j and j.proc.poll() is None and j.stop_requested is None:
            j.capped = True
            try:
                self.stop(j.run_name)
            except JobError:
                pass

    # -- the training slot: runs/.trainer.lock ------------------------------------------------
    def _read_lock(self) -> dict[str, Any] | None:
        return read_json(self.runs_dir / LOCK_NAME)

    def _slot_holder(self) -> str | None:
        """Who holds ``runs/.trainer.lock`` now (None: nobody alive): a trainer that is running, or an app that
        has just claimed the slot and not yet launched."""
        info = self._read_lock()
        if info is None:
            return None
        trainer, app = _int(info.get("trainer_pid")), _int(info.get("app_pid"))
        if trainer and _is_trainer(trainer):
            return f"run {str(info.get('run_name'))[:40]!r} (trainer pid {trainer}, app pid {app})"
        if not trainer and app and app != os.getpid() and runs_mod.pid_alive(app):
            return f"another app (pid {app}) starting a run"
        return None

    def _claim_slot(self, run_name: str) -> None:
        """Take ``runs/.trainer.lock`` (created exclusively; a stale one, whose processes are gone, is replaced)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.runs_dir / LOCK_NAME
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._slot_holder()
                if holder is not None:
                    raise JobError(f"The training slot is taken by {holder}; one training job at a time.") from None
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"app_pid": os.getpid(), "trainer_pid": None, "run_name": run_name,
                           "started": time.time()}, f)
            return
        raise JobError("The training slot is being taken by another app; one training job at a time.")

    def _release_slot(self, trainer_pid: int | None) -> None:
        """Remove the lock if it is this app's, for this trainer (None: a claim that launched nothing)."""
        info = self._read_lock()
        if info and _int(info.get("app_pid")) == os.getpid() and _int(info.get("trainer_pid")) == trainer_pid:
            (self.runs_dir / LOCK_NAME).unlink(missing_ok=True)

    def reap_orphan(self) -> int | None:
        """At start: a trainer left by an app that is gone (the lock names a dead app and a live trainer) is sent
        SIGTERM; it stops at a checkpoint and publishes nothing. Returns its pid (None: no orphan)."""
        info = self._read_lock() or {}
        trainer, app = _int(info.get("trainer_pid")), _int(info.get("app_pid"))
        if trainer and _is_trainer(trainer) and not (app and runs_mod.pid_alive(app)):
            try:
                os.killpg(trainer, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            return trainer
        return None

    def _check_free(self) -> None:
        self._reap()
        j = self.active()
        if j is not None and (j.stop_requested is not None or
                              runs_mod.read_status(j.run_dir).get("state") in runs_mod.FINAL_STATES):
            try:  # a trainer that has saved and said its last word exits within moments
                j.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self._reap()
        if self.active() is not None:
            raise JobError(f"A training job is already running ({self._job.run_name}); "
                           "stop it first: one training job at a time.")
        other = self.busy_elsewhere()
        if other is not None:
            raise JobError(f"A training run started elsewhere is running ({other.name}, pid {other.pid}); "
                           "one training job at a time.")
        holder = self._slot_holder()
        if holder is not None:
            raise JobError(f"The training slot is taken by {holder}; one training job at a time.")

    def _watch_stop(self, j: Job) -> None:
        try:
            j.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            j.killed = True
            _signal_group(j.proc, signal.SIGKILL)
            j.proc.wait()
        self._finalise(j)

    def _watch_exit(self, j: Job) -> None:
        j.proc.wait()
        self._finalise(j)

    def _reap(self) -> None:
        j = self._job
        if j is not None and j.proc.poll() is not None:
            self._finalise(j)

    def _finalise(self, j: Job) -> None:
        """After the process ended: make sure status.json holds a final state, once. Serialised: several threads
        see the same exit (the exit watcher, the stop watcher, a waiting ``stop``; one once raced another's rename
        of the temporary file), and the later ones return at once instead of reading and writing the run again."""
        with self._finalise_lock:
            if j.finalised:
                return
            self._finalise_locked(j)
            self._release_slot(j.proc.pid)
            j.finalised = True

    def _finalise_locked(self, j: Job) -> None:
        if not j.run_dir.is_dir():  # the run's folder was deleted while its trainer ended: nothing left to record
            return
        path = j.run_dir / "status.json"
        status = read_json(path) or {}
        done = status.get("state") in runs_mod.FINAL_STATES and float(status.get("updated") or 0) >= j.started - 1
        if done and not j.capped:
            return
        rc = j.proc.returncode
        if j.capped:  # the trainer said "stopped at a checkpoint"; the page says why
            state = status.get("state") if done else "stopped"
            msg = f"stopped at this host's time limit ({self.max_seconds:g} s a run)" + (
                f"; {status.get('message')}" if done and status.get("message") else "")
        elif j.stop_requested is not None and not j.killed and rc == 0:
            state, msg = "stopped", "stopped by the user"
        elif j.stop_requested is not None:
            state, msg = "stopped", f"killed after not stopping within {self.stop_timeout:g} s" if j.killed else \
                f"stopped (exit code {rc})"
        elif rc == 0:
            state, msg = (status.get("state") if status.get("state") in runs_mod.FINAL_STATES else "finished"), \
                status.get("message") or "finished"
        else:
            state, msg = "failed", f"the trainer exited with code {rc}" + (
                " (killed: out of memory?)" if rc in (-9, 137) else "")
        status.update(state=state, message=msg, updated=time.time(), pid=j.proc.pid)
        write_json_atomic(path, status)

    def shutdown(self) -> None:
        """Stop the running job (used when the app exits)."""
        if self.active() is not None:
            try:
                self.stop(wait=True)
            except JobError:
                pass


FLOW_RESUME_DEFAULTS = {"minutes": 15.0, "sample_steps": 50}  # a resumed flow run whose config.json lacks them


def flow_teacher_command(python: str, run_dir: Path, settings: dict[str, Any] | None) -> list[str]:
    """The flow teacher's command line: a new run from checked ``settings``, or (None) ``--resume`` of ``run_dir``
    with the time budget and grid steps its ``config.json`` recorded (each checked; else `FLOW_RESUME_DEFAULTS`)."""
    cmd = [python, "-m", "cdlab.flow.train_teacher", "--out", str(run_dir)]
    if settings is None:
        saved = read_json(Path(run_dir) / "config.json") or {}
        minutes, steps = saved.get("minutes"), saved.get("sample_steps")
        ok = lambda v, lo, hi, kinds: isinstance(v, kinds) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
        minutes = minutes if ok(minutes, 0.01, 1440, (int, float)) else FLOW_RESUME_DEFAULTS["minutes"]
        steps = steps if ok(steps, 1, 1000, int) else FLOW_RESUME_DEFAULTS["sample_steps"]
        return [*cmd, "--resume", "--minutes", f"{float(minutes):g}", "--grid-steps", str(steps)]
    flags = ("num_hiddens", "batch_size", "lr", "num_epochs", "epoch_images", "grid_steps")
    shown = {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in settings.items()}
    return [*cmd, "--minutes", f"{float(settings['minutes']):g}",
            *[x for k in flags for x in ("--" + k.replace("_", "-"), shown[k])]]


def flow_student_command(python: str, teacher_dir: Path, run_dir: Path, settings: dict[str, Any]) -> list[str]:
    """``python -m cdlab.flow.distill`` on a teacher run, writing ``run_dir`` and its student ``adapters/<run name>``,
    from the student ``settings["init"]`` when set: the form's main numbers always, every other setting where it
    differs from the CLI's default (`cdlab.flow.student_config.config_flags`), and the discriminator's rate only
    with the GAN term."""
    fields = {f.name for f in dataclass_fields(StudentConfig)}
    recipe = {k: v for k, v in settings.items() if k in fields and (k != "disc_lr" or settings.get("gan_weight"))}
    always = ("method", "steps", "batch_size", "lr", "pairs", "guidance", "lora_rank", "windows", "num_boundaries")
    init = ["--init", settings["init"]] if settings.get("init") else []
    return [python, "-m", "cdlab.flow.distill", "--teacher", str(teacher_dir), "--run-dir", str(run_dir),
            "--name", Path(run_dir).name, *init, *config_flags(recipe, always)]


def trainer_thread_env() -> dict[str, str]:
    """On a CPU-only machine the trainer gets all cores but one, so the app keeps answering while it trains
    (two processes each spinning on every core slow both down many times). A GPU trainer keeps the default;
    an explicit ``OMP_NUM_THREADS`` is respected."""
    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return {}
    n = max(1, (os.cpu_count() or 2) - 1)
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _is_trainer(pid: int) -> bool:
    """Whether ``pid`` is alive and (where ``/proc`` tells) a ``cdlab`` process, not a recycled pid."""
    if not runs_mod.pid_alive(pid):
        return False
    try:
        return b"cdlab" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


