"""DMD2's training step: one generator update, then the fake score's updates (`cdlab.loss`'s DMD notes).

    python -m cdlab train --model tiny --method dmd --num_boundaries 1                      # a one-step generator
    python -m cdlab train --config cdlab/train/configs/tiny-dmd-1.json --overwrite          # the shipped tiny-dmd-1

The UNet carries two adapters (`cdlab.students.roles`): the generator (the student, ``"default"``) and the fake
score (``"fake"``), each with its own optimiser; the real score is the UNet with every adapter off. A step is
one generator update (`cdlab.loss.dmd_generator_loss`: distribution matching, + DMD's regression on the
teacher's own ODE pairs when ``dmd_regression_weight > 0``) then ``dmd_fake_steps`` fake-score updates
(`cdlab.loss.dmd_fake_loss`). The regression pairs (`regression_pairs`) are made once and cached beside the
latents. The functions take the running `cdlab.train.trainer.Trainer` (``tr``) and read its state.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

import torch
from safetensors.torch import load_file

from cdlab.loss import dmd_fake_loss, dmd_fake_updates, dmd_generator_loss, generator_sample
from cdlab.paths import write_safetensors_atomic
from cdlab.samplers import ddim_timesteps, sample_ddim
from cdlab.students.roles import FAKE_SCORE, GENERATOR, TEACHER, adapter_role
from cdlab.train.config import cache_root
from cdlab.train.data import base_fingerprint

__all__ = ["dmd_step", "dmd_kwargs", "regression_pairs"]


def dmd_kwargs(tr: Any) -> dict:
    """The run's keyword arguments of `cdlab.loss.dmd_generator_loss`."""
    cfg = tr.cfg
    return dict(uncond=tr.uncond, guidance=float(cfg.guidance), generator_adapter=GENERATOR,
                fake_adapter=FAKE_SCORE, gen_timesteps=tr.sampler_timesteps,
                t_range=(cfg.dmd_t_min, cfg.dmd_t_max), latent_shape=tr.latent_shape,
                generator=tr.loss_gen, autocast_dtype=tr.autocast_dtype)


def dmd_step(tr: Any) -> tuple[float, float]:
    """One generator update (distribution matching, + regression when weighted), then ``dmd_fake_steps``
    fake-score updates on the generator's samples (the first on this step's own, detached). Returns the
    generator's ``(mean loss, gradient norm)``; the fake score's mean loss goes to ``tr.fake_loss``."""
    cfg, acc = tr.cfg, tr.acc
    total, kw = 0.0, dmd_kwargs(tr)
    samples = None
    for micro in range(cfg.grad_accum):
        idx = torch.randint(0, len(tr.data), (cfg.batch_size,), generator=tr.data_gen)
        _, cond = tr.data.batch(idx, tr.data_gen, tr.device)  # DMD needs the captions, not the images
        reg = None
        if tr.regression is not None:
            j = torch.randint(0, tr.regression[0].shape[0], (cfg.batch_size,), generator=tr.data_gen)
            reg = tuple(v[j] for v in tr.regression)
        sync = micro == cfg.grad_accum - 1
        ctx = acc.no_sync(tr.student) if not sync and tr.world > 1 else contextlib.nullcontext()
        with ctx:
            out = dmd_generator_loss(tr.student, cond, tr.teacher.scheduler, regression=reg,
                                     regression_weight=cfg.dmd_regression_weight, dm_weight=cfg.dmd_weight, **kw)
            acc.backward(out["loss"] / cfg.grad_accum)
        total += float(out["loss"].detach()) / cfg.grad_accum
        samples = (out["x_g"], cond)
    grad_norm = float("nan")
    if cfg.max_grad_norm > 0:
        grad_norm = float(acc.clip_grad_norm_(tr.params, cfg.max_grad_norm))
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.lr_sched.step()
    tr.update_ema()
    tr.fake_loss = _fake_steps(tr, samples) / cfg.dmd_fake_steps
    return total, grad_norm


def _fake_steps(tr: Any, samples: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``dmd_fake_steps`` updates of the fake score (`cdlab.loss.dmd_fake_updates`): the first on ``samples``
    (this step's), the others on fresh generator samples. Returns the sum of their losses."""
    cfg, acc, sched = tr.cfg, tr.acc, tr.teacher.scheduler

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(tr.data), (cfg.batch_size,), generator=tr.data_gen)
        _, cond = tr.data.batch(idx, tr.data_gen, tr.device)
        z = torch.randn((cfg.batch_size, *tr.latent_shape), generator=tr.loss_gen).to(tr.device)
        with torch.no_grad(), adapter_role(tr.student, GENERATOR):
            x_g = generator_sample(tr.student, z, cond, sched, gen_timesteps=tr.sampler_timesteps,
                                   generator=tr.loss_gen, autocast_dtype=tr.autocast_dtype, grad=False)["x_g"]
        return x_g, cond

    def update(x_g: torch.Tensor, cond: torch.Tensor) -> float:
        fl = dmd_fake_loss(tr.student, x_g, cond, sched, fake_adapter=FAKE_SCORE,
                           num_train_timesteps=cfg.num_train_timesteps, generator=tr.loss_gen,
                           autocast_dtype=tr.autocast_dtype)
        acc.backward(fl["loss"])
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(tr.fake_params, cfg.max_grad_norm)
        tr.fake_optimizer.step()
        tr.fake_optimizer.zero_grad(set_to_none=True)
        return float(fl["loss"].detach())

    return dmd_fake_updates(cfg.dmd_fake_steps, samples, fresh, update)


@torch.no_grad()
def regression_pairs(tr: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DMD's regression pairs: ``dmd_regression_pairs`` fixed noises z, the teacher's DDIM (``dmd_regression_steps``,
    CFG at ``guidance``, every adapter off) image latents y from them, and their captions' embeddings.

    At 50 steps they cost 100 NFE each (2048 pairs: about 15 min on one CPU thread for the tiny teacher), so they
    are cached beside the latents (``dmd-pairs-<key>.safetensors``, written atomically), keyed by the teacher's
    weights (VAE, text encoder and UNet), the data, the count, the seed, the guidance and the steps: a resume or
    a second run with the same recipe reads them back (with ``cache_latents``; without it they are made each time)."""
    cfg = tr.cfg
    n = min(cfg.dmd_regression_pairs, len(tr.data))
    h = hashlib.sha256(f"v1|{tr.model_fingerprint}|{base_fingerprint(tr.unet)}|"
                       f"{getattr(tr.data, 'cache_path', '') or cfg.data}|{cfg.data_seed}|{cfg.data_size}|{n}|"
                       f"{cfg.seed}|{float(cfg.guidance)!r}|{cfg.num_train_timesteps}|"
                       f"{tuple(tr.latent_shape)}"
                       # 50 steps keep the key they had before the field existed (caches stay valid)
                       f"{'' if cfg.dmd_regression_steps == 50 else f'|steps{cfg.dmd_regression_steps}'}"
                       .encode()).hexdigest()[:20]
    path = cache_root(cfg) / f"dmd-pairs-{h}.safetensors" if cfg.cache_latents else None
    if path is not None and path.is_file():
        try:
            t = load_file(str(path))
            tr.log(f"dmd: {n} regression pairs read from {path}")
            return t["z"].to(tr.device), t["y"].to(tr.device), t["cond"].to(tr.device)
        except Exception as e:  # unreadable: make them again
            tr.log(f"dmd: cached pairs {path} unreadable ({e}); making them again")
    g = torch.Generator().manual_seed(cfg.seed * 31 + 7)
    _, cond = tr.data.batch(torch.arange(n), g, tr.device)
    z = torch.randn((n, *tr.latent_shape), generator=g).to(tr.device)
    t0 = time.perf_counter()
    ys = []
    with adapter_role(tr.unet, TEACHER):
        for i in range(0, n, 64):
            tr.status("running", f"loading data: DMD regression pairs {i}/{n} "
                                 f"(teacher-{cfg.dmd_regression_steps} with CFG)")
            out = sample_ddim(tr.unet, z[i:i + 64], cond[i:i + 64], tr.uncond.expand(len(cond[i:i + 64]), -1, -1),
                              float(cfg.guidance), ddim_timesteps(cfg.dmd_regression_steps, cfg.num_train_timesteps),
                              tr.teacher.scheduler)
            ys.append(out.latents.float())
    y = torch.cat(ys)
    tr.log(f"dmd: {n} regression pairs (teacher-{cfg.dmd_regression_steps}, CFG {cfg.guidance:g}) in "
           f"{time.perf_counter() - t0:.1f} s")
    if path is not None and tr.acc.is_main_process:
        try:
            write_safetensors_atomic(path, {"z": z.cpu(), "y": y.cpu(), "cond": cond.float().cpu()})
        except OSError as e:
            tr.log(f"dmd: could not cache the pairs in {path}: {e}")
    return z, y, cond
