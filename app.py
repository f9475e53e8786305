"""cdlab's Gradio app: Compare the teacher with its students, Train a student, read Evaluations.

    python app.py                       # tiny teacher on CPU; SD1.5 on CUDA (falls back to tiny)
    python app.py --model sd15 --host 0.0.0.0 --port 7860 [--share]
    python app.py --model path/to/diffusers/pipeline

Layout and wiring only: the logic lives in ``cdlab.ui`` (testable without Gradio).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path

import gradio as gr

from cdlab.ui import compare as C
from cdlab.ui import evaluate_tab as E
from cdlab.ui import hosting as H
from cdlab.ui import session as S
from cdlab.ui import train_tab as T
from cdlab.ui.jobs import JobError, JobManager

log = logging.getLogger("cdlab.app")
CSS = ".cdlab-header {font-size: 0.95em} #compare-gallery img {image-rendering: pixelated}"
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


def build_demo(teacher, model_arg: str) -> gr.Blocks:
    runs_dir, adapters_dir, evals_dir = H.runs_dir(), H.adapters_dir(), H.evals_dir()
    comparer = C.Comparer(teacher, adapters_root=adapters_dir)
    jobs = JobManager(runs_dir, model=model_arg)
    presets = C.prompt_presets(teacher)
    fields = T.form_fields(model_arg, teacher.resolution)
    training_on = H.training_allowed()

    @user_errors
    def do_compare(prompt, seed, guidance, steps, columns, show_traj, progress=gr.Progress()):
        res = comparer.run(prompt, seed, guidance, steps, columns, bool(show_traj),
                           progress=lambda f, d: progress(f, desc=d))
        for w in res.warnings:
            gr.Warning(w)
        gallery = [(C.upscale(c.image), c.caption()) for c in res.columns]
        strips = [(C.trajectory_strip(c.trajectory, c.trajectory_steps), f"x0 after each step: {c.label}")
                  for c in res.columns if c.trajectory]
        path = Path(tempfile.mkdtemp(prefix="cdlab-compare-")) / f"compare_seed{res.seed}.png"
        res.compose().save(path)
        info = f"{len(res.columns)} columns in {res.total_seconds:.2f} s · one text encoding, one initial noise"
        return gallery, res.table(), gr.Gallery(value=strips, visible=bool(strips)), str(path), info

    do_compare = H.gpu(do_compare, duration=120)

    def refresh_columns():
        choices = comparer.column_choices()
        return gr.CheckboxGroup(choices=choices, value=choices)

    @user_errors
    def do_start(*values):
        if not H.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        form = dict(zip([f.key for f in fields], values[:len(fields)]))
        data_kind, data_path, extra = values[len(fields):]
        cfg = T.form_to_config(form, model_arg, data_kind, data_path, teacher.resolution, extra)
        job = jobs.start(cfg)
        return gr.Dropdown(choices=T.run_choices(jobs), value=job.run_name), gr.Timer(active=True)

    @user_errors
    def do_stop(run_name):
        jobs.stop(run_name or None)
        return gr.Timer(active=True)

    @user_errors
    def do_resume(run_name):
        if not H.training_allowed():
            raise gr.Error(H.TRAINING_OFF_MESSAGE)
        if not run_name:
            raise gr.Error("Pick a run to resume.")
        jobs.resume(run_name)
        return gr.Timer(active=True)

    @user_errors
    def do_poll(run_name):
        v = T.poll(jobs, run_name)
        return (v.status_md, v.progress_html, v.plot, str(v.preview) if v.preview else None, v.preview_caption,
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
        return v.table_md, str(v.plot) if v.plot else None, f"`{v.name}` · {v.summary}"

    def refresh_evals():
        names = E.list_evaluations(evals_dir)
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    @user_errors
    def do_evaluate(progress=gr.Progress()):
        path = E.run_new_evaluation(teacher, progress=lambda f, d="": progress(f, desc=d))
        names = E.list_evaluations(evals_dir)
        return gr.Dropdown(choices=names, value=path.name if path.name in names else (names[0] if names else None))

    do_evaluate = H.gpu(do_evaluate, duration=600)

    with gr.Blocks(title="cdlab: consistency distillation lab") as demo:
        gr.Markdown("# cdlab · consistency distillation lab")
        gr.Markdown(S.header_line(teacher), elem_classes=["cdlab-header"], elem_id="header")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", value=presets[0], lines=2, max_lines=4, elem_id="prompt")
                        preset = gr.Dropdown(presets, label="Presets", value=None)
                    with gr.Column(scale=2):
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=C.SEED_MAX)
                            rand = gr.Button("🎲 random", size="sm")
                        guidance = gr.Slider(*C.GUIDANCE_RANGE, value=teacher.guidance, step=0.5,
                                             label="Teacher guidance (CFG)")
                        steps = gr.Radio(list(C.STUDENT_STEPS), value=4, label="Student steps")
                choices = comparer.column_choices()
                with gr.Row():
                    columns = gr.CheckboxGroup(choices, value=choices, label="Columns", scale=5)
                    refresh = gr.Button("↻ columns", size="sm", scale=1)
                with gr.Row():
                    show_traj = gr.Checkbox(label="Show trajectory (x0 prediction after each step)")
                    run_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                info = gr.Markdown()
                gallery = gr.Gallery(label="Columns", columns=4, height="auto", elem_id="compare-gallery",
                                     object_fit="contain")
                table = gr.Dataframe(headers=["column", "seconds", "NFE", "speedup vs teacher-50"],
                                     label="Timings", interactive=False)
                traj = gr.Gallery(label="Trajectories (x0 after each step)", columns=1, visible=False, height="auto",
                                  object_fit="contain", elem_id="trajectory-gallery")
                download = gr.DownloadButton("Download comparison (PNG)", elem_id="download-btn")
                preset.change(lambda p: p or gr.skip(), preset, prompt, api_visibility="private")
                rand.click(C.random_seed, None, seed, api_name="random_seed")
                refresh.click(refresh_columns, None, columns, api_name="refresh_columns")
                run_btn.click(do_compare, [prompt, seed, guidance, steps, columns, show_traj],
                              [gallery, table, traj, download, info], api_name="compare",
                              concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)

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
                                inputs.append(gr.Number(value=f.default, label=f.label, minimum=f.minimum,
                                                        maximum=f.maximum, precision=0 if f.kind == "int" else None))
                        data_kind = gr.Radio(list(T.DATA_KINDS), value=T.DATA_KINDS[0], label="Data set")
                        data_path = gr.Textbox(label="Folder or HF datasets name (not for the tiny world)")
                        extra = gr.Textbox(label="Advanced: other config fields as JSON", placeholder='{"log_every": 10}',
                                           elem_id="extra-config")
                        with gr.Row():
                            start = gr.Button("Start", variant="primary", interactive=training_on, elem_id="train-start")
                            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                            resume = gr.Button("Resume", interactive=training_on)
                    with gr.Column(scale=3):
                        with gr.Row():
                            run_dd = gr.Dropdown(T.run_choices(jobs), label="Runs (app and CLI)", scale=5,
                                                 elem_id="runs")
                            runs_refresh = gr.Button("↻ runs", size="sm", scale=1)
                        status = gr.Markdown(elem_id="train-status")
                        bar = gr.HTML()
                        plot = gr.Image(label="Loss", type="pil", elem_id="loss-plot")
                        preview = gr.Image(label="Latest preview", type="filepath", elem_id="preview")
                        preview_cap = gr.Markdown(elem_id="preview-caption")
                        log_box = gr.Textbox(label="Last lines of the trainer's log", lines=10, visible=False)
                timer = gr.Timer(1.0, active=False)
                poll_out = [status, bar, plot, preview, preview_cap, log_box, timer]
                start.click(do_start, [*inputs, data_kind, data_path, extra], [run_dd, timer], api_name="train_start")
                stop.click(do_stop, run_dd, timer, api_name="train_stop")
                resume.click(do_resume, run_dd, timer, api_name="train_resume")
                run_dd.change(do_poll, run_dd, poll_out, api_name="train_status")
                timer.tick(do_poll, run_dd, poll_out, api_visibility="private")
                runs_refresh.click(refresh_runs, run_dd, run_dd, api_name="refresh_runs")

            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    eval_dd = gr.Dropdown(E.list_evaluations(evals_dir), label="Evaluations (newest first)", scale=4)
                    eval_refresh = gr.Button("↻", size="sm", scale=1)
                    eval_btn = gr.Button("Run a new evaluation", variant="primary", scale=2)
                eval_summary = gr.Markdown()
                eval_table = gr.Markdown(elem_id="eval-table")
                eval_plot = gr.Image(label="Quality against NFE", type="filepath")
                eval_dd.change(show_eval, eval_dd, [eval_table, eval_plot, eval_summary], api_name="show_evaluation")
                eval_refresh.click(refresh_evals, None, eval_dd, api_visibility="private")
                eval_btn.click(do_evaluate, None, eval_dd, api_name="evaluate",
                               concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)

        # Fresh lists on every page load: a student or run that appeared since start shows up.
        demo.load(refresh_columns, None, columns, api_visibility="private")
        demo.load(refresh_runs, None, run_dd, api_visibility="private")
        demo.load(refresh_evals, None, eval_dd, api_visibility="private")
    demo.cdlab_jobs = jobs  # for shutdown
    return demo


def launch_kwargs(args) -> dict:
    return dict(
        server_name=args.host, server_port=args.port, share=args.share,
        allowed_paths=H.allowed_paths(H.runs_dir(), H.adapters_dir()), max_file_size=H.MAX_FILE_SIZE,
        theme=gr.themes.Soft(), css=CSS, show_error=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="cdlab's Gradio app")
    p.add_argument("--model", default=None, help="tiny | sd15 | a local diffusers pipeline folder "
                   "(default: sd15 on CUDA, falling back to tiny; tiny elsewhere)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if H.is_public_host():
        args.host = "0.0.0.0"
    try:
        teacher = S.load(args.model)
    except Exception as e:  # TeacherLoadError: one clear line, not a stack trace
        print(f"cdlab app: {e}", file=sys.stderr)
        return 2
    model_arg = args.model or ("tiny" if teacher.fallback_reason else S.default_model())
    print(f"cdlab app: {teacher.describe()}" + (f" ({teacher.fallback_reason})" if teacher.fallback_reason else ""),
          flush=True)
    demo = build_demo(teacher, model_arg)
    demo.queue(default_concurrency_limit=H.DEFAULT_CONCURRENCY_LIMIT, max_size=H.QUEUE_MAX_SIZE)
    try:
        demo.launch(**launch_kwargs(args))
    finally:
        demo.cdlab_jobs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
