"""The training job manager: one trainer subprocess at a time, watched through its run directory.

The trainer runs as ``python -m cdlab train ...`` in its own process group, so a crash or an
out-of-memory kill ends that process, not the app; the app reports it with the last lines of the
log. Stop sends SIGTERM (the trainer saves a checkpoint and exits) and kills the group after a
timeout; a run is never left "stopping".
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdlab.paths import REPO_ROOT, read_json
from cdlab.train.config import RUN_NAME_RE
from cdlab.ui import runs as runs_mod

LOG_NAME = "train.log"
LAUNCH_NAME = "ui_launch.json"  # what the app started: command, pid, start time (the trainer never reads it)


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
    """

    def __init__(self, runs_dir: Path, model: str, python: str | None = None, stop_timeout: float = 60.0,
                 env: dict[str, str] | None = None, cwd: Path | None = None):
        self.runs_dir = Path(runs_dir)
        self.model = model
        self.python = python or sys.executable
        self.stop_timeout = stop_timeout
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd else REPO_ROOT
        self._job: Job | None = None
        self._lock = threading.Lock()
        self._finalise_lock = threading.Lock()  # the exit watcher, the stop watcher and _reap may all finalise

    # -- queries -----------------------------------------------------------------------------
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
        run_name = str(config.get("run_name") or "")
        if not RUN_NAME_RE.fullmatch(run_name):
            raise JobError(f"Invalid run name {run_name[:40]!r}.")
        run_dir = self.runs_dir / run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise JobError(f"A run named {run_name!r} already exists in {self.runs_dir}; pick another name.")
        self._check_free()
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "ui_config.json"
        cfg_path.write_text(json.dumps({**config, "model": self.model}, indent=2))
        cmd = [self.python, "-m", "cdlab", "train", "--model", self.model, "--config", str(cfg_path),
               *(extra_args or [])]
        return self._launch(run_name, run_dir, cmd, owner_digest(owner))

    def run_owner(self, run_name: str) -> str | None:
        """The owner digest recorded when the app first started ``run_name`` (None: a CLI run, or no owner)."""
        info = read_json(self.runs_dir / run_name / LAUNCH_NAME) or {}
        owner = info.get("owner")
        return owner if isinstance(owner, str) else None

    def check_owner(self, run_name: str, owner: str | None, allow_unowned: bool = True) -> None:
        """Refuse a stop/resume of ``run_name`` from any session but the one that started it.

        Runs with no recorded owner (started by the CLI) are allowed only when ``allow_unowned``
        (a local host); a public host passes False.
        """
        recorded = self.run_owner(run_name)
        if recorded is None:
            if not allow_unowned:
                raise JobError(f"Run {run_name!r} was not started from this app; on a public host only the "
                               "browser session that started a run can stop or resume it.")
            return
        if owner_digest(owner) != recorded:
            raise JobError(f"Run {run_name!r} was started from another browser session; only that session "
                           "can stop or resume it.")

    def resume(self, run_name: str, owner: str | None = None, allow_unowned: bool = True) -> Job:
        """Continue ``run_name`` from its newest complete checkpoint (owner rules: `check_owner`)."""
        if not isinstance(run_name, str) or not RUN_NAME_RE.fullmatch(run_name):
            raise JobError(f"Invalid run name {str(run_name)[:40]!r}.")
        run_dir = self.runs_dir / run_name
        if not run_dir.is_dir():
            raise JobError(f"No run named {run_name!r} in {self.runs_dir}.")
        self.check_owner(run_name, owner, allow_unowned)
        if runs_mod.latest_checkpoint(run_dir) is None:
            raise JobError(f"Run {run_name!r} has no complete checkpoint to resume from.")
        st = runs_mod.read_status(run_dir)
        if st.get("state") == "finished":
            raise JobError(f"Run {run_name!r} already finished; start a new run to train further.")
        self._check_free()
        cmd = [self.python, "-m", "cdlab", "train", "--model", self.model, "--resume", str(run_dir)]
        return self._launch(run_name, run_dir, cmd, self.run_owner(run_name))

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
        with self._lock:
            self._check_free()
            env = {**os.environ, **trainer_thread_env(), **self.env, "PYTHONUNBUFFERED": "1"}
            log = open(run_dir / LOG_NAME, "ab")
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=str(self.cwd), start_new_session=True)
            finally:
                log.close()
            (run_dir / LAUNCH_NAME).write_text(json.dumps({"cmd": cmd, "pid": proc.pid, "started": time.time(),
                                                           "owner": owner}))
            self._job = Job(run_name, run_dir, proc, time.time(), owner=owner)
            threading.Thread(target=self._watch_exit, args=(self._job,), daemon=True).start()
            return self._job

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
        """After the process ended: make sure status.json holds a final state. Serialised: several threads
        see the same exit (one once raced another's rename of the temporary file)."""
        with self._finalise_lock:
            self._finalise_locked(j)

    def _finalise_locked(self, j: Job) -> None:
        path = j.run_dir / "status.json"
        status = read_json(path) or {}
        if status.get("state") in runs_mod.FINAL_STATES and float(status.get("updated") or 0) >= j.started - 1:
            return
        rc = j.proc.returncode
        if j.stop_requested is not None and not j.killed and rc == 0:
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
        tmp = path.with_name(f".status.json.ui-tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)

    def shutdown(self) -> None:
        """Stop the running job (used when the app exits)."""
        if self.active() is not None:
            try:
                self.stop(wait=True)
            except JobError:
                pass


def trainer_thread_env() -> dict[str, str]:
    """On a CPU-only machine the trainer gets all cores but one, so the app keeps answering while it trains
    (two processes each spinning on every core slow both down many times). A GPU trainer keeps the default;
    an explicit ``OMP_NUM_THREADS`` is respected."""
    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return {}
    n = max(1, (os.cpu_count() or 2) - 1)
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


