"""Quality against NFE on the flow track: every column at 1, 2, 4 and 8 steps, scored against the real test set.

    python -m cdlab.flow.evaluate --n 2000              # the shipped teacher and its students
    python -m cdlab evaluate --model fashion-flow       # the same

Every column samples the same ``n`` noises ``z_i`` (seed ``i``) with class ``i mod 10``, and gets:

* **FID** in the 128-d features of the track's classifier (:mod:`cdlab.flow.classifier`) against the 10,000
  real test images (:func:`cdlab.metrics.fid_of_features`). Class accuracy alone cannot see the few-step gap;
  this does (issue 24's sketch: Euler 50 -> 1 step, FID 32.7 -> 102.2 at accuracy 0.98 throughout).
* **class accuracy**: the fraction the classifier labels as the class asked for;
* **diversity** as the tiny world has it (:func:`cdlab.metrics.seed_diversity`): the mean |a - b| between the
  first 16 samples of each class, averaged over classes (mode collapse reads far below the teacher's).

The columns go through the lab's one column runner (:func:`cdlab.columns.run_columns`) on the flow teacher
(:class:`cdlab.flow.pipeline.FlowTeacher`), as Compare's do: the teacher at 50 Euler steps with CFG (2 NFE a
step; the reference of ``fid_ratio``) and naively at each step count, then each student of the flow teacher in
``adapters/`` (``load_student``) at each step count, guidance distilled in (1 NFE a step).

FID has a bias that falls with n: compare columns at the same n (at least 2000, as the issue asks).
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cdlab.columns import TEACHER_50, Column, run_columns, student_column
from cdlab.flow import matching
from cdlab.flow.classifier import accuracy, as_feature, load_classifier, load_reference_stats
from cdlab.metrics import fid_of_features, seed_diversity
from cdlab.students import StudentCard, read_card, students_of
from cdlab.teachers import FLOW_TEACHER

__all__ = ["STEPS", "noise", "columns", "score", "sample_and_score", "evaluate", "run_flow_evaluation", "main"]

STEPS = (1, 2, 4, 8)
DIVERSITY_SEEDS = 16
MIN_SAMPLES, MAX_SAMPLES = 20, 50000  # per column; FID is biased at small n (the docs' figures use 2000)
NOTE = ("FID is in the features of the track's own classifier (cdlab.flow.classifier) against the 10,000 real "
        "test images: compare the rows of one table, at one n, not with FID elsewhere.")


def noise(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noises ``[n, 1, 28, 28]`` (one CPU generator from ``seed``) and their classes ``i mod 10``."""
    z = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    return z, torch.arange(n) % matching.NUM_CLASSES


def columns(cards: list[StudentCard], guidance: float, steps: tuple[int, ...] = STEPS) -> list[Column]:
    """The teacher at 50 Euler steps with CFG ``guidance``, naively at ``steps``, then each student at ``steps``."""
    cols = [Column(TEACHER_50, "teacher", 50, guidance)]
    cols += [Column(f"teacher-{k} (naive)", "teacher", k, guidance) for k in steps]
    return cols + [student_column(card, k) for card in cards for k in steps]


def score(images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module,
          reference: torch.Tensor | dict[str, torch.Tensor]) -> dict:
    """FID, class accuracy and diversity of one column's images (module docstring); ``reference``: the real
    images' features, or their statistics (:func:`cdlab.flow.classifier.load_reference_stats`)."""
    x = images.clamp(0, 1)
    feats = as_feature(classifier)(x)
    per_class = [x[labels == k][:DIVERSITY_SEEDS] for k in range(matching.NUM_CLASSES)]
    div = seed_diversity(torch.cat(per_class), DIVERSITY_SEEDS) if all(len(p) == DIVERSITY_SEEDS for p in per_class) else None
    return {"fid": round(fid_of_features(feats, reference), 2), "accuracy": round(accuracy(classifier, x, labels), 4),
            "diversity": None if div is None else round(div, 4)}


def sample_and_score(teacher, col: Column, z: torch.Tensor, labels: torch.Tensor, classifier: nn.Module,
                     reference: torch.Tensor | dict[str, torch.Tensor], adapters_root: str | Path | None = None
                     ) -> tuple[Any, dict]:
    """One column sampled from the noises ``z`` of classes ``labels`` as the evaluation samples every column
    (:func:`cdlab.columns.run_columns`, calls of ``matching.ROWS`` rows, no decoding), and its :func:`score`
    against ``reference``. Returns the column's run and the score (the evaluation, the trial and selection tools)."""
    prompts = [teacher.classes[int(y)] for y in labels]
    run = run_columns(teacher, [col], prompts, list(range(len(labels))), noise=z.to(teacher.device), decode=None,
                      adapters_root=adapters_root, max_rows=matching.ROWS)[0]
    return run, score(run.latents.float().cpu(), labels, classifier, reference)


def evaluate(teacher, cards: list[StudentCard], *, n: int = 2000, steps: tuple[int, ...] = STEPS,
             guidance: float | None = None, classifier: nn.Module | None = None,
             reference: torch.Tensor | dict[str, torch.Tensor] | None = None, adapters_root: str | Path | None = None,
             seed: int = 0, progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """Rows ``{method, column, kind, steps, nfe, fid, fid_ratio, accuracy, diversity, seconds_per_image,
    speedup}`` of :func:`columns`, all sampled by :func:`cdlab.columns.run_columns` on :func:`noise`
    (``teacher``: a :class:`cdlab.flow.pipeline.FlowTeacher`; ``cards``: its students in ``adapters_root``).
    ``guidance``: the teacher's CFG (default ``teacher.guidance``). ``reference``: real images, or their feature
    statistics; default the shipped classifier's saved statistics of the test set (or, when it has none, the
    test set). ``fid_ratio`` and ``speedup`` are against the first row, teacher-50."""
    if classifier is None:
        classifier = load_classifier()
        reference = load_reference_stats() if reference is None else reference
    if reference is None:
        from cdlab.flow.data import load_fashion_mnist

        reference = load_fashion_mnist("test")[0]
    ref_feats = reference if isinstance(reference, dict) else as_feature(classifier)(reference)
    z, labels = noise(n, seed)
    w = float(teacher.guidance if guidance is None else guidance)
    rows: list[dict] = []
    cols = columns(cards, w, steps)
    for i, col in enumerate(cols):
        if progress:
            progress(i / len(cols), f"{col.label} ({col.steps} steps), {n} samples")
        run, scores = sample_and_score(teacher, col, z, labels, classifier, ref_feats, adapters_root)
        teacher_row = col.kind == "teacher"
        row = {"method": "teacher" if teacher_row else col.name, "column": col.name,
               "kind": "teacher" if teacher_row else run.card.method, "steps": col.steps, "nfe": run.nfe,
               **scores, "seconds_per_image": run.seconds / n}
        first = rows[0] if rows else row
        row["fid_ratio"] = round(row["fid"] / first["fid"], 3)
        row["speedup"] = first["seconds_per_image"] / row["seconds_per_image"]
        rows.append(row)
    return rows


def run_flow_evaluation(teacher, *, n: int = 2000, cards: list[StudentCard] | None = None,
                        guidance: float | None = None, adapters_root: str | Path | None = None,
                        classifier_dir: str | Path | None = None, out_dir: str | Path | None = None,
                        overwrite: bool = False, progress: Callable[[float, str], None] | None = None,
                        seed: int = 0, steps: tuple[int, ...] = STEPS) -> dict:
    """Evaluate the flow teacher and its students (default: every student of it in ``adapters_root``) at ``steps``
    on the 2,000 (``n``) noises of ``seed`` (:func:`noise`; another seed: another draw of the same table) and write
    the evaluation as every evaluation is written (``results.json``, ``table.md``, ``quality_vs_nfe.png``:
    :func:`cdlab.evaluate.store.write_evaluation`, suite ``"flow"``); default folder ``evals/flow-<time>``.
    Returns the results, with ``out_dir``. ``guidance`` defaults to the one the students were distilled at."""
    from cdlab.evaluate.store import check_out_dir, new_out_dir, write_evaluation

    if isinstance(n, bool) or not isinstance(n, int) or not MIN_SAMPLES <= n <= MAX_SAMPLES:
        raise ValueError(f"n: samples per column must be an integer in [{MIN_SAMPLES}, {MAX_SAMPLES}], got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed: the noise seed must be an integer in [0, 2^31), got {seed!r}")
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50 for k in steps):
        raise ValueError(f"steps: step counts must be integers in [1, 50], got {steps!r}")
    out = Path(out_dir) if out_dir is not None else new_out_dir("flow-")
    check_out_dir(out, "results.json", overwrite)
    cards = students_of(teacher, adapters_root) if cards is None else cards
    w = float(guidance if guidance is not None else (_students_guidance(cards) or teacher.guidance))
    rows = evaluate(teacher, cards, n=n, guidance=w, classifier=load_classifier(classifier_dir),
                    reference=load_reference_stats(classifier_dir), adapters_root=adapters_root, progress=progress,
                    seed=seed, steps=tuple(steps))
    results = {"created": datetime.now().isoformat(timespec="seconds"), "model": FLOW_TEACHER,
               "base_id": teacher.base_id, "base_fingerprint": teacher.base_fingerprint,
               "describe": teacher.describe(), "device": str(teacher.device), "suite": "flow", "n": n,
               "guidance": w, "reference_steps": 50, "prompt_source": f"classes i mod 10, noise seed {seed}",
               "rows": rows, "notes": [NOTE]}
    results["out_dir"] = str(write_evaluation(results, out, overwrite))
    return results


def _students_guidance(cards: list[StudentCard]) -> float | None:
    """The CFG scale the students were distilled at, when they agree (the teacher's reference should use it)."""
    ws = {float(c.training_config["guidance"]) for c in cards if "guidance" in c.training_config}
    return ws.pop() if len(ws) == 1 else None


def main(argv: list[str] | None = None) -> int:
    from cdlab.evaluate.report import render_table
    from cdlab.evaluate.store import check_out_dir
    from cdlab.flow.pipeline import load_flow_teacher

    p = argparse.ArgumentParser(prog="python -m cdlab.flow.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="the teacher's folder (default: the shipped one)")
    p.add_argument("--student", action="append", default=None,
                   help="a student's name in --adapters (repeat; default: every student of the flow teacher there)")
    p.add_argument("--adapters", default=None, help="the students' folder (default adapters/)")
    p.add_argument("--classifier", default=None, help="the classifier's folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=2000,
                   help=f"samples per column, {MIN_SAMPLES} to {MAX_SAMPLES} (default 2000: FID is biased below it)")
    p.add_argument("--guidance", type=float, default=None,
                   help="the teacher's CFG scale (default: the one its students were distilled at, else the teacher's)")
    p.add_argument("--out", default=None, help="output folder (default evals/flow-<time>); one that holds an "
                                               "evaluation is refused unless --overwrite")
    p.add_argument("--seed", type=int, default=0, help="the noises' seed (default 0, the shipped evaluation's)")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS),
                   help=f"the few-step columns' step counts (default {' '.join(map(str, STEPS))})")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        check_out_dir(out, "results.json", args.overwrite)
        teacher = load_flow_teacher(args.teacher, args.device, name=args.teacher or FLOW_TEACHER)
        cards = ([read_card(s, args.adapters) for s in args.student] if args.student is not None
                 else students_of(teacher, args.adapters))
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        results = run_flow_evaluation(teacher, n=args.n, cards=cards, guidance=args.guidance,
                                      adapters_root=args.adapters, classifier_dir=args.classifier, out_dir=out,
                                      overwrite=args.overwrite, seed=args.seed, steps=tuple(args.steps),
                                      progress=lambda f, d: print(f"[{f:4.0%}] {d}", file=sys.stderr, flush=True))
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_table(results))
    print(f"wrote {results['out_dir']}")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
