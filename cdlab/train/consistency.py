"""The consistency methods' training step (CT, CD, multi-boundary CD) and the fixed probe batch they log.

    python -m cdlab train --model tiny --method mbcd --num_boundaries 4 --max_steps 600
    python -m cdlab train --model tiny --method cd --num_boundaries 1 --ema_decay 0.95
    python -m cdlab train --model tiny --method ct

One step, per micro-batch of ``grad_accum``: cached latents and captions -> `cdlab.loss.consistency_loss` (the
teacher is the same UNet with every adapter off; the target pass uses the EMA of the LoRA weights when
``ema_decay > 0``) -> backward (scaled under fp16) -> unscale, clip -> AdamW. A step the fp16 scaler skips
(inf/NaN gradients) moves neither the LR schedule nor the EMA. The functions take the running
`cdlab.train.trainer.Trainer` (``tr``) and read its state.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

import cdlab.loss  # looked up at call time: tests patch cdlab.loss.consistency_loss

__all__ = ["consistency_step", "loss_kwargs", "probe_batch", "probe_loss"]


def loss_kwargs(tr: Any) -> dict:
    """The run's keyword arguments of `cdlab.loss.consistency_loss` (CT: no teacher)."""
    cfg = tr.cfg
    guidance = cfg.guidance if cfg.guidance_max is None else (cfg.guidance, cfg.guidance_max)
    return dict(teacher=tr.unet if cfg.method != "ct" else None, uncond=tr.uncond, guidance=guidance,
                num_boundaries=cfg.num_boundaries, step_size=cfg.step_size,
                num_train_timesteps=cfg.num_train_timesteps, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                autocast_dtype=tr.autocast_dtype)


def consistency_step(tr: Any) -> tuple[float, float]:
    """One optimiser step of the consistency loss; returns ``(mean loss, gradient norm)`` (NaN norm unclipped)."""
    cfg, acc = tr.cfg, tr.acc
    total = 0.0
    kw = loss_kwargs(tr)
    for micro in range(cfg.grad_accum):
        idx = torch.randint(0, len(tr.data), (cfg.batch_size,), generator=tr.data_gen)
        x0, cond = tr.data.batch(idx, tr.data_gen, tr.device)
        sync = micro == cfg.grad_accum - 1
        ctx = acc.no_sync(tr.student) if not sync and tr.world > 1 else contextlib.nullcontext()
        with ctx:
            out = cdlab.loss.consistency_loss(tr.student, x0, cond, tr.teacher.scheduler, target_model=tr.unet,
                                              target_weights=tr.ema, sampler_timesteps=tr.sampler_timesteps,
                                              sampler_prob=cfg.sampler_prob, generator=tr.loss_gen, **kw)
            loss = out["loss"] / cfg.grad_accum
            if tr.own_scaler is not None:
                tr.own_scaler.scale(loss).backward()
            else:
                acc.backward(loss)  # scales the loss when accelerate holds the scaler
        total += float(out["loss"].detach()) / cfg.grad_accum
    own = tr.own_scaler
    if own is not None:
        own.unscale_(tr.optimizer)  # clip the true gradients
    grad_norm = float("nan")
    if cfg.max_grad_norm > 0:
        grad_norm = float(acc.clip_grad_norm_(tr.params, cfg.max_grad_norm))
    if own is not None:
        scale = own.get_scale()
        own.step(tr.optimizer)  # skips optimizer.step() when a gradient is inf/NaN
        own.update()
        skipped = own.get_scale() < scale
    else:
        tr.optimizer.step()
        skipped = bool(getattr(tr.optimizer, "step_was_skipped", False))
    tr.optimizer.zero_grad(set_to_none=True)
    if skipped:
        # The scaler threw the update away (inf/NaN gradients at this scale): the weights did not move,
        # so neither do the LR schedule nor the EMA. The step still counts toward max_steps.
        tr.skipped_steps += 1
        return total, grad_norm
    tr.lr_sched.step()
    tr.update_ema()
    return total, grad_norm


def probe_batch(tr: Any) -> dict | None:
    """The fixed probe batch (``probe_size`` items, their noise and timesteps spread over the grid), or None."""
    cfg = tr.cfg
    n = min(cfg.probe_size, len(tr.data))
    if n == 0:
        return None
    g = torch.Generator().manual_seed(12345)
    idx = torch.arange(n)
    x0, cond = tr.data.batch(idx, g, tr.device)
    m = cfg.num_train_timesteps // cfg.step_size
    i = torch.linspace(1, m, n).round().long()
    t = cfg.step_size * i - 1
    return dict(latents=x0, cond=cond, timesteps=(t, (t - cfg.step_size).clamp(min=0)),
                noise=torch.randn(x0.shape, generator=g).to(tr.device))


@torch.no_grad()
def probe_loss(tr: Any) -> float | None:
    """The consistency loss on the probe batch (fixed t, s and noise; guidance ``cfg.guidance``), or None (DMD)."""
    if tr.probe is None or tr.dmd:  # DMD logs its fake score's loss instead (``fake_loss``)
        return None
    kw = loss_kwargs(tr)
    kw["guidance"] = tr.cfg.guidance
    out = cdlab.loss.consistency_loss(tr.unet, tr.probe["latents"], tr.probe["cond"], tr.teacher.scheduler,
                                      timesteps=tr.probe["timesteps"], noise=tr.probe["noise"], **kw)
    return float(out["loss"])
