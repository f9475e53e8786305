"""Score saved flow students on a selection draw, kept apart from the evaluation's: another noise seed, and the
real *training* images as FID's reference.

    python tools/flow_select.py --steps 1 --seed 1 fashion-dmd-1 runs/trial-d40-dmd1-b1200-lr2e5-fine/students/s1300

Choosing a checkpoint (or a grid, or a weight) by the evaluation's own figures, its noise seed 0 against the test
set, makes the shipped figure a choice, not a measurement. This tool scores on a draw no evaluation uses: the
noises of ``--seed`` (not 0; :func:`cdlab.flow.evaluate.noise`, classes i mod 10) and the classifier features of
the first ``--reference`` training images (Fashion-MNIST's files, ``cdlab.flow.data``: the one step here that
needs the data). Choose on these figures, then report the evaluation's. ``--classifier F`` scores in another
classifier's features (``python -m cdlab.flow.classifier --out F --seed 2``): a judge held out from a student
trained against a classifier's features (``--disc features``) and from the evaluation alike. A student is a
name in ``adapters/`` or a student folder's path (``<root>/<name>``); each prints one JSON line: FID, class
accuracy, diversity, seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdlab.columns import student_column  # noqa: E402
from cdlab.flow.classifier import as_feature, load_classifier  # noqa: E402
from cdlab.flow.data import load_fashion_mnist  # noqa: E402
from cdlab.flow.evaluate import noise, sample_and_score  # noqa: E402
from cdlab.flow.pipeline import load_flow_teacher  # noqa: E402
from cdlab.metrics import feature_stats  # noqa: E402
from cdlab.students import read_card  # noqa: E402


def student_at(spec: str) -> tuple[str, str | None]:
    """A student as the flow tools name one: ``(name, root)`` of a name in ``adapters/`` (root None) or of a
    student folder's path ``<root>/<name>``."""
    root, name = (None, spec) if "/" not in spec else spec.rsplit("/", 1)
    return name, root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/flow_select.py", description=__doc__.split("\n")[0])
    p.add_argument("students", nargs="+", help="names in adapters/, or student folders (<root>/<name>)")
    p.add_argument("--steps", type=int, default=1, help="sample each student at this many steps")
    p.add_argument("--seed", type=int, default=1, help="the selection draw's noise seed (0 is the evaluation's)")
    p.add_argument("--n", type=int, default=2000, help="samples per student")
    p.add_argument("--reference", type=int, default=10_000, help="training images in FID's reference")
    p.add_argument("--teacher", default="cdlab/assets/fashion-flow")
    p.add_argument("--classifier", default=None, help="score in this classifier's features and labels (a folder of "
                   "python -m cdlab.flow.classifier; default the evaluation's): a held-out judge, one that neither "
                   "a student's training nor the evaluation uses")
    args = p.parse_args(argv)
    if args.seed == 0:
        p.error("--seed 0 is the evaluation's draw: choose on another")
    if not 1 <= args.steps <= 8 or not 10 <= args.n <= 10_000 or not 100 <= args.reference <= 60_000:
        p.error("--steps in [1, 8], --n in [10, 10000], --reference in [100, 60000]")
    teacher = load_flow_teacher(args.teacher, "cpu")
    classifier = load_classifier(args.classifier)
    with torch.no_grad():
        reference = feature_stats(as_feature(classifier)(load_fashion_mnist("train")[0][:args.reference]))
    z, labels = noise(args.n, args.seed)
    for spec in args.students:
        name, root = student_at(spec)
        start = time.monotonic()
        col = student_column(read_card(name, root), args.steps)
        row = sample_and_score(teacher, col, z, labels, classifier, reference, root)[1]
        print(json.dumps({"student": spec, "steps": args.steps, "seed": args.seed, **row,
                          "seconds": round(time.monotonic() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
