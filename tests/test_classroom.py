"""A classroom on one laptop (issue 23): ``--host`` not loopback is shared, and its powerful actions belong to the
instructor; students own what they train; the trainer dies with the app; shared resources are pruned; publishing a
student survives a kill.

The served app runs on 127.0.0.1 with ``CDLAB_CLASSROOM=1`` (the policy of ``--host 0.0.0.0`` without an external
interface; `test_hosts_are_classified` checks that 0.0.0.0 gets it) and a known instructor token. A second session
is a gradio client without the token.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdlab.paths import REPO_ROOT, TINY_ID

TOKEN = "instructor-secret-for-tests"
CAP_S = 15  # the classroom app's wall-clock cap per run (CDLAB_SHARED_MAX_SECONDS)


def _form(**change):
    """A cheap run on the tiny world: few data, no previews; ``max_steps`` large enough to be stopped."""
    values = dict(method="cd", num_boundaries=1, lora_rank=4, lr=1e-3, max_steps=5000, batch_size=8,
                  guidance=3.0, guidance_max=3.0, preview_every=0, student_name="", data_kind="tiny world",
                  data_path="", extra_config='{"data_size": 64, "log_every": 1}', overwrite=False, owner="",
                  instructor_token="")
    values.update(change)
    return values


def _wait(pred, timeout: float, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return None


def _status(run_dir: Path) -> dict:
    from cdlab.paths import read_json

    return read_json(run_dir / "status.json") or {}


def _serve(work: Path, **env):
    from cdlab.ui.bench import serve_app

    return serve_app("tiny", work, env={"OMP_NUM_THREADS": "1", "CDLAB_CACHE_DIR": str(work.parent / "cache"), **env})


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The classroom app (instructor token `TOKEN`, a run capped at `CAP_S` s) with two random students."""
    from cdlab.ui.bench import make_random_students

    root = tmp_path_factory.mktemp("classroom")
    work = root / "work"
    students = make_random_students(TINY_ID, work / "adapters", n=2)
    with _serve(work, CDLAB_CLASSROOM="1", CDLAB_INSTRUCTOR_TOKEN=TOKEN,
                CDLAB_SHARED_MAX_SECONDS=str(CAP_S)) as url:
        yield SimpleNamespace(url=url, work=work, students=students)


def _client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def _refused(call, match: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        call()
    assert match.lower() in str(e.value).lower(), str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------- who is shared


def test_hosts_are_classified_and_the_secret_is_fixed(tmp_path, monkeypatch):
    from cdlab.ui import hosting as H

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv(H.CLASSROOM_ENV, raising=False)
    monkeypatch.delenv(H.INSTRUCTOR_ENV, raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.7", "lab-laptop.local", ""):
        assert not H.is_loopback(host), host
        policy, token = H.host_policy(host)
        assert policy.classroom and policy.shared and token and policy.is_instructor(token), host
        assert not policy.is_instructor(token + "x") and not policy.is_instructor("") and not policy.is_instructor(None)
        assert policy.max_steps == H.SHARED_MAX_STEPS
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", None):
        assert H.is_loopback(host), host
        policy, token = H.host_policy(host)
        assert not policy.shared and token is None and policy.max_seconds is None, host
        policy.require_instructor(None, "Training")  # loopback: everything as before
    assert H.host_policy("0.0.0.0", instructor_token="given")[1] == "given"
    assert H.host_policy("0.0.0.0")[1] != H.host_policy("0.0.0.0")[1]  # generated: fresh each start
    public, token = H.host_policy("0.0.0.0", share=True)  # --share: today's public rules, no instructor
    assert public.public and not public.classroom and token is None
    with pytest.raises(H.HostRuleError, match="Training on a shared host belongs to the instructor"):
        H.host_policy("0.0.0.0")[0].require_instructor("wrong", "Training")
    secret = H.app_secret(tmp_path)
    assert len(secret) >= 32 and H.app_secret(tmp_path) == secret
    assert stat.S_IMODE((tmp_path / H.SECRET_NAME).stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != H.SECRET_NAME]


# ------------------------------------------------------------------------------------------- the served classroom


def test_page_says_who_may_do_what_and_the_secret_is_kept(app):
    import urllib.request

    with urllib.request.urlopen(app.url + "config", timeout=10) as r:
        config = r.read().decode()
    assert config.count("belong to the instructor") >= 2  # the Train and the Evaluate tab
    assert "Instructor token" in config
    secret = app.work / "runs" / ".app-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_text().strip()) >= 32


def test_a_second_session_is_refused_each_instructor_only_action(app):
    client = _client(app)
    for token in ("", "not-the-token"):
        _refused(lambda: client.predict(**_form(instructor_token=token), api_name="/train_start"),
                 "Training on a shared host belongs to the instructor")
        _refused(lambda: client.predict(run_name=None, owner="", instructor_token=token, api_name="/train_resume"),
                 "Resuming a run on a shared host belongs to the instructor")
        _refused(lambda: client.predict(prompts=2, instructor_token=token, api_name="/evaluate"),
                 "A new evaluation on a shared host belongs to the instructor")
    # the old parameters alone (an API caller that does not know the token) are refused the same way
    _refused(lambda: client.predict(**{k: v for k, v in _form().items() if k != "instructor_token"},
                                    api_name="/train_start"), "belongs to the instructor")
    assert not any(p for p in (app.work / "runs").iterdir() if not p.name.startswith("."))
    # the instructor passes the gate: the next check speaks (the step cap)
    _refused(lambda: client.predict(**_form(max_steps=20_001, instructor_token=TOKEN), api_name="/train_start"),
             "steps must be between 1 and 20000")  # the app's one cap (APP_LIMITS), on every host


def test_the_instructor_passes_the_evaluation_gate(tmp_path):
    """In process (a served evaluation takes half a minute): the instructor's token passes the classroom's gate,
    and the next check speaks; anyone else is refused by the rule."""
    import gradio as gr

    from cdlab.ui import hosting as H
    from cdlab.ui.evaluate_tab import evaluate_handlers

    policy, _ = H.host_policy("0.0.0.0", instructor_token=TOKEN)
    fn = evaluate_handlers(None, tmp_path, 4, policy)
    with pytest.raises(gr.Error, match="Prompts must be"):
        fn.evaluate(0, TOKEN)
    with pytest.raises(gr.Error, match="A new evaluation on a shared host belongs to the instructor"):
        fn.evaluate(0, "guess")


def test_instructor_trains_students_watch_and_the_run_is_capped(app):
    """The instructor starts a run; a student watches it live but cannot stop or resume it; the wall-clock cap
    stops it; the instructor, from another browser (another owner token), resumes it and stops it."""
    instructor, student = _client(app), _client(app)
    runs, owner = app.work / "runs", "instructor-browser-1"
    t0 = time.time()
    _, returned_owner = instructor.predict(**_form(owner=owner, instructor_token=TOKEN,
                                                   extra_config='{"data_size": 64, "run_name": "lesson"}'),
                                           api_name="/train_start")
    assert returned_owner == owner
    run = runs / "lesson"
    assert _wait(lambda: _status(run).get("state") == "running" and _status(run).get("step", 0) >= 1, 60)
    assert "lesson" in [c[1] for c in student.predict(current=None, api_name="/refresh_runs")["choices"]]
    status = student.predict(run_name="lesson", api_name="/train_status")  # watching: allowed
    assert "lesson" in status[1] and "running" in status[1]
    _refused(lambda: student.predict(run_name="lesson", owner="student-browser", instructor_token="",
                                     api_name="/train_stop"), "another browser session")
    assert _status(run).get("state") == "running"
    # the cap stops it at a checkpoint, whoever started it
    assert _wait(lambda: "time limit" in _status(run).get("message", ""), CAP_S + 60), _status(run)
    assert time.time() - t0 >= CAP_S - 1 and _status(run)["state"] == "stopped"
    _refused(lambda: student.predict(run_name="lesson", owner=owner, instructor_token="", api_name="/train_resume"),
             "Resuming a run on a shared host belongs to the instructor")
    instructor.predict(run_name="lesson", owner="instructor-browser-2", instructor_token=TOKEN,
                       api_name="/train_resume")
    msg = instructor.predict(run_name="lesson", owner="instructor-browser-2", instructor_token=TOKEN,
                             api_name="/train_stop")
    assert "Stop requested" in msg
    assert _wait(lambda: _status(run).get("state") in ("stopped", "failed")
                 and not (runs / ".trainer.lock").exists(), 60), _status(run)
    assert not (app.work / "adapters" / "lesson").exists()


def test_two_simultaneous_starts_one_wins_the_loser_leaves_nothing(app):
    from gradio_client.exceptions import AppError

    runs = app.work / "runs"
    assert _wait(lambda: not (runs / ".trainer.lock").exists(), 60)
    results: dict[str, object] = {}

    def start(name: str) -> None:
        try:
            results[name] = _client(app).predict(**_form(
                instructor_token=TOKEN, owner=f"o-{name}",
                extra_config=json.dumps({"data_size": 64, "run_name": name})), api_name="/train_start")
        except AppError as e:
            results[name] = e

    threads = [threading.Thread(target=start, args=(n,)) for n in ("race-a", "race-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lost = [n for n, r in results.items() if isinstance(r, AppError)]
    won = [n for n, r in results.items() if not isinstance(r, AppError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "one training job at a time" in str(results[lost[0]])
    assert not (runs / lost[0]).exists(), "the loser left a run folder behind"
    lock = json.loads((runs / ".trainer.lock").read_text())
    assert lock["run_name"] == won[0] and lock["app_pid"] > 0
    other = _client(app)
    other.predict(current=None, api_name="/refresh_runs")
    other.predict(run_name=won[0], owner="someone-else", instructor_token=TOKEN, api_name="/train_stop")
    assert _wait(lambda: not (runs / ".trainer.lock").exists(), 60)


# ------------------------------------------------------------------------------------------- ownership, and the trainer dies with the app


def _classmate(work: Path) -> Path:
    """A student "classmate" in ``work/adapters`` whose card names run ``run-a``, started by session "token-a";
    returns its weights file."""
    from cdlab.ui.bench import make_random_students

    [name] = make_random_students(TINY_ID, work / "adapters", n=1)
    os.replace(work / "adapters" / name, work / "adapters" / "classmate")
    card_path = work / "adapters" / "classmate" / "card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "name": "classmate", "training_config": {"run_name": "run-a"}}))
    (work / "runs" / "run-a").mkdir(parents=True)
    (work / "runs" / "run-a" / "ui_launch.json").write_text(json.dumps(
        {"owner": hashlib.sha256(b"token-a").hexdigest(), "pid": 1, "started": 0}))
    return work / "adapters" / "classmate" / "pytorch_lora_weights.safetensors"


def _running_trainer(run: Path) -> int | None:
    """The trainer's pid once it has taken two steps."""
    st = _status(run)
    return st.get("pid") if st.get("state") == "running" and st.get("step", 0) >= 2 else None


def _gone(pid: int) -> bool:
    from cdlab.ui.runs import pid_alive

    return not pid_alive(pid)


def _kill_app_mid_run(work: Path, sig: int, run_name: str) -> int:
    """Once run ``run_name`` steps, send ``sig`` to the app (the lock names its pid) and wait until the app is
    gone; returns the trainer's pid."""
    run = work / "runs" / run_name
    pid = _wait(lambda: _running_trainer(run), 90)
    assert pid, (run / "train.log").read_text()[-2000:]
    app_pid = json.loads((work / "runs" / ".trainer.lock").read_text())["app_pid"]
    os.kill(app_pid, sig)
    assert _wait(lambda: _gone(app_pid), 90), "the app did not exit"
    return pid


def _assert_died_unpublished(work: Path, run_name: str, trainer: int, max_steps: int) -> None:
    assert _wait(lambda: _gone(trainer), 30), "the trainer outlived the app"
    st = _status(work / "runs" / run_name)
    assert st.get("step", 0) < max_steps and st.get("state") in ("stopped", "failed"), st
    assert "student saved" not in (work / "runs" / run_name / "train.log").read_text()


def test_killed_apps_leave_no_trainer_and_only_a_students_owner_replaces_it(tmp_path):
    """Real signals to a served app (loopback: no instructor) in the middle of a run that would finish, and
    publish, within seconds: after a SIGKILL and after a SIGTERM no trainer process remains and nothing is
    published. Between them the app restarts on the same folders (the SIGKILL left its lock file): same secret,
    the slot free again; there, another session may not replace a student session "token-a" trained, and
    "token-a" may (the run the SIGTERM then interrupts)."""
    from gradio_client import Client

    work, steps = tmp_path / "work", 40
    weights = _classmate(work)
    before = weights.read_bytes()
    extra = json.dumps({"data_size": 64, "run_name": "doomed", "checkpoint_every": 1000})
    with _serve(work) as url:
        Client(url, verbose=False).predict(**_form(max_steps=steps, owner="o", student_name="doomed",
                                                   extra_config=extra), api_name="/train_start")
        trainer = _kill_app_mid_run(work, signal.SIGKILL, "doomed")
    _assert_died_unpublished(work, "doomed", trainer, steps)
    assert not (work / "adapters" / "doomed").exists()
    secret = (work / "runs" / ".app-secret").read_text()

    with _serve(work) as url:  # the restart
        assert (work / "runs" / ".app-secret").read_text() == secret
        client = Client(url, verbose=False)
        _refused(lambda: client.predict(**_form(student_name="classmate", overwrite=True, owner="token-b"),
                                        api_name="/train_start"), "trained from another browser session")
        extra = json.dumps({"data_size": 64, "run_name": "replace", "checkpoint_every": 1000})
        client.predict(**_form(max_steps=steps, student_name="classmate", overwrite=True, owner="token-a",
                               extra_config=extra), api_name="/train_start")
        trainer = _kill_app_mid_run(work, signal.SIGTERM, "replace")
    _assert_died_unpublished(work, "replace", trainer, steps)
    # the SIGTERM closed the server at once (cdlab.ui.hosting.serve_until_interrupted), not through Gradio's
    # loop, which waits up to 5 s for the client's open event stream; and it closed without a traceback (the
    # refused request above logs one: Gradio's)
    log = (work / "server.log").read_text()
    assert "cdlab app: interrupted, closing the server" in log, log[-2000:]
    assert "Traceback" not in log.split("cdlab app: interrupted, closing the server")[1], log[-2000:]
    assert weights.read_bytes() == before  # neither the refused session nor the interrupted run replaced it


def test_a_trainer_whose_parent_is_gone_exits_at_once(tmp_path):
    """A trainer started for an app that is already gone (``CDLAB_PARENT_PID`` is not its parent) stops before
    training and publishes nothing."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CDLAB_RUNS_DIR=str(tmp_path / "runs"), PYTHONPATH=str(REPO_ROOT),
               CDLAB_ADAPTERS_DIR=str(tmp_path / "adapters"), CDLAB_PARENT_PID="1", HF_HUB_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "cdlab", "train", "--model", "tiny", "--max_steps", "2",
                           "--run_name", "orphan", "--student_name", "orphan", "--preview_every", "0"],
                          env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert not (tmp_path / "adapters" / "orphan").exists()


# ------------------------------------------------------------------------------------------- pruning, reading, publishing


def test_previews_and_app_evaluations_are_pruned(tmp_path):
    from cdlab.evaluate.store import APP_MARKER, prune_evaluations
    from cdlab.train.previews import prune_previews

    previews = tmp_path / "previews"
    previews.mkdir()
    for s in range(0, 1001, 10):
        (previews / f"step_{s:06d}.png").write_bytes(b"x")
    (previews / "reference.png").write_bytes(b"x")
    for foreign in ("step_notes.png", "step_000010.png.bak"):  # not a preview row (paths.preview_step): kept
        (previews / foreign).write_bytes(b"x")
    prune_previews(previews, cap=12)
    kept = sorted(int(p.stem[5:]) for p in previews.glob("step_*.png") if p.stem[5:].isdigit())
    assert len(kept) == 12 and kept[0] == 0 and kept[-1] == 1000 and (previews / "reference.png").exists()
    assert (previews / "step_notes.png").exists() and (previews / "step_000010.png.bak").exists()
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) - min(gaps) <= 10  # evenly spaced

    evals = tmp_path / "evals"
    for i in range(8):
        d = evals / f"e{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"created": f"2026-01-0{i + 1}", "rows": []}))
        if i != 0:  # e0, the oldest, is the CLI's
            (d / APP_MARKER).write_text("")
    removed = prune_evaluations(evals, cap=3, keep=evals / "e1")
    assert sorted(p.name for p in removed) == ["e2", "e3", "e4"]
    assert sorted(p.name for p in evals.iterdir()) == ["e0", "e1", "e5", "e6", "e7"]


def test_metrics_are_read_incrementally(tmp_path):
    from cdlab.ui.runs import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 2001)))
    assert len(read_metrics(tmp_path)) == 2000
    # Rewrite the first line in place (same length): a reader that re-reads the whole file would see it.
    with open(path, "r+b") as f:
        f.write(json.dumps({"step": 1, "loss": 9.0}).encode())
        f.seek(0, os.SEEK_END)
        f.write((json.dumps({"step": 2001, "loss": 0.5}) + "\n" + '{"step": 2002, "lo').encode())  # half a line
    rows = read_metrics(tmp_path)
    assert rows[0]["loss"] == 1.0 and rows[-1]["step"] == 2001 and len(rows) == 2001
    with open(path, "ab") as f:
        f.write(b'ss": 0.25}\n')
    assert read_metrics(tmp_path)[-1] == {"step": 2002, "loss": 0.25, "resumed": False}
    path.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # replaced (a new file): read again
    assert [r["loss"] for r in read_metrics(tmp_path)] == [3.0]


_KILL_BETWEEN_RENAMES = r"""
import os, sys
from pathlib import Path
from cdlab.students import registry
real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(dst).parent.name.startswith(".old-"):
        os._exit(9)  # killed between the two renames of an overwrite
os.replace = replace
registry._swap_in(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_an_overwrite_killed_between_renames_leaves_the_old_student(tmp_path):
    import shutil

    from cdlab.students import list_students

    root = tmp_path / "adapters"
    shipped = [c.name for c in list_students(REPO_ROOT / "adapters")]
    shutil.copytree(REPO_ROOT / "adapters" / shipped[0], root / shipped[0])
    shutil.copytree(REPO_ROOT / "adapters" / shipped[0], root / f".tmp-{shipped[0]}-new")  # a save, ready to swap in
    (root / f".tmp-{shipped[0]}-new" / "NEW").write_text("the new student")
    (root / ".tmp-ghost-abc").mkdir()  # a save killed earlier
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(root / f".tmp-{shipped[0]}-new"),
                           str(root / shipped[0])], cwd=str(REPO_ROOT),
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 9 and not (root / shipped[0]).exists()  # the kill came between the renames
    assert [c.name for c in list_students(root)] == [shipped[0]]
    assert not (root / shipped[0] / "NEW").exists()  # the old one, whole
    assert not [p.name for p in root.iterdir() if p.name.startswith((".old-", ".tmp-"))]
