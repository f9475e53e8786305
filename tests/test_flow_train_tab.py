"""The Train tab with the flow teacher: its form (every field hostile), the missing-data message, and a real short
``python -m cdlab.flow.train_teacher`` run launched through the JobManager and read by the tab's own poll
(loss rows, status, class grids), stopped at a checkpoint and resumed where it stopped."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdlab.flow.pipeline import flow_fingerprint
from cdlab.ui import flow_train as F
from fashion_files import write_train_set
from cdlab.ui import runs as R
from cdlab.ui import train_tab as T
from cdlab.ui.jobs import JobError, JobManager

# The stand-in for the app's flow teacher (cdlab.flow.pipeline.FlowTeacher, built elsewhere): what the tab reads.
TEACHER = SimpleNamespace(base_id="cdlab/fashion-flow", resolution=28, name="fashion-flow",
                          describe=lambda: "the class-conditioned flow teacher (stand-in)")
TINY = dict(minutes=5, num_epochs=3, epoch_images=64, batch_size=16, lr=2e-3, num_hiddens=8)


@pytest.fixture
def fashion_dir(tmp_path):
    """A small Fashion-MNIST stand-in: 96 random 28x28 images, labels 0..9 in turn."""
    return write_train_set(tmp_path / "fashion", 96)


def test_flow_form_refuses_hostile_fields_naming_each():
    ok = F.form_to_settings(dict(TINY), run_name="r1")
    assert ok == {**TINY, "minutes": 5.0, "lr": 2e-3, "grid_steps": F.GRID_STEPS, "run_name": "r1"}
    assert all(type(ok[k]) is int for k in ("num_epochs", "epoch_images", "batch_size", "num_hiddens"))
    assert F.form_to_settings({})["epoch_images"] == 12800  # the browser's short epochs
    for change, named in [({"lr": float("nan")}, "learning rate"), ({"lr": "inf"}, "learning rate"),
                          ({"batch_size": 1.5}, "batch size"), ({"num_hiddens": 1000}, "channels D"),
                          ({"epoch_images": "many"}, "images an epoch"), ({"minutes": True}, "time budget"),
                          ({"num_epochs": None}, "epochs"), ({"minutes": -1}, "time budget"),
                          ({"epoch_images": 10 ** 400}, "images an epoch"), ({"student_name": "x"}, "student_name"),
                          ({"__class__": 1}, "__class__"),
                          ({"num_epochs": 100, "epoch_images": 60000, "batch_size": 16}, "epochs x images an epoch")]:
        with pytest.raises(ValueError, match=named):
            F.form_to_settings({**TINY, **change})
    with pytest.raises(ValueError, match=r"time budget \(minutes\) must be a number, got a true/false"):
        F.form_to_settings({**TINY, "minutes": True})  # refused as what it is, not as "empty"
    with pytest.raises(ValueError, match="named fields"):
        F.form_to_settings(["minutes", 5])


def test_flow_train_tab_builds_and_says_how_to_get_missing_data(tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("CDLAB_FASHION_MNIST", str(tmp_path / "nowhere"))
    problem = F.data_problem()
    assert "apt-get install dataset-fashion-mnist" in problem
    jobs = JobManager(tmp_path / "runs", model="fashion-flow")
    with gr.Blocks():
        with gr.Tabs():
            tab = T.TrainTab(jobs, TEACHER, "fashion-flow", gr.BrowserState(""))
    assert [c.label for c in tab.ui.inputs] == [f.label for f in F.form_fields()]
    assert tab.ui.form_extra == [] and not tab.ui.start.interactive  # no data: Start is off, the page says why
    assert [c.label for c in tab.ui.student.inputs] == [f.label for f in F.student_fields()]  # the folded 2nd form
    assert tab.ui.student.init.choices == [(F.NO_INIT, "")]  # no teacher run yet: no student to start from
    with pytest.raises(gr.Error, match="teacher run"):
        tab.fn.start_student("../../etc", "reflow", "", 4, 5, 8, 1e-3, 16, 2.0, 4, 1, 1, 0.0, 1e-3, 0, 1.0, 10.0, 0.9, "no", "")
    for method, gan in (("cd", 0.0), ("dmd", 0.05)):  # CD's data and the GAN term's real images: the hint
        with pytest.raises(gr.Error, match="apt-get install dataset-fashion-mnist"):
            tab.fn.start_student("teacher", method, "", 4, 5, 8, 1e-3, 16, 2.0, 4, 1, 1, gan, 1e-3, 0, 1.0, 10.0, 0.9, "no",
                                 "")
    with pytest.raises(gr.Error, match="No flow teacher run"):  # reflow and DMD alone need no real images
        tab.fn.start_student("teacher", "dmd", "", 1, 5, 8, 1e-3, 16, 2.0, 4, 1, 1, 0.0, 1e-3, 0, 1.0, 0.3, 0.0, "no", "")
    with pytest.raises(gr.Error, match="apt-get install dataset-fashion-mnist"):
        tab.fn.start(*TINY.values(), "")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert F.is_flow_teacher("tiny", TEACHER) and not F.is_flow_teacher("tiny", SimpleNamespace(resolution=64))


def test_flow_start_handler_names_the_refused_field_and_keeps_the_classroom_rules(tmp_path, monkeypatch, fashion_dir):
    import hashlib

    import gradio as gr

    from cdlab.ui import hosting as H

    monkeypatch.setenv("CDLAB_FASHION_MNIST", str(fashion_dir))
    jobs = JobManager(tmp_path / "runs", model="fashion-flow")
    fn = T.train_handlers(jobs, TEACHER, "fashion-flow", F.form_fields())
    for i, bad in [(0, float("nan")), (2, "1e9"), (3, 0), (5, [32])]:
        values = list(TINY.values())
        values[i] = bad
        with pytest.raises(gr.Error, match=F.form_fields()[i].label.split(" (")[0]):
            fn.start(*values, "")
    classroom = H.Policy(classroom=True, instructor=hashlib.sha256(b"secret").hexdigest())
    fn = T.train_handlers(jobs, TEACHER, "fashion-flow", F.form_fields(), classroom)
    with pytest.raises(gr.Error, match="belongs to the instructor"):
        fn.start(*TINY.values(), "", "not the token")
    assert not (tmp_path / "runs").exists() or not any(p.is_dir() for p in (tmp_path / "runs").iterdir())
    (tmp_path / "runs" / "lora-run").mkdir(parents=True)  # a distillation run of another teacher: no Resume here
    (tmp_path / "runs" / "lora-run" / "config.json").write_text(json.dumps({"model": "tiny", "method": "mbcd"}))
    with pytest.raises(gr.Error, match="student of another teacher"):
        T.train_handlers(jobs, TEACHER, "fashion-flow", F.form_fields()).resume("lora-run", "")


def _wait(jobs: JobManager, name: str, until, timeout: float = 60.0) -> T.RunView:
    end = time.time() + timeout
    while time.time() < end:
        v = T.poll(jobs, name)
        if until(v):
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out: {v.status_md}\n{R.tail(jobs.runs_dir / name / 'train.log')}")


@pytest.mark.slow
def test_flow_teacher_run_from_the_tab_streams_loss_and_grids_stops_and_resumes(tmp_path, fashion_dir):
    jobs = JobManager(tmp_path / "runs", model="fashion-flow", env={"CDLAB_FASHION_MNIST": str(fashion_dir),
                                                                    "OMP_NUM_THREADS": "1"})
    settings = F.form_to_settings(dict(TINY), grid_steps=2, run_name="flow-a")
    job = jobs.start_flow_teacher(settings, owner="tok")
    assert "cdlab.flow.train_teacher" in job.proc.args
    v = _wait(jobs, "flow-a", lambda v: not v.active, timeout=90)
    assert (v.state, v.step, v.max_steps) == ("finished", 12, 12), v.status_md
    rows = R.read_metrics(jobs.runs_dir / "flow-a")
    assert [r["step"] for r in rows] == list(range(1, 13)) and v.loss is not None
    assert set(v.loss.series) == {"loss", "loss (EMA)"}
    assert v.preview is not None and "teacher" in v.preview_caption  # the newest class grid under the first
    assert sorted(p.name for p in (jobs.runs_dir / "flow-a" / "previews").iterdir()) == \
        ["step_000004.png", "step_000008.png", "step_000012.png"]
    assert (jobs.runs_dir / "flow-a" / "samples-epoch1.png").is_file()  # the seed's deliverable
    with pytest.raises(JobError, match="already finished"):
        jobs.resume("flow-a", owner="tok")

    # Stop -> a checkpoint; Resume continues the step count (owner rules as a distillation run's)
    long = F.form_to_settings({**TINY, "num_epochs": 100}, grid_steps=2, run_name="flow-b")
    jobs.start_flow_teacher(long, owner="tok")
    _wait(jobs, "flow-b", lambda v: v.step >= 10)
    jobs.stop("flow-b", wait=True, owner="tok", check_owner=True)
    stopped = json.loads((jobs.runs_dir / "flow-b" / "state.json").read_text())["step"]
    v = T.poll(jobs, "flow-b")
    assert v.state == "stopped" and v.step == stopped >= 10 and R.resumable(jobs.runs_dir / "flow-b")
    with pytest.raises(JobError, match="another browser session"):
        jobs.resume("flow-b", owner="someone else")
    jobs.resume("flow-b", owner="tok")
    _wait(jobs, "flow-b", lambda v: v.state == "running" and v.step > stopped + 5)
    jobs.stop("flow-b", wait=True, owner="tok", check_owner=True)
    v = T.poll(jobs, "flow-b")
    steps = [r["step"] for r in R.read_metrics(jobs.runs_dir / "flow-b")]
    assert v.state == "stopped" and v.step > stopped and steps == list(range(1, v.step + 1))
    launch = json.loads((jobs.runs_dir / "flow-b" / "ui_launch.json").read_text())
    assert launch["cmd"][-5:] == ["--resume", "--minutes", "5", "--grid-steps", "2"]


def test_a_flow_teacher_whose_app_is_gone_stops_at_a_checkpoint(tmp_path, fashion_dir):
    """``CDLAB_PARENT_PID`` names a process that is not its parent (the app is gone): it saves and stops at once."""
    import os
    import subprocess
    import sys

    from cdlab.paths import REPO_ROOT

    out = tmp_path / "run"
    env = dict(os.environ, CDLAB_PARENT_PID="1", CDLAB_FASHION_MNIST=str(fashion_dir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cdlab.flow.train_teacher", "--out", str(out), "--minutes", "5", "--num-hiddens",
           "8", "--batch-size", "16", "--epoch-images", "64", "--num-epochs", "100", "--grid-steps", "2"]
    subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), check=True, timeout=60, capture_output=True)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and "app that started it is gone" in status["message"]
    assert R.resumable(out) and status["step"] < 400


@pytest.fixture
def teacher_jobs(tmp_path, fashion_dir) -> JobManager:
    """A JobManager over ``runs/`` that holds one finished tiny flow teacher run, ``teacher``."""
    from cdlab.flow import train_teacher

    runs = tmp_path / "runs"
    cfg = train_teacher.TeacherConfig(num_hiddens=8, batch_size=16, epoch_images=32, num_epochs=1)
    train_teacher.train(runs / "teacher", 5, cfg, data_root=str(fashion_dir), grid_steps=2, log=lambda line: None)
    return JobManager(runs, model="fashion-flow",
                      env={"OMP_NUM_THREADS": "1", "CDLAB_ADAPTERS_DIR": str(tmp_path / "adapters")})


@pytest.mark.slow
def test_a_student_of_a_flow_teacher_run_from_the_tab(teacher_jobs):
    """A reflow student (piecewise, 2 windows) of a teacher run launched through the JobManager; the poll reads its
    loss rows. The app then serves the teacher run with that student."""
    jobs, runs = teacher_jobs, teacher_jobs.runs_dir
    for bad, named in [({"teacher_run": "../x"}, "teacher run"), ({"method": "gan"}, "method"),
                       ({"pairs": 10 ** 6}, "reflow pairs"), ({"lr": "nan"}, "student learning rate"),
                       ({"shell": "rm"}, "shell"), ({"method": "cd", "windows": 4}, "reflow windows"),
                       ({"windows": 9}, "reflow windows"), ({"num_boundaries": 4}, "CD boundaries"),
                       ({"method": "cd", "num_boundaries": 0}, "CD boundaries"),
                       ({"gan_weight": 0.05}, "GAN term"), ({"method": "dmd", "gan_weight": 2}, "GAN term"),
                       ({"method": "dmd", "gan_weight": 0.05, "disc_lr": 0}, "discriminator's learning rate"),
                       ({"lr_decay_steps": -1}, "falling rate"), ({"lr_decay_steps": 1.5}, "falling rate"),
                       ({"lr_decay_steps": 10 ** 9}, "falling rate"), ({"shift": 0.3}, "timestep shift"),
                       ({"method": "dmd", "shift": 0}, "timestep shift"),
                       ({"method": "dmd", "shift": float("inf")}, "timestep shift"),
                       ({"sample_steps": 0}, "samples with"), ({"sample_steps": 1.5}, "samples with"),
                       ({"regression_weight": 1}, "regression weight"),
                       ({"method": "dmd", "regression_weight": -1}, "regression on the teacher pairs"),
                       ({"adam_beta1": 1}, "beta1"), ({"adam_beta1": "nan"}, "beta1"),
                       ({"method": "dmd", "gan_clip": "yes"}, "gan clip"),
                       ({"method": "dmd", "gan_weight": 0.05, "gan_clip": True}, "clipped to"),
                       ({"method": "dmd", "gan_weight": 0.05, "gan_clip": "on"}, "clipped to"),
                       ({"init": "../x"}, "start from student"), ({"init": 5}, "start from student"),
                       ({"init": "a" * 65}, "start from student")]:
        with pytest.raises(ValueError, match=named):
            F.student_settings({"teacher_run": "teacher", **bad})
    with pytest.raises(JobError, match="No flow teacher run"):
        jobs.start_flow_student(F.student_settings({"teacher_run": "nope"}))
    settings = F.student_settings({"teacher_run": "teacher", "steps": 6, "batch_size": 8, "pairs": 16,
                                   "lora_rank": 4, "windows": 2}, run_name="student-a")  # piecewise, 2 windows
    jobs.start_flow_student(settings, owner="tok")
    v = _wait(jobs, "student-a", lambda v: not v.active, timeout=90)
    assert (v.state, v.step, v.max_steps) == ("finished", 6, 6), v.status_md
    assert [r["step"] for r in R.read_metrics(runs / "student-a")] == list(range(1, 7))
    card = json.loads((runs.parent / "adapters" / "student-a" / "card.json").read_text())  # as every student
    assert card["method"] == "reflow" and card["training_config"]["trained_steps"] == 6
    assert card["base_fingerprint"] == flow_fingerprint(runs / "teacher")  # the run's weights, not only its folder
    assert card["num_boundaries"] == card["training_config"]["windows"] == 2
    assert not R.resumable(runs / "student-a") and R.run_kind(runs / "student-a") == "flow-student"

    # The app serves that teacher run (`python app.py --model runs/teacher`): every tab on it, Compare with its
    # own student and none of the shipped ones (a LoRA fits only the weights it was trained on), no second flow
    # section beside it; the evaluation CLI takes the same folder.
    from cdlab.paths import REPO_ROOT
    from cdlab.teachers import TeacherLoadError, load_teacher
    from cdlab.ui import session as S
    from cdlab.ui.compare import TEACHER_50, Comparer

    teacher = load_teacher(str(runs / "teacher"), device="cpu")
    assert teacher.base_id == str((runs / "teacher").resolve()) and teacher.base_fingerprint == card["base_fingerprint"]
    assert f"of the run {str(runs / 'teacher')!r}" in teacher.describe() and teacher.unet.num_hiddens == 8
    assert S.load_flow(teacher) is None and F.is_flow_teacher(str(runs / "teacher"), teacher)
    assert [c.name for c in Comparer(teacher, adapters_root=REPO_ROOT / "adapters").students()] == []
    comparer = Comparer(teacher, adapters_root=runs.parent / "adapters", batching=False)
    assert comparer.column_choices() == [TEACHER_50, "teacher-4 (naive)", "student-a"]
    res = comparer.run("Sneaker", 0, teacher.guidance, "as trained", ["student-a", TEACHER_50])
    assert [(c.label, c.nfe, c.error) for c in res.columns] == [("student-a (4 steps)", 4, None), (TEACHER_50, 100, None)]
    (runs / "not-a-teacher").mkdir()
    (runs / "not-a-teacher" / "state.json").write_text("{}")
    (runs / "not-a-teacher" / "unet.safetensors").write_bytes(b"")
    with pytest.raises(TeacherLoadError, match="not-a-teacher"):
        load_teacher(str(runs / "not-a-teacher"), device="cpu")

    # A second student started from the first (`--init`, as fashion-dmd-1 from fashion-reflow-1): the form offers
    # the run's own students; one of another teacher, a missing one or a wider one than the run's rank is refused.
    assert F.init_choices(jobs, "teacher") == [(F.NO_INIT, ""), ("student-a", "student-a")]
    assert F.init_choices(jobs, "../teacher") == F.init_choices(jobs, "nope") == [(F.NO_INIT, "")]
    for init, rank, named in [("fashion-reflow-1", 4, "no student 'fashion-reflow-1'"),
                              ("student-a", 2, "rank 4; a run started from it needs a rank of at least that")]:
        with pytest.raises(JobError, match=f"Start from student: .*{named}"):
            jobs.start_flow_student(F.student_settings({"teacher_run": "teacher", "init": init, "lora_rank": rank}))
    settings = F.student_settings({"teacher_run": "teacher", "method": "dmd", "init": "student-a", "steps": 2,
                                   "batch_size": 4, "pairs": 16, "lora_rank": 4}, run_name="student-c")
    jobs.start_flow_student(settings, owner="tok")
    v = _wait(jobs, "student-c", lambda v: not v.active, timeout=90)
    assert (v.state, v.step) == ("finished", 2), v.status_md
    card_c = json.loads((runs.parent / "adapters" / "student-c" / "card.json").read_text())
    assert card_c["method"] == "dmd" and card_c["training_config"]["init"] == "student-a"


@pytest.mark.slow
def test_a_stopped_student_run_saves_its_student_and_has_no_resume(teacher_jobs):
    """A student run has no checkpoint: Stop saves the student as trained so far, and there is no Resume (a DMD
    student: the generator and fake-score LoRAs train from the tab, and the card names the method)."""
    jobs, runs = teacher_jobs, teacher_jobs.runs_dir
    long = F.student_settings({"teacher_run": "teacher", "method": "dmd", "steps": 20000, "batch_size": 8,
                               "pairs": 16, "lora_rank": 4}, run_name="student-b")
    jobs.start_flow_student(long, owner="tok")
    _wait(jobs, "student-b", lambda v: v.step >= 10)
    jobs.stop("student-b", wait=True, owner="tok", check_owner=True)
    v = T.poll(jobs, "student-b")
    card = json.loads((runs.parent / "adapters" / "student-b" / "card.json").read_text())
    assert v.state == "stopped" and card["training_config"]["trained_steps"] == v.step >= 10, v.status_md
    assert (card["method"], card["steps"], card["num_boundaries"]) == ("dmd", 4, 4)
    with pytest.raises(JobError, match="no complete checkpoint"):
        jobs.resume("student-b", owner="tok")


def test_a_multi_boundary_cd_student_from_the_form_reaches_the_command_line():
    """The student form's CD boundaries (fashion-mbcd-4 has 4) become ``--num-boundaries`` of the distillation
    command, whose own parser reads every flag back; its GAN weight and the discriminator's rate reach a DMD run
    (fashion-dmd-4's term), and a run without the term gets neither flag; the falling rate reaches the run when
    it is set, and the CLI's constant rate is kept when it is not."""
    from cdlab.flow import distill
    from cdlab.ui.jobs import flow_student_command

    settings = F.student_settings({"teacher_run": "teacher", "method": "cd", "num_boundaries": 4, "lr": 2e-4},
                                  run_name="mbcd")
    cmd = flow_student_command("python", Path("runs/teacher"), Path("runs/mbcd"), settings)
    p = argparse.ArgumentParser()
    distill.add_config_arguments(p)
    args, rest = p.parse_known_args(cmd[3:])
    cfg = distill.config_from_args(p, args)
    assert (cfg.method, cfg.num_boundaries, cfg.lr, cfg.windows) == ("cd", 4, 2e-4, 1)
    assert rest == ["--teacher", "runs/teacher", "--run-dir", "runs/mbcd", "--name", "mbcd"]
    assert cfg.gan_weight == 0 and "--gan-weight" not in cmd and "--disc-lr" not in cmd  # the CLI's defaults kept
    gan = F.student_settings({"teacher_run": "teacher", "method": "dmd", "gan_weight": 0.05}, run_name="dmd")
    args, _ = p.parse_known_args(flow_student_command("python", Path("runs/teacher"), Path("runs/dmd"), gan)[3:])
    cfg = distill.config_from_args(p, args)  # fashion-dmd-4's GAN term: weight 0.05, DMD2's head at rate 1e-3
    assert (cfg.method, cfg.gan_weight, cfg.disc_lr, cfg.disc) == ("dmd", 0.05, 1e-3, "head")
    assert cfg.lr_decay_steps == 0 and "--lr-decay-steps" not in cmd
    falling = F.student_settings({"teacher_run": "teacher", "method": "dmd", "steps": 900, "lr_decay_steps": 900},
                                 run_name="dmd")  # the form's falling rate reaches the run
    args, _ = p.parse_known_args(flow_student_command("python", Path("runs/teacher"), Path("runs/dmd"), falling)[3:])
    assert distill.config_from_args(p, args).lr_decay_steps == 900 and "--shift" not in cmd
    shifted = F.student_settings({"teacher_run": "teacher", "method": "dmd", "shift": 0.3}, run_name="dmd")
    args, _ = p.parse_known_args(flow_student_command("python", Path("runs/teacher"), Path("runs/dmd"), shifted)[3:])
    cfg = distill.config_from_args(p, args)
    assert cfg.shift == 0.3  # the form's shifted grid reaches the run
    assert (cfg.sample_steps, cfg.adam_beta1, cfg.gan_clip) == (4, 0.9, False)  # the CLI's defaults kept
    assert "--gan-clip" not in cmd and "--adam-beta1" not in cmd
    one = F.student_settings({"teacher_run": "teacher", "method": "dmd", "sample_steps": 1, "regression_weight": 0.3,
                              "gan_weight": 0.05, "adam_beta1": 0, "gan_clip": "yes"}, run_name="dmd")
    args, rest = p.parse_known_args(flow_student_command("python", Path("runs/teacher"), Path("runs/dmd"), one)[3:])
    cfg = distill.config_from_args(p, args)  # a one-step DMD run held still ("From the first step", docs/flow.md)
    assert (cfg.sample_steps, cfg.regression_weight, cfg.adam_beta1, cfg.gan_clip) == (1, 0.3, 0.0, True)
    assert "--init" not in rest  # a fresh LoRA unless a student is picked
    from_reflow = F.student_settings({"teacher_run": "teacher", "method": "dmd", "init": "fashion-reflow-1"},
                                     run_name="dmd")  # the shipped one-step recipe's start
    cmd = flow_student_command("python", Path("runs/teacher"), Path("runs/dmd"), from_reflow)
    assert cmd[cmd.index("--init") + 1] == "fashion-reflow-1" and F.student_settings(
        {"teacher_run": "teacher", "init": ""})["init"] is None
    from cdlab.flow.student_config import config_flags  # the command line's one writer refuses a stray key by name
    with pytest.raises(ValueError, match="not StudentConfig fields: .'shell'."):
        config_flags({"method": "dmd", "shell": "rm"})
