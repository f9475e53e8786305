"""The learning-rate schedule of the lab's trainers, as one factor on the base rate a step.

    from cdlab.train.schedule import rate_factor
    rate_factor(250, total_steps=1000, warmup_steps=50)          # the distillation trainer's --lr_schedule cosine

The distillation trainer (`cdlab.train.trainer`, ``--lr_schedule`` and ``--warmup_steps``) and the flow students
(`cdlab.flow.distill`, ``--lr-decay-steps`` and ``--lr-decay-start``) both set their rates from it.
"""
from __future__ import annotations

import math

__all__ = ["rate_factor"]


def rate_factor(step: int, total_steps: int, warmup_steps: int = 0, cosine: bool = True,
                decay_start: int = 0) -> float:
    """The factor on the base learning rate at step ``step`` (counted from 0).

    A linear warm-up ``min(1, (step + 1) / W)`` over ``W = warmup_steps`` (none at 0), times, with ``cosine``, one
    half cosine ``(1 + cos(pi f)) / 2`` from step ``S = max(W, decay_start)`` on, ``f = (step - S) / (total_steps -
    S)`` clipped to [0, 1] (SGDR's cosine, Loshchilov & Hutter 2017, one cycle): 1 after the warm-up, 0 from
    ``total_steps`` on. With ``decay_start`` after the warm-up the rate holds at 1 until then (warmup-stable-decay,
    Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). Without
    ``cosine`` the rate stays at the warm-up's end.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if not cosine:
        return warm
    start = max(warmup_steps, decay_start)
    frac = min(1.0, max(0, step - start) / max(1, total_steps - start))
    return warm * 0.5 * (1 + math.cos(math.pi * frac))
