"""A flow student's quality as it trains: FID, class accuracy and diversity every ``--every`` steps.

    python tools/flow_student_trial.py --out runs/trial-dmd-1 --init fashion-reflow-1 --every 100 -- \\
        --method dmd --sample-steps 1 --guidance 1.5 --pairs 4096 --batch-size 64 --lr 2e-5 \\
        --regression-weight 1 --steps 800

The arguments after ``--`` are ``python -m cdlab.flow.distill``'s recipe (its ``StudentConfig`` flags). The run
trains in pieces of ``--every`` steps on one checkpoint folder (``<out>/checkpoint``), which continues bit for bit
(:func:`cdlab.flow.distill.distill`), so step k here is step k of the one-piece command with ``--steps k``. After
each piece the student is saved in ``<out>/students/s<k>`` and scored as the shipped evaluation scores it: its own
sampler at its card's steps (``--eval-steps`` another count) through the column runner, on the evaluation's
2,000 noises (:func:`cdlab.flow.evaluate.noise`, classes i mod 10), against the real test set
(:func:`cdlab.flow.evaluate.score`). Each line printed is also appended to ``<out>/trial.jsonl``. ``--resume`` with
a larger ``--steps`` (the recipe otherwise the same, which the checkpoint checks) continues a trial. Its rate
schedule may change where it agrees on every step already taken, so a copy of a constant-rate trial continues
into a fall from its last step (a branch; the first trial's folder stays as it was):

    cp -r runs/trial-d40-dmd4-1800 runs/trial-d40-wsd-2400
    python tools/flow_student_trial.py --out runs/trial-d40-wsd-2400 --init fashion-reflow-4 --every 150 --resume \
        -- <the first trial's recipe> --lr-decay-start 1800 --lr-decay-steps 2400 --steps 2400

``--branch`` lets that copy continue under other rates, loss weights or pairs (``--regression-weight 3``, ...),
with the fake score, the discriminator and Adam's moments kept: from the branch's step on, it is another run.

``--pairs-from STUDENT`` learns from a few-step student's samples instead of the teacher's Euler-50 pairs
(reflow's coupling, DMD's regression): ``(z, x1)`` with ``x1`` that student's sample from ``z`` at its card's
steps, ``z`` and the classes the teacher's pairs have (:func:`cdlab.flow.pairs.pair_noise` and ``pair_labels``,
the recipe's seed), kept in ``<out>/pairs-<student>-<count>-s<seed>.safetensors``. A 4-step student costs 4 NFE
a pair where the teacher's pair costs 100, so a one-step student can be regressed on 25 times as many: knowledge
distillation (Luhman & Luhman 2021) from a cheaper sampler:

    python tools/flow_student_trial.py --out runs/trial-kd1 --init fashion-dmd-4 --pairs-from fashion-dmd-4 \
        --every 500 -- --method reflow --reflow-times zero --sample-steps 1 --pairs 65536 --batch-size 128 \
        --lr 1e-3 --steps 2000

Choosing a step count by these figures is choosing it on the evaluation's own noise and test set: say so beside
any figure chosen that way. docs/flow.md has the trials it printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cdlab.columns import run_columns, student_column  # noqa: E402
from cdlab.flow import matching  # noqa: E402
from cdlab.flow.pairs import pair_labels, pair_noise  # noqa: E402
from cdlab.flow.classifier import load_classifier, load_reference_stats  # noqa: E402
from cdlab.flow.distill import distill, save_flow_student  # noqa: E402
from cdlab.flow.student_config import StudentConfig, add_config_arguments, config_from_args  # noqa: E402
from cdlab.flow.evaluate import noise, sample_and_score  # noqa: E402
from cdlab.flow.pipeline import load_flow_teacher  # noqa: E402
from cdlab.flow.student_checkpoint import CHECKPOINT_JSON, branches_of, recipe_changes  # noqa: E402
from cdlab.paths import cache_dir, read_json, write_safetensors_atomic  # noqa: E402
from cdlab.students import read_card  # noqa: E402


def recipe(argv: list[str]) -> StudentConfig:
    """``StudentConfig`` from distill's own flags and checks (``--lr 2e-5 ...``); an unknown flag is refused."""
    p = argparse.ArgumentParser(prog="recipe")
    add_config_arguments(p)
    return config_from_args(p, p.parse_args(argv))


def student_pairs(teacher, name: str, cfg: StudentConfig, out: Path, report) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, x1)``: the noises of the teacher's pairs (:func:`cdlab.flow.pairs.pair_noise`, the recipe's seed; the
    classes of :func:`cdlab.flow.pairs.pair_labels`) and student ``name``'s samples from them at its card's steps,
    through the column runner; read back from ``out`` when kept there."""
    path = out / f"pairs-{name}-{cfg.pairs}-s{cfg.seed}.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return saved["z"], saved["x1"]
    began = time.monotonic()
    labels, z = pair_labels(cfg.pairs), pair_noise(cfg.pairs, cfg.seed)
    card = read_card(name)
    col = student_column(card, None)  # its card's steps
    prompts = [teacher.classes[int(y)] for y in labels]
    x1 = torch.cat([run_columns(teacher, [col], prompts[i:i + 4096], list(range(i, min(i + 4096, cfg.pairs))),
                                noise=z[i:i + 4096], decode=None, max_rows=matching.ROWS)[0].latents.float().cpu()
                    for i in range(0, cfg.pairs, 4096)])
    write_safetensors_atomic(path, {"z": z.contiguous(), "x1": x1.contiguous()})
    report({"pairs_from": name, "pairs": cfg.pairs, "student_steps": col.steps,
            "seconds": round(time.monotonic() - began, 1)})
    return z, x1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python tools/flow_student_trial.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the trial's folder (checkpoint/, students/, trial.jsonl)")
    p.add_argument("--teacher", default="cdlab/assets/fashion-flow")
    p.add_argument("--init", default=None, help="start from this student in adapters/")
    p.add_argument("--every", type=int, default=100, help="steps between scores")
    p.add_argument("--eval-steps", type=int, default=None, help="sample at this many steps (default: the recipe's)")
    p.add_argument("--n", type=int, default=2000, help="samples per score")
    p.add_argument("--resume", action="store_true", help="continue the trial in --out to the recipe's --steps")
    p.add_argument("--pairs-from", default=None, help="learn from this student's samples (a name in adapters/), "
                   "not the teacher's pairs")
    p.add_argument("--branch", action="store_true", help="with --resume: the recipe may change a rate, a loss "
                   "weight or the pairs from the checkpoint's (distill's branch; a row says what changed)")
    args = p.parse_args(ours)
    cfg = recipe(theirs)
    if not 1 <= args.every <= cfg.steps:
        p.error(f"--every must be in [1, {cfg.steps}]")
    out = Path(args.out)
    done = (read_json(out / "checkpoint" / CHECKPOINT_JSON) or {}).get("step", 0)
    if (out / "checkpoint").exists() and not args.resume:  # a trial is continued only when asked
        p.error(f"{out} holds a trial already; choose a new --out, or --resume it")
    if args.resume and not (isinstance(done, int) and 0 < done < cfg.steps):
        p.error(f"--resume: {out} holds no checkpoint before step {cfg.steps}")
    if args.branch and not args.resume:
        p.error("--branch continues a trial: it needs --resume")
    changes = recipe_changes(out / "checkpoint", cfg) if args.branch else {}
    teacher = load_flow_teacher(args.teacher, "cpu")
    classifier, reference = load_classifier(), load_reference_stats()
    z, labels = noise(args.n, 0)
    k = args.eval_steps or cfg.sample_steps

    def scored(name: str, root: Path | None) -> dict:
        col = student_column(read_card(name, root), k)
        run, row = sample_and_score(teacher, col, z, labels, classifier, reference, root)
        return {**row, "below_zero": round(float((run.latents < 0).float().mean()), 4)}  # pixels the clip makes black

    def report(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(out / "trial.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    pairs = None if args.pairs_from is None else student_pairs(teacher, args.pairs_from, cfg, out, report)
    if args.init is not None and not done:
        report({"step": 0, "init": args.init, "eval_steps": k, **scored(args.init, None)})
    if changes:
        report({"step": done, "branch": {key: [old, new] for key, (old, new) in changes.items()}})
    for steps in range(done + args.every, cfg.steps + 1, args.every):
        unet, done = distill(args.teacher, dataclasses.replace(cfg, steps=steps), init=args.init,
                             checkpoint=out / "checkpoint", pair_cache=cache_dir(), log=lambda line: None,
                             branch=args.branch, pairs=pairs)
        name = f"s{done}"
        save_flow_student(unet, name, cfg, out / "students", teacher=args.teacher, trained_steps=done,
                          init=args.init, overwrite=True, branches=branches_of(out / "checkpoint"))
        report({"step": done, "eval_steps": k, **scored(name, out / "students"),
                "seconds": round(time.monotonic() - start, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
