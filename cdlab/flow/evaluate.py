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
import json
import sys
from pathlib import Path

import torch
from torch import nn

from cdlab.columns import TEACHER_50, Column, run_columns, student_column
from cdlab.flow import matching
from cdlab.flow.classifier import accuracy, as_feature, load_classifier, load_reference_stats
from cdlab.metrics import fid_of_features, seed_diversity
from cdlab.paths import FLOW_ID
from cdlab.students import StudentCard, list_students, read_card

__all__ = ["STEPS", "noise", "columns", "score", "evaluate", "render_table", "main"]

STEPS = (1, 2, 4, 8)
DIVERSITY_SEEDS = 16


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


def evaluate(teacher, cards: list[StudentCard], *, n: int = 2000, steps: tuple[int, ...] = STEPS,
             guidance: float | None = None, classifier: nn.Module | None = None,
             reference: torch.Tensor | dict[str, torch.Tensor] | None = None, adapters_root: str | Path | None = None,
             seed: int = 0, log=print) -> list[dict]:
    """Rows ``{column, kind, steps, nfe, fid, fid_ratio, accuracy, diversity, seconds}`` of :func:`columns`, all
    sampled by :func:`cdlab.columns.run_columns` on :func:`noise` (``teacher``: a
    :class:`cdlab.flow.pipeline.FlowTeacher`; ``cards``: its students in ``adapters_root``). ``guidance``: the
    teacher's CFG (default ``teacher.guidance``). ``reference``: real images, or their feature statistics;
    default the shipped classifier's saved statistics of the test set (or, when it has none, the test set)."""
    if classifier is None:
        classifier = load_classifier()
        reference = load_reference_stats() if reference is None else reference
    if reference is None:
        from cdlab.flow.data import load_fashion_mnist

        reference = load_fashion_mnist("test")[0]
    ref_feats = reference if isinstance(reference, dict) else as_feature(classifier)(reference)
    z, labels = noise(n, seed)
    prompts = [teacher.classes[int(y)] for y in labels]
    w = float(teacher.guidance if guidance is None else guidance)
    rows: list[dict] = []
    for col in columns(cards, w, steps):
        run = run_columns(teacher, [col], prompts, list(range(n)), noise=z.to(teacher.device), decode=None,
                          adapters_root=adapters_root, max_rows=2000)[0]
        kind = "teacher" if col.kind == "teacher" else run.card.method
        row = {"column": col.name, "kind": kind, "steps": col.steps, "nfe": run.nfe,
               **score(run.latents.float().cpu(), labels, classifier, ref_feats), "seconds": round(run.seconds, 2)}
        row["fid_ratio"] = round(row["fid"] / rows[0]["fid"], 3) if rows else 1.0
        rows.append(row)
        log(json.dumps(row))
    return rows


def _students_guidance(cards: list[StudentCard]) -> float | None:
    """The CFG scale the students were distilled at, when they agree (the teacher's reference should use it)."""
    ws = {float(c.training_config["guidance"]) for c in cards if "guidance" in c.training_config}
    return ws.pop() if len(ws) == 1 else None


def render_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = "| column | steps | NFE | FID | ÷ teacher-50 | accuracy | diversity |\n|---|---|---|---|---|---|---|\n"
    return head + "\n".join(f"| {r['column']} | {r['steps']} | {r['nfe']} | {r['fid']} | {r['fid_ratio']} | "
                             f"{r['accuracy']} | {r['diversity']} |" for r in rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cdlab.evaluate.store import check_out_dir, new_out_dir
    from cdlab.flow.pipeline import load_flow_teacher
    from cdlab.paths import write_json_atomic

    p = argparse.ArgumentParser(prog="python -m cdlab.flow.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="the teacher's folder (default: the shipped one)")
    p.add_argument("--student", action="append", default=None,
                   help="a student's name in --adapters (repeat; default: every student of the flow teacher there)")
    p.add_argument("--adapters", default=None, help="the students' folder (default adapters/)")
    p.add_argument("--classifier", default=None, help="the classifier's folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=2000, help="samples per column (default 2000: FID is biased below it)")
    p.add_argument("--guidance", type=float, default=None,
                   help="the teacher's CFG scale (default: the one its students were distilled at, else the teacher's)")
    p.add_argument("--out", default=None, help="output folder (default evals/flow-<time>); one that holds an "
                                               "evaluation is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not 20 <= args.n <= 50000:  # FID is biased at small n: the docs' figures use 2000
        p.error(f"--n must be in [20, 50000], got {args.n}")
    out = Path(args.out) if args.out else new_out_dir("flow-")
    try:
        check_out_dir(str(out), "results.json", args.overwrite)
        teacher = load_flow_teacher(args.teacher, args.device)
        cards = ([read_card(s, args.adapters) for s in args.student] if args.student is not None
                 else list_students(args.adapters, base_model=FLOW_ID))
        classifier = load_classifier(args.classifier, args.device)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    guidance = args.guidance if args.guidance is not None else (_students_guidance(cards) or teacher.guidance)
    rows = evaluate(teacher, cards, n=args.n, guidance=guidance, classifier=classifier,
                    reference=load_reference_stats(args.classifier), adapters_root=args.adapters,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"teacher": args.teacher or "fashion-flow", "n": args.n,
                                             "guidance": guidance, "rows": rows})
    (out / "table.md").write_text(render_table(rows))
    print(render_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
