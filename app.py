"""cdlab's Gradio app: Compare the teacher with its students, Edit with them, Train a student, read Evaluations.

    python app.py                       # tiny teacher on CPU; SD1.5 on CUDA (falls back to tiny)
    python app.py --model sd15 --host 0.0.0.0 --port 7860 [--share]
    python app.py --model sd15-random         # SD1.5's architecture with random weights: the SD1.5 path offline
    python app.py --model fashion-flow        # every tab on the flow-matching teacher (seed 003 part B)
    python app.py --model runs/flow-teacher-1 # a flow teacher trained in the Train tab, with its own students
    python app.py --model path/to/diffusers/pipeline

This file parses the arguments, builds the page from one builder per tab and launches it. Each tab's layout
and events live beside its logic in ``cdlab.ui`` (``compare_tab``, ``edit_tab``, ``train_tab``,
``evaluate_tab``); what every tab shares (errors on the page, the page load, the ready signal) in
``cdlab.ui.session``, the hosting policy in ``cdlab.ui.hosting``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import gradio as gr

from cdlab import paths as P
from cdlab.train.config import TrainConfig, cache_root
from cdlab.ui import compare as C
from cdlab.ui import compare_view as V
from cdlab.ui import hosting as H
from cdlab.ui import session as S
from cdlab.ui.compare_tab import CompareTab
from cdlab.ui.edit_tab import EditTab
from cdlab.ui.evaluate_tab import EvaluateTab
from cdlab.ui.jobs import JobManager
from cdlab.ui.train_tab import TrainTab

CSS = (".cdlab-header {font-size: 0.95em} .cdlab-header h2 {margin: 0 0 2px 0} "
       "#compare-legend {font-size: 0.8em; opacity: 0.85} #compare-info {font-size: 0.85em} "
       "#compare-gallery img, #edit-gallery img, #edit-image canvas, #flow-compare-gallery img, #flow-compare-row img, "
       "#flow-edit-gallery img, #flow-edit-image canvas, #flow-edit-row img "
       "{image-rendering: pixelated} "
       "#edit-info {font-size: 0.85em}" + V.CSS)


def build_demo(teacher, model_arg: str, policy: H.Policy | None = None, flow_teacher=None) -> gr.Blocks:
    """The page: a header saying which teacher is live, the four tabs, the flow-matching section when
    ``flow_teacher`` is given (its own Compare), and the page-load chain (fresh lists, the default comparisons,
    then the ready signal ``#cdlab-ready``). ``policy``: who may do what on this host
    (`cdlab.ui.hosting.host_policy`). ``demo.cdlab_jobs`` is the training job manager, for shutdown."""
    policy = policy or H.Policy()
    comparer = C.Comparer(teacher, adapters_root=P.adapters_dir(), batching=H.batching_allowed())
    jobs = JobManager(P.runs_dir(), model=model_arg, max_seconds=policy.max_seconds)
    secret = H.app_secret(P.runs_dir())  # fixed: a browser's stored tokens still open after a restart
    with gr.Blocks(title="cdlab: consistency distillation lab", delete_cache=H.delete_cache()) as demo:
        gr.Markdown("**cdlab** · consistency distillation lab · " + S.header_line(teacher), elem_classes=["cdlab-header"],
                    elem_id="header")
        ready = gr.HTML("", elem_id="app-ready", padding=False)
        owner = gr.BrowserState("", storage_key="cdlab-owner", secret=secret)  # this browser's runs
        instructor = gr.BrowserState("", storage_key="cdlab-instructor", secret=secret)
        with gr.Tabs():
            compare = CompareTab(teacher, comparer)
            edit = EditTab(teacher, comparer)
            train = TrainTab(jobs, teacher, model_arg, owner, policy=policy, adapters_root=P.adapters_dir())
            evaluate = EvaluateTab(teacher, P.evals_dir(), policy=policy)
            tabs, openers, tokens = [compare, edit, train, evaluate], [compare], [train.ui.instructor, evaluate.instructor]
            if flow_teacher is not None:  # seed 003 part B, beside the main teacher
                with gr.Tab("Flow matching (Fashion-MNIST)", id="flow"):
                    gr.Markdown(S.flow_line(flow_teacher), elem_classes=["cdlab-header"], elem_id="flow-header")
                    flow_comparer = C.Comparer(flow_teacher, adapters_root=P.adapters_dir(), batching=H.batching_allowed())
                    with gr.Tabs():
                        flow = CompareTab(flow_teacher, flow_comparer, prefix="flow-")
                        flow_edit = EditTab(flow_teacher, flow_comparer, prefix="flow-")
                        flow_train = TrainTab(jobs, flow_teacher, flow_teacher.name, owner, policy=policy,
                                              adapters_root=P.adapters_dir(), prefix="flow-")  # one training slot
                        flow_eval = EvaluateTab(flow_teacher, P.evals_dir(), policy=policy, prefix="flow-")
                tabs, openers = tabs + [flow, flow_edit, flow_train, flow_eval], openers + [flow]
                tokens += [flow_train.ui.instructor, flow_eval.instructor]
        H.keep_instructor_token(demo, instructor, tokens)
        S.wire_page_load(demo, ready, tabs, openers)
    demo.cdlab_jobs = jobs  # for shutdown
    return H.safe_delete_cache(demo)


def launch_kwargs(args) -> dict:
    return dict(
        server_name=args.host, server_port=args.port, share=args.share,
        blocked_paths=H.blocked_paths(P.runs_dir(), cache_root(TrainConfig())), max_file_size=H.MAX_FILE_SIZE,
        theme=gr.themes.Soft(), css=CSS, show_error=False,  # gr.Error messages only: no exception text
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="cdlab's Gradio app")
    p.add_argument("--model", default=None, help="tiny | sd15 | sd15-random (SD1.5 architecture, random weights, "
                   "64 px: the SD1.5 code path offline) | fashion-flow (the flow-matching teacher: every tab on "
                   "it) | a flow teacher's run folder (runs/<name>, trained in the Train tab: every tab on it and "
                   "its students) | a local diffusers pipeline folder "
                   "(default: sd15 on CUDA, falling back to tiny; tiny elsewhere)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default; a public "
                   "host: training off unless --allow-training, evaluations capped)")
    p.add_argument("--allow-training", action="store_true",
                   help=f"allow training on a public host (same as {H.TRAINING_ENV}=1)")
    p.add_argument("--instructor-token", default=None,
                   help=f"on a shared --host (a classroom): the instructor's token (default ${H.INSTRUCTOR_ENV}, "
                   "else a fresh one printed at start); training and new evaluations need it")
    p.add_argument("--classroom", action="store_true",
                   help=f"classroom rules whatever --host says, e.g. behind a proxy (same as {H.CLASSROOM_ENV}=1)")
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
    flow_teacher = S.load_flow(teacher)
    print(f"cdlab app: {teacher.describe()}" + (f" ({teacher.fallback_reason})" if teacher.fallback_reason else ""),
          flush=True)
    policy, token = H.host_policy(args.host, args.share, args.classroom, args.instructor_token)
    if policy.shared:  # who may do what here, and the instructor's token (a classroom)
        print("cdlab app: " + policy.rules_line().replace("**", "") + (f" Instructor token: {token}" if token else ""),
              flush=True)
    demo = build_demo(teacher, model_arg, policy=policy, flow_teacher=flow_teacher)
    demo.queue(default_concurrency_limit=H.DEFAULT_CONCURRENCY_LIMIT, max_size=H.QUEUE_MAX_SIZE)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of the app: as Ctrl-C, so the trainer is stopped below
    try:
        H.serve_until_interrupted(demo, **launch_kwargs(args))
    finally:
        demo.cdlab_jobs.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
