"""Reading run directories, the training job manager (with a stand-in trainer process), the Train form,
hosting helpers and the Evaluate tab's reading of evaluation folders."""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cdlab.ui import evaluate_tab as E
from cdlab.ui import hosting as H
from cdlab.ui import runs as R
from cdlab.ui import train_tab as T
from cdlab.ui.jobs import JobError, JobManager


def _metrics(run, rows):
    with open(run / "metrics.jsonl", "a") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_read_metrics_dedupes_resumed_steps_and_skips_bad_lines(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    _metrics(run, [{"step": s, "loss": 1.0 / s, "elapsed_s": s} for s in (10, 20, 30)])
    _metrics(run, ["{not json", '{"step": 35}'])  # half-written and loss-less lines
    _metrics(run, [{"step": s, "loss": 2.0 / s, "elapsed_s": s - 15} for s in (20, 30, 40)])  # resumed from 15
    rows = R.read_metrics(run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[1]["loss"] == pytest.approx(0.1)  # the replayed step's later value wins
    assert R.resume_points(rows) == [20]
    p = R.progress(rows, {"state": "running", "max_steps": 100})
    assert (p.step, p.max_steps, p.points) == (40, 100, 4)
    assert p.eta_s == pytest.approx(60.0)  # 1 step/s after the resume

    df = R.loss_frame(rows)  # the LinePlot's data: each series a function of the step, resumes marked
    assert list(df.columns) == ["step", "loss", "series"]
    assert df[df.series == "loss"].step.tolist() == [10, 20, 30, 40]
    assert df[df.series == "loss"].loss.tolist() == pytest.approx([0.1, 0.1, 2 / 30, 0.05])
    ema = df[df.series == "loss (EMA)"]
    assert ema.step.tolist() == [10, 20, 30, 40] and ema.loss.iloc[0] == pytest.approx(0.1)
    assert "probe loss" not in set(df.series)  # these metrics have none
    mark = df[df.series == "resumed at step 20"]
    assert mark.step.tolist() == [20, 20] and mark.loss.tolist() == pytest.approx([0.05, 0.1])
    dup = df[df.duplicated(["step", "series"], keep=False)]  # only the resume mark has two rows at one step
    assert set(dup.series) == {"resumed at step 20"} and len(dup) == 2


def test_loss_frame_probe_series_and_long_runs_thinned():
    rows = [{"step": s, "loss": 1.0 + (s % 7), "probe_loss": 1.0 / s if s % 2 else None} for s in range(1, 5001)]
    df = R.loss_frame(rows, max_points=500)
    loss, probe = df[df.series == "loss"], df[df.series == "probe loss"]
    assert len(loss) == 500 and loss.step.iloc[0] == 1 and loss.step.iloc[-1] == 5000
    assert loss.step.is_monotonic_increasing and loss.step.is_unique
    assert len(probe) == 500 and probe.step.iloc[0] == 1 and probe.step.iloc[-1] == 4999
    assert probe.loss.iloc[0] == pytest.approx(1.0) and (probe.step % 2 == 1).all()
    assert set(df.series) == {"loss", "loss (EMA)", "probe loss"}  # no resume in these rows
    empty = R.loss_frame([])
    assert len(empty) == 0 and list(empty.columns) == ["step", "loss", "series"]


def test_ema_is_debiased_and_smooths():
    assert R.ema([]) == []
    assert R.ema([5.0, 5.0, 5.0], 0.1) == pytest.approx([5.0, 5.0, 5.0])
    sm = R.ema([0.0, 10.0] * 50, 0.05)
    assert max(sm[20:]) - min(sm[20:]) < 2.0


def test_status_of_dead_process_reads_failed_and_missing_reads_queued(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert R.read_status(run)["state"] == "queued"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid, "step": 3}))
    assert R.read_status(run)["state"] == "failed"
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    assert R.read_status(run)["state"] == "running"


def test_previews_checkpoints_and_run_list(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "previews").mkdir(parents=True)
        (d / "checkpoints").mkdir()
    for s in (0, 100, 20):
        (a / "previews" / f"step_{s:06d}.png").write_bytes(b"")
    (a / "checkpoints" / "ckpt_000100").mkdir()
    (a / "checkpoints" / ".tmp-ckpt_000200").mkdir()  # incomplete: not a checkpoint
    assert R.latest_preview(a)[1] == 100 and R.latest_checkpoint(a).name == "ckpt_000100"
    assert R.latest_preview(b) is None and R.latest_checkpoint(b) is None
    (a / "status.json").write_text(json.dumps({"state": "finished", "updated": 2.0, "step": 5, "max_steps": 5}))
    (b / "config.json").write_text("{}")  # a CLI run that has not written a status yet
    (tmp_path / "junk").mkdir()
    names = [r.name for r in R.list_runs(tmp_path)]
    assert sorted(names) == ["a", "b"]


# ------------------------------------------------------------------ the job manager, with a stand-in trainer

FAKE_TRAINER = textwrap.dedent('''
    """Stands in for `python -m cdlab train`: writes status/metrics like the trainer; behaviour from env."""
    import json, os, signal, sys, time
    args = sys.argv[sys.argv.index("train") + 1:]
    mode = os.environ["FAKE_MODE"]
    if "--resume" in args:
        run = args[args.index("--resume") + 1]
    else:
        cfg = json.load(open(args[args.index("--config") + 1]))
        run = os.path.join(os.environ["CDLAB_RUNS_DIR"], cfg["run_name"])
    stop = []
    def status(state, step):
        json.dump({"state": state, "step": step, "max_steps": 1000, "pid": os.getpid(), "message": state,
                   "student": "s", "updated": time.time()}, open(run + "/status.json.tmp", "w"))
        os.replace(run + "/status.json.tmp", run + "/status.json")
    if mode == "crash":
        print("Traceback: something broke deep inside"); print("RuntimeError: out of memory"); sys.exit(1)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, lambda *a: None)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    for step in range(1, 1000):
        status("running", step)
        with open(run + "/metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "elapsed_s": step * 0.05, "max_steps": 1000}) + "\\n")
        if stop:
            os.makedirs(run + f"/checkpoints/ckpt_{step:06d}", exist_ok=True)
            status("stopped", step); sys.exit(0)
        time.sleep(0.05)
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg" / "cdlab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_TRAINER)
    runs = tmp_path / "runs"
    monkeypatch.setenv("CDLAB_RUNS_DIR", str(runs))

    def make(mode, stop_timeout=5.0):
        return JobManager(runs, model="tiny", stop_timeout=stop_timeout,
                          env={"FAKE_MODE": mode}, cwd=tmp_path / "fakepkg")
    return make


def _wait(pred, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_job_start_stop_resume(fake, monkeypatch):
    jobs = fake("normal")
    job = jobs.start({"run_name": "r1", "max_steps": 1000})
    assert jobs.state("r1")["state"] in ("queued", "running")
    with pytest.raises(JobError, match="one training job at a time"):
        jobs.start({"run_name": "r2"})
    assert _wait(lambda: jobs.state("r1")["state"] == "running")
    jobs.stop("r1")
    assert jobs.state("r1")["state"] in ("stopping", "stopped")
    assert _wait(lambda: jobs.state("r1")["state"] == "stopped")
    assert job.proc.returncode == 0 and R.latest_checkpoint(job.run_dir) is not None
    with pytest.raises(JobError, match="already exists"):
        jobs.start({"run_name": "r1"})
    jobs.resume("r1")
    assert _wait(lambda: jobs.state("r1")["state"] == "running" and R.read_status(job.run_dir)["step"] >= 1)
    jobs.stop("r1", wait=True)
    assert jobs.state("r1")["state"] == "stopped"
    assert [r.name for r in R.list_runs(jobs.runs_dir)] == ["r1"]
    # the exit and stop watchers see the same end after the waiting stop recorded it: they return at once
    last, released = jobs._job, []
    monkeypatch.setattr(jobs, "_release_slot", released.append)
    jobs._finalise(last)
    assert released == []
    # a run whose folder was deleted before its end was recorded: nothing is written (no FileNotFoundError)
    shutil.rmtree(last.run_dir)
    last.finalised = False
    jobs._finalise(last)
    assert not last.run_dir.exists() and released == [last.proc.pid]


def test_only_the_starting_session_stops_or_resumes(fake):
    jobs = fake("normal")
    jobs.start({"run_name": "mine", "max_steps": 1000}, owner="token-a")
    assert _wait(lambda: jobs.state("mine")["state"] == "running")
    for token in ("token-b", "", None):
        with pytest.raises(JobError, match="another browser session"):
            jobs.stop("mine", owner=token, check_owner=True)
    assert jobs.state("mine")["state"] == "running"
    info = json.loads((jobs.runs_dir / "mine" / "ui_launch.json").read_text())
    assert "token-a" not in json.dumps(info) and info["owner"]  # only a digest is kept
    jobs.stop("mine", owner="token-a", check_owner=True, wait=True)
    assert jobs.state("mine")["state"] == "stopped"
    with pytest.raises(JobError, match="another browser session"):
        jobs.resume("mine", owner="token-b")
    jobs.resume("mine", owner="token-a", allow_unowned=False)
    assert _wait(lambda: jobs.state("mine")["state"] == "running")
    jobs.stop("mine", owner="token-a", check_owner=True, wait=True)
    # a run the CLI started has no owner: resumable from a local app, never from a public one
    cli = jobs.runs_dir / "cli-run"
    shutil.copytree(jobs.runs_dir / "mine", cli)
    (cli / "ui_launch.json").unlink()
    with pytest.raises(JobError, match="not started from this app"):
        jobs.resume("cli-run", owner="token-a", allow_unowned=False)
    for bad in ("../mine", "/etc", "a" * 300, "x\x00y"):
        with pytest.raises(JobError, match="Invalid run name"):
            jobs.resume(bad, owner="token-a")


def test_stubborn_trainer_is_killed_and_never_left_stopping(fake):
    jobs = fake("stubborn", stop_timeout=0.5)
    job = jobs.start({"run_name": "s1"})
    assert _wait(lambda: jobs.state("s1")["state"] == "running")
    jobs.stop("s1")
    assert _wait(lambda: job.proc.poll() is not None)
    assert _wait(lambda: jobs.state("s1")["state"] == "stopped")
    assert "killed" in jobs.state("s1")["message"]


def test_crash_reports_log_tail_and_frees_the_slot(fake):
    jobs = fake("crash")
    jobs.start({"run_name": "c1"})
    assert _wait(lambda: jobs.state("c1")["state"] == "failed")
    st = jobs.state("c1")
    assert "exited with code 1" in st["message"] and "out of memory" in st["log_tail"]
    view = T.poll(jobs, "c1")
    assert view.state == "failed" and "out of memory" in view.log_tail and not view.active
    with pytest.raises(JobError, match="no complete checkpoint"):
        jobs.resume("c1")
    with pytest.raises(JobError, match="No run named"):
        jobs.resume("nope")
    with pytest.raises(JobError):
        jobs.stop()


def test_cli_run_alive_blocks_a_second_job(fake, tmp_path):
    jobs = fake("normal")
    cli = jobs.runs_dir / "from-cli"
    cli.mkdir(parents=True)
    (cli / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "updated": time.time()}))
    with pytest.raises(JobError, match="started elsewhere"):
        jobs.start({"run_name": "x"})


# ------------------------------------------------------------------------------------ the Train form

def test_form_defaults_resolve_through_the_trainer_config():
    fields = T.form_fields("tiny")
    keys = [f.key for f in fields]
    assert {"method", "num_boundaries", "lora_rank", "lr", "max_steps", "batch_size", "guidance", "guidance_max",
            "preview_every", "student_name"} <= set(keys)
    values = {f.key: f.default for f in fields}
    cfg = T.form_to_config(values, "tiny", "tiny world", "", extra_json='{"log_every": 1}')
    from cdlab.train.config import PROFILES

    assert cfg["lr"] == PROFILES["tiny"]["lr"] and cfg["data"] == "world" and cfg["log_every"] == 1
    assert cfg["run_name"] and cfg["model"] == "tiny"
    sd = {f.key: f.default for f in T.form_fields("sd15")}
    assert sd["lora_rank"] == PROFILES["sd15"]["lora_rank"]


@pytest.mark.parametrize("change, kind, path, extra, match", [
    ({"lr": 0}, "tiny world", "", "", "learning rate"),
    ({"max_steps": 2.5}, "tiny world", "", "", "whole number"),
    ({"student_name": "bad name!"}, "tiny world", "", "", "student name"),
    ({"guidance": 5.0, "guidance_max": 2.0}, "tiny world", "", "", "guidance_max"),
    ({"method": "mbcd", "num_boundaries": 1}, "tiny world", "", "", "num_boundaries"),
    ({}, "image folder", "/no/such/folder", "", "outside the allowed folder"),
    ({}, "image folder", "", "", "folder"),
    ({}, "tiny world", "", "{oops", "not valid JSON"),
    ({}, "tiny world", "", '{"no_such_field": 1}', "unknown field"),
])
def test_form_errors(change, kind, path, extra, match):
    values = {f.key: f.default for f in T.form_fields("tiny")}
    values.update(change)
    with pytest.raises(ValueError, match=match):
        T.form_to_config(values, "tiny", kind, path, extra_json=extra)


def test_unreadable_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLAB_DATA_DIRS", str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        T.data_value("image folder", str(tmp_path / "nope"))
    (tmp_path / "metadata.jsonl").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="metadata.jsonl"):
        T.data_value("image folder", str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    assert T.data_value("COCO recipe folder", str(tmp_path)) == str(tmp_path.resolve())


# ------------------------------------------------------------------------------------ hosting, evaluate

def test_training_gate(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv(H.TRAINING_ENV, raising=False)
    assert H.training_allowed() and not H.is_public_host()
    # a --share link is a public host: training off, evaluations capped
    assert H.is_public_host(share=True) and not H.training_allowed(share=True)
    assert H.eval_prompt_limits(share=True) == (H.PUBLIC_EVAL_MAX_PROMPTS, H.PUBLIC_EVAL_MAX_PROMPTS)
    assert H.eval_prompt_limits()[1] > H.PUBLIC_EVAL_MAX_PROMPTS
    monkeypatch.setenv("SPACE_ID", "user/cdlab")
    assert H.is_public_host() and not H.training_allowed()
    monkeypatch.setenv(H.TRAINING_ENV, "1")
    assert H.training_allowed() and H.training_allowed(share=True)


def test_gpu_wraps_only_with_spaces(monkeypatch):
    import types

    def f(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not importable
    assert H.gpu(f) is f
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda fn: calls.append(duration) or (lambda *a: fn(*a) * 10))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    g = H.gpu(f, duration=30)
    assert g is not f and g(1) == 20 and calls == [30]


def test_runs_and_cache_are_blocked_from_serving(tmp_path):
    paths = H.blocked_paths(tmp_path / "runs", tmp_path / "cache")
    assert paths == [str((tmp_path / "runs").resolve()), str((tmp_path / "cache").resolve())]


def test_evaluations_newest_first_and_table(tmp_path):
    none = tmp_path / "no-shipped"
    assert E.load_view(tmp_path, shipped=none) is None
    shipped = E.load_view(tmp_path)  # a fresh clone opens on the evaluation the repository ships
    assert shipped.name == E.SHIPPED_EVALUATION and "teacher" in shipped.table_md and shipped.plot is not None
    for name in ("20250101-000000", "20250301-000000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"teacher": "tiny", "rows": [{"column": "teacher-50", "nfe": 100, "adherence": 0.5}]}))
    (tmp_path / "20250301-000000" / "table.md").write_text("| a |\n|---|\n| 1 |")
    (tmp_path / "20250101-000000" / "quality_vs_nfe.png").write_bytes(b"png")
    assert E.evaluation_choices(tmp_path) == ["20250301-000000", "20250101-000000", E.SHIPPED_EVALUATION]
    assert E.evaluation_choices(tmp_path, shipped=none) == ["20250301-000000", "20250101-000000"]
    v = E.load_view(tmp_path)
    assert v.name == "20250301-000000" and v.table_md.startswith("| a |") and v.plot is None
    old = E.load_view(tmp_path, "20250101-000000")
    assert "| column | nfe | adherence |" in old.table_md and "100" in old.table_md and old.plot is not None
    assert "teacher: tiny" in old.summary
    for bad in ("nope", "../20250101-000000", "/etc", 5):
        with pytest.raises(ValueError, match="No evaluation"):
            E.load_view(tmp_path, bad)
    # the flow teacher's evaluations are listed in the flow section's tab only, and the others only in the main one
    (tmp_path / "flow-20250401-000000").mkdir()
    (tmp_path / "flow-20250401-000000" / "results.json").write_text(json.dumps(
        {"model": "fashion-flow", "suite": "flow", "rows": [{"column": "teacher-50 (CFG)", "fid": 30.0}]}))
    assert E.evaluation_choices(tmp_path, shipped=none) == ["20250301-000000", "20250101-000000"]
    assert E.evaluation_choices(tmp_path, shipped=none, flow=True) == ["flow-20250401-000000"]
    assert "fid" in E.load_view(tmp_path, shipped=none, flow=True).table_md
    with pytest.raises(ValueError, match="No evaluation"):
        E.load_view(tmp_path, "20250101-000000", shipped=none, flow=True)


# ------------------------------------------------------------------------------------ the Train previews

def _row_png(path, colors, size=128):
    from PIL import Image

    row = Image.new("RGB", (size * len(colors), size), "white")
    for k, c in enumerate(colors):
        row.paste(Image.new("RGB", (size, size), c), (k * size, 0))
    row.save(path)


PROMPTS = ["a small red circle at the top left on a blue background",
           "a large green square in the center on a white background", "a triangle"]


def _preview_run(tmp_path, student_steps=(0, 5, 10), reference=True):
    run = tmp_path / "run"
    (run / "previews").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"preview_prompts": PROMPTS, "sample_steps": 4}))
    if reference:
        _row_png(run / "previews" / "reference.png", [(255, 0, 0)] * 3)
        (run / "previews" / "reference.json").write_text(json.dumps(
            {"steps": 50, "guidance": 5.0, "nfe": 100, "prompts": PROMPTS}))
    for s, c in zip(student_steps, [(0, 255, 0), (0, 0, 0), (0, 0, 255)]):
        _row_png(run / "previews" / f"step_{s:06d}.png", [c] * 3)
    return run


def test_composed_preview_rows_labels_and_sizes(tmp_path):
    import numpy as np

    from cdlab.ui import previews as P

    run = _preview_run(tmp_path)
    ps = P.read_previews(run)
    assert ps.prompts == PROMPTS and ps.student_steps == [0, 10]  # step 0 and the newest; step 5 is not shown
    assert [r.label for r in ps.rows] == ["teacher-50 (CFG), reference", "student, 4 steps, at step 0",
                                          "student, 4 steps, at step 10"]
    img = P.compose(ps)
    a = np.asarray(img.convert("RGB")).astype(int)
    header = img.height - 3 * (128 + P.PAD) - P.PAD
    assert img.width == P.LABEL_WIDTH + 3 * 128 + P.PAD
    assert 2 * P.CAPTION_FONT < header < 8 * P.CAPTION_FONT  # the longest caption wraps onto a few lines
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):  # reference, step 0, step 10
        y = header + i * (128 + P.PAD) + 64
        for k in range(3):
            assert tuple(a[y, P.LABEL_WIDTH + k * 128 + 64]) == color
        label = a[y - 40:y + 40, :P.LABEL_WIDTH]
        assert (label.sum(axis=2) < 300).sum() > 50  # text in the label column of every row
    for k in range(3):  # each caption written above its own column
        cap = a[:header, P.LABEL_WIDTH + k * 128:P.LABEL_WIDTH + (k + 1) * 128]
        assert (cap.sum(axis=2) < 300).sum() > 30
    assert (a[:header, :P.LABEL_WIDTH].sum(axis=2) < 300).sum() == 0  # the header's label corner stays blank
    text = P.caption(ps)
    assert text.startswith("preview at step 10") and "step 0 and step 10" in text and "DDIM 50 steps, CFG 5" in text
    from PIL import Image, ImageDraw

    fnt = P.font(P.CAPTION_FONT)
    lines = P.wrap(PROMPTS[0], 120, fnt)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert len(lines) >= 3 and " ".join(lines) == PROMPTS[0]
    assert all(draw.textlength(line, font=fnt) <= 120 for line in lines)


def test_composed_preview_without_reference_or_later_step_and_large_rows(tmp_path):
    from cdlab.ui import previews as P

    run = _preview_run(tmp_path, student_steps=(0,), reference=False)
    ps = P.read_previews(run)
    assert [r.label for r in ps.rows] == ["student, 4 steps, at step 0"]
    assert "no teacher reference" in P.caption(ps)
    big = _preview_run(tmp_path / "big", student_steps=(0, 3))
    for f in (big / "previews").glob("*.png"):
        _row_png(f, [(9, 9, 9)] * 3, size=512)  # SD1.5's 512 px previews are shown at MAX_CELL
    img = P.compose(P.read_previews(big))
    assert img.width == P.LABEL_WIDTH + 3 * P.MAX_CELL + P.PAD
    empty = tmp_path / "empty"
    (empty / "previews").mkdir(parents=True)
    assert P.compose(P.read_previews(empty)) is None and P.caption(P.read_previews(empty)) == "no preview yet"


def test_poll_and_runs_list_agree(tmp_path):
    runs = tmp_path / "runs"
    run = _preview_run(runs)  # runs/run
    (run / "status.json").write_text(json.dumps(
        {"state": "running", "step": 3, "max_steps": 300, "pid": os.getpid(), "updated": time.time()}))
    _metrics(run, [{"step": s, "loss": 1.0, "max_steps": 300} for s in range(1, 51)])
    other = runs / "older"
    other.mkdir()
    (other / "status.json").write_text(json.dumps({"state": "finished", "step": 9, "max_steps": 9, "updated": 1.0}))
    jobs = JobManager(runs, model="tiny")
    v = T.poll(jobs, "run")
    assert "**running** · step 50/300" in v.status_md and (v.step, v.max_steps) == (50, 300)
    labels = dict((n, lab) for lab, n in T.run_choices(jobs, v))
    assert labels["run"].startswith("run · running · step 50/300 · ")  # status.json says step 3: the view wins
    assert labels["older"].startswith("older · finished · step 9/9")
    assert dict((n, lab) for lab, n in T.run_choices(jobs))["run"].startswith("run · running · step 3/300")
    assert v.preview is not None and v.preview.width == T.previews_mod.LABEL_WIDTH + 3 * 128 + T.previews_mod.PAD
    assert v.preview_caption.startswith("preview at step 10") and list(v.loss.columns) == ["step", "loss", "series"]
    assert T.poll(jobs, "run").preview is v.preview  # unchanged files: not composed again


def test_a_page_opened_mid_run_shows_the_run_at_once(tmp_path):
    """The page load sends the selected run's status, loss and previews and turns polling on while it runs: the
    selection can be the one the page was built with, which fires no change event (a student opening the page
    during the instructor's run saw an empty Train tab)."""
    import gradio as gr
    from types import SimpleNamespace

    runs = tmp_path / "runs"
    run = _preview_run(runs)
    (run / "status.json").write_text(json.dumps(
        {"state": "running", "step": 3, "max_steps": 300, "pid": os.getpid(), "updated": time.time()}))
    _metrics(run, [{"step": s, "loss": 1.0, "max_steps": 300} for s in range(1, 51)])
    jobs = JobManager(runs, model="tiny")
    with gr.Blocks():
        with gr.Tabs():
            tab = T.TrainTab(jobs, SimpleNamespace(resolution=32), "tiny", gr.BrowserState(""))
    out = tab.on_load()
    assert len(out) == len(tab.load_outputs)
    got = dict(zip([c for c in tab.load_outputs], out))
    assert got[tab.ui.run_dd].value == "run"
    assert "**running** · step 50/300" in got[tab.ui.status] and got[tab.ui.timer].active
    assert got[tab.ui.preview] is not None
