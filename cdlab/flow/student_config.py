"""The flow students' recipe: one flat, typed config (:class:`StudentConfig`), its rates and its command line.

    python -m cdlab.flow.distill --help          # one --flag per field below, each checked by config_from_args

:mod:`cdlab.flow.distill` trains a student from it. A run's checkpoint keeps it
(:mod:`cdlab.flow.student_checkpoint`), so a run continues only under its own recipe, or under another one where
``BRANCHABLE`` allows it (``--branch``).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from cdlab.loss import DMD_T_RANGE, REGRESSION_DISTANCES
from cdlab.samplers import consistency_timesteps
from cdlab.train import schedule

__all__ = ["METHODS", "DISCRIMINATORS", "StudentConfig", "rate_factor", "add_config_arguments", "config_flags",
           "config_from_args"]

METHODS = ("reflow", "cd", "dmd")  # the student methods of the flow teacher (the CLI's --method, the Train tab's)
DISCRIMINATORS = ("head", "pixel", "features")  # DMD's GAN term's (--disc): cdlab.flow.distill.make_discriminator


@dataclass(frozen=True)
class StudentConfig:
    method: str = "cd"              # one of METHODS: "cd" (consistency distillation; N > 1: multi-boundary),
                                    # "reflow" or "dmd"
    num_boundaries: int = 1
    sample_steps: int = 4           # the steps it is meant for (its card's ``steps``)
    guidance: float = 5.0           # the teacher's CFG scale, distilled in
    step_size: int = 20
    ema_decay: float = 0.95         # cd: the target f_theta^- uses an EMA of the LoRA (0: the online weights)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    lora_rank: int = 32
    pairs: int = 20000              # reflow: teacher pairs drawn once
    reflow_times: str = "uniform"   # reflow: "uniform" t ~ U[0, 1], or "zero" (one-step distillation)
    windows: int = 1                # reflow: W > 1 is piecewise rectified flow (PeRFlow) on W windows
    regression_weight: float = 10.0  # dmd: the weight of the regression on the teacher's pairs (cdlab's tiny-dmd-1's)
    regression_loss: str = "l2"     # dmd: the regression's distance, "l2" (squared) or "l1" (cdlab.loss's notes)
    fake_steps: int = 1             # dmd: fake-score updates per generator update
    fake_lr: float = 0.0            # dmd: the fake score's learning rate (0: lr, one rate for both adapters)
    fake_rank: int = 0              # dmd: the fake score's LoRA rank (0: lora_rank's). At 80 or more on the D = 40
                                    # UNet (its widest layers' 80 outputs) it can move every adapted weight freely
    fake_warmup: int = 0            # dmd: the first steps train the fake score alone (a run started --init from
                                    # a generator that is not the teacher: its fake score must learn it first)
    gan_weight: float = 0.0         # dmd: the generator's GAN term (DMD2's; 0: none), against real images
    disc_weight: float = 0.1        # dmd with gan_weight > 0: the discriminator's loss in the fake score's update
    disc_lr: float = 0.0            # dmd with gan_weight > 0: the discriminator head's rate (0: the fake score's)
    disc: str = "head"              # dmd with gan_weight > 0: "head" (DMD2's, on the fake score), "pixel" (its own)
                                    # or "features" (ADD's: heads on a frozen classifier's features)
    disc_backbone: str = ""         # --disc features: the frozen classifier's folder (python -m
                                    # cdlab.flow.classifier --out F --seed 1), never the judge's
    gan_clip: bool = False          # dmd with gan_weight > 0: its discriminator sees the samples as shown, in [0, 1]
    student_ema: float = 0.0        # the student saved is this EMA of its weights (0: its last weights)
    adam_beta1: float = 0.9         # Adam's first-moment decay for every adapter (torch's default; DMD2 uses 0)
    lr_decay_steps: int = 0         # 0: every rate constant; T > 0: each falls along a half cosine to 0 at step T
                                    # (rate_factor), whatever --steps is, so a run in pieces keeps one schedule
    lr_decay_start: int = 0         # with lr_decay_steps T: the rates stay constant to step S, then fall to 0 at T
                                    # (warmup-stable-decay): a constant run's checkpoint at S continues into it
    shift: float = 1.0              # dmd: the K jumps' grid under SD3's timestep shift (< 1: nearer the data,
                                    # consistency_timesteps); the card samples on it (scheduler_kwargs)
    dmd_t_max: int = DMD_T_RANGE[1]  # dmd: the matching and GAN terms diffuse G's samples to t ~ U{20..T} (DMD2's
                                    # 980); a lower T spends every step where the fine detail shows (docs/flow.md)
    seed: int = 0

    def rate(self, step: int) -> float:
        """The factor on every learning rate at step ``step`` under this recipe's schedule (:func:`rate_factor`)."""
        return rate_factor(step, self.lr_decay_steps, self.lr_decay_start)


def rate_factor(step: int, decay_steps: int, decay_start: int = 0) -> float:
    """The factor on every learning rate at step ``step`` (from 0): 1 without a schedule (``decay_steps`` 0), else
    the lab's cosine without warm-up (:func:`cdlab.train.schedule.rate_factor`), 1 up to ``S = decay_start`` and
    ``(1 + cos(pi min(step - S, T - S) / (T - S))) / 2`` after, from 1 at step S to 0 at step ``T = decay_steps``,
    where an adversarial run's swing (docs/flow.md, "A longer DMD-4 run") dies down instead of stopping wherever it
    stands. With S > 0 (warmup-stable-decay) the constant part is the constant-rate run itself, so one constant run
    can be continued from its checkpoint into several falls."""
    return 1.0 if decay_steps <= 0 else schedule.rate_factor(step, decay_steps, decay_start=decay_start)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`StudentConfig` field (``--lora-rank 16``), its default the field's; a yes/no
    field is ``--gan-clip`` or ``--no-gan-clip``."""
    for name, value in asdict(StudentConfig()).items():
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(type=type(value))
        p.add_argument("--" + name.replace("_", "-"), default=value, **kind)


def config_flags(values: dict, always: tuple[str, ...] = ()) -> list[str]:
    """The command line of :func:`add_config_arguments` for ``values`` (:class:`StudentConfig` fields): the fields in
    ``always``, then every other one that differs from its default (the flags a run needs, and no more). A number
    is written ``%g``, a yes/no field ``--gan-clip`` or ``--no-gan-clip``. An unknown field is refused by name."""
    defaults = asdict(StudentConfig())
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"not StudentConfig fields: {unknown}")
    out = []
    for name in [*always, *(k for k in values if k not in always and values[k] != defaults[k])]:
        flag, value = "--" + name.replace("_", "-"), values[name]
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return out


def config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> StudentConfig:
    """The :class:`StudentConfig` of :func:`add_config_arguments`' flags, each checked (``p.error`` names the
    flag out of range)."""
    cfg = StudentConfig(**{k: getattr(args, k) for k in asdict(StudentConfig())})
    if cfg.method not in METHODS or cfg.reflow_times not in ("uniform", "zero"):
        p.error(f"--method must be one of {', '.join(METHODS)}, --reflow-times uniform or zero")
    if cfg.regression_loss not in REGRESSION_DISTANCES or (cfg.regression_loss != "l2" and cfg.method != "dmd"):
        p.error(f"--regression-loss must be one of {', '.join(REGRESSION_DISTANCES)}, and other than l2 only with "
                "--method dmd")
    if not 0 <= cfg.regression_weight <= 1000 or not 1 <= cfg.fake_steps <= 10 or not 0 <= cfg.fake_lr <= 1:
        p.error("--regression-weight must be in [0, 1000], --fake-steps in [1, 10], --fake-lr in [0, 1]")
    if not 1 <= cfg.lora_rank <= 512 or not 0 <= cfg.fake_rank <= 512 or (cfg.fake_rank and cfg.method != "dmd"):
        p.error("--lora-rank must be in [1, 512]; --fake-rank in [0, 512], and more than 0 only with --method dmd "
                "(0: --lora-rank's)")
    if not 0 <= cfg.fake_warmup < cfg.steps or (cfg.fake_warmup and cfg.method != "dmd"):
        p.error("--fake-warmup must be in [0, --steps), and more than 0 only with --method dmd")
    if (not 0 <= cfg.gan_weight <= 10 or not 0 <= cfg.disc_weight <= 100 or not 0 <= cfg.disc_lr <= 1
            or (cfg.gan_weight and cfg.method != "dmd") or cfg.disc not in DISCRIMINATORS):
        p.error("--gan-weight must be in [0, 10], and more than 0 only with --method dmd; --disc-weight in [0, 100], "
                f"--disc-lr in [0, 1], --disc one of {', '.join(DISCRIMINATORS)}")
    if (cfg.disc == "features") != bool(cfg.disc_backbone):
        p.error("--disc features needs --disc-backbone (a classifier's folder), and --disc-backbone needs it")
    if cfg.gan_clip and not cfg.gan_weight:
        p.error("--gan-clip clips what the GAN term's discriminator judges: it needs --gan-weight > 0")
    if not 0 <= cfg.student_ema < 1 or not 0 <= cfg.ema_decay < 1 or not 0 <= cfg.adam_beta1 < 1:
        p.error("--student-ema, --ema-decay and --adam-beta1 must be in [0, 1)")
    if not 1 <= cfg.windows <= 50 or (cfg.windows > 1 and cfg.method != "reflow"):
        p.error("--windows must be in [1, 50], and more than 1 only with --method reflow")
    if not 1 <= cfg.num_boundaries <= 50 or (cfg.num_boundaries > 1 and cfg.method != "cd"):
        p.error("--num-boundaries must be in [1, 50], and more than 1 only with --method cd")
    if not 0 <= cfg.lr_decay_steps <= 10 ** 6 or not 0 <= cfg.lr_decay_start < max(1, cfg.lr_decay_steps):
        p.error("--lr-decay-steps must be in [0, 1000000], --lr-decay-start in [0, --lr-decay-steps) (0 without it)")
    if cfg.shift != 1.0 and cfg.method != "dmd":
        p.error("--shift must be 1 except with --method dmd (its K jumps' grid)")
    lo, hi = DMD_T_RANGE
    if not lo < cfg.dmd_t_max <= hi or (cfg.dmd_t_max != hi and cfg.method != "dmd"):
        p.error(f"--dmd-t-max must be in ({lo}, {hi}], and below {hi} only with --method dmd")
    try:  # the range (cdlab.samplers.SHIFT_RANGE) and a grid whose rounded points stay apart
        consistency_timesteps(cfg.sample_steps, cfg.sample_steps, shift=cfg.shift)
    except ValueError as e:
        p.error(f"--shift: {e}")
    return cfg
