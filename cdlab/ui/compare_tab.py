"""The Compare tab (Gradio): the prompt, seed, guidance, student steps and columns on the left; on the right the
columns in one row, the aligned trajectory grid, the images and timings as the API returns them, and the
comparison as one PNG. Sampling is `cdlab.ui.compare.Comparer`'s, the way a result is shown
`cdlab.ui.compare_view`'s; this module lays the tab out and wires its events (``/compare``,
``/random_seed``, ``/refresh_columns``); ``/compare`` streams, an update per finished column. Gradio is imported
when the tab is built.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cdlab.ui import compare as C
from cdlab.ui import compare_view as V
from cdlab.ui import hosting as H
from cdlab.teachers import class_names
from cdlab.ui.session import named_errors, user_errors

# Compare requests all enter at once and wait in the Comparer's micro-batcher (`cdlab.ui.hosting`).
CONCURRENCY = dict(concurrency_id=H.COMPARE_CONCURRENCY_ID, concurrency_limit=H.COMPARE_CONCURRENCY_LIMIT)


def compare_outputs(res: Any, png: str | None = None, prefix: str = "") -> tuple:
    """The tab's outputs for a result, whole or partial (``res.pending``: columns still sampling, held by grey
    boxes, and no PNG yet): the columns' row (HTML), the images with captions, the timings table, the aligned
    trajectory grid (HTML), the PNG's path and a summary."""
    n = len(res.columns)
    if res.pending:
        info = (f"{n} of {n + len(res.pending)} columns done after {res.total_seconds:.2f} s · still sampling: "
                + ", ".join(res.pending))
    else:
        shared = f" · served together with {res.batch - 1} other request(s)" if res.batch > 1 else ""
        info = f"{n} columns in {res.total_seconds:.2f} s · seed {res.seed} · one text encoding, one initial noise{shared}"
    images = [(c.image, c.caption()) for c in res.columns]
    return V.columns_html(res, prefix), images, res.table(), V.trajectory_html(res, prefix), png, info


def compare_handlers(comparer: Any, prefix: str = "") -> SimpleNamespace:
    """The tab's event functions: ``compare`` (the API's ``/compare``), ``prompt_notice`` and
    ``refresh_columns`` (the API's ``/refresh_columns``)."""
    import gradio as gr

    @user_errors
    def do_compare(prompt, seed, guidance, steps, columns, show_trajectory, progress=gr.Progress()):
        """Sample the ticked columns from one noise and one prompt, streamed: an update as columns finish
        (students first), then the whole result with its PNG (`compare_outputs`)."""
        res = None
        for res in comparer.stream(prompt, seed, guidance, steps, columns, bool(show_trajectory),
                                   progress=lambda f, d: progress(f, desc=d)):
            if res.pending:
                yield compare_outputs(res, prefix=prefix)
        for w in res.warnings:
            gr.Warning(w)
        # The PNG goes to a folder of its own that is removed once Gradio has copied it into its cache (the
        # generator resumes after that, when Gradio asks for the next update): nothing is left under /tmp.
        folder = Path(tempfile.mkdtemp(prefix="cdlab-compare-"))
        try:
            path = folder / f"compare_seed{res.seed}.png"
            res.compose().save(path)
            yield compare_outputs(res, str(path), prefix)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def prompt_notice(prompt):
        text, nearest = comparer.prompt_notice(prompt)
        return (gr.Markdown(f"⚠ {text}" if text else "", visible=bool(text)),
                gr.Button(visible=bool(nearest)), nearest or "")

    def refresh_columns():
        choices = comparer.column_choices()
        return gr.CheckboxGroup(choices=choices, value=choices)

    return SimpleNamespace(compare=H.gpu(do_compare, duration=120), prompt_notice=prompt_notice,
                           refresh_columns=refresh_columns)


def compare_controls(teacher: Any, comparer: Any, prefix: str = "") -> SimpleNamespace:
    """The left column: prompt (with the notice and the nearest caption), presets, the button, seed,
    guidance, student steps, columns and the trajectory switch. A class-conditioned teacher (``classes``: the
    flow teacher) takes a class from a dropdown instead of a prompt, and has no presets. ``prefix``: of every
    elem_id (a second Compare tab on the page)."""
    import gradio as gr

    ui = SimpleNamespace()
    classes = class_names(teacher)
    presets = [] if classes else C.prompt_presets(teacher)
    if classes:
        ui.prompt = gr.Dropdown(classes, value=classes[0], label="Class", elem_id=prefix + "prompt")
    else:
        ui.prompt = gr.Textbox(label="Prompt", value=presets[0], lines=2, max_lines=4, elem_id=prefix + "prompt")
    with gr.Row():
        ui.notice = gr.Markdown(visible=False, elem_id=prefix + "prompt-notice")
    ui.use_nearest = gr.Button("use the nearest caption", size="sm", visible=False, elem_id=prefix + "use-nearest")
    ui.preset = gr.Dropdown(presets, label="Presets", value=None, visible=bool(presets))
    ui.run_btn = gr.Button("Compare", variant="primary", elem_id=prefix + "compare-btn")
    with gr.Row(equal_height=True):
        ui.seed = gr.Number(label="Seed", value=0, precision=0, scale=2, min_width=90)  # C.validate_request
        ui.rand = gr.Button("random seed", size="sm", scale=1, min_width=90)  # words: no emoji font
    ui.guidance = gr.Slider(*C.GUIDANCE_RANGE, value=teacher.guidance, step=0.5, label="Teacher guidance (CFG)")
    ui.steps = gr.Radio(list(C.STEPS_CHOICES), value=C.AS_TRAINED, label="Student steps",
                        info="as trained: each student at its card's steps (a 1-step student at 1)")
    choices = comparer.column_choices()
    ui.columns = gr.CheckboxGroup(choices, value=choices, label="Columns")
    with gr.Row(equal_height=True):
        ui.show_traj = gr.Checkbox(label="Show trajectory (x_t, x̂0 per step)", scale=3,
                                   elem_id=prefix + "show-trajectory")
        ui.refresh = gr.Button("↻ columns", size="sm", scale=1, min_width=90, elem_id=prefix + "refresh-columns")
    return ui


def compare_results(ui: SimpleNamespace, prefix: str = "", legend: str = V.LEGEND) -> None:
    """The right column, added to ``ui``: summary, the columns' row, legend, trajectory grid, the images and
    timings (as the API returns them) and the PNG download."""
    import gradio as gr

    ui.info = gr.Markdown(elem_id=prefix + "compare-info", label="summary")
    ui.row = gr.HTML(elem_id=prefix + "compare-row", padding=False, label="columns html")
    gr.Markdown(legend, elem_id=prefix + "compare-legend")
    ui.traj = gr.HTML("", elem_id=prefix + "trajectory", padding=False, label="trajectory html")
    with gr.Accordion("Images and timings (as the API returns them)", open=False):
        ui.gallery = gr.Gallery(label="Images", height="auto", elem_id=prefix + "compare-gallery",
                                object_fit="contain")
        ui.table = gr.Dataframe(headers=["column", "seconds", "NFE", "speedup vs teacher-50"], label="Timings",
                                interactive=False)
    ui.download = gr.DownloadButton("Download comparison (PNG)", elem_id=prefix + "download-btn")


class CompareTab:
    """The Compare tab, built inside the page's ``gr.Tabs``: its components, its events, and its part of the
    page load (fresh columns, then the default comparison: the page opens with a result)."""

    def __init__(self, teacher: Any, comparer: Any, prefix: str = ""):
        """``prefix``: of the tab's id, its elem_ids (``"flow-"``) and its API names (``"flow_"``), for a second
        Compare tab on the page (the flow teacher's beside the main teacher's)."""
        import gradio as gr

        self.fn = compare_handlers(comparer, prefix)
        self.api = prefix.replace("-", "_")
        with gr.Tab("Compare" + (f" ({prefix.strip('-')})" if prefix else ""), id=prefix + "compare"):
            # Controls on the left, the result on the right: at 1280x800 the default comparison's columns
            # and their labels are on screen when the page opens.
            with gr.Row():
                with gr.Column(scale=1, min_width=330):
                    ui = compare_controls(teacher, comparer, prefix)
                with gr.Column(scale=3):
                    compare_results(ui, prefix, V.legend(teacher))
            ui.nearest = gr.State("")
            self.ui = ui
            self.inputs = [ui.prompt, ui.seed, ui.guidance, ui.steps, ui.columns, ui.show_traj]
            self.outputs = [ui.row, ui.gallery, ui.table, ui.traj, ui.download, ui.info]
            self._wire()
        self.load_outputs = [ui.columns]

    def _wire(self) -> None:
        import gradio as gr

        ui, fn = self.ui, self.fn
        notice_out = [ui.notice, ui.use_nearest, ui.nearest]
        ui.preset.change(lambda p: p or gr.skip(), ui.preset, ui.prompt, api_visibility="private")
        ui.rand.click(C.random_seed, None, ui.seed, api_name=self.api + "random_seed")
        ui.refresh.click(fn.refresh_columns, None, ui.columns, api_name=self.api + "refresh_columns")
        ui.prompt.change(fn.prompt_notice, ui.prompt, notice_out, api_visibility="private")
        named_errors(ui.prompt, ui.seed, ui.guidance, ui.steps, ui.columns, ui.show_traj)
        ui.run_btn.click(fn.compare, self.inputs, self.outputs, api_name=self.api + "compare", **CONCURRENCY)
        ui.use_nearest.click(lambda n: n or gr.skip(), ui.nearest, ui.prompt, api_visibility="private").then(
            fn.compare, self.inputs, self.outputs, api_visibility="private", **CONCURRENCY)

    def on_load(self) -> tuple:
        """The columns offered, fresh: a student that appeared since the start shows up."""
        return (self.fn.refresh_columns(),)

    def then_opening(self, event: Any) -> Any:
        """After ``event``: the prompt's notice, then the default preset compared (its teacher columns cached
        after the first visitor). Returns the last event, for the ready signal to follow."""
        import gradio as gr

        compare = self.fn.compare

        def on_load_compare(*args):
            try:
                yield from compare(*args)
            except gr.Error:  # e.g. a column failed: the page still opens, the user sees the empty row
                yield ("", [], [], "", None, "")

        ui = self.ui
        return event.then(self.fn.prompt_notice, ui.prompt, [ui.notice, ui.use_nearest, ui.nearest],
                          api_visibility="private").then(
            on_load_compare, self.inputs, self.outputs, api_visibility="private", **CONCURRENCY)
