"""Quality against NFE on the flow track: every column at 1, 2, 4 and 8 steps, scored against the real test set.

    python -m cdlab.flow.evaluate --teacher cdlab/assets/fashion-flow --student adapters/fashion-cd-4 --n 2000

Every column samples the same ``n`` noises ``z_i`` (seed ``i``) with class ``i mod 10``, and gets:

* **FID** in the 128-d features of the track's classifier (:mod:`cdlab.flow.classifier`) against the 10,000
  real test images (:func:`cdlab.metrics.fid_of_features`). Class accuracy alone cannot see the few-step gap;
  this does (issue 24's sketch: Euler 50 -> 1 step, FID 32.7 -> 102.2 at accuracy 0.98 throughout).
* **class accuracy**: the fraction the classifier labels as the class asked for;
* **diversity** as the tiny world has it (:func:`cdlab.metrics.seed_diversity`): the mean |a - b| between the
  first 16 samples of each class, averaged over classes (mode collapse reads far below the teacher's).

The columns:

=================  ==========================================================  ===================
teacher            Euler with CFG (:func:`cdlab.flow.matching.sample_euler`)   2 NFE a step
cd / mbcd          multistep consistency (:func:`cdlab.samplers.sample_loop`     1 NFE a step
                   with :class:`cdlab.samplers.ConsistencyStep` on the flow's
                   path), guidance distilled in
reflow             Euler on the student's own velocity, no CFG                  1 NFE a step
=================  ==========================================================  ===================

FID has a bias that falls with n: compare columns at the same n (at least 2000, as the issue asks).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from cdlab.flow import matching
from cdlab.flow.classifier import accuracy, as_feature, load_classifier
from cdlab.flow.model import FLOW_SCHEDULE, FlowModel
from cdlab.metrics import fid_of_features, seed_diversity
from cdlab.samplers import ConsistencyStep, consistency_timesteps, sample_loop

__all__ = ["STEPS", "noise", "sample_column", "score", "evaluate", "main"]

STEPS = (1, 2, 4, 8)
DIVERSITY_SEEDS = 16


def noise(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noises ``[n, 1, 28, 28]`` (one CPU generator from ``seed``) and their classes ``i mod 10``."""
    z = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    return z, torch.arange(n) % matching.NUM_CLASSES


@torch.no_grad()
def sample_column(unet: nn.Module, kind: str, z: torch.Tensor, labels: torch.Tensor, steps: int, *,
                  guidance: float = matching.GUIDANCE, num_boundaries: int = 1, batch_size: int = 1000) -> torch.Tensor:
    """One column's images ``[n, 1, 28, 28]`` (CPU, not clipped): ``kind`` is ``"teacher"`` (Euler with CFG
    ``guidance``), ``"cd"`` (consistency jumps of an N-boundary student) or ``"reflow"`` (Euler, no CFG)."""
    dev = next(unet.parameters()).device
    out = []
    for zb, yb in zip(z.split(batch_size), labels.split(batch_size)):
        c, zb = matching.one_hot(yb).to(dev), zb.to(dev)
        if kind == "cd":
            ts = consistency_timesteps(steps, num_boundaries)
            x = sample_loop(FlowModel(unet), zb, ts, ConsistencyStep(FLOW_SCHEDULE), cond=c).latents
        elif kind in ("teacher", "reflow"):
            v = matching.guided_velocity(unet, c, guidance if kind == "teacher" else None)
            x = matching.sample_euler(v, zb, matching.euler_timesteps(steps).to(dev))
        else:
            raise ValueError(f"kind must be teacher, cd or reflow, got {kind!r}")
        out.append(x.float().cpu())
    return torch.cat(out)


def score(images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module, reference_features: torch.Tensor) -> dict:
    """FID, class accuracy and diversity of one column's images (module docstring)."""
    x = images.clamp(0, 1)
    feats = as_feature(classifier)(x)
    per_class = [x[labels == k][:DIVERSITY_SEEDS] for k in range(matching.NUM_CLASSES)]
    div = seed_diversity(torch.cat(per_class), DIVERSITY_SEEDS) if all(len(p) == DIVERSITY_SEEDS for p in per_class) else None
    return {"fid": round(fid_of_features(feats, reference_features), 2), "accuracy": round(accuracy(classifier, x, labels), 4),
            "diversity": None if div is None else round(div, 4)}


def evaluate(teacher: nn.Module, students: dict[str, tuple[nn.Module, dict]], *, n: int = 2000,
             steps: tuple[int, ...] = STEPS, guidance: float = matching.GUIDANCE, classifier: nn.Module | None = None,
             reference: torch.Tensor | None = None, seed: int = 0, log=print) -> list[dict]:
    """Rows ``{column, kind, steps, nfe, fid, fid_ratio, accuracy, diversity, seconds}``: the teacher at 50 steps
    (the reference of ``fid_ratio``) and naive at ``steps``, then each student (name -> (UNet with its adapter,
    card)) at ``steps``."""
    if classifier is None:
        classifier = load_classifier()
    if reference is None:
        from cdlab.flow.data import load_fashion_mnist

        reference = load_fashion_mnist("test")[0]
    ref_feats = as_feature(classifier)(reference)
    z, labels = noise(n, seed)
    plan = [("teacher", "teacher", k, teacher, 1) for k in (50, *steps)]
    for name, (unet, card) in students.items():
        kind = "reflow" if card.get("scheduler") == "euler" else "cd"
        plan += [(name, kind, k, unet, int(card.get("num_boundaries") or 1)) for k in steps]
    rows: list[dict] = []
    for name, kind, k, unet, nb in plan:
        start = time.monotonic()
        images = sample_column(unet, kind, z, labels, k, guidance=guidance, num_boundaries=nb)
        row = {"column": name, "kind": kind, "steps": k, "nfe": k * (2 if kind == "teacher" else 1),
               **score(images, labels, classifier, ref_feats), "seconds": round(time.monotonic() - start, 2)}
        row["fid_ratio"] = round(row["fid"] / rows[0]["fid"], 3) if rows else 1.0
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    from cdlab.flow.distill import load_flow_student
    from cdlab.flow.train_teacher import load_unet

    p = argparse.ArgumentParser(prog="python -m cdlab.flow.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's folder")
    p.add_argument("--student", action="append", default=[], help="a student's folder (repeat)")
    p.add_argument("--classifier", default=None, help="the classifier's folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--guidance", type=float, default=matching.GUIDANCE)
    p.add_argument("--out", default=None, help="write the rows here as JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not 160 <= args.n <= 50000:
        p.error(f"--n must be in [160, 50000], got {args.n}")
    teacher = load_unet(args.teacher).to(args.device)
    students = {Path(s).name: load_flow_student(args.teacher, s, args.device) for s in args.student}
    rows = evaluate(teacher, students, n=args.n, guidance=args.guidance,
                    classifier=load_classifier(args.classifier, args.device))
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "guidance": args.guidance, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
