"""Where a one-step flow student's background sits, and which of DMD's terms moves it.

    python tools/flow_background.py score fashion-dmd-1 runs/trial-d40-dmd1-b1200-lr2e5-fine/students/s1325
    python tools/flow_background.py pushes runs/trial-d40-dmd1-1800-ckpt/s1200 --init fashion-reflow-1 --steps 1335 -- \\
        --method dmd --sample-steps 1 --guidance 1.5 --pairs 4096 --batch-size 64 --lr 2e-5 --regression-weight 1 \\
        --gan-weight 0.05 --disc-weight 0.1 --disc-lr 1e-3

Fashion-MNIST's backgrounds are exactly 0, and the app and the evaluation show a sample clipped to [0, 1]. A
generator whose background sits at 0 with some spread shows half of it as faint grey speckle, which the
classifier's features (and so the FID) see at once; one whose background sits a little below 0 shows black.

``score``: for each student (a name in ``adapters/`` or a student folder ``<root>/<name>``), on the evaluation's
noises (``--seed``, default 0) against the real test set, as :func:`cdlab.flow.evaluate.sample_and_score` scores
it: the FID and class accuracy, the fraction of pixels below 0 (black once clipped), and, as a diagnosis only,
the FID of the same samples moved by a constant before the clip (``--shift``). No student samples that way.

``pushes``: continue a copy of a DMD run's checkpoint (in a temporary folder; the run's own stays as it is) to
step ``--steps`` under the recipe after ``--``, as ``python -m cdlab.flow.distill`` would (a changed rate or
weight is a branch), and print one JSON line a step: the mean of the generator's background (its pixels below
0.1) and the summed push of the matching term and of the GAN term on those pixels (their gradients on the
sample, x 1000; positive moves the background down, since the generator descends them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cdlab.loss  # noqa: E402
from cdlab.columns import student_column  # noqa: E402
from cdlab.flow import distill  # noqa: E402
from cdlab.flow.classifier import load_classifier, load_reference_stats  # noqa: E402
from cdlab.flow.evaluate import noise, sample_and_score, score  # noqa: E402
from cdlab.flow.pipeline import load_flow_teacher  # noqa: E402
from cdlab.paths import cache_dir  # noqa: E402
from cdlab.students import read_card  # noqa: E402
from tools.flow_select import student_at  # noqa: E402
from tools.flow_student_trial import recipe as parse_recipe  # noqa: E402

BACKGROUND = 0.1  # a sample's pixels below this are its background


def scores(args: argparse.Namespace) -> None:
    teacher = load_flow_teacher(args.teacher, "cpu")
    classifier, reference = load_classifier(), load_reference_stats()
    z, labels = noise(args.n, args.seed)
    for spec in args.students:
        name, root = student_at(spec)
        col = student_column(read_card(name, root), 1)
        run, row = sample_and_score(teacher, col, z, labels, classifier, reference, root)
        x = run.latents.float().cpu()
        moved = {f"fid_shift{c:+g}": score(x + c, labels, classifier, reference)["fid"] for c in args.shift}
        print(json.dumps({"student": spec, "fid": row["fid"], "accuracy": row["accuracy"],
                          "below_zero": round(float((x < 0).float().mean()), 4), **moved}), flush=True)


def pushes(args: argparse.Namespace, recipe: list[str]) -> None:
    cfg = parse_recipe(recipe)  # distill's own flags and checks
    kept: dict = {}
    generator_sample, dmd_loss = cdlab.loss.generator_sample, distill.dmd_loss

    def sample(*a, **kw):  # the generator's sample with its graph, for the terms' gradients on it
        out = generator_sample(*a, **kw)
        if kw.get("grad", True):
            kept["x_g"] = out["x_g"]
        return out

    def loss(*a, **kw):
        out = dmd_loss(*a, **kw)
        x_g = kept["x_g"]
        bg = x_g.detach() < BACKGROUND
        gan = (torch.autograd.grad(out["loss_gan"], x_g, retain_graph=True)[0] * cfg.gan_weight
               if out["loss_gan"].requires_grad else torch.zeros_like(x_g))
        dm = out["grad"] / x_g[0].numel() / len(x_g)  # d loss_dm / d x_g
        kept["row"] = {"background": round(float(x_g.detach()[bg].mean()), 5),
                       "below_zero": round(float((x_g.detach() < 0).float().mean()), 4),
                       "push_dm": round(float(dm[bg].sum()) * 1e3, 3), "push_gan": round(float(gan[bg].sum()) * 1e3, 3)}
        return out

    def on_step(done: int, _loss: float) -> bool:
        print(json.dumps({"step": done, **kept["row"]}), flush=True)
        return False

    cdlab.loss.generator_sample, distill.dmd_loss = sample, loss  # put back below, whatever happens
    try:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "checkpoint"
            shutil.copytree(args.checkpoint, copy)
            distill.distill(args.teacher, dataclasses.replace(cfg, steps=args.steps), init=args.init,
                            checkpoint=copy, checkpoint_every=10 ** 9, pair_cache=cache_dir(), log=lambda _: None,
                            on_step=on_step, branch=True)
    finally:
        cdlab.loss.generator_sample, distill.dmd_loss = generator_sample, dmd_loss


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, recipe = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python tools/flow_background.py", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="cdlab/assets/fashion-flow")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="FID, accuracy and pixels below 0 of one-step students")
    s.add_argument("students", nargs="+")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--shift", type=float, nargs="*", default=[-0.04, -0.02, 0.02])
    q = sub.add_parser("pushes", help="per step, the background and each term's push on it")
    q.add_argument("checkpoint")
    q.add_argument("--steps", type=int, required=True, help="continue to this step")
    q.add_argument("--init", default=None, help="the run's --init (a name in adapters/)")
    args = p.parse_args(ours)
    if args.command == "score":
        scores(args)
    else:
        pushes(args, recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
