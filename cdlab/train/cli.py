"""``python -m cdlab train``: train a consistency student.

    python -m cdlab train --model tiny                                   # tiny multi-boundary CD (N=4), CPU ok;
                                                                         # a new student tiny-mbcd-4-<timestamp>
    python -m cdlab train --model tiny --student_name my-cd --overwrite  # replace adapters/my-cd if it exists
    python -m cdlab train --model tiny --method cd --num_boundaries 1    # classic CD (one boundary)
    python -m cdlab train --model tiny --method ct                       # consistency training, no teacher
    python -m cdlab train --model sd15 --data data/coco5k --max_steps 3000   # the course's project
    python -m cdlab train --config my.json --lr 3e-4                     # a JSON config, then overrides
    python -m cdlab train --resume runs/<run_name> [--max_steps N]       # continue from the newest checkpoint
    torchrun --nproc_per_node 2 -m cdlab train --model tiny ...          # data parallel (also accelerate launch)

Every field of `cdlab.train.config.TrainConfig` is a ``--key value`` option (``--help`` lists them with
their defaults). Exit status: 0 finished or stopped cleanly (SIGTERM/SIGINT), 2 bad config or data, 1 crash.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def _parser():
    from cdlab.train.config import TrainConfig

    p = argparse.ArgumentParser(prog="python -m cdlab train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="JSON file of config fields (applied before --key value options)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest complete checkpoint")
    for f in dataclasses.fields(TrainConfig):
        if f.type in (bool, "bool"):  # `--overwrite` alone means true; `--overwrite false` also works
            p.add_argument(f"--{f.name}", dest=f.name, default=None, metavar="V", nargs="?", const="true",
                           help=f"default: {f.default!r}")
        else:
            p.add_argument(f"--{f.name}", dest=f.name, default=None, metavar="V", help=f"default: {f.default!r}")
    return p


def build_config(argv: list[str]):
    """``(config, resume_dir)`` from the command line."""
    from cdlab.train.config import TrainConfig, check_destination, from_dict, load_json, resolve

    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None}
    base = TrainConfig()
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"--resume {run}: not a run directory (no config.json)")
        base = load_json(run / "config.json")
    if args.config:
        base = load_json(args.config, base)
    cfg = from_dict(overrides, base)
    resolved = resolve(cfg)  # fail on a bad value now, before the teacher loads; the trainer resolves for real
    if not args.resume:
        check_destination(resolved)  # an existing student is replaced only with --overwrite
        if not cfg.student_name:  # keep the collision-free default name the check just approved
            cfg = dataclasses.replace(cfg, student_name=resolved.student_name, run_name=cfg.run_name or resolved.run_name)
    return cfg, (Path(args.resume) if args.resume else None)


def main(argv: list[str] | None = None) -> int:
    from cdlab.train.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, resume = build_config(argv)
        from cdlab.train.trainer import train

        result = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError, DataError) as e:
        if os.environ.get("CDLAB_DEBUG"):
            raise
        print(f"cdlab train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from cdlab.teachers import TeacherLoadError

        if isinstance(e, TeacherLoadError):
            print(f"cdlab train: error: {e}", file=sys.stderr)
            return 2
        raise
    print(f"cdlab train: {result.state} at step {result.step}; run {result.run_dir}"
          + (f"; student {result.student_dir}" if result.student_dir else ""))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
