"""The README's image grid: fixed prompts (rows) x the teacher at several step counts and the
students at k steps (columns), every cell of a row from the same initial noise.

    python -m cdlab.figures --model tiny --out docs/grid.png
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from PIL import Image, ImageDraw

from cdlab.columns import Column, run_columns
from cdlab.prompts import tiny_prompts
from cdlab.students import students_of
from cdlab.teachers import load_teacher

TEACHER_STEPS = (1, 2, 4, 8, 16, 50)


def comparison_grid(teacher: Any, prompts: Sequence[str], seeds: Sequence[int], *,
                    teacher_steps: Sequence[int] = TEACHER_STEPS, students: Sequence[str] = (),
                    student_steps: int = 4, guidance: float | None = None, cell: int = 96):
    """A captioned PIL grid: one row per (prompt, seed), one column per sampler (`cdlab.columns.run_columns`:
    the seeding rule, students as peft's active adapter)."""
    w = teacher.guidance if guidance is None else guidance
    cols = [Column(f"teacher {k}", "teacher", k, w) for k in teacher_steps]
    cols += [Column(name, "student", student_steps, student=name, label=f"{name} {student_steps}") for name in students]
    runs = run_columns(teacher, cols, list(prompts), list(seeds), fuse=False, check_base=False)
    columns = [(r.column.label, r.images) for r in runs]
    head = 18
    grid = Image.new("RGB", (cell * len(columns), head + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (label, images) in enumerate(columns):
        draw.text((j * cell + 3, 3), label, fill="black")
        for i, im in enumerate(images):
            grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (j * cell, head + i * cell))
    return grid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdlab.figures", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--out", default="docs/grid.png")
    args = ap.parse_args(argv)

    teacher = load_teacher(args.model)
    prompts = tiny_prompts(args.rows)
    students = [c.name for c in students_of(teacher) if c.method != "external"]
    grid = comparison_grid(teacher, prompts, list(range(args.rows)), students=students)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(prompts)} prompts x {len(TEACHER_STEPS) + len(students)} samplers")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
