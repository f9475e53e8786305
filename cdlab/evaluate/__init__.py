"""Evaluations: quality against steps, and the edits measured on the tiny world.

==========  ======================================================================================================
module      job
==========  ======================================================================================================
prompts     the captions an evaluation samples (:func:`read_prompts`, :func:`check_prompts`)
run         :func:`run_evaluation`: the teacher at 1..50 DDIM+CFG steps and every fitting student at 1..8 steps,
            every column through `cdlab.columns.run_columns` from the same noise, scored
report      what an evaluation shows: :func:`render_table`, :func:`plot_quality`, the notes
store       its folder under ``cdlab.paths.evals_dir()``: :func:`write_evaluation`, :func:`load_evaluation`,
            :func:`list_evaluations`, :func:`check_out_dir`
edit        :func:`run_edit_evaluation`: SDEdit, inpainting, sketches, anagrams and hybrids, read by the world's checker
cli         ``python -m cdlab evaluate [--edit] ...``
==========  ======================================================================================================

Each module imports only those above it in this table (cli imports them all); nothing here imports Gradio.
``run_evaluation``, ``list_evaluations`` and ``load_evaluation`` are the Python API the app's Evaluate tab uses::

    from cdlab.evaluate import run_evaluation
    results = run_evaluation(load_teacher("tiny"), n=16)        # also written to evals/<timestamp>/
"""
from __future__ import annotations

from cdlab.paths import evals_dir
from cdlab.evaluate.prompts import DEFAULT_N, PROMPT_SEED, EvaluationError, check_prompts, read_prompts
from cdlab.evaluate.report import plot_quality, render_table
from cdlab.evaluate.store import (EvaluationResult, check_out_dir, list_evaluations, load_evaluation,
                                  write_evaluation)
from cdlab.evaluate.run import REFERENCE_STEPS, STUDENT_STEPS, TEACHER_METHOD, TEACHER_STEPS, run_evaluation
from cdlab.evaluate.edit import (inpaint_mask, make_cases, render_edit_table, run_edit_evaluation, scribble,
                                 write_edit_evaluation)
from cdlab.evaluate.cli import main

__all__ = [
    "TEACHER_STEPS", "STUDENT_STEPS", "REFERENCE_STEPS", "TEACHER_METHOD", "DEFAULT_N", "PROMPT_SEED",
    "EvaluationError", "EvaluationResult", "evals_dir", "run_evaluation", "write_evaluation", "render_table",
    "plot_quality", "list_evaluations", "load_evaluation", "check_out_dir", "read_prompts", "check_prompts",
    "run_edit_evaluation", "render_edit_table", "write_edit_evaluation", "make_cases", "scribble", "inpaint_mask",
    "main",
]
