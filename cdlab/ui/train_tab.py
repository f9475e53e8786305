"""The Train tab: what one poll of a run shows (status, progress, loss chart data, labelled preview), the form
(checked field by field, every value untrusted) and the tab itself (`TrainTab`, Gradio imported when it is built).
With the flow teacher the form is `cdlab.ui.flow_train`'s (train that teacher from scratch); the poll is this one.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PIL import Image

from cdlab.paths import adapters_dir, shown_path, shown_text
from cdlab.train import config as C
from cdlab.ui import hosting as H
from cdlab.ui import flow_train
from cdlab.ui import previews as previews_mod
from cdlab.ui.form import FormField, check_number, form_inputs  # FormField, form_inputs: re-exported
from cdlab.ui import runs as runs_mod
from cdlab.ui.jobs import JobManager, new_owner_token
from cdlab.ui.session import named_errors, user_errors


@dataclass
class RunView:
    """Everything the Train tab displays for one run (one poll)."""

    run_name: str
    state: str
    status_md: str
    progress_html: str
    loss: Any  # pandas DataFrame for the LinePlot (`cdlab.ui.runs.loss_frame`): step, loss, series; None before
    #            the first loss point (Gradio 6.31's LinePlot fails to draw later data after an empty frame)
    plot_title: str
    preview: Any  # PIL image: the labelled, composed preview (`cdlab.ui.previews.compose`), or None
    preview_caption: str
    log_tail: str
    active: bool  # keep polling
    step: int = 0
    max_steps: int = 0

    def label(self, updated: float = 0.0) -> str:
        """The runs dropdown's label for this run: the same state and step as the status line."""
        return runs_mod.RunInfo(self.run_name, Path(self.run_name), self.state, self.step, self.max_steps,
                                updated=updated).label()


def empty_view() -> RunView:
    """The view with no run selected."""
    return RunView("", "", "_No run selected. Start one, or pick a run from the list._", "", None, "", None, "", "",
                   False)


def _signature(ps: previews_mod.PreviewSet) -> tuple:
    sig = []
    for r in ps.rows:
        try:
            st = r.path.stat()
            sig.append((r.label, str(r.path), st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((r.label, str(r.path), 0, 0))
    return tuple(ps.prompts), tuple(sig)


_COMPOSED: dict[tuple, Any] = {}  # signature -> composed image: a poll a second re-composes only on change


def composed_preview(run_dir: Path) -> tuple[Any, str]:
    """The run's labelled preview (PIL image or None) and its caption, re-composed only when a file changed."""
    ps = previews_mod.read_previews(run_dir)
    if not ps.rows:
        return None, previews_mod.caption(ps)
    sig = _signature(ps)
    if sig not in _COMPOSED:
        if len(_COMPOSED) > 16:
            _COMPOSED.clear()
        _COMPOSED[sig] = previews_mod.compose(ps)
    return _COMPOSED[sig], previews_mod.caption(ps)


def poll(jobs: JobManager, run_name: str | None) -> RunView:
    """Read a run directory once: its state (with this app's process knowledge), metrics and previews."""
    if not run_name:
        return empty_view()
    run_dir = jobs.runs_dir / run_name
    if not run_dir.is_dir():
        return RunView(run_name, "missing", f"_Run {run_name!r} is gone from {shown_path(jobs.runs_dir)}._", "", None, "", None,
                       "", "", False)
    st = jobs.state(run_name)
    state = str(st.get("state", "queued"))
    rows = runs_mod.read_metrics(run_dir)
    p = runs_mod.progress(rows, st)
    line = runs_mod.progress_markdown(p, state)
    msg = shown_text(str(st.get("message") or "").strip())  # the page names no machine's folders
    student = st.get("student")
    head = f"**Run** `{run_name}`" + (f" → student `{student}`" if student else "")
    status_md = head + "  \n" + line + (f"  \n{msg}" if msg else "")
    log = shown_text(str(st.get("log_tail") or ""))
    if state == "failed" and log:
        status_md += "  \nThe trainer failed; the last lines of its log are below."
    image, caption = composed_preview(run_dir)
    title = f"{run_name} (resumed at step {', '.join(map(str, p.resumes))})" if p.resumes else run_name
    loss = runs_mod.loss_frame(rows) if rows else None
    return RunView(run_name, state, status_md, runs_mod.progress_html(p, state), loss, title,
                   image, caption, log, state in runs_mod.ACTIVE_STATES, step=p.step, max_steps=p.max_steps)


def read_image(path: Path | None):
    """A PIL copy of an image file (None if it is gone), so the app returns pixels, not a path under runs/."""
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def run_choices(jobs: JobManager, current: RunView | None = None) -> list[tuple[str, str]]:
    """(label, name) pairs for the runs dropdown: every run directory, the CLI's included, newest first.

    ``current`` (the view a poll just built) relabels its run with the state and step of the status line,
    so the list and the status always agree."""
    out = []
    for r in runs_mod.list_runs(jobs.runs_dir):
        if current is not None and r.name == current.run_name and current.state not in ("", "missing"):
            out.append((current.label(r.updated), r.name))
        else:
            out.append((r.label(), r.name))
    return out


# ------------------------------------------------------------------------------ the form

DATA_KINDS = ("tiny world", "image folder", "HF datasets name", "COCO recipe folder")

# The TrainConfig fields the form shows; a number's range is the app's (`cdlab.train.config.APP_LIMITS`, the
# one table the advanced JSON is checked against too). Every other field keeps the trainer's default.
_FORM = [
    ("method", "mode", "choice", {"choices": ("ct", "cd", "mbcd", "dmd"),
                                  "info": "ct: no teacher · cd: one boundary · mbcd: multi-boundary CD · "
                                          "dmd: distribution matching (N = generator steps)"}),
    ("num_boundaries", "boundaries N", "int", {}),
    ("lora_rank", "LoRA rank", "int", {}),
    ("lr", "learning rate", "float", {}),
    ("max_steps", "steps", "int", {}),
    ("batch_size", "batch size", "int", {}),
    ("guidance", "guidance w (min)", "float", {}),
    ("guidance_max", "guidance w (max; = min for a fixed w)", "float", {}),
    ("preview_every", "preview every (steps)", "int", {}),
    ("student_name", "student name", "text", {"info": "saved to adapters/<name>; letters, digits, - and _"}),
]


def form_fields(model: str, teacher_resolution: int | None = None) -> list[FormField]:
    """The form, with the trainer's defaults for this teacher (its profile fills the ``None`` fields)."""
    prof = C.PROFILES[C.profile_name(model, teacher_resolution)]
    base = C.TrainConfig()
    out = []
    for key, label, kind, extra in _FORM:
        default = getattr(base, key)
        if default is None:
            default = prof.get(key)
        if key == "num_boundaries" and default is None:
            default = 1 if base.method == "cd" else 4
        if key == "guidance_max" and default is None:
            default = prof.get("guidance")
        if key == "max_steps":
            default = 300 if C.profile_name(model, teacher_resolution) == "tiny" else default
        if key == "preview_every":
            default = 50 if C.profile_name(model, teacher_resolution) == "tiny" else default
        if kind in ("int", "float"):
            extra = {**extra, "minimum": C.APP_LIMITS[key][0], "maximum": C.APP_LIMITS[key][1]}
        out.append(FormField(key, label, kind, default, **extra))
    return out


def data_value(kind: str, value: str | None, roots: list[Path] | None = None) -> str:
    """The trainer's ``data`` field from the form's data-set choice; checks what can be checked here.

    Folders must lie inside the data folders the host allows (`cdlab.train.config.data_roots`).
    Raises ``ValueError`` for a folder outside them, one that does not exist or has no readable
    ``metadata.jsonl``, or an HF name without the ``datasets`` package.
    """
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"config: data set kind must be one of {DATA_KINDS}.")
    if value is not None and not isinstance(value, str):
        raise ValueError("config: data set folder or name must be text.")
    value = (value or "").strip()
    if kind == "tiny world":
        return "world"
    if kind in ("image folder", "COCO recipe folder"):
        if not value:
            raise ValueError("Give the data-set folder (with images and a metadata.jsonl)."
                             + (" Make one with `python -m cdlab coco --images DIR --captions FILE --out DIR`."
                                if kind == "COCO recipe folder" else ""))
        folder = Path(C.check_data(value, roots))
        meta = folder / "metadata.jsonl"
        if not folder.is_dir():
            raise ValueError(f"The data-set folder {value!r} does not exist.")
        try:
            first = next((ln for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip()), None)
            if first is None or not isinstance(json.loads(first), dict):
                raise ValueError
        except (OSError, ValueError, UnicodeDecodeError):
            raise ValueError(f"The data-set folder {value!r} has no readable metadata.jsonl "
                             "(one JSON object a line: file_name and text).") from None
        return str(folder)
    if kind == "HF datasets name":
        if not value:
            raise ValueError("Give a Hugging Face datasets name, e.g. 'user/my-captioned-images'.")
        name = C.check_data(value if value.startswith("hf:") else f"hf:{value}", roots)
        if importlib.util.find_spec("datasets") is None:
            raise ValueError("Training on an HF datasets name needs the `datasets` package (pip install datasets).")
        return name
    raise ValueError(f"config: data set kind must be one of {DATA_KINDS}, got {str(kind)[:40]!r}.")


MAX_EXTRA_JSON = 10_000  # characters in the form's advanced box


def form_to_config(values: dict[str, Any], model: str, data_kind: str, data_path: str | None,
                   teacher_resolution: int | None = None, extra_json: str | None = None, *,
                   overwrite: bool = False, adapters_root: Path | None = None) -> dict[str, Any]:
    """Check the form (from the browser or the API: every field hostile) and return the resolved config dict.

    ``extra_json`` (the form's "advanced" box) sets other `TrainConfig` fields, e.g. ``{"log_every": 1}``;
    it goes through `cdlab.train.config.untrusted_overrides` (unknown and host-only keys, types, finite
    numbers, text, data folders confined). The resolved config is checked by the trainer's own `check`
    (ranges, names), then, form and JSON alike, by `cdlab.train.config.check_app_limits` (the app's caps),
    and by `check_destination`: an existing student is replaced only with ``overwrite``, and
    the students shipped with the repository never.

    Raises ``ValueError`` whose message names the bad field.
    """
    unknown = sorted(set(values) - {f.key for f in form_fields(model, teacher_resolution)})
    if unknown:
        raise ValueError(f"config: unknown form field(s) {unknown}.")
    d: dict[str, Any] = {"model": model}
    for f in form_fields(model, teacher_resolution):
        v = values.get(f.key, f.default)
        if f.kind in ("int", "float"):
            v = check_number(f, v)
        elif f.kind == "choice":
            if v not in f.choices:
                raise ValueError(f"config: {f.label} must be one of {f.choices}, got {str(v)[:40]!r}.")
        elif f.kind == "text":
            if v is not None and not isinstance(v, str):
                raise ValueError(f"config: {f.label} must be text, got {type(v).__name__}.")
            v = (v or "").strip()
            if len(v) > C.MAX_TEXT:
                raise ValueError(f"config: {f.label} is {len(v)} characters long; the limit is {C.MAX_TEXT}.")
        d[f.key] = v
    if d.get("method") == "cd":
        d["num_boundaries"] = 1
    if not isinstance(overwrite, bool):
        raise ValueError(f"config: overwrite must be true or false, got {overwrite!r}.")
    d["overwrite"] = overwrite
    d["data"] = data_value(data_kind, data_path)
    if extra_json is not None and not isinstance(extra_json, str):
        raise ValueError("config: the advanced settings must be JSON text.")
    if extra_json and extra_json.strip():
        if len(extra_json) > MAX_EXTRA_JSON:
            raise ValueError(f"config: the advanced settings are {len(extra_json)} characters; the limit is "
                             f"{MAX_EXTRA_JSON}.")
        try:
            extra = json.loads(extra_json, parse_constant=lambda c: float(c))
        except ValueError as e:
            raise ValueError(f"config: the advanced settings are not valid JSON ({e}).") from None
        d.update(C.untrusted_overrides(extra))
    cfg = C.resolve(C.from_dict(d), teacher_resolution)
    C.check_app_limits(cfg)  # the form's values and the advanced JSON's, against the one table
    C.check_destination(cfg, adapters_root, allow_shipped=False)
    return cfg.to_dict()


# ------------------------------------------------------------------------------ the tab (Gradio)

def view_outputs(v: RunView) -> tuple:
    """One run's view as the tab's status, bar, loss, preview, caption, log and timer. The preview leaves runs/ as
    pixels (runs/ itself is never served)."""
    import gradio as gr

    return (v.status_md, v.progress_html, gr.LinePlot(value=v.loss, title=v.plot_title or None), v.preview,
            v.preview_caption, gr.Textbox(value=v.log_tail, visible=bool(v.log_tail)), gr.Timer(active=v.active))


def listed_runs(jobs: JobManager, current: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """The runs list, and ``current`` while it is still listed, else the newest run (None: no runs)."""
    choices = run_choices(jobs)
    names = [n for _, n in choices]
    return choices, (current if current in names else (names[0] if names else None))


def distill_start_handler(jobs: JobManager, teacher: Any, model: str, policy: H.Policy,
                          adapters_root: Path | None = None):
    """The tab's ``/train_start`` for a LoRA student (``python -m cdlab train``): who may (the host's policy), the
    form (`form_to_config`), replacing a student (its owner's or the instructor's), then the launch."""
    import gradio as gr

    adapters = Path(adapters_root) if adapters_root is not None else adapters_dir()

    @user_errors
    def do_start(method, num_boundaries, lora_rank, lr, max_steps, batch_size, guidance, guidance_max,
                 preview_every, student_name, data_kind, data_path, extra_config, overwrite, owner,
                 instructor_token=""):
        """Start a training run; the config is checked field by field (every value is untrusted)."""
        if not policy.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        policy.require_instructor(instructor_token, "Training")
        form = dict(method=method, num_boundaries=num_boundaries, lora_rank=lora_rank, lr=lr, max_steps=max_steps,
                    batch_size=batch_size, guidance=guidance, guidance_max=guidance_max,
                    preview_every=preview_every, student_name=student_name)
        cfg = form_to_config(form, model, data_kind, data_path, teacher.resolution, extra_config,
                             overwrite=overwrite, adapters_root=adapters_root)
        owner = owner if isinstance(owner, str) and owner else new_owner_token()
        if cfg.get("overwrite"):
            jobs.check_replace(cfg["student_name"], adapters, owner, allow_unowned=not policy.shared,
                               override=policy.is_instructor(instructor_token))
        job = jobs.start(cfg, owner=owner)
        return gr.Dropdown(choices=run_choices(jobs), value=job.run_name), owner

    return do_start


def train_handlers(jobs: JobManager, teacher: Any, model: str, fields: list[FormField],
                   policy: H.Policy | None = None, adapters_root: Path | None = None) -> SimpleNamespace:
    """The tab's event functions: ``/train_start``, ``/train_stop``, ``/train_resume``, ``/train_status``,
    ``/refresh_runs`` and the poll of the page's timer. Every value is untrusted. Who may do what is the host's
    `cdlab.ui.hosting.Policy`: in a classroom, start and resume need the instructor token; stop and resume are
    the starting session's (`cdlab.ui.jobs.JobManager.check_owner`) or the instructor's, and so is replacing a
    student (`cdlab.ui.jobs.JobManager.check_replace`). Start trains a LoRA student (`distill_start_handler`), or
    with the flow teacher that teacher from scratch (`cdlab.ui.flow_train.start_handler`)."""
    import gradio as gr

    policy = policy or H.Policy()
    flow = flow_train.is_flow_teacher(model, teacher)
    start = flow_train.start_handler(jobs, policy, run_choices) if flow \
        else distill_start_handler(jobs, teacher, model, policy, adapters_root)
    start_student = flow_train.student_start_handler(jobs, policy, run_choices) if flow else None
    assert [f.key for f in fields] == list(inspect.signature(start).parameters)[:len(fields)], "form != start"

    @user_errors
    def do_stop(run_name, owner, instructor_token=""):
        instructor = policy.is_instructor(instructor_token)
        job = jobs.active()
        if job is not None and job.owner is None:  # resumed from a CLI run: nobody's, so the instructor's
            policy.require_instructor(instructor_token, "Stopping a run without an owner")
        name = jobs.stop(run_name or None, owner=owner, check_owner=not instructor)
        return f"Stop requested for run `{name or run_name}`; it saves a checkpoint and stops."

    @user_errors
    def do_resume(run_name, owner, instructor_token=""):
        if not policy.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        policy.require_instructor(instructor_token, "Resuming a run")
        if not run_name:
            raise gr.Error("Pick a run to resume.")
        if flow and isinstance(run_name, str) and runs_mod.run_kind(jobs.runs_dir / run_name) == "distill":
            raise gr.Error(f"Run {run_name[:40]!r} trains a student of another teacher; resume it from an app "
                           "serving that teacher.")
        jobs.resume(run_name, owner=owner, allow_unowned=not policy.public,
                    override=policy.is_instructor(instructor_token))
        return f"Run `{run_name}` resumes from its newest complete checkpoint."

    def poll_timer(run_name):
        """Keep polling while the run is active (the page's timer; not part of the API)."""
        return gr.Timer(active=poll(jobs, run_name).active)

    @user_errors
    def do_status(run_name):
        """What the Train tab shows for one run: the runs list, status, progress, loss, previews, log."""
        return do_poll(run_name)[:-1]

    @user_errors
    def do_poll(run_name):
        v = poll(jobs, run_name)
        # The runs list is relabelled from the same view as the status line; no value is sent, so a pick made
        # while this poll ran is kept.
        return (gr.Dropdown(choices=run_choices(jobs, v)), *view_outputs(v))

    def refresh_runs(current=None):
        choices, name = listed_runs(jobs, current)
        return gr.Dropdown(choices=choices, value=name)

    def load_view():
        """The page load: the runs list with the newest run selected, and that run's view (one listing). A
        component made in a handler is an update without a ``value`` to read back, hence ``listed_runs``."""
        choices, name = listed_runs(jobs)
        return (gr.Dropdown(choices=choices, value=name), *view_outputs(poll(jobs, name)))

    return SimpleNamespace(start=start, start_student=start_student, stop=do_stop, resume=do_resume, poll_timer=poll_timer, status=do_status,
                           poll=do_poll, refresh_runs=refresh_runs, load_view=load_view)


def train_form(fields: list[FormField], training_on: bool, policy: H.Policy) -> SimpleNamespace:
    """The left column: who may do what on a shared host, the form (`form_fields`), the data set, the advanced
    JSON, overwrite, the instructor token (a classroom) and the Start / Stop / Resume buttons."""
    import gradio as gr

    if policy.rules_line():
        gr.Markdown(policy.rules_line(), elem_id="train-rules")
    ui = SimpleNamespace(inputs=form_inputs(fields))
    ui.data_kind = gr.Radio(list(DATA_KINDS), value=DATA_KINDS[0], label="Data set")
    ui.data_path = gr.Textbox("", label="Folder or HF datasets name (not for the tiny world)")
    ui.extra = gr.Textbox("", label="Advanced: other config fields as JSON", placeholder='{"log_every": 10}',
                          elem_id="extra-config")
    ui.overwrite = gr.Checkbox(False, label="Replace an existing student of this name",
                               info="Off: a name in use is refused. Shipped students are never replaced.",
                               elem_id="train-overwrite")
    ui.form_extra = [ui.data_kind, ui.data_path, ui.extra, ui.overwrite]  # the inputs after the fields
    ui.instructor = H.instructor_token_box(policy, "train-instructor")
    with gr.Row():
        ui.start = gr.Button("Start", variant="primary", interactive=training_on, elem_id="train-start")
        ui.stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        ui.resume = gr.Button("Resume", interactive=training_on, elem_id="train-resume")
    return ui


def train_monitor(ui: SimpleNamespace, jobs: JobManager, prefix: str = "") -> None:
    """The right column, added to ``ui``: the runs list (app and CLI), status, progress bar, loss chart and the
    trainer's log on failure."""
    import gradio as gr

    with gr.Row():
        ui.run_dd = gr.Dropdown(run_choices(jobs), label="Runs (app and CLI)", scale=5, elem_id=prefix + "runs")
        ui.runs_refresh = gr.Button("↻ runs", size="sm", scale=1)
    ui.status = gr.Markdown(elem_id=prefix + "train-status", label="status")
    ui.bar = gr.HTML(label="progress")
    ui.plot = gr.LinePlot(None, x="step", y="loss", color="series", label="Loss", x_title="step", y_title="loss",
                          color_title="", elem_id=prefix + "loss-plot")
    ui.log_box = gr.Textbox(label="Last lines of the trainer's log", lines=10, visible=False)


class TrainTab:
    """The Train tab, built inside the page's ``gr.Tabs``: the form, the runs list and one run's status,
    polled by the page's timer while the run is active; ``owner`` is the browser's token (a
    ``gr.BrowserState``) that lets it stop and resume its own runs; ``policy`` says who may do what here.

    With the flow teacher (``model == "fashion-flow"``, or a ``teacher`` whose ``base_id`` is
    ``"cdlab/fashion-flow"``: `cdlab.ui.flow_train.is_flow_teacher`) the form trains that teacher from scratch
    (`cdlab.ui.flow_train`); the runs list, status, loss, previews, Stop and Resume are the same."""

    def __init__(self, jobs: JobManager, teacher: Any, model: str, owner: Any, policy: H.Policy | None = None,
                 adapters_root: Path | None = None, prefix: str = ""):
        """``prefix``: of the tab's id, the flow form's and the monitor's elem_ids (``"flow-"``) and the API names
        (``/flow_train_start``, ...), for a second Train tab on the page (the flow teacher's, sharing ``jobs``:
        one training slot)."""
        import gradio as gr

        policy = policy or H.Policy()
        flow = flow_train.is_flow_teacher(model, teacher)
        fields = flow_train.form_fields() if flow else form_fields(model, teacher.resolution)
        training_on = policy.training_allowed()
        self.fn, self.jobs = train_handlers(jobs, teacher, model, fields, policy, adapters_root), jobs
        self.api = prefix.replace("-", "_")
        with gr.Tab("Train" + (f" ({prefix.strip('-')})" if prefix else ""), id=prefix + "train"):
            if not training_on:
                gr.Markdown(f"**{H.TRAINING_OFF_MESSAGE}**", elem_id=prefix + "training-off")
            with gr.Row():
                with gr.Column(scale=2):
                    ui = (flow_train.flow_form(fields, training_on, policy, prefix) if flow
                          else train_form(fields, training_on, policy))
                    ui.student = flow_train.student_form(jobs, training_on, prefix) if flow else None
                with gr.Column(scale=3):
                    train_monitor(ui, jobs, prefix)
            # Full width: the captions above the rows stay readable at 1280 px.
            ui.preview = gr.Image(label="Previews", type="pil", elem_id=prefix + "preview",
                                  buttons=["download", "fullscreen"])
            ui.preview_cap = gr.Markdown(elem_id=prefix + "preview-caption", label="preview caption")
            ui.timer = gr.Timer(1.0, active=False)
            self.ui = ui
            self._wire(owner)
        self.load_outputs = [ui.run_dd, ui.status, ui.bar, ui.plot, ui.preview, ui.preview_cap, ui.log_box, ui.timer]

    def _wire(self, owner: Any) -> None:
        import gradio as gr

        ui, fn = self.ui, self.fn
        poll_out = [ui.run_dd, ui.status, ui.bar, ui.plot, ui.preview, ui.preview_cap, ui.log_box, ui.timer]
        named_errors(*ui.inputs, *ui.form_extra, ui.run_dd)
        start_polling = dict(fn=lambda: gr.Timer(active=True), inputs=None, outputs=ui.timer, api_visibility="private")
        # The run's owner token comes back by name (a BrowserState has no label) and is kept in this browser.
        owner_out = gr.Textbox(visible=False, label="owner")
        form = [*ui.inputs, *ui.form_extra, owner, ui.instructor]
        ui.start.click(fn.start, form, [ui.run_dd, owner_out], api_name=self.api + "train_start").success(
            lambda o: o, owner_out, owner, api_visibility="private").success(**start_polling)
        if ui.student is not None:  # the flow teacher's second form: a student of a teacher run
            st = ui.student
            named_errors(st.teacher_run, st.method, st.init, *st.inputs)
            st.start.click(fn.start_student, [st.teacher_run, st.method, st.init, *st.inputs, owner, ui.instructor],
                           [ui.run_dd, owner_out], api_name=self.api + "train_flow_student").success(
                lambda o: o, owner_out, owner, api_visibility="private").success(**start_polling)
            ui.runs_refresh.click(lambda: gr.Dropdown(choices=flow_train.teacher_runs(self.jobs)), None,
                                  st.teacher_run, api_visibility="private")
            # the students of the teacher run picked, fresh (one distilled since shows up)
            init_of = dict(fn=lambda run: gr.Dropdown(choices=flow_train.init_choices(self.jobs, run), value=""),
                           inputs=st.teacher_run, outputs=st.init, api_visibility="private")
            st.teacher_run.change(**init_of)
            ui.runs_refresh.click(**init_of)
        ui.stop.click(fn.stop, [ui.run_dd, owner, ui.instructor], ui.status, api_name=self.api + "train_stop").success(
            **start_polling)
        ui.resume.click(fn.resume, [ui.run_dd, owner, ui.instructor], ui.status, api_name=self.api + "train_resume").success(
            **start_polling)
        ui.run_dd.change(fn.status, ui.run_dd, poll_out[:-1], api_name=self.api + "train_status").then(
            fn.poll_timer, ui.run_dd, ui.timer, api_visibility="private")
        ui.timer.tick(fn.poll, ui.run_dd, poll_out, api_visibility="private")
        ui.runs_refresh.click(fn.refresh_runs, ui.run_dd, ui.run_dd, api_name=self.api + "refresh_runs")

    def on_load(self) -> tuple:
        """The runs list, fresh (a run started since, the CLI's too, shows up), and the selected run's status,
        loss, previews and log, polling on while it runs: a page opened mid-run shows the run at once, even when
        the selection is the one the page was built with (no change event then)."""
        return self.fn.load_view()
