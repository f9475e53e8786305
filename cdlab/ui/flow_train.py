"""The Train tab when the app's teacher is the flow teacher (``--model fashion-flow``): train it from scratch.

The form's fields (`form_fields`: time budget, epochs, images an epoch, batch size, learning rate, channels D)
are checked one by one (`form_to_settings`: every value from the browser is hostile), then
`cdlab.ui.jobs.JobManager.start_flow_teacher` launches ``python -m cdlab.flow.train_teacher`` through the same
slot, owner and stop/resume rules as a distillation run, and the tab's one poller (`cdlab.ui.train_tab.poll`)
shows its loss and class grids: the flow teacher writes the same run folder (`cdlab.flow.train_teacher`).

Browser defaults (`BROWSER_DEFAULTS`) differ from the CLI's in one setting: an epoch covers 12,800 images (100
steps at batch 128, one to two minutes on 2 cores) instead of the 60,000 of the training set, so a grid appears
after every epoch, the seed's epoch-1 grid within about 2 minutes, and the learning rate still decays to 0.1x
over the run's 10 epochs (docs/flow.md).

A second, folded form distils a few-step student from a teacher run (`student_settings`, `student_form`,
`student_start_handler`: ``python -m cdlab.flow.distill --run-dir``), watched by the same poller.
"""
from __future__ import annotations

import inspect
import time
from types import SimpleNamespace
from typing import Any, Callable

from cdlab.flow.data import INSTALL_HINT, data_root, find_split
from cdlab.flow.student_config import METHODS, StudentConfig  # METHODS: the one list of the methods
from cdlab.flow.pipeline import FLOW_GUIDANCE
from cdlab.flow.train_teacher import TeacherConfig, total_steps
from cdlab.paths import FLOW_ID, shown_path
from cdlab.students import StudentError, validate_name
from cdlab.teachers import FLOW_TEACHER, class_names
from cdlab.train.config import APP_LIMITS, RUN_NAME_RE
from cdlab.ui import hosting as H
from cdlab.ui import runs as runs_mod
from cdlab.ui.form import FormField, check_field, check_number, form_inputs
from cdlab.ui.jobs import JobManager, new_owner_token
from cdlab.ui.session import user_errors

__all__ = ["BROWSER_DEFAULTS", "GRID_STEPS", "STUDENT_DEFAULTS", "METHODS",
           "is_flow_teacher", "form_fields", "form_to_settings", "student_fields", "student_settings", "data_problem",
           "start_handler", "teacher_runs", "student_start_handler", "student_form", "flow_form"]

GRID_STEPS = 50  # the grids' Euler steps (the seed's); not a form field
BROWSER_DEFAULTS = {"minutes": 15.0, "num_epochs": 10, "epoch_images": 12800, "batch_size": 128, "lr": 2e-3,
                    "num_hiddens": 32}

# key, label, kind, minimum, maximum (the app's ranges: a classroom machine's, narrower than the CLI's)
_FORM = [
    ("minutes", "time budget (minutes)", "float", 0.1, 240),
    ("num_epochs", "epochs", "int", 1, 100),
    ("epoch_images", "images an epoch", "int", 16, 60000),
    ("batch_size", "batch size", "int", 1, 512),
    ("lr", "learning rate", "float", 1e-5, 0.05),
    ("num_hiddens", "channels D (num_hiddens)", "int", 4, 128),
]
_INFO = {"minutes": "the run stops at a checkpoint then; Resume continues it",
         "epoch_images": "what an epoch covers: a grid after each, the rate decays once per epoch"}


def is_flow_teacher(model: str, teacher: Any) -> bool:
    """Whether the app serves a flow teacher: model ``"fashion-flow"``, a teacher whose ``base_id`` is
    ``"cdlab/fashion-flow"`` (any object: the app's `FlowTeacher`, a test's stand-in), or one whose prompt is a
    class (`cdlab.teachers.class_names`: a flow teacher's run folder)."""
    return model == FLOW_TEACHER or getattr(teacher, "base_id", None) == FLOW_ID or bool(class_names(teacher))


def form_fields() -> list[FormField]:
    """The flow teacher's form, with the browser's defaults."""
    return [FormField(key, label, kind, BROWSER_DEFAULTS[key], minimum=lo, maximum=hi, info=_INFO.get(key, ""))
            for key, label, kind, lo, hi in _FORM]


def form_to_settings(values: dict[str, Any], *, grid_steps: int = GRID_STEPS,
                     run_name: str | None = None) -> dict[str, Any]:
    """Check the form (every field hostile) and return the run's settings for
    `cdlab.ui.jobs.JobManager.start_flow_teacher`: ``run_name`` (``flow-teacher-<time>``), ``minutes``,
    ``grid_steps`` (the server's, not the form's) and the `cdlab.flow.train_teacher.TeacherConfig` fields.

    Raises ``ValueError`` whose message names the field: an unknown key, an empty or non-numeric value, one not
    finite, not whole (for a count) or out of its range; or a run longer than the app's step limit (the one a
    distillation run from the app has, `cdlab.train.config.APP_LIMITS`), naming the fields that make it."""
    if not isinstance(values, dict):
        raise ValueError("config: the form must be a set of named fields.")
    fields = form_fields()
    unknown = sorted(str(k)[:40] for k in set(values) - {f.key for f in fields})
    if unknown:
        raise ValueError(f"config: unknown form field(s) {unknown}.")
    out: dict[str, Any] = {f.key: check_number(f, values.get(f.key, f.default)) for f in fields}
    cfg = TeacherConfig(**{k: v for k, v in out.items() if k != "minutes"}).check()  # the trainer's limits too
    steps, limit = total_steps(cfg), int(APP_LIMITS["max_steps"][1])
    if steps > limit:
        raise ValueError(f"config: epochs x images an epoch / batch size is {steps} steps; the app's limit is {limit}.")
    out.update(grid_steps=grid_steps, run_name=run_name or f"flow-teacher-{time.strftime('%Y%m%d-%H%M%S')}")
    return out


_CLI = StudentConfig()  # python -m cdlab.flow.distill's defaults
NO_INIT = "none: a fresh LoRA on the teacher"
STUDENT_DEFAULTS = {"method": "reflow", "steps": 500, "batch_size": 128, "lr": 1e-3, "pairs": 2000,
                    "guidance": FLOW_GUIDANCE,  # the guidance the shipped students were distilled at
                    "lora_rank": 16, "windows": 1, "num_boundaries": 1, "gan_weight": 0.0, "disc_lr": 1e-3,
                    "lr_decay_steps": 0, "shift": 1.0,  # then four of the CLI's own defaults:
                    "sample_steps": _CLI.sample_steps, "regression_weight": _CLI.regression_weight,
                    "adam_beta1": _CLI.adam_beta1, "gan_clip": "yes" if _CLI.gan_clip else "no"}
_STUDENT_FORM = [  # key, label, kind, minimum (a choice: its choices), maximum
    ("sample_steps", "the steps it samples with (1: one step from noise, as fashion-dmd-1 and fashion-reflow-1)",
     "int", 1, 8),
    ("steps", "student steps", "int", 1, 20000),
    ("batch_size", "student batch size", "int", 1, 512),
    ("lr", "student learning rate", "float", 1e-5, 0.05),
    ("pairs", "reflow pairs (teacher samples)", "int", 16, 20000),
    ("guidance", "teacher CFG distilled in", "float", 1.0, 10.0),
    ("lora_rank", "LoRA rank", "int", 1, 64),
    ("windows", "reflow windows (1: 2-rectified flow; 4: piecewise, PeRFlow)", "int", 1, 8),
    ("num_boundaries", "CD boundaries (1: CD; 4: multi-boundary, as fashion-mbcd-4)", "int", 1, 8),
    ("gan_weight", "DMD's GAN term on real images (0: off; fashion-dmd-4: 0.05)", "float", 0.0, 1.0),
    ("disc_lr", "GAN discriminator's learning rate (with the GAN term)", "float", 1e-5, 0.05),
    ("lr_decay_steps", "falling rate: every rate reaches 0 at this step, along a half cosine (0: constant)", "int",
     0, 20000),
    ("shift", "DMD: its steps' grid under SD3's timestep shift (1: uniform; fashion-dmd-4: 0.3, nearer the data)",
     "float", 0.1, 4.0),
    ("regression_weight", "DMD: the regression on the teacher pairs (the shipped runs: 10, then 1 or 0.3)",
     "float", 0.0, 1000.0),
    ("adam_beta1", "Adam's beta1 (0.9: torch's; 0: DMD2's, which holds a one-step DMD run still)", "float", 0.0, 0.99),
    ("gan_clip", "DMD's GAN term judges the samples as shown, clipped to [0, 1] (with a GAN weight)", "choice",
     ("no", "yes"), None),
]
# A field that belongs to one method keeps its default with the others: (key, method, what the message calls it)
_BELONGS = [("windows", "reflow", "reflow windows"), ("num_boundaries", "cd", "CD boundaries"),
            ("gan_weight", "dmd", "DMD's GAN term"), ("shift", "dmd", "DMD's timestep shift"),
            ("regression_weight", "dmd", "DMD's regression weight")]


def student_fields() -> list[FormField]:
    """The student form's fields (the method and the teacher run are choices beside them)."""
    return [FormField(key, label, kind, STUDENT_DEFAULTS[key], choices=lo)
            if kind == "choice" else FormField(key, label, kind, STUDENT_DEFAULTS[key], minimum=lo, maximum=hi)
            for key, label, kind, lo, hi in _STUDENT_FORM]


def student_settings(values: dict[str, Any], *, run_name: str | None = None) -> dict[str, Any]:
    """Check the student form (every field hostile) and return the settings for
    `cdlab.ui.jobs.JobManager.start_flow_student`: ``teacher_run`` (a run name, by ``fullmatch``; the job manager
    checks it is a flow teacher run with weights), ``method`` (``reflow``, ``cd`` or ``dmd``), ``init`` (the
    student it starts from, a name by `cdlab.students.validate_name`, or None; the job manager checks it is one of
    that teacher run's), the values of `student_fields` (``gan_clip`` a bool) and ``run_name``. Raises
    ``ValueError`` whose message names the field: an unknown key, a value out of its range or choices, or a
    method's own field set with another method."""
    if not isinstance(values, dict):
        raise ValueError("config: the form must be a set of named fields.")
    fields = student_fields()
    unknown = sorted(str(k)[:40] for k in set(values) - {f.key for f in fields} - {"teacher_run", "method", "init"})
    if unknown:
        raise ValueError(f"config: unknown form field(s) {unknown}.")
    teacher = values.get("teacher_run")
    if not isinstance(teacher, str) or not RUN_NAME_RE.fullmatch(teacher):
        raise ValueError(f"config: teacher run must be a run's name, got {str(teacher)[:40]!r}.")
    method = values.get("method", STUDENT_DEFAULTS["method"])
    if method not in METHODS:
        raise ValueError(f"config: method must be one of {METHODS}, got {str(method)[:40]!r}.")
    init = values.get("init") or None  # "" and None: from the teacher (a fresh LoRA)
    try:
        init = None if init is None else validate_name(init)
    except StudentError:
        raise ValueError(f"config: start from student must be a student's name, got {str(init)[:40]!r}.") from None
    out: dict[str, Any] = {f.key: check_field(f, values.get(f.key, f.default)) for f in fields}
    for key, owner, called in _BELONGS:
        if out[key] != STUDENT_DEFAULTS[key] and method != owner:
            raise ValueError(f"config: {called} must be {STUDENT_DEFAULTS[key]:g} with method {method!r} "
                             f"(it belongs to {owner}).")
    out["gan_clip"] = out["gan_clip"] == "yes"
    if out["gan_clip"] and not out["gan_weight"]:
        raise ValueError("config: DMD's GAN term judges clipped samples only with a GAN weight above 0 (gan clip).")
    return {**out, "teacher_run": teacher, "method": method, "init": init,
            "run_name": run_name or f"flow-student-{time.strftime('%Y%m%d-%H%M%S')}"}


def data_problem(root: str | None = None) -> str | None:
    """None when Fashion-MNIST's training files are there; else what the page says: where they were looked
    for and how to get them."""
    try:
        find_split("train", root)
    except FileNotFoundError:
        return (f"Fashion-MNIST is not on this machine (looked in {shown_path(data_root(root))}). Install it with "
                f"`{INSTALL_HINT}`, or point $CDLAB_FASHION_MNIST at a folder of its idx files, then reload.")
    return None


def start_handler(jobs: JobManager, policy: H.Policy, run_choices: Callable[[JobManager], list]) -> Callable:
    """The tab's ``/train_start`` for the flow teacher: who may (the host's policy, as a distillation run), the
    data, the form, then the launch; returns the runs list with the new run selected and the owner token."""
    import gradio as gr

    @user_errors
    def do_start_flow(minutes, num_epochs, epoch_images, batch_size, lr, num_hiddens, owner, instructor_token=""):
        """Start training the flow teacher from scratch; every field is checked (every value is untrusted)."""
        if not policy.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        policy.require_instructor(instructor_token, "Training")
        problem = data_problem()
        if problem:
            raise gr.Error(problem)
        settings = form_to_settings(dict(minutes=minutes, num_epochs=num_epochs, epoch_images=epoch_images,
                                         batch_size=batch_size, lr=lr, num_hiddens=num_hiddens))
        owner = owner if isinstance(owner, str) and owner else new_owner_token()
        job = jobs.start_flow_teacher(settings, owner=owner)
        return gr.Dropdown(choices=run_choices(jobs), value=job.run_name), owner

    keys = [f.key for f in form_fields()]
    assert keys == list(inspect.signature(do_start_flow).parameters)[:len(keys)], "form != do_start_flow"
    return do_start_flow


def teacher_runs(jobs: JobManager) -> list[str]:
    """The flow teacher runs a student can be distilled from (their weights saved), newest first."""
    return [r.name for r in runs_mod.list_runs(jobs.runs_dir) if jobs.flow_teacher_run(r.name) is not None]


def init_choices(jobs: JobManager, teacher_run: Any) -> list[tuple[str, str]]:
    """The students a run of ``teacher_run`` may start from (``--init``): those of that run's weights in the
    manager's adapters folder, after ``(NO_INIT, "")``: none, a fresh LoRA."""
    from cdlab.flow.pipeline import flow_base_id, flow_fingerprint
    from cdlab.students import list_students

    choices = [(NO_INIT, "")]
    folder = jobs.flow_teacher_run(teacher_run)
    if folder is None:
        return choices
    cards = list_students(jobs.adapters_root(), flow_base_id(folder), flow_fingerprint(folder))
    return choices + [(c.name, c.name) for c in cards]


def student_start_handler(jobs: JobManager, policy: H.Policy, run_choices: Callable[[JobManager], list]) -> Callable:
    """The tab's ``/train_flow_student``: a few-step student of a flow teacher run (`student_settings`), through
    `cdlab.ui.jobs.JobManager.start_flow_student`; the host's rules as for Start."""
    import gradio as gr

    @user_errors
    def do_start_student(teacher_run, method, init, sample_steps, steps, batch_size, lr, pairs, guidance, lora_rank,
                         windows, num_boundaries, gan_weight, disc_lr, lr_decay_steps, shift, regression_weight,
                         adam_beta1, gan_clip, owner, instructor_token=""):
        """Distil a student from a flow teacher run; every field is checked (every value is untrusted)."""
        if not policy.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        policy.require_instructor(instructor_token, "Training")
        settings = student_settings(dict(
            teacher_run=teacher_run, method=method, init=init, sample_steps=sample_steps, steps=steps,
            batch_size=batch_size, lr=lr, pairs=pairs, guidance=guidance, lora_rank=lora_rank, windows=windows,
            num_boundaries=num_boundaries, gan_weight=gan_weight, disc_lr=disc_lr, lr_decay_steps=lr_decay_steps,
            shift=shift, regression_weight=regression_weight, adam_beta1=adam_beta1, gan_clip=gan_clip))
        problem = data_problem() if settings["method"] == "cd" or settings["gan_weight"] > 0 else None
        if problem:  # CD's data and the GAN term's real side are the training images
            raise gr.Error(problem)
        owner = owner if isinstance(owner, str) and owner else new_owner_token()
        job = jobs.start_flow_student(settings, owner=owner)
        return gr.Dropdown(choices=run_choices(jobs), value=job.run_name), owner

    keys = ["teacher_run", "method", "init", *(f.key for f in student_fields())]
    assert keys == list(inspect.signature(do_start_student).parameters)[:len(keys)], "form != do_start_student"
    return do_start_student


def student_form(jobs: JobManager, training_on: bool, prefix: str = "") -> SimpleNamespace:
    """The flow tab's second form, folded: a teacher run (`teacher_runs`), the method, the student it starts from
    (`init_choices`), `student_fields` and the Distil button. Its student is saved as every student is,
    ``adapters/<run name>/`` with its card."""
    import gradio as gr

    with gr.Accordion("Distil a few-step student from a teacher run", open=False):
        runs = teacher_runs(jobs)
        st = SimpleNamespace(teacher_run=gr.Dropdown(runs, value=runs[0] if runs else None, label="teacher run",
                                                     elem_id=prefix + "flow-teacher-run"),
                             method=gr.Radio(list(METHODS), value=STUDENT_DEFAULTS["method"], label="method",
                                             info="reflow: 2-rectified flow on teacher pairs (piecewise with "
                                                  "windows > 1) · cd: consistency distillation on the flow ODE "
                                                  "(multi-boundary with boundaries > 1) · "
                                                  "dmd: distribution matching against the teacher, with a fake-score "
                                                  "LoRA and a regression on the teacher pairs (and, with a GAN "
                                                  "weight, DMD2's discriminator on real images)"))
        st.init = gr.Dropdown(init_choices(jobs, st.teacher_run.value), value="", label="start from student",
                              info="a student of this teacher run (--init): fashion-dmd-1 started from "
                                   "fashion-reflow-1, itself from fashion-reflow-4; a LoRA rank at least its own",
                              elem_id=prefix + "flow-student-init")
        st.inputs = form_inputs(student_fields())
        st.start = gr.Button("Distil", interactive=training_on, elem_id=prefix + "flow-student-start")
    return st


def flow_form(fields: list[FormField], training_on: bool, policy: H.Policy, prefix: str = "") -> SimpleNamespace:
    """The left column for the flow teacher: who may do what, what the run is, the data's state (how to get it
    when missing), the form, the instructor token and the Start / Stop / Resume buttons. ``form_extra``: no
    data-set, advanced or overwrite inputs (the data is Fashion-MNIST; a teacher run publishes no student). The
    tab adds the folded student form below it (`student_form`)."""
    import gradio as gr

    if policy.rules_line():
        gr.Markdown(policy.rules_line(), elem_id=prefix + "train-rules")
    gr.Markdown("Trains the class-conditioned flow teacher from scratch on Fashion-MNIST (seed 003 part B: "
                "flow matching, 10% of the classes dropped for CFG). After every epoch the page shows 4 samples of "
                "each class (Euler 50, CFG 5); the run folder is what `python -m cdlab.flow.train_teacher` writes.",
                elem_id=prefix + "flow-train-about")
    problem = data_problem()
    if problem:
        gr.Markdown(f"**{problem}**", elem_id=prefix + "flow-data-missing")
    ui = SimpleNamespace(inputs=form_inputs(fields), form_extra=[])
    ui.instructor = H.instructor_token_box(policy, prefix + "train-instructor")
    with gr.Row():
        ui.start = gr.Button("Start", variant="primary", interactive=training_on and not problem,
                             elem_id=prefix + "train-start")
        ui.stop = gr.Button("Stop", variant="stop", elem_id=prefix + "train-stop")
        ui.resume = gr.Button("Resume", interactive=training_on, elem_id=prefix + "train-resume")
    return ui
