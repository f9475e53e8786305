"""Generate one image from a teacher (DDIM + CFG) or a student (multistep consistency sampling).

    python -m cdlab generate --model tiny --prompt "a red circle above a blue square" --seed 0 --out sample.png
    python -m cdlab generate --model tiny --student my-student --prompt "..." --steps 4 --out student.png
    python -m cdlab generate --model sd15 --prompt "a photo of a cat" --steps 50 --guidance 7.5 --out cat.png

Prints the sampling time in seconds and the number of network evaluations (a CFG step counts 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from cdlab.columns import Column, run_columns, student_column
from cdlab.samplers import student_timesteps
from cdlab.students import EXTERNAL_STUDENTS, external_card, read_card
from cdlab import teachers

TEACHER_STEPS = 50   # DDIM steps for the teacher when --steps is not given


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cdlab generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="teacher: tiny | sd15 | PATH to a diffusers pipeline folder")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (>= 0)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (teacher default {TEACHER_STEPS}; a student's default is its card's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the teacher's own, 5 for tiny and 7.5 for SD1.5; a student's default is its card's)")
    p.add_argument("--student", default=None, help="a student in adapters/ or an external student key")
    p.add_argument("--stochastic", action="store_true", help="consistency students: Song et al.'s Alg. 1 re-noising")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--out", default="sample.png", help="output image file (.png)")
    return p


def _check(args: argparse.Namespace) -> str | None:
    """A message for bad input, or None."""
    if not args.prompt.strip():
        return "--prompt must not be empty"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.steps is not None and not 1 <= args.steps <= 1000:
        return f"--steps must be in [1, 1000], got {args.steps}"
    if args.guidance is not None and not args.guidance >= 0:
        return f"--guidance must be >= 0, got {args.guidance}"
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        return f"--out must end in .png (or .jpg/.webp), got {args.out!r}"
    return None


def _column(teacher: Any, args: argparse.Namespace) -> tuple[Column, str, str | None]:
    """The column ``args`` asks for, its label, and a note for the user (or None)."""
    if not args.student:
        steps = args.steps or TEACHER_STEPS
        guidance = teacher.guidance if args.guidance is None else args.guidance  # the teacher's own default
        return (Column(f"teacher-{steps}", "teacher", steps, guidance),
                f"teacher DDIM {steps} steps, guidance {guidance:g}", None)
    external = args.student in EXTERNAL_STUDENTS
    card = external_card(args.student) if external else read_card(args.student)
    steps = args.steps or card.steps
    note = None
    if card.scheduler == "consistency":
        if args.guidance not in (None, 1.0):
            note = f"note: --guidance is ignored for consistency student {card.name!r} (guidance is distilled in)"
        label = f"student {card.name} ({steps} consistency steps {student_timesteps(card, steps)})"
    else:  # a diffusers-scheduler student (LCM, TCD, ...): its card's scheduler, as in Compare (same seed, same image)
        if args.guidance is not None:
            card = dataclasses.replace(card, guidance=float(args.guidance))
        label = f"student {card.name} ({steps} steps, {card.scheduler})"
    if external:  # its card travels with the column (its guidance may be --guidance)
        return student_column(card, steps), label, note
    return Column(card.name, "student", steps, num_boundaries=card.num_boundaries, student=card.name), label, note


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    try:
        teacher = teachers.load_teacher(args.model, device=args.device)  # looked up now: tests patch it
    except teachers.TeacherLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:  # students run as peft's active adapter (fuse=False), on the seeding rule of cdlab.columns
        column, label, note = _column(teacher, args)
        run = run_columns(teacher, [column], [args.prompt], [args.seed], stochastic=bool(args.stochastic),
                          fuse=False)[0]
    except ValueError as e:  # StudentError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if note:
        print(note)
    image, nfe = run.images[0], run.nfe
    seconds = time.perf_counter() - start
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    print(f"{teacher.describe()} · {label}")
    print(f"saved {out_path} ({image.size[0]}x{image.size[1]}) in {seconds:.2f} s, NFE {nfe}")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
