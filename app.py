"""cdlab's Gradio app: Compare the teacher with its students, Edit with them, Train a student, read Evaluations.

    python app.py                       # tiny teacher on CPU; SD1.5 on CUDA (falls back to tiny)
    python app.py --model sd15 --host 0.0.0.0 --port 7860 [--share]
    python app.py --model sd15-random         # SD1.5's architecture with random weights: the SD1.5 path offline
    python app.py --model path/to/diffusers/pipeline

Layout and wiring only: the logic lives in ``cdlab.ui`` (testable without Gradio).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path

import gradio as gr

from cdlab import paths as P
from cdlab.ui import compare as C
from cdlab.ui import compare_view as V
from cdlab.ui import edit_tab as ED
from cdlab.ui import evaluate_tab as E
from cdlab.ui import hosting as H
from cdlab.ui import session as S
from cdlab.ui import train_tab as T
from cdlab.ui.jobs import JobError, JobManager, new_owner_token

log = logging.getLogger("cdlab.app")
CSS = (".cdlab-header {font-size: 0.95em} .cdlab-header h2 {margin: 0 0 2px 0} "
       "#compare-legend {font-size: 0.8em; opacity: 0.85} #compare-info {font-size: 0.85em} "
       "#compare-gallery img, #edit-gallery img, #edit-image canvas {image-rendering: pixelated} "
       "#edit-info {font-size: 0.85em}" + V.CSS)
USER_ERRORS = (ValueError, JobError, FileNotFoundError, KeyError)  # InputError, StudentError: ValueErrors


def user_errors(fn):
    """Turn the logic's errors into a gr.Error for the page; the server carries on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # a bug or a backend failure: still a message, not a dead server
            log.exception("request failed")
            raise gr.Error(f"{type(e).__name__}: {e}") from None
    return wrapper


_NAMED_CLASSES: dict[type, type] = {}


def _named_class(cls: type) -> type:
    """A subclass of component class ``cls``, with the same name (the page picks a component's code by its
    class name), whose ``preprocess`` prefixes Gradio's own input errors with the component's label."""
    if cls not in _NAMED_CLASSES:
        def preprocess(self, payload):
            try:
                return cls.preprocess(self, payload)
            except gr.Error as e:
                raise gr.Error(f"{self.label}: {e.message}") from None
            except Exception as e:  # e.g. an upload that is not an image: refused by name, the server goes on
                raise gr.Error(f"{self.label}: could not read the value ({type(e).__name__}: {str(e)[:120]})") from None

        _NAMED_CLASSES[cls] = type(cls.__name__, (cls,), {"preprocess": preprocess, "__module__": cls.__module__})
    return _NAMED_CLASSES[cls]


def named_errors(*components):
    """Prefix Gradio's own input checks (a value out of a slider's range, not among a radio's choices) with
    the component's label, so every refused field is named; our own checks name theirs already. Done on the
    class (a same-named subclass), so it holds for the per-session copies Gradio builds when an update
    changes a component (new choices in a dropdown)."""
    for comp in components:
        comp.__class__ = _named_class(type(comp))
    return components


def build_demo(teacher, model_arg: str, share: bool = False) -> gr.Blocks:
    runs_dir, adapters_dir, evals_dir = P.runs_dir(), P.adapters_dir(), P.evals_dir()
    comparer = C.Comparer(teacher, adapters_root=adapters_dir, batching=H.batching_allowed())
    jobs = JobManager(runs_dir, model=model_arg)
    presets = C.prompt_presets(teacher)
    fields = T.form_fields(model_arg, teacher.resolution)
    public = H.is_public_host(share)
    training_on = H.training_allowed(share)
    eval_default, eval_max = H.eval_prompt_limits(share)

    @user_errors
    def do_compare(prompt, seed, guidance, steps, columns, show_trajectory, progress=gr.Progress()):
        """Sample the ticked columns from one noise and one prompt; returns the columns (HTML, one row), their
        images with captions, the timings table, the aligned trajectory grid (HTML), the PNG and a summary."""
        res = comparer.run(prompt, seed, guidance, steps, columns, bool(show_trajectory),
                           progress=lambda f, d: progress(f, desc=d))
        for w in res.warnings:
            gr.Warning(w)
        images = [(c.image, c.caption()) for c in res.columns]
        traj = V.trajectory_html(res)
        path = Path(tempfile.mkdtemp(prefix="cdlab-compare-")) / f"compare_seed{res.seed}.png"
        res.compose().save(path)
        shared = f" · served together with {res.batch - 1} other request(s)" if res.batch > 1 else ""
        info = (f"{len(res.columns)} columns in {res.total_seconds:.2f} s · seed {res.seed} · one text encoding, "
                f"one initial noise{shared}")
        return V.columns_html(res), images, res.table(), traj, str(path), info

    def prompt_notice(prompt):
        text, nearest = comparer.prompt_notice(prompt)
        return (gr.Markdown(f"⚠ {text}" if text else "", visible=bool(text)),
                gr.Button(visible=bool(nearest)), nearest or "")

    do_compare = H.gpu(do_compare, duration=120)

    def refresh_columns():
        choices = comparer.column_choices()
        return gr.CheckboxGroup(choices=choices, value=choices)

    edit_presets = ED.presets(teacher)

    @user_errors
    def do_edit(technique, image, prompt, prompt_2, strength, seed, student_steps, columns):
        """Run one edit (sdedit | inpaint | anagram | hybrid) in every ticked column from one noise; returns the
        columns (HTML, one row, the input first), their images with captions, the timings table and a summary."""
        v = ED.run_edit(teacher, comparer, technique, image, prompt, prompt_2, strength, seed, student_steps,
                        columns)
        for note in v.notes:
            gr.Info(note)
        return v.html(), v.gallery(), v.table, v.summary

    do_edit = H.gpu(do_edit, duration=120)

    def edit_technique_changed(technique):
        """Labels and visibility follow the technique: two prompts for anagrams and hybrids, no strength there (the
        image editor stays: re-rendering it would drop a drawing; anagrams and hybrids ignore it)."""
        technique = technique if technique in ED.TECHNIQUES else "sdedit"
        first, second = ED.PROMPTS[technique]
        return (gr.Textbox(info=first), gr.Textbox(info=second, visible=second is not None),
                gr.Slider(visible=ED.USES_STRENGTH[technique]))

    @user_errors
    def edit_preset_run(name, student_steps, columns):
        """Fill the inputs from a preset AND run its edit from the preset's own values, in one event (a second
        event reading the inputs back from the page could read them before the page applied them)."""
        p = next((p for p in edit_presets if p.name == name), None)
        if p is None:
            return (gr.skip(),) * 10
        editor = p.editor_value()
        fill = (p.technique, editor if editor is not None else gr.skip(), p.prompt, p.prompt_2, p.strength, p.seed)
        return (*fill, *do_edit(p.technique, editor, p.prompt, p.prompt_2, p.strength, p.seed, student_steps, columns))

    def edit_preset_selected(student_steps, columns, evt: gr.SelectData):
        return edit_preset_run(evt.value, student_steps, columns)

    def edit_first_visit(row, student_steps, columns):
        """The tab opens with a result: on the first visit (nothing shown yet) the first preset is run."""
        if row or not edit_presets:
            return (gr.skip(),) * 10
        return edit_preset_run(edit_presets[0].name, student_steps, columns)

    def refresh_edit_columns():
        choices = ED.edit_column_choices(comparer)
        return gr.CheckboxGroup(choices=choices, value=choices)

    def edit_columns_on_select(current, known):
        """On every visit of the tab: students that appeared since (a finished training run) are offered and
        ticked; the user's other ticks are kept."""
        choices = ED.edit_column_choices(comparer)
        known = known or []
        value = [c for c in (current or []) if c in choices] + [c for c in choices if c not in known]
        return gr.CheckboxGroup(choices=choices, value=value), choices

    @user_errors
    def do_start(method, num_boundaries, lora_rank, lr, max_steps, batch_size, guidance, guidance_max,
                 preview_every, student_name, data_kind, data_path, extra_config, overwrite, owner):
        """Start a training run; the config is checked field by field (every value is untrusted)."""
        if not training_on:
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        form = dict(method=method, num_boundaries=num_boundaries, lora_rank=lora_rank, lr=lr, max_steps=max_steps,
                    batch_size=batch_size, guidance=guidance, guidance_max=guidance_max,
                    preview_every=preview_every, student_name=student_name)
        cfg = T.form_to_config(form, model_arg, data_kind, data_path, teacher.resolution, extra_config,
                               overwrite=overwrite, adapters_root=adapters_dir)
        owner = owner if isinstance(owner, str) and owner else new_owner_token()
        job = jobs.start(cfg, owner=owner)
        return gr.Dropdown(choices=T.run_choices(jobs), value=job.run_name), owner

    assert [f.key for f in fields] == list(inspect.signature(do_start).parameters)[:len(fields)], "form != do_start"

    @user_errors
    def do_stop(run_name, owner):
        name = jobs.stop(run_name or None, owner=owner, check_owner=True)
        return f"Stop requested for run `{name or run_name}`; it saves a checkpoint and stops."

    @user_errors
    def do_resume(run_name, owner):
        if not training_on:
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        if not run_name:
            raise gr.Error("Pick a run to resume.")
        jobs.resume(run_name, owner=owner, allow_unowned=not public)
        return f"Run `{run_name}` resumes from its newest complete checkpoint."

    def poll_timer(run_name):
        """Keep polling while the run is active (the page's timer; not part of the API)."""
        return gr.Timer(active=T.poll(jobs, run_name).active)

    @user_errors
    def do_status(run_name):
        """What the Train tab shows for one run: the runs list, status, progress, loss, previews, log."""
        return do_poll(run_name)[:-1]

    @user_errors
    def do_poll(run_name):
        v = T.poll(jobs, run_name)
        # The preview leaves runs/ as pixels (runs/ itself is never served). The runs list is relabelled from
        # the same view as the status line; no value is sent, so a pick made while this poll ran is kept.
        return (gr.Dropdown(choices=T.run_choices(jobs, v)), v.status_md, v.progress_html,
                gr.LinePlot(value=v.loss, title=v.plot_title or None), v.preview, v.preview_caption,
                gr.Textbox(value=v.log_tail, visible=bool(v.log_tail)), gr.Timer(active=v.active))

    def refresh_runs(current=None):
        choices = T.run_choices(jobs)
        names = [n for _, n in choices]
        return gr.Dropdown(choices=choices, value=current if current in names else (names[0] if names else None))

    @user_errors
    def show_eval(name):
        v = E.load_view(evals_dir, name or None)
        if v is None:
            return "_No evaluation yet: run one below or with `python -m cdlab evaluate`._", None, ""
        return v.table_md, T.read_image(v.plot), f"`{v.name}` · {v.summary}"

    def refresh_evals():
        names = E.evaluation_choices(evals_dir)
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    @user_errors
    def do_evaluate(prompts, progress=gr.Progress()):
        n = E.check_prompt_count(prompts, eval_max)
        path = E.run_new_evaluation(teacher, n=n, progress=lambda f, d="": progress(f, desc=d))
        names = E.evaluation_choices(evals_dir)
        return gr.Dropdown(choices=names, value=path.name if path.name in names else (names[0] if names else None))

    do_evaluate = H.gpu(do_evaluate, duration=600)

    with gr.Blocks(title="cdlab: consistency distillation lab") as demo:
        gr.Markdown("**cdlab** · consistency distillation lab · " + S.header_line(teacher), elem_classes=["cdlab-header"],
                    elem_id="header")
        ready = gr.HTML("", elem_id="app-ready", padding=False)
        owner = gr.BrowserState("", storage_key="cdlab-owner")  # this browser's token: stop/resume own runs
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                # Controls on the left, the result on the right: at 1280x800 the default comparison's columns
                # and their labels are on screen when the page opens.
                with gr.Row():
                    with gr.Column(scale=1, min_width=330):
                        prompt = gr.Textbox(label="Prompt", value=presets[0], lines=2, max_lines=4, elem_id="prompt")
                        with gr.Row():
                            notice = gr.Markdown(visible=False, elem_id="prompt-notice")
                        use_nearest = gr.Button("use the nearest caption", size="sm", visible=False,
                                                elem_id="use-nearest")
                        preset = gr.Dropdown(presets, label="Presets", value=None)
                        run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                        with gr.Row(equal_height=True):
                            seed = gr.Number(label="Seed", value=0, precision=0, scale=2, min_width=90)  # C.validate_request
                            rand = gr.Button("random seed", size="sm", scale=1, min_width=90)  # words: no emoji font
                        guidance = gr.Slider(*C.GUIDANCE_RANGE, value=teacher.guidance, step=0.5,
                                             label="Teacher guidance (CFG)")
                        steps = gr.Radio([str(k) for k in C.STUDENT_STEPS], value="4", label="Student steps")
                        choices = comparer.column_choices()
                        columns = gr.CheckboxGroup(choices, value=choices, label="Columns")
                        with gr.Row(equal_height=True):
                            show_traj = gr.Checkbox(label="Show trajectory (x_t, x̂0 per step)", scale=3,
                                                    elem_id="show-trajectory")
                            refresh = gr.Button("↻ columns", size="sm", scale=1, min_width=90,
                                                elem_id="refresh-columns")
                    with gr.Column(scale=3):
                        info = gr.Markdown(elem_id="compare-info", label="summary")
                        row = gr.HTML(elem_id="compare-row", padding=False, label="columns html")
                        gr.Markdown(V.LEGEND, elem_id="compare-legend")
                        traj = gr.HTML("", elem_id="trajectory", padding=False, label="trajectory html")
                        with gr.Accordion("Images and timings (as the API returns them)", open=False):
                            gallery = gr.Gallery(label="Images", height="auto", elem_id="compare-gallery",
                                                 object_fit="contain")
                            table = gr.Dataframe(headers=["column", "seconds", "NFE", "speedup vs teacher-50"],
                                                 label="Timings", interactive=False)
                        download = gr.DownloadButton("Download comparison (PNG)", elem_id="download-btn")
                nearest = gr.State("")
                preset.change(lambda p: p or gr.skip(), preset, prompt, api_visibility="private")
                rand.click(C.random_seed, None, seed, api_name="random_seed")
                refresh.click(refresh_columns, None, columns, api_name="refresh_columns")
                prompt.change(prompt_notice, prompt, [notice, use_nearest, nearest], api_visibility="private")
                named_errors(prompt, seed, guidance, steps, columns, show_traj)
                compare_inputs = [prompt, seed, guidance, steps, columns, show_traj]
                compare_outputs = [row, gallery, table, traj, download, info]
                compare_kw = dict(concurrency_id=H.COMPARE_CONCURRENCY_ID, concurrency_limit=H.COMPARE_CONCURRENCY_LIMIT)
                run_btn.click(do_compare, compare_inputs, compare_outputs, api_name="compare", **compare_kw)
                use_nearest.click(lambda n: n or gr.skip(), nearest, prompt, api_visibility="private").then(
                    do_compare, compare_inputs, compare_outputs, api_visibility="private", **compare_kw)

            with gr.Tab("Edit", id="edit") as edit_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=330):
                        e_preset = gr.Dropdown([p.name for p in edit_presets], value=None, elem_id="edit-preset",
                                               label="Presets (one click: the inputs, then the edit)")
                        e_tech = gr.Radio([(ED.TECHNIQUE_LABELS[k], k) for k in ED.TECHNIQUES], value="sdedit",
                                          label="Technique", elem_id="edit-technique")
                        canvas = int(teacher.resolution)
                        gr.Markdown(f"**Image** ({canvas}×{canvas} px): upload or draw. SDEdit edits the picture as "
                                    "drawn; for inpainting, paint over the region to regenerate (the paint is the "
                                    "mask).", elem_id="edit-image-help")
                        e_image = gr.ImageEditor(
                            type="pil", image_mode="RGBA", canvas_size=(canvas, canvas), fixed_canvas=True, format="png",
                            sources=("upload", "clipboard"), transforms=(), height=360, elem_id="edit-image",
                            label="Image",
                            brush=gr.Brush(default_size=max(2, canvas // 10), color_mode="defaults"),
                            layers=gr.LayerOptions(allow_additional_layers=False))
                        e_prompt = gr.Textbox("", label="Prompt", info=ED.PROMPTS["sdedit"][0], lines=2, max_lines=4,
                                              elem_id="edit-prompt")
                        e_prompt2 = gr.Textbox("", label="Prompt 2", visible=False, lines=2, max_lines=4,
                                               elem_id="edit-prompt-2")
                        e_strength = gr.Slider(0.0, 1.0, value=ED.DEFAULT_STRENGTH["sdedit"], step=0.05, label="Strength",
                                               info="the noise level the edit starts from (1: pure noise)",
                                               elem_id="edit-strength")
                        with gr.Row(equal_height=True):
                            e_seed = gr.Number(label="Seed", value=0, precision=0, min_width=90)
                            e_steps = gr.Radio([str(k) for k in ED.STUDENT_STEPS], value="4", label="Student steps")
                        e_choices = ED.edit_column_choices(comparer)
                        e_columns = gr.CheckboxGroup(e_choices, value=e_choices, label="Columns",
                                                     info="the teacher and the consistency students",
                                                     elem_id="edit-columns-pick")
                        e_btn = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                    with gr.Column(scale=3):
                        e_info = gr.Markdown(elem_id="edit-info", label="summary")
                        e_row = gr.HTML(elem_id="edit-row", padding=False, label="columns html")
                        gr.Markdown(ED.LEGEND, elem_id="edit-legend")
                        with gr.Accordion("Images and timings (as the API returns them)", open=False):
                            e_gallery = gr.Gallery(label="Images", height="auto", elem_id="edit-gallery",
                                                   object_fit="contain")
                            e_table = gr.Dataframe(headers=["column", "seconds", "NFE", "steps"], label="Timings",
                                                   interactive=False)
                named_errors(e_tech, e_image, e_prompt, e_prompt2, e_strength, e_seed, e_steps, e_columns)
                edit_inputs = [e_tech, e_image, e_prompt, e_prompt2, e_strength, e_seed, e_steps, e_columns]
                edit_outputs = [e_row, e_gallery, e_table, e_info]
                edit_kw = dict(concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)
                e_tech.change(edit_technique_changed, e_tech, [e_prompt, e_prompt2, e_strength],
                              api_visibility="private")
                e_btn.click(do_edit, edit_inputs, edit_outputs, api_name="edit", **edit_kw)
                preset_outputs = [e_tech, e_image, e_prompt, e_prompt2, e_strength, e_seed, *edit_outputs]
                e_known = gr.State(e_choices)  # the columns offered so far
                edit_tab.select(edit_columns_on_select, [e_columns, e_known], [e_columns, e_known],
                                api_visibility="private").then(
                    edit_first_visit, [e_row, e_steps, e_columns], preset_outputs, api_visibility="private", **edit_kw)
                # .select carries the option picked (the dropdown's value as read by an .input event can be the
                # previous one); picking the same preset again runs it again.
                e_preset.select(edit_preset_selected, [e_steps, e_columns], preset_outputs,
                               api_visibility="private", **edit_kw)

            with gr.Tab("Train", id="train"):
                if not training_on:
                    gr.Markdown(f"**{H.TRAINING_OFF_MESSAGE}**", elem_id="training-off")
                with gr.Row():
                    with gr.Column(scale=2):
                        inputs = []
                        for f in fields:
                            if f.kind == "choice":
                                inputs.append(gr.Radio(list(f.choices), value=f.default, label=f.label, info=f.info or None))
                            elif f.kind == "text":
                                inputs.append(gr.Textbox(value=f.default or "", label=f.label, info=f.info or None,
                                                         placeholder="automatic"))
                            else:
                                # No minimum/maximum here: Gradio's own range message would not name the
                                # field; T.form_to_config checks the same range and says which field.
                                inputs.append(gr.Number(value=f.default, label=f.label,
                                                        info=f"{f.minimum:g} to {f.maximum:g}",
                                                        precision=0 if f.kind == "int" else None))
                        data_kind = gr.Radio(list(T.DATA_KINDS), value=T.DATA_KINDS[0], label="Data set")
                        data_path = gr.Textbox("", label="Folder or HF datasets name (not for the tiny world)")
                        extra = gr.Textbox("", label="Advanced: other config fields as JSON",
                                           placeholder='{"log_every": 10}', elem_id="extra-config")
                        overwrite = gr.Checkbox(False, label="Replace an existing student of this name",
                                                info="Off: a name in use is refused. Shipped students are never "
                                                     "replaced.", elem_id="train-overwrite")
                        with gr.Row():
                            start = gr.Button("Start", variant="primary", interactive=training_on, elem_id="train-start")
                            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                            resume = gr.Button("Resume", interactive=training_on, elem_id="train-resume")
                    with gr.Column(scale=3):
                        with gr.Row():
                            run_dd = gr.Dropdown(T.run_choices(jobs), label="Runs (app and CLI)", scale=5,
                                                 elem_id="runs")
                            runs_refresh = gr.Button("↻ runs", size="sm", scale=1)
                        status = gr.Markdown(elem_id="train-status", label="status")
                        bar = gr.HTML(label="progress")
                        plot = gr.LinePlot(None, x="step", y="loss", color="series", label="Loss", x_title="step",
                                           y_title="loss", color_title="", elem_id="loss-plot")
                        log_box = gr.Textbox(label="Last lines of the trainer's log", lines=10, visible=False)
                # Full width: the captions above the rows stay readable at 1280 px.
                preview = gr.Image(label="Previews", type="pil", elem_id="preview", buttons=["download", "fullscreen"])
                preview_cap = gr.Markdown(elem_id="preview-caption", label="preview caption")
                timer = gr.Timer(1.0, active=False)
                poll_out = [run_dd, status, bar, plot, preview, preview_cap, log_box, timer]
                named_errors(*inputs, data_kind, data_path, extra, overwrite, run_dd)
                start_polling = dict(fn=lambda: gr.Timer(active=True), inputs=None, outputs=timer,
                                     api_visibility="private")
                # The run's owner token comes back by name (a BrowserState has no label) and is kept in this browser.
                owner_out = gr.Textbox(visible=False, label="owner")
                start.click(do_start, [*inputs, data_kind, data_path, extra, overwrite, owner], [run_dd, owner_out],
                            api_name="train_start").success(lambda o: o, owner_out, owner, api_visibility="private"
                                                            ).success(**start_polling)
                stop.click(do_stop, [run_dd, owner], status, api_name="train_stop").success(**start_polling)
                resume.click(do_resume, [run_dd, owner], status, api_name="train_resume").success(**start_polling)
                run_dd.change(do_status, run_dd, poll_out[:-1], api_name="train_status").then(
                    poll_timer, run_dd, timer, api_visibility="private")
                timer.tick(do_poll, run_dd, poll_out, api_visibility="private")
                runs_refresh.click(refresh_runs, run_dd, run_dd, api_name="refresh_runs")

            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    eval_dd = gr.Dropdown(E.evaluation_choices(evals_dir), label="Evaluations (newest first)", scale=4,
                                          elem_id="evals")
                    eval_refresh = gr.Button("↻", size="sm", scale=1)
                    eval_n = gr.Number(eval_default, label="Prompts", precision=0, minimum=1, maximum=eval_max,
                                       scale=1, elem_id="eval-prompts",
                                       info=f"at most {eval_max}" + (" on this public host" if public else ""))
                    eval_btn = gr.Button("Run a new evaluation", variant="primary", scale=2, elem_id="eval-btn")
                eval_summary = gr.Markdown(elem_id="eval-summary", label="summary")
                eval_table = gr.Markdown(elem_id="eval-table", label="table")
                eval_plot = gr.Image(label="Quality against NFE", type="pil", elem_id="eval-plot")
                eval_dd.change(show_eval, eval_dd, [eval_table, eval_plot, eval_summary], api_name="show_evaluation")
                eval_refresh.click(refresh_evals, None, eval_dd, api_visibility="private")
                named_errors(eval_n, eval_dd)
                eval_btn.click(do_evaluate, eval_n, eval_dd, api_name="evaluate",
                               concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)

        # Fresh lists on every page load (a student or run that appeared since start shows up), the newest
        # evaluation's table and plot shown (no click needed: the dropdown's change may not fire when its value
        # is already the newest), the default Compare, then the page's ready signal: tests and scripts wait for
        # #cdlab-ready, never for network idle.
        def on_load():
            names = E.evaluation_choices(evals_dir)
            newest = names[0] if names else None
            try:
                shown = show_eval(newest)
            except gr.Error:  # an unreadable evaluation: the list still loads; picking one says what is wrong
                shown = (gr.skip(),) * 3
            return (refresh_columns(), refresh_edit_columns(), refresh_runs(), gr.Dropdown(choices=names, value=newest),
                    *shown)

        # The page opens with a result: the default preset compared (its teacher columns cached after the
        # first visitor), then the ready signal.
        def on_load_compare(*args):
            try:
                return do_compare(*args)
            except gr.Error:  # e.g. a column failed: the page still opens, the user sees the empty row
                return ("", [], [], "", None, "")

        demo.load(on_load, None, [columns, e_columns, run_dd, eval_dd, eval_table, eval_plot, eval_summary],
                  api_visibility="private").then(
            prompt_notice, prompt, [notice, use_nearest, nearest], api_visibility="private").then(
            on_load_compare, compare_inputs, compare_outputs, api_visibility="private", **compare_kw).then(
            lambda: S.READY_HTML, None, ready, api_visibility="private")
    demo.cdlab_jobs = jobs  # for shutdown
    return demo


def launch_kwargs(args) -> dict:
    from cdlab.train.config import TrainConfig, cache_root

    return dict(
        server_name=args.host, server_port=args.port, share=args.share,
        blocked_paths=H.blocked_paths(P.runs_dir(), cache_root(TrainConfig())), max_file_size=H.MAX_FILE_SIZE,
        theme=gr.themes.Soft(), css=CSS, show_error=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="cdlab's Gradio app")
    p.add_argument("--model", default=None, help="tiny | sd15 | sd15-random (SD1.5 architecture, random weights, "
                   "64 px: the SD1.5 code path offline) | a local diffusers pipeline folder "
                   "(default: sd15 on CUDA, falling back to tiny; tiny elsewhere)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default; a public "
                   "host: training off unless --allow-training, evaluations capped)")
    p.add_argument("--allow-training", action="store_true",
                   help=f"allow training on a public host (same as {H.TRAINING_ENV}=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if H.is_public_host():
        args.host = "0.0.0.0"
    if args.allow_training:
        os.environ[H.TRAINING_ENV] = "1"
    try:
        teacher = S.load(args.model)
    except Exception as e:  # TeacherLoadError: one clear line, not a stack trace
        print(f"cdlab app: {e}", file=sys.stderr)
        return 2
    model_arg = args.model or ("tiny" if teacher.fallback_reason else S.default_model())
    print(f"cdlab app: {teacher.describe()}" + (f" ({teacher.fallback_reason})" if teacher.fallback_reason else ""),
          flush=True)
    demo = build_demo(teacher, model_arg, share=args.share)
    demo.queue(default_concurrency_limit=H.DEFAULT_CONCURRENCY_LIMIT, max_size=H.QUEUE_MAX_SIZE)
    try:
        demo.launch(**launch_kwargs(args))
    finally:
        demo.cdlab_jobs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
