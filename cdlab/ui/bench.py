"""Compare speed benchmark: teacher-50 (CFG), teacher-4 and 3 students on the tiny teacher, 4 student steps.

    OMP_NUM_THREADS=2 python -m cdlab.ui.bench [--model tiny] [--repeats 5]

Target on 2 CPU cores: one Compare request returns in 3 s or less (median, after one warm-up).
Students are random LoRAs (speed does not depend on their weights) in a scratch adapters folder.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def bench_compare(model: str = "tiny", repeats: int = 5, n_students: int = 3) -> dict:
    """Seconds per Compare request (median, min, max over ``repeats`` after a warm-up) and per column."""
    from cdlab.teachers import load_teacher
    from cdlab.ui.compare import TEACHER_4, TEACHER_50, Comparer
    from cdlab.ui.testing import make_random_students

    teacher = load_teacher(model)
    root = Path(tempfile.mkdtemp(prefix="cdlab-bench-adapters-"))
    names = make_random_students(teacher.base_id, root, n=n_students)
    cmp = Comparer(teacher, adapters_root=root)
    cols = [TEACHER_50, TEACHER_4, *names]
    prompt = "a small red circle at the top left on a blue background"
    cmp.run(prompt, 0, 3.0, 4, cols)  # warm-up: loads the adapters onto the UNet
    times, last = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        last = cmp.run(prompt, i, 3.0, 4, cols)
        times.append(time.perf_counter() - t0)
    return {"teacher": teacher.describe(), "columns": len(cols), "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times),
            "per_column_s": {c.label: round(c.seconds, 4) for c in last.columns}}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    r = bench_compare(args.model, args.repeats)
    print(f"{r['teacher']} · torch threads {torch.get_num_threads()} · {r['columns']} columns")
    print(f"Compare request: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}); target <= 3 s")
    for k, v in r["per_column_s"].items():
        print(f"  {k:28s} {v:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
