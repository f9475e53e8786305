"""``python -m cdlab evaluate``: the command line of both evaluations.

    python -m cdlab evaluate --model tiny --n 128            # the embedded world (adherence, agreement)
    python -m cdlab evaluate --edit [--n 128]                # the edits of cdlab.edit (cdlab.evaluate.edit)
    python -m cdlab evaluate --model sd15 --n 2048 --prompts data/coco/metadata.jsonl   # CLIP, FID-SD, LPIPS
    python -m cdlab evaluate --model fashion-flow --n 2000   # the flow track (cdlab.flow.evaluate): FID, accuracy
    python -m cdlab evaluate --model runs/flow-teacher-1     # the same, on a flow teacher run and its students

Writes ``evals/<timestamp>/{results.json, table.md, quality_vs_nfe.png}`` (``CDLAB_EVALS_DIR`` overrides
``evals/``), or with ``--edit`` ``evals/edit-<timestamp>/{edit_results.json, edit_table.md}``. ``--out`` and a
prompt file are checked before the (slow) teacher load; every error is one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from cdlab import teachers
from cdlab.evaluate.edit import TECHNIQUES, render_edit_table, run_edit_evaluation
from cdlab.evaluate.prompts import DEFAULT_N, EvaluationError, read_prompts
from cdlab.evaluate.report import render_table
from cdlab.evaluate.run import STUDENT_STEPS, TEACHER_STEPS, run_evaluation
from cdlab.evaluate.store import check_out_dir

__all__ = ["main"]


DESCRIPTION = ("Quality against steps: the teacher at 1..50 DDIM+CFG steps and every fitting student at 1..8 steps,\n"
               "over one fixed prompt/seed set, every column of a prompt starting from the same initial noise.")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list (``--students``, ``--techniques``), or None when not given."""
    return [s for s in text.split(",") if s] if text else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cdlab evaluate", description=DESCRIPTION)
    parser.add_argument("--model", default="tiny", help="tiny | sd15 | fashion-flow | a flow teacher's run folder | "
                        "a local pipeline folder (default tiny)")
    parser.add_argument("--n", type=int, default=None,
                        help=f"prompts (default {DEFAULT_N} for the tiny world, all of --prompts, or the course's 8); "
                             "FID-SD needs 2048 or more")
    parser.add_argument("--out", default=None, help="output folder (default evals/<timestamp>); one that holds an "
                                                    "evaluation is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the evaluation in --out")
    parser.add_argument("--steps", type=_int_list, default=list(TEACHER_STEPS), help="teacher steps, e.g. 1,2,4,50")
    parser.add_argument("--student-steps", type=_int_list, default=list(STUDENT_STEPS))
    parser.add_argument("--students", default=None, help="comma-separated student names (default: all fitting)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="SD captions: a .txt (one a line, # comments), a .json list of strings or a COCO "
                             "metadata.jsonl; --n takes the first n")
    parser.add_argument("--metadata", default=None, metavar="FILE", help="alias of --prompts (a COCO metadata.jsonl)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    parser.add_argument("--edit", action="store_true",
                        help="measure the edits of cdlab.edit (SDEdit, inpainting, sketches, anagrams, hybrids) "
                             "on the tiny world instead (cdlab.evaluate.edit; --n cases per technique, default 128)")
    parser.add_argument("--techniques", default=None,
                        help="with --edit: comma-separated subset of sdedit,inpaint,sketch,sketch_text,anagram,hybrid")
    return parser


def _progress(frac: float, msg: str) -> None:
    print(f"[{frac * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)


def _load_teacher(model: str, device: str | None, dtype: str | None = None) -> teachers.Teacher | None:
    """The teacher, or None after a one-line error."""
    try:
        teacher = teachers.load_teacher(model, device=device, dtype=getattr(torch, dtype) if dtype else None)
    except (teachers.TeacherLoadError, AttributeError, OSError, ValueError) as e:
        print(f"error: could not load the teacher {model!r}: {e}", file=sys.stderr)
        return None
    print(f"teacher: {teacher.describe()}", file=sys.stderr)
    return teacher


def _edit_main(args: argparse.Namespace) -> int:
    """``--edit``: the edit evaluation (`cdlab.evaluate.edit`)."""
    try:  # before the teacher loads
        check_out_dir(args.out, "edit_results.json", args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    teacher = _load_teacher(args.model, args.device)
    if teacher is None:
        return 1
    try:
        results = run_edit_evaluation(teacher, n=args.n, seed=args.seed, out_dir=args.out,
                                      students=_names(args.students), guidance=args.guidance,
                                      techniques=_names(args.techniques) or TECHNIQUES, progress=_progress,
                                      overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_edit_table(results))
    print(f"wrote {results['out_dir']} in {results['elapsed_s']:.1f} s")
    return 0


def _flow_main(args: argparse.Namespace) -> int:
    """``--model fashion-flow`` or a flow teacher's run folder: the flow track's evaluation (`cdlab.flow.evaluate`:
    FID in the judge's features, class accuracy, diversity) of that teacher and its students (``--students``,
    default all), at ``--student-steps`` on the noises of ``--seed``."""
    from cdlab.flow.evaluate import main as flow_main

    teacher = [] if args.model == teachers.FLOW_TEACHER else ["--teacher", args.model]
    argv = teacher + ["--n", str(args.n or 2000), "--seed", str(args.seed),
                      "--steps", *map(str, args.student_steps)] + (
        ["--out", args.out] if args.out else []) + (["--overwrite"] if args.overwrite else []) + (
        ["--device", args.device] if args.device else []) + (
        ["--guidance", str(args.guidance)] if args.guidance is not None else []) + [
        x for name in (args.students.split(",") if args.students else []) for x in ("--student", name.strip())]
    return flow_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cdlab.flow.pipeline import is_flow_run

    if args.model == teachers.FLOW_TEACHER or is_flow_run(args.model):
        return _flow_main(args)
    if args.edit:
        return _edit_main(args)
    if args.prompts and args.metadata:
        print("error: --prompts and --metadata (its alias): give one, not both", file=sys.stderr)
        return 1
    flag, prompt_file = ("--metadata", args.metadata) if args.metadata else ("--prompts", args.prompts)
    try:  # checked before the (slow) teacher load
        check_out_dir(args.out, "results.json", args.overwrite)
        if prompt_file:
            read_prompts(prompt_file, args.n, what=flag)
    except (FileExistsError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    teacher = _load_teacher(args.model, args.device, args.dtype)
    if teacher is None:
        return 1
    try:
        results = run_evaluation(
            teacher, n=args.n, steps=args.steps, student_steps=args.student_steps, students=_names(args.students),
            out_dir=args.out, progress=_progress, batch_size=args.batch_size, seed=args.seed,
            guidance=args.guidance, prompts=prompt_file, overwrite=args.overwrite)
    except (EvaluationError, FileNotFoundError, FileExistsError, ModuleNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_table(results))
    print(f"wrote {results['out_dir']} in {results['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
