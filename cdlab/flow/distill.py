"""Few-step students of the flow teacher, as LoRA adapters on its UNet.

    python -m cdlab.flow.distill --teacher cdlab/assets/fashion-flow --method cd --num-boundaries 4 --name fashion-mbcd-4
    python -m cdlab.flow.distill --teacher cdlab/assets/fashion-flow --method reflow --steps 4000 --name fashion-rf
    python -m cdlab.flow.distill --teacher cdlab/assets/fashion-flow --method dmd --sample-steps 1 --guidance 1.5 \
        --pairs 4096 --batch-size 64 --lr 1e-4 --gan-weight 0.05 --disc-lr 1e-3 --steps 1200 \
        --init fashion-reflow-1 --name fashion-dmd-1-1200 --run-dir runs/dmd-1
    python -m cdlab.flow.distill --teacher cdlab/assets/fashion-flow --method dmd --sample-steps 1 --guidance 1.5 \
        --pairs 4096 --batch-size 64 --lr 2e-5 --gan-weight 0.05 --disc-lr 1e-3 --regression-weight 1 --steps 1300 \
        --init fashion-reflow-1 --name fashion-dmd-1 --run-dir runs/dmd-1 --resume --branch   # docs/flow.md
    python -m cdlab.flow.distill --teacher runs/flow-teacher --method reflow --run-dir runs/s --name s
    python -m cdlab.flow.distill --teacher runs/flow-teacher --method reflow --run-dir runs/s --name s --resume

Students land in ``adapters/<name>/`` with their card (``--root`` another folder), as every student does; a name
that is taken is refused.

``--run-dir`` also writes the run folder the app's Train tab reads (:mod:`cdlab.flow.student_run`), as the app's student runs do,
with a checkpoint every 100 steps that ``--resume`` continues. Reflow's teacher pairs are cached
(:func:`cdlab.flow.pairs.cached_teacher_pairs`, ``--pair-cache``), so a second run, or one cut off, does not pay
for them again.

**Consistency distillation on the flow ODE** (``method="cd"``, ``num_boundaries`` N; N > 1 is multi-boundary CD).
The lab's one consistency loss (:func:`cdlab.loss.consistency_loss`) with the flow teacher's eps model
(:class:`cdlab.flow.model.FlowModel`) on its path (``FLOW_SCHEDULE``): the teacher's DDIM step from t to s is
exactly an Euler step of its guided velocity, ``x_s = x_t + (s - t) u_w`` in flow time (:mod:`cdlab.flow.model`),
and the student jumps to its segment's boundary with the same straight line of its own velocity. Nothing in the
loss is new: a flow teacher is a new model class, not a second copy of CD.

**2-rectified flow** (``method="reflow"``; Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow", §2.2, eq. 6). Draw pairs ``(z, x1)`` with ``x1`` the teacher's own
Euler-50 sample with CFG from noise ``z`` (:func:`cdlab.flow.pairs.teacher_pairs`), then fit the flow-matching
loss on the pairs instead of on independent noise and data::

    L = E_{(z, x1), t ~ U[0, 1]} || u_theta((1 - t) z + t x1, t, c) - (x1 - z) ||^2

The coupled pairs have straight, non-crossing lines between them, so the new flow is straighter than the
teacher's and Euler with few steps follows it. ``--reflow-times zero`` trains at t = 0 only, the paper's
"distillation" of a rectified flow into one step (its §2.3, ``L = || z + u_theta(z, 0) - x1 ||^2``), started from
a reflow student with ``--init``. Guidance is distilled in: the student runs the class alone, 1 NFE a step.

**Piecewise rectified flow** (``--windows W`` > 1; Yan et al. 2024, "PeRFlow: Piecewise Rectified Flow as
Universal Plug-and-Play Accelerator", §3, eq. 5). Cut time into W windows with edges ``t_0 = 0 < t_1 < ... <
t_W = 1`` (:func:`cdlab.flow.pairs.window_edges`: the times of the lab's W-step sampler), keep the teacher's
states ``x_{t_k}`` at the edges of each Euler-50 trajectory (one trajectory gives W pairs), and straighten each
window on its own::

    L = E_{i, k, tau ~ U[0, 1]} || u_theta(x_t, t, c) - (x_{t_{k+1}} - x_{t_k}) / (t_{k+1} - t_k) ||^2,
        t = t_k + tau (t_{k+1} - t_k),   x_t = (1 - tau) x_{t_k} + tau x_{t_{k+1}}

One Euler step a window then lands where the teacher's 50 steps land, up to the student's error: each window
asks for a shorter, less curved piece of the teacher's path than 2-rectified flow's one line from noise to data.
W = 1 is 2-rectified flow above; ``--reflow-times zero`` trains at each window's start (tau = 0), the only point
W Euler steps use.

**Distribution matching distillation** (``method="dmd"``; Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation", §3.2 and §3.3; the fake score's updates as DMD2's, Yin et al. 2024b). The lab's one DMD loss
(:func:`cdlab.loss.dmd_generator_loss`, :func:`cdlab.loss.dmd_fake_loss`) with :class:`FlowModel`, as CD above:
the generator G is the student's LoRA, the real score the teacher with CFG, the fake score a second LoRA
(``"fake"``) fitted to G's samples. Diffuse a sample along the flow path, ``x_t = t G(z) + (1 - t) n``; G(z)
moves against::

    grad = (x1_fake(x_t) - x1_real(x_t)) / mean |G(z) - x1_real(x_t)|,    x1(x_t) = x_t + (1 - t) u(x_t, t)

(each score's data prediction, :func:`cdlab.flow.matching.velocity_to_data`), plus ``regression_weight`` times
DMD's regression on the teacher's pairs, ``|| G(z) - x1 ||^2`` (reflow's pairs, :mod:`cdlab.flow.pairs`;
``--regression-loss l1``: ``mean |G(z) - x1|``).
Matching the teacher's distribution, not each pair's image, is what FID measures; the regression keeps G on
the teacher's modes. Start it from a one-step student (``--init``, e.g. the reflow-distilled one; a
``--lora-rank`` above that student's widens its LoRA with the same product, :func:`widen_lora`).
``--gan-weight`` > 0 adds DMD2's GAN term (Yin et al. 2024b, §4.3; :mod:`cdlab.loss` has its equations): a
discriminator head (:class:`cdlab.flow.unet.DiscriminatorHead`) on the fake score's features tells the real
training images from G's samples, both diffused to one t, and G also descends ``gan_weight * mean
softplus(-D(x_t(G)))``. It is the one term that sees real data, so it can move G past its teacher's FID.
``--gan-clip`` shows D the samples clipped to [0, 1], as they are shown: real pixels are never below black, so
unclipped, such a pixel is a tell, and the term pushes G's backgrounds grey (docs/flow.md). ``--disc pixel``
gives it a discriminator of its own on the clean images (:class:`cdlab.flow.unet.PixelDiscriminator`);
``--disc features --disc-backbone F`` one whose features are a frozen classifier's (ADD's, Sauer et al. 2023:
:class:`cdlab.flow.unet.FeatureDiscriminator`), a classifier trained apart from the evaluation's judge.
``--dmd-t-max T`` diffuses the samples for the matching and the GAN term to ``t ~ U{20..T}`` (DMD2's T is 980).
A K-step G jumps on the grid it will sample on, ``consistency_timesteps(K, K)`` (999/750/500/250 for K = 4);
``--shift s`` moves it by SD3's timestep shift (Esser et al. 2024), ``u' = s u / (1 + (s - 1) u)`` on ``u = k /
1000``, the grid its card samples on: at ``s = 0.3``, 999/474/231/91, more steps near the data.

The UNet keeps the teacher's BatchNorm statistics (eval mode) while the LoRA trains: only the adapter changes.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from cdlab.flow import matching
from cdlab.flow.data import PIXEL_RANGE, images_of_classes
from cdlab.flow.model import FLOW_SCHEDULE, FlowModel
from cdlab.flow.pairs import cached_teacher_pairs, pair_labels, window_edges
from cdlab.flow.student_config import StudentConfig, add_config_arguments, config_from_args
from cdlab.flow.student_checkpoint import (branches_of, load_checkpoint, lora_weights, save_checkpoint,
                                           set_lora_weights)
from cdlab.flow.unet import DiscriminatorHead, FeatureDiscriminator, PixelDiscriminator, UNet
from cdlab.loss import (DMD_T_RANGE, consistency_loss, dmd_fake_loss, dmd_fake_updates, dmd_generator_loss,
                        generator_sample)
from cdlab.paths import cache_dir, shown_path
from cdlab.samplers import consistency_timesteps
from cdlab.students import StudentCard, StudentError, save_student, student_dir, validate_name
from cdlab.students.roles import FAKE_SCORE, adapter_role

__all__ = ["lora_targets", "attach_flow_lora", "cd_loss",
           "reflow_loss", "dmd_loss", "dmd_fake_update", "StudentConfig", "distill", "save_checkpoint", "load_checkpoint", "student_card",
           "save_flow_student", "init_card", "student_lora", "widen_lora", "lora_weights", "set_lora_weights", "make_discriminator", "gan_argument",
           "main"]

ADAPTER = "student"
Discriminator = tuple[nn.Module, nn.Module] | nn.Module  # DMD2's (unet.up1, head), or one on the clean images


def lora_targets(unet: nn.Module) -> list[str]:
    """The names of the UNet's Conv2d and Linear layers (peft's LoRA has no ConvTranspose2d); on a UNet that
    already carries an adapter, the names of the layers it wraps (not its own ``lora_A``/``lora_B``)."""
    names = [n.removesuffix(".base_layer") for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    return [n for n in names if ".lora_" not in n]


def attach_flow_lora(unet: nn.Module, rank: int = 32, alpha: float | None = None,
                     adapter_name: str = ADAPTER) -> nn.Module:
    """A trainable LoRA on every Conv2d and Linear of the flow UNet (peft ``inject_adapter_in_model``); the base
    weights are frozen. LoRA B starts at zero, so the student starts as the teacher."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                        target_modules=lora_targets(unet), init_lora_weights=True)
    others = getattr(unet, "peft_config", None) or {}
    if others:  # a second adapter (DMD's fake score): peft warns when the model already has a config
        del unet.peft_config
    unet = inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    unet.peft_config = {**others, adapter_name: config}  # as diffusers keeps it
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return unet


CHECKPOINT_EVERY = 100  # steps between a student run's checkpoints


def cd_loss(unet: nn.Module, x1: torch.Tensor, labels: torch.Tensor, *, guidance: float, num_boundaries: int = 1,
            step_size: int = 20, sample_steps: int = 4, sampler_prob: float = 0.1,
            target_weights: dict[str, torch.Tensor] | None = None,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Consistency distillation of the flow teacher (the UNet with its adapter off) into its LoRA: the lab's
    :func:`cdlab.loss.consistency_loss` with :class:`FlowModel`, data ``x1`` as the clean boundary."""
    c = matching.one_hot(labels).to(x1.device)
    return consistency_loss(unet, x1, c, FLOW_SCHEDULE, teacher=unet, uncond=torch.zeros_like(c[:1]),
                            guidance=guidance, num_boundaries=num_boundaries, step_size=step_size,
                            sampler_timesteps=consistency_timesteps(sample_steps, num_boundaries),
                            sampler_prob=sampler_prob, target_weights=target_weights, generator=generator,
                            model_class=FlowModel)


def reflow_loss(unet: nn.Module, z: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor, *, times: str = "uniform",
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """2-rectified flow's loss on teacher pairs (module docstring); ``times="zero"``: the one-step distillation.

    ``x1`` ``[B, W, 1, 28, 28]`` (the teacher's states at W window edges, :mod:`cdlab.flow.pairs`): piecewise
    rectified flow, each sample in a window drawn uniformly, ``times="zero"`` at that window's start."""
    if x1.ndim == 5:
        edges = torch.tensor(window_edges(x1.shape[1]), dtype=z.dtype)
        k = torch.randint(0, x1.shape[1], (len(z),), generator=generator)
        tau = torch.rand(len(z), generator=generator) if times == "uniform" else torch.zeros(len(z))
        rows = torch.arange(len(z))
        start = torch.cat([z[:, None], x1], 1)[rows, k]
        width = edges[k + 1] - edges[k]
        t = (edges[k] + tau * width).to(z.device)
        x_t = matching.interpolate(start, x1[rows, k], tau.to(z.device))
        u = unet(x_t, t, matching.one_hot(labels).to(z.device))
        target = (x1[rows, k] - start) / width.to(z.device).reshape(-1, 1, 1, 1)
        return {"loss": torch.nn.functional.mse_loss(u, target)}
    t = (torch.rand(len(z), generator=generator) if times == "uniform" else torch.zeros(len(z))).to(z.device)
    loss = matching.flow_matching_loss(unet, x1, matching.one_hot(labels).to(z.device), x0=z, t=t, p_uncond=0.0)
    return {"loss": loss}


def dmd_loss(unet: nn.Module, z: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor, *, guidance: float,
             sample_steps: int = 1, regression_weight: float = 10.0, gan: Discriminator | None = None,
             gan_weight: float = 0.0, generator: torch.Generator | None = None, shift: float = 1.0,
             gan_clip: bool = False, t_max: int = DMD_T_RANGE[1], regression_loss: str = "l2"
             ) -> dict[str, torch.Tensor]:
    """The generator's DMD loss on the flow teacher (module docstring): :func:`cdlab.loss.dmd_generator_loss`
    with :class:`FlowModel` on the flow path, classes ``labels`` for the matching (fresh noise from
    ``generator``) and teacher pairs ``(z, x1)`` of those classes for the regression. The generator runs as the
    students are sampled: the lab's ``sample_steps``-step consistency sampler (1 step: from pure noise), on its
    grid shifted by ``shift`` (:func:`cdlab.samplers.consistency_timesteps`; the card carries it). ``gan``
    ``(unet.up1, head)`` or a discriminator of its own, ``gan_weight`` and ``gan_clip``: DMD2's GAN term (above).
    ``t_max``: the matching's (and the GAN term's) timesteps are ``U{20..t_max}``; ``regression_loss``: the
    regression's distance, ``"l2"`` or ``"l1"``."""
    c = matching.one_hot(labels).to(z.device)
    return dmd_generator_loss(unet, c, FLOW_SCHEDULE, uncond=torch.zeros_like(c[:1]), guidance=guidance,
                              generator_adapter=ADAPTER, fake_adapter=FAKE_SCORE,
                              gen_timesteps=consistency_timesteps(sample_steps, sample_steps, shift=shift),
                              latent_shape=tuple(z.shape[1:]), regression=(z, x1, c),
                              regression_weight=regression_weight, regression_distance=regression_loss,
                              gan=gan, gan_weight=gan_weight,
                              gan_range=PIXEL_RANGE if gan_clip else None, t_range=(DMD_T_RANGE[0], t_max),
                              generator=generator, model_class=FlowModel)


def dmd_fake_update(unet: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], x_g: torch.Tensor,
                    labels: torch.Tensor, *, generator: torch.Generator | None = None,
                    gan: Discriminator | None = None, real: torch.Tensor | None = None,
                    disc_weight: float = 0.0, gan_clip: bool = False) -> float:
    """One update of the fake score on the generator's samples ``x_g`` (detached): the flow path's denoising loss
    (:func:`cdlab.loss.dmd_fake_loss`, at timesteps 1..999: at 0 the path is the data itself). Only the fake
    adapter has gradients, so ``opt`` steps it alone; with ``gan``, the fake adapter and the head also learn to
    tell ``real`` images (of ``labels``' classes) from ``x_g`` (clipped: ``gan_clip``), at weight ``disc_weight``.
    Returns the loss."""
    c = matching.one_hot(labels).to(x_g.device)
    out = dmd_fake_loss(unet, x_g, c, FLOW_SCHEDULE, fake_adapter=FAKE_SCORE, generator=generator,
                        model_class=FlowModel, gan=gan, real=real, gan_weight=disc_weight,
                        gan_range=PIXEL_RANGE if gan_clip else None)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(out["loss"].item())


def make_discriminator(unet: UNet, cfg: StudentConfig) -> nn.Module | None:
    """The GAN term's trainable network (None without it), on the UNet's device: DMD2's head on ``unet``'s features,
    or a discriminator of its own (``cfg.disc``)."""
    if cfg.gan_weight == 0:
        return None
    if cfg.disc == "features":
        net = FeatureDiscriminator(*feature_backbone(cfg.disc_backbone).stages())
    else:
        net = DiscriminatorHead(unet.num_hiddens) if cfg.disc == "head" else PixelDiscriminator()
    return net.to(next(unet.parameters()).device)


def feature_backbone(folder: str | Path) -> nn.Module:
    """The frozen classifier of ``--disc features`` (:class:`cdlab.flow.unet.FeatureDiscriminator`), read from
    ``folder``; refused (``ValueError``) when it is the shipped judge, the network the evaluation's FID and
    accuracy are measured in: a generator trained against the judge's own features would be graded by them."""
    from cdlab.flow.classifier import load_classifier

    net = load_classifier(folder)
    judge = load_classifier().state_dict()
    if all(torch.equal(v, judge[k]) for k, v in net.state_dict().items()):
        raise ValueError(f"--disc-backbone {shown_path(folder)} is the evaluation's own classifier: train another "
                         "(python -m cdlab.flow.classifier --out F --seed 1)")
    return net


def gan_argument(unet: UNet, net: nn.Module | None) -> Discriminator | None:
    """What :mod:`cdlab.loss` takes as ``gan`` for :func:`make_discriminator`'s network: DMD2's head with the layer
    it reads, ``(unet.up1, head)``, or a discriminator of its own (on the clean images) as it is."""
    return None if net is None else ((unet.up1, net) if isinstance(net, DiscriminatorHead) else net)


def _load_teacher_unet(folder: str | Path, device: torch.device) -> UNet:
    from cdlab.flow.train_teacher import load_unet

    return load_unet(folder).to(device).eval()


def distill(teacher: str | Path, cfg: StudentConfig, *, init: str | None = None, root: str | Path | None = None,
            device: str = "cpu", max_seconds: float | None = None, log: Callable[[str], None] = print,
            on_step: Callable[[int, float], bool] | None = None, checkpoint: str | Path | None = None,
            checkpoint_every: int = CHECKPOINT_EVERY, pair_cache: str | Path | None = None,
            should_stop: Callable[[], bool] | None = None, branch: bool = False,
            pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, int]:
    """Train a student LoRA on the teacher's UNet for ``cfg.steps`` steps (or until ``max_seconds`` have passed);
    returns the UNet with the adapter (eval mode; with ``cfg.student_ema``, the adapter's average) and the steps
    taken. ``init``: start from that student's LoRA (a name in ``root``, default ``adapters/``).
    ``on_step(steps_done, loss)`` after each step (a run folder's metrics row, `main`'s ``--run-dir``) stops the
    training when it returns True.

    ``checkpoint`` (a folder): every ``checkpoint_every`` steps and when it stops, the LoRA, its averages, Adam's
    state and the generator are saved there (:func:`save_checkpoint`); a folder that holds one continues it, bit
    for bit as if it had not stopped, provided the recipe is the same (``cfg.steps`` may grow). ``pair_cache``: where
    reflow's teacher pairs are kept (:mod:`cdlab.flow.pairs`); ``should_stop`` ends the run while they are
    drawn (the steps taken are then the checkpoint's, or 0). ``branch``: the checkpoint continues under this recipe
    where it differs in a rate, a loss weight or the pairs (:func:`load_checkpoint`'s ``BRANCHABLE``), keeping the
    fake score, the discriminator and Adam's state. ``pairs``: ``(z, x1)`` of the classes `pair_labels` gives,
    learnt from in place of the teacher's (reflow, DMD's regression): another sampler's (`tools/flow_student_trial.py
    --pairs-from`: a few-step student's samples, knowledge distillation as Luhman & Luhman 2021 from a cheaper
    sampler)."""
    dev = torch.device(device)
    if pairs is not None and (len(pairs) != 2 or any(len(p) != cfg.pairs for p in pairs)):
        raise ValueError(f"pairs: two tensors of cfg.pairs = {cfg.pairs} rows each (z, x1)")
    with torch.random.fork_rng(devices=[]):  # LoRA A's random start from cfg.seed: a run is reproducible
        torch.manual_seed(cfg.seed)
        unet = attach_flow_lora(_load_teacher_unet(teacher, dev), cfg.lora_rank)
        if cfg.method == "dmd":  # the fake score: a second LoRA, starting as the teacher (its B is zero)
            attach_flow_lora(unet, cfg.fake_rank or cfg.lora_rank, adapter_name=FAKE_SCORE)
        head = make_discriminator(unet, cfg)
    if init is not None:
        set_lora_weights(unet, widen_lora(student_lora(init, root, teacher), lora_weights(unet)))
    unet.to(dev).eval()
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    params, weights = [p for _, p in named], dict(named)
    opt, ema, average = _optimizer_and_averages(named, cfg, head)
    rates = [group["lr"] for group in opt.param_groups]  # each group's own, before any schedule
    g = torch.Generator().manual_seed(cfg.seed)
    run = dict(teacher=teacher, init=init, cfg=cfg, head=head)
    history = [] if checkpoint is None else branches_of(Path(checkpoint), cfg)  # before the load, which checks it
    done = 0 if checkpoint is None else load_checkpoint(Path(checkpoint), unet, opt, ema, g, average=average,
                                                           branch=branch, **run)
    if done:
        log(f"{cfg.method}: continuing from step {done} ({shown_path(checkpoint)})"
            + (f"; its recipe's changes: {history}" if history else ""))
    data = _training_data(unet, cfg, head, pairs, cache=pair_cache, log=log, should_stop=should_stop)
    if data is None:
        log(f"{cfg.method}: stopped while drawing the teacher's pairs, at step {done}")
        return unet.eval(), done
    gan = gan_argument(unet, head)
    start = time.monotonic()
    for step in range(done, cfg.steps):
        if cfg.lr_decay_steps:
            for group, rate in zip(opt.param_groups, rates):
                group["lr"] = rate * cfg.rate(step)
        out = _train_step(unet, cfg, step, data, opt, params, ema, g, gan)
        with torch.no_grad():
            for avg, decay in ((ema, cfg.ema_decay), (average, cfg.student_ema)):
                for n, value in (avg or {}).items():
                    value.lerp_(weights[n].detach(), 1.0 - decay)
        done = step + 1
        stop = on_step is not None and on_step(done, float(out["loss"].item()))
        late = max_seconds is not None and time.monotonic() - start > max_seconds
        if checkpoint is not None and (stop or late or done % checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(Path(checkpoint), unet, opt, ema, g, done, average=average, branches=history, **run)
        if stop:
            log(f"{cfg.method}: stopped at step {done} of {cfg.steps}")
            break
        if step % 200 == 0 or step == cfg.steps - 1:
            log(f"{cfg.method} step {step}: loss {out['loss'].item():.3e} ({time.monotonic() - start:.0f} s)")
        if late:
            log(f"{cfg.method}: stopped at step {done} of {cfg.steps}, after {max_seconds} s")
            break
    if average is not None:  # the student is the average (the checkpoint above keeps the last weights too)
        set_lora_weights(unet, average)
    return unet.eval(), done


def _training_data(unet: nn.Module, cfg: StudentConfig, head: Any, pairs: tuple | None, **draw: Any) -> tuple | None:
    """What :func:`distill` trains on: reflow's and DMD's pairs ``(z, x1, labels)`` (``pairs``, else the teacher's,
    drawn or read back by :func:`cdlab.flow.pairs.cached_teacher_pairs` with ``draw``), CD's real images and
    labels, and after the pairs the real images of the GAN's real side; None when stopped while drawing."""
    data: tuple = ()
    if cfg.method in ("reflow", "dmd"):
        if pairs is None:
            with adapter_role(unet, None):  # the teacher: the adapter off
                pairs = cached_teacher_pairs(unet, cfg.pairs, guidance=cfg.guidance, seed=cfg.seed,
                                             windows=cfg.windows, **draw)
        if pairs is None:
            return None
        data = (*pairs, pair_labels(cfg.pairs))
    if cfg.method == "cd" or head is not None:  # the real training images: CD's data, the GAN's real side
        from cdlab.flow.data import load_fashion_mnist

        real = load_fashion_mnist("train")
        data = real if cfg.method == "cd" else (*data, *real)
    return data


def _train_step(unet: nn.Module, cfg: StudentConfig, step: int, data: tuple[torch.Tensor, ...],
                opt: torch.optim.Optimizer, params: list[nn.Parameter], ema: dict[str, torch.Tensor] | None,
                g: torch.Generator, gan: Discriminator | None = None) -> dict[str, torch.Tensor]:
    """One step of :func:`distill`: a batch of ``data`` (the teacher's pairs ``(z, x1, labels)`` for reflow and
    DMD, then with ``gan`` the training images and their labels; the training images ``(images, labels)`` for
    CD), the method's loss and Adam's step, then DMD's fake-score updates (only those during its first
    ``cfg.fake_warmup`` steps). Returns the loss terms."""
    dev = next(unet.parameters()).device
    if cfg.method == "cd":
        images, labels = data
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        out = cd_loss(unet, images[idx].to(dev), labels[idx], guidance=cfg.guidance,
                      num_boundaries=cfg.num_boundaries, step_size=cfg.step_size, sample_steps=cfg.sample_steps,
                      target_weights=ema, generator=g)
    else:
        z_all, x1_all, labels, *real = data
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,), generator=g)
        z, x1, y = z_all[idx].to(dev), x1_all[idx].to(dev), labels[idx]
        fake = lambda x_g: _fake_updates(unet, opt, params, x_g, y, z.shape, cfg, g, gan, real)  # noqa: E731
        if cfg.method == "dmd" and step < cfg.fake_warmup:  # the fake score alone learns the generator's samples
            return {"loss": torch.tensor(fake(None))}
        out = (reflow_loss(unet, z, x1, y, times=cfg.reflow_times, generator=g) if cfg.method == "reflow" else
               dmd_loss(unet, z, x1, y, guidance=cfg.guidance, sample_steps=cfg.sample_steps,
                        regression_weight=cfg.regression_weight, gan=gan, gan_weight=cfg.gan_weight, generator=g,
                        shift=cfg.shift, gan_clip=cfg.gan_clip, t_max=cfg.dmd_t_max,
                        regression_loss=cfg.regression_loss))
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if "x_g" in out:  # DMD: the fake score follows the generator's new samples
        fake(out["x_g"])
    return out


def _optimizer_and_averages(named: list[tuple[str, nn.Parameter]], cfg: StudentConfig, head: nn.Module | None = None
                            ) -> tuple[torch.optim.Optimizer, dict | None, dict | None]:
    """The run's Adam and its two optional averages of the LoRA weights (name -> tensor), as ``distill`` uses them.

    * One Adam for every LoRA: DMD's generator and fake score each step only the adapter that has gradients; with
      ``cfg.fake_lr`` the fake score's parameters are a group of their own, at that rate. Its beta_1 is
      ``cfg.adam_beta1``: DMD2 (Yin et al. 2024b) trains both at 0, no momentum in a two-player game whose
      target (the fake score) moves every step.
    * ``ema``: CD's target network theta^- (Song et al. 2023, Alg. 2: theta^- <- mu theta^- + (1 - mu) theta,
      mu = ``cfg.ema_decay``, 0.95 as LCM uses); with the online weights (mu = 0) the flow students drifted from the
      teacher (docs/flow.md).
    * ``average``: the student's own average (Polyak, rate ``cfg.student_ema``), what is saved: DMD's generator
      moves from step to step, its average less.

    DMD2's discriminator ``head`` (with ``cfg.gan_weight``) is a last group, at ``cfg.disc_lr`` (0: the fake
    score's rate): a new network learns at a higher rate than the adapters' small one."""
    fake = [p for n, p in named if f".{FAKE_SCORE}." in n] if cfg.fake_lr > 0 else []
    groups = ([{"params": [p for n, p in named if f".{FAKE_SCORE}." not in n]}, {"params": fake, "lr": cfg.fake_lr}]
              if fake else [{"params": [p for _, p in named]}])
    if head is not None:
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],  # a frozen backbone's: not
                       "lr": cfg.disc_lr or cfg.fake_lr or cfg.lr})
    ema = {n: p.detach().clone() for n, p in named} if cfg.method == "cd" and cfg.ema_decay > 0 else None
    average = {n: p.detach().clone() for n, p in named if f".{ADAPTER}." in n} if cfg.student_ema > 0 else None
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, 0.999)), ema, average


def _fake_updates(unet: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], x_g: torch.Tensor | None,
                  labels: torch.Tensor, shape: torch.Size, cfg: StudentConfig, g: torch.Generator,
                  gan: Discriminator | None = None, real: list[torch.Tensor] | None = None) -> float:
    """DMD's ``cfg.fake_steps`` fake-score updates (:func:`cdlab.loss.dmd_fake_updates`): the first on this step's
    samples ``x_g`` (None, a warm-up step: fresh ones too), the others on fresh ones of the same classes, from
    noise of the batch's ``shape``. With ``gan``, each also trains the discriminator on training images of the
    same classes (``real``: the images and their labels). Returns the sum of their losses."""
    device = next(unet.parameters()).device

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(shape, generator=g).to(device)
        with adapter_role(unet, ADAPTER):
            x = generator_sample(unet, z, matching.one_hot(labels).to(device), FLOW_SCHEDULE,
                                 gen_timesteps=consistency_timesteps(cfg.sample_steps, cfg.sample_steps,
                                                                     shift=cfg.shift),
                                 generator=g, grad=False, model_class=FlowModel)["x_g"]
        return x, labels

    def update(x: torch.Tensor, y: torch.Tensor) -> float:
        disc = {} if gan is None else dict(gan=gan, disc_weight=cfg.disc_weight, gan_clip=cfg.gan_clip,
                                           real=images_of_classes(*real, y, g).to(device))
        return dmd_fake_update(unet, opt, params, x, y, generator=g, **disc)

    return dmd_fake_updates(cfg.fake_steps, fresh() if x_g is None else (x_g, labels), fresh, update)


def init_card(name: str, root: str | Path | None = None, teacher: str | Path | None = None,
              lora_rank: int | None = None) -> StudentCard:
    """The card of the student a run starts from (``--init``), refused (`StudentError`, naming it) unless it is
    ``teacher``'s (its folder; None: the shipped teacher): its id, and its weights where the card records them
    (`StudentCard.fits`); with ``lora_rank``, unless its rank is at most that (`widen_lora` pads, never cuts)."""
    from cdlab.flow.pipeline import flow_base_id, flow_fingerprint
    from cdlab.students import read_card

    card = read_card(name, root)
    if card.base_model != flow_base_id(teacher):
        raise StudentError(f"student {name!r} is a student of {card.base_model!r}, not of {flow_base_id(teacher)!r}")
    weights = flow_fingerprint(teacher)
    if not card.fits(card.base_model, weights):
        raise StudentError(f"student {name!r} is a student of other weights of {card.base_model!r} (fingerprint "
                           f"{card.base_fingerprint}, this teacher's {weights}): the teacher was trained again since")
    if lora_rank is not None and card.lora_rank is not None and card.lora_rank > lora_rank:
        raise StudentError(f"student {name!r} has LoRA rank {card.lora_rank}; a run started from it needs a rank of "
                           f"at least that, not {lora_rank}")
    return card


def student_lora(name: str, root: str | Path | None = None, teacher: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A saved student's LoRA as this module's adapter parameters (``...lora_A.student.weight``), from the lab's
    file (``unet.``-prefixed peft keys with alpha/r folded into ``lora_B``; rank = alpha, so scale 1). The student
    must be ``teacher``'s (its folder; None: the shipped teacher): its id, and its weights where the card records
    them (`StudentCard.fits`)."""
    from cdlab.students import WEIGHT_NAME

    init_card(name, root, teacher)
    state = load_file(str(student_dir(name, root) / WEIGHT_NAME))
    return {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{ADAPTER}.weight", k[len("unet."):]): v for k, v in state.items()}


def widen_lora(weights: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student's LoRA (scale 1, :func:`student_lora`) fitted to the LoRA ``into`` (:func:`lora_weights` of the
    UNet it is for, as :func:`attach_flow_lora` drew it) of a larger rank, with the same product: ``B' = [B, 0]``
    and ``A' = [A; the rest of into's A]``, so ``B' A' = B A`` exactly (the new rows of A are peft's own draw, and
    learn once B's new columns leave 0). ``--init`` a rank-128 student from a rank-32 one. A source of a larger
    rank than ``into``'s is refused; at the same rank, or under a name ``into`` lacks (which
    :func:`set_lora_weights` refuses by name), the weights are returned as they are."""
    out = {}
    for name, w in weights.items():
        axis = 0 if ".lora_A." in name else 1
        have, rank = w.shape[axis], into[name].shape[axis] if name in into else w.shape[axis]
        if have > rank:
            raise ValueError(f"{name!r} has rank {have}, above the student's --lora-rank {rank}")
        if have == rank:
            out[name] = w
            continue
        rest = into[name].narrow(axis, have, rank - have)
        out[name] = torch.cat([w, rest if axis == 0 else torch.zeros_like(rest)], dim=axis)
    return out


def student_card(cfg: StudentConfig, name: str, *, trained_steps: int, init: str | None = None,
                 teacher: str | Path | None = None, branches: list[dict] | None = None) -> StudentCard:
    """The student's card: ``reflow`` (``num_boundaries`` None, or its W windows when piecewise) or ``cd``/``mbcd`` (N boundaries);
    sampled by the lab's consistency jump on the flow path, an Euler step (:mod:`cdlab.flow.model`); guidance
    distilled in; its base is its teacher's (`cdlab.flow.pipeline.flow_base_id`: the shipped one's when None), and
    so are the weights it records (`cdlab.flow.pipeline.flow_fingerprint`). ``training_config`` says the steps it
    took and the student it started from, and a run continued under another recipe its ``branches``
    (:func:`cdlab.flow.student_checkpoint.branches_of`): the recipe it holds is the last one."""
    from cdlab.flow.pipeline import flow_base_id, flow_fingerprint

    method = cfg.method if cfg.method in ("reflow", "dmd") else ("mbcd" if cfg.num_boundaries > 1 else "cd")
    if method == "reflow":
        boundaries = cfg.windows if cfg.windows > 1 else None
    elif method == "dmd":  # a K-step generator: its K jumps are its boundaries, as the lab's DMD students
        boundaries = cfg.sample_steps
    else:
        boundaries = cfg.num_boundaries
    return StudentCard(name=name, base_model=flow_base_id(teacher), base_fingerprint=flow_fingerprint(teacher),
                       method=method, num_boundaries=boundaries, steps=cfg.sample_steps,
                       guidance=1.0, scheduler="consistency",
                       scheduler_kwargs={"shift": cfg.shift} if cfg.shift != 1.0 else {},
                       training_config={**asdict(cfg), "trained_steps": trained_steps, "init": init,
                                        **({"branches": branches} if branches else {})})


def save_flow_student(unet: nn.Module, name: str, cfg: StudentConfig, root: str | Path | None = None, *,
                      teacher: str | Path | None = None, trained_steps: int | None = None, init: str | None = None,
                      overwrite: bool = False, branches: list[dict] | None = None) -> Path:
    """Save the LoRA as the lab saves every student: ``<root>/<name>/`` (default ``adapters/``) with its card
    (:func:`cdlab.students.save_student`), whose base is ``teacher``'s (the folder it was distilled from; None:
    the shipped teacher); ``load_student(load_flow_teacher(teacher), name)`` reads it."""
    card = student_card(cfg, name, trained_steps=cfg.steps if trained_steps is None else trained_steps, init=init,
                        teacher=teacher, branches=branches)
    return save_student(unet, name, card, root, adapter_name=ADAPTER, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab.flow.distill", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's folder (unet.safetensors, state.json)")
    p.add_argument("--name", required=True, help="the student's name: adapters/<name>/ (see --root)")
    p.add_argument("--root", default=None, help="the students' folder (default adapters/)")
    p.add_argument("--init", default=None, help="start from this student (a name in --root)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--run-dir", default=None, help="also write a run folder the app's Train tab reads (status, "
                   "metrics.jsonl, checkpoint/), and stop on SIGTERM (the app's Stop) or when the app is gone")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--branch", action="store_true", help="with --resume: continue the checkpoint under this recipe "
                   "where it changes a rate, a loss weight or the pairs (student_checkpoint.BRANCHABLE), keeping "
                   "the fake score, the discriminator and Adam's state")
    p.add_argument("--pair-cache", default=None, help="where reflow's teacher pairs are kept (default: the cache "
                   "folder, $CDLAB_CACHE_DIR or cache/)")
    add_config_arguments(p)
    args = p.parse_args(argv)
    cfg = config_from_args(p, args)
    if args.resume and args.run_dir is None:
        p.error("--resume continues a --run-dir")
    if args.branch and not args.resume:
        p.error("--branch continues a checkpoint: it needs --resume")
    try:
        validate_name(args.name)
        if student_dir(args.name, args.root).exists():  # refused now, not after the training
            raise StudentError(f"a student named {args.name!r} exists in "
                               f"{shown_path(student_dir(args.name, args.root).parent)}; choose another --name")
        if args.run_dir is not None:
            from cdlab.flow.student_run import run_in_folder  # the Train tab's run-folder protocol

            return run_in_folder(args, cfg, distill=distill, save_flow_student=save_flow_student)
        unet, done = distill(args.teacher, cfg, init=args.init, root=args.root, device=args.device,
                             max_seconds=args.max_seconds, pair_cache=args.pair_cache or cache_dir())
        print(f"saved {save_flow_student(unet, args.name, cfg, args.root, teacher=args.teacher, trained_steps=done, init=args.init)}")
    except (StudentError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
