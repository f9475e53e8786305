"""How many UNet rows a call the flow evaluation should give the teacher: seconds, kernel time and page faults of
teacher-50 (Euler, CFG 1.5) on the evaluation's own noise, at each row count, and whether the samples are the same.

    python tools/flow_eval_rows.py --n 400 --rows 400 100 50
    python tools/flow_eval_rows.py --pairs --n 128 --rows 256 50     # the reflow pairs' calls instead

Each row count samples the same ``n`` images through the column runner (``max_rows``: a CFG image counts 2) in one
process, one after the other; the last lines print each count's time as a ratio to the first's and the largest
difference from its samples. ``--pairs`` times :func:`cdlab.flow.pairs.teacher_pairs` (the reflow and DMD students'
teacher samples, Euler 50 with CFG 1.5 from its own noise) at ``rows // 2`` images a call instead.
:data:`cdlab.flow.matching.ROWS` is the count chosen from it (the evaluation's and the reflow pairs').
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlab.columns import run_columns  # noqa: E402
from cdlab.flow.evaluate import columns, noise  # noqa: E402
from cdlab.flow.pairs import pair_labels, teacher_pairs  # noqa: E402
from cdlab.flow.pipeline import FLOW_GUIDANCE, load_flow_teacher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/flow_eval_rows.py", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=400, help="images per row count")
    p.add_argument("--rows", type=int, nargs="+", default=[400, 100, 50], help="UNet rows a call, first = baseline")
    p.add_argument("--pairs", action="store_true", help="time the reflow pairs' sampler, not the evaluation's")
    args = p.parse_args(argv)
    teacher = load_flow_teacher(None, "cpu")
    z, labels = noise(args.n)
    prompts = [teacher.classes[int(y)] for y in labels]
    col = columns([], FLOW_GUIDANCE, ())[0]  # teacher-50 with CFG: 100 NFE an image

    def draw(rows: int) -> torch.Tensor:
        if args.pairs:
            return teacher_pairs(teacher.pipe.unet, pair_labels(args.n), 50, FLOW_GUIDANCE,
                                 torch.Generator().manual_seed(0), batch_size=max(1, rows // 2))[1]
        return run_columns(teacher, [col], prompts, list(range(args.n)), noise=z, decode=None,
                           max_rows=rows)[0].latents

    seconds, samples = {}, {}
    for rows in args.rows:
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        samples[rows] = draw(rows)
        seconds[rows], after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"{rows} rows: {seconds[rows]:.1f} s ({1000 * seconds[rows] / args.n:.0f} ms an image), user "
              f"{after.ru_utime - before.ru_utime:.1f} s, kernel {after.ru_stime - before.ru_stime:.1f} s, "
              f"{after.ru_minflt - before.ru_minflt} minor page faults", flush=True)
    first = args.rows[0]
    for rows in args.rows[1:]:
        diff = (samples[rows] - samples[first]).abs().max().item()
        print(f"{first} rows take {seconds[first] / seconds[rows]:.2f}x the time of {rows}; largest sample difference {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
