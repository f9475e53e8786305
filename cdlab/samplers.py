"""Samplers as small pure functions (k-diffusion style), with diffusers as the reference.

Both samplers take the UNet, the initial latent ``x_T ~ N(0, I)``, text embeddings, a list of
integer timesteps from high to low noise and anything with ``alphas_cumprod`` (the scheduler is
read, never mutated or stepped). After the last timestep they jump to ``t = 0``, the clean
boundary of :mod:`cdlab.math`.

    from cdlab.samplers import ddim_timesteps, sample_ddim
    out = sample_ddim(unet, x_T, cond, uncond, 7.5, ddim_timesteps(50), scheduler)
    out.latents, out.nfe   # nfe == 100: each CFG step is one batched call of 2B, counted as 2

``sample_ddim`` equals ``StableDiffusionPipeline.__call__`` with a trailing ``DDIMScheduler`` and
``set_alpha_to_one=True`` (tests/test_samplers.py) whenever ``num_steps`` divides 1000; for other
step counts diffusers' ``step`` jumps by ``1000 // num_steps`` instead of to the next listed
timestep, and cdlab follows the listed timesteps.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cdlab.math import cfg_eps, ddim_solver_step, predict_x0, q_sample

__all__ = ["SampleOutput", "ddim_timesteps", "consistency_timesteps", "sample_ddim", "sample_consistency",
           "sample_scheduler", "sample_student"]

# callback(i, t, x0_pred): called after step i at timestep t with that step's x_0 prediction.
Callback = Callable[[int, int, torch.Tensor], Any]


@dataclass
class SampleOutput:
    """What a sampler returns.

    Args:
        latents (`torch.Tensor`): the final sample, in the UNet's (scaled) latent space.
        x0_trajectory (`list[torch.Tensor]`): the x_0 prediction after every step (empty unless asked).
        xt_trajectory (`list[torch.Tensor]`): the latent x_t each step was evaluated at (empty unless asked);
            ``xt_trajectory[i]`` and ``x0_trajectory[i]`` belong to ``timesteps[i]``.
        timesteps (`list[int]`): the timesteps at which the network was evaluated.
        nfe (`int`): network evaluations per image; a CFG step counts 2.
    """

    latents: torch.Tensor
    x0_trajectory: list[torch.Tensor] = field(default_factory=list)
    xt_trajectory: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    nfe: int = 0


def _check_steps(num_steps: int, max_steps: int) -> int:
    try:
        n = operator.index(num_steps)  # ints and numpy ints; not floats or bools
    except TypeError:
        n = None
    if n is None or isinstance(num_steps, bool) or not 1 <= n <= max_steps:
        raise ValueError(f"num_steps must be an integer in [1, {max_steps}], got {num_steps!r}")
    return n


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing timesteps (Lin et al. 2023, Table 2), equal to diffusers'
    ``DDIMScheduler(timestep_spacing="trailing").set_timesteps(num_steps).timesteps``: 4 -> [999, 749, 499, 249]."""
    import numpy as np  # numpy's float arange, as diffusers does, so that every num_steps rounds the same way

    num_steps = _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps / num_steps
    return [int(t) - 1 for t in np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64)]


def consistency_timesteps(num_steps: int, num_boundaries: int, num_train_timesteps: int = 1000) -> list[int]:
    """Multistep consistency timesteps (Song et al. 2023, Alg. 1; Heek et al. 2024): ``T - i T / k``, the first
    mapped to ``T - 1``. With ``k == N`` they are the student's boundaries from the top: N=4 -> [999, 750, 500, 250].

    For ``k != N`` the points are still evenly spaced in k (so they do not depend on ``num_boundaries``, which is
    checked and documents intent): ``k > N`` adds points inside segments, where the student's eps still jumps to
    the next listed timestep (a DDIM step with the student's eps, not a consistency jump), e.g. N=4, k=8 ->
    [999, 875, 750, ...]; ``k < N`` skips boundaries, so a jump crosses several segments and extrapolates the
    student's eps with DDIM beyond the boundary it was trained to reach, e.g. N=4, k=2 -> [999, 500].
    ``num_steps`` is at most ``2 T / 3`` (666), so that the rounded timesteps stay strictly decreasing.
    """
    # Beyond 2T/3 steps the spacing drops below 1.5 and rounding would repeat a timestep.
    num_steps = _check_steps(num_steps, num_train_timesteps * 2 // 3)
    if not 1 <= num_boundaries <= num_train_timesteps:
        raise ValueError(f"num_boundaries must be in [1, {num_train_timesteps}], got {num_boundaries!r}")
    ts = [int(round(num_train_timesteps - i * num_train_timesteps / num_steps)) for i in range(num_steps)]
    ts[0] = num_train_timesteps - 1
    return ts


def _check_timesteps(timesteps: Any, scheduler: Any) -> list[int]:
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    n = len(scheduler.alphas_cumprod)
    if not ts:
        raise ValueError("timesteps is empty: give at least one timestep")
    if any(not 0 < t < n for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing integers in [1, {n - 1}], got {ts}")
    return ts


def _tvec(t: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long, device=device)


@torch.no_grad()
def sample_ddim(
    unet: Any,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float | torch.Tensor,
    timesteps: list[int],
    scheduler: Any,
    *,
    return_trajectory: bool = False,
    callback: Callback | None = None,
) -> SampleOutput:
    """Deterministic DDIM (Song et al. 2021, eta = 0) with classifier-free guidance (Ho & Salimans 2022).

    Args:
        unet: epsilon model, ``unet(x, t, encoder_hidden_states=emb).sample``.
        x_T (`torch.Tensor`): initial latents ``[B, C, h, w]``.
        cond, uncond (`torch.Tensor`): text embeddings ``[B, L, D]``; ``uncond=None`` or ``guidance == 1``
            runs the conditional model only (1 NFE per step). Otherwise cond and uncond go through ONE batched
            UNet call of 2B (uncond first, as in diffusers) and the step counts 2 NFE. Unlike the diffusers
            pipeline, ``guidance < 1`` is honoured (0 = unconditional).
        guidance (`float` or `torch.Tensor`): the CFG scale w, or one per example (``[B]``: a batch of
            requests with their own guidance; CFG runs when any of them is not 1).
        timesteps (`list[int]`): strictly decreasing, e.g. :func:`ddim_timesteps`; the step after the last goes to 0.
        scheduler: the schedule (``alphas_cumprod``).
    """
    ts = _check_timesteps(timesteps, scheduler)
    if isinstance(guidance, torch.Tensor) and guidance.ndim > 0:
        use_cfg = uncond is not None and bool((guidance != 1.0).any())
    else:
        use_cfg = uncond is not None and float(guidance) != 1.0
    x = x_T
    b = x.shape[0]
    emb = torch.cat([uncond, cond]) if use_cfg else cond
    trajectory: list[torch.Tensor] = []
    xts: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else 0
        if return_trajectory:
            xts.append(x)
        if use_cfg:
            eps_u, eps_c = unet(torch.cat([x, x]), _tvec(t, 2 * b, x.device), encoder_hidden_states=emb).sample.chunk(2)
            eps = cfg_eps(eps_u, eps_c, guidance)
        else:
            eps = unet(x, _tvec(t, b, x.device), encoder_hidden_states=emb).sample
        tv = _tvec(t, b, x.device)
        if return_trajectory or callback is not None:
            x0 = predict_x0(eps, x, tv, scheduler)
            if return_trajectory:
                trajectory.append(x0)
            if callback is not None:
                callback(i, t, x0)
        x = ddim_solver_step(eps, x, tv, _tvec(s, b, x.device), scheduler)
    return SampleOutput(latents=x, x0_trajectory=trajectory, xt_trajectory=xts, timesteps=ts,
                        nfe=len(ts) * (2 if use_cfg else 1))


@torch.no_grad()
def sample_consistency(
    unet: Any,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    timesteps: list[int],
    scheduler: Any,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: Callback | None = None,
) -> SampleOutput:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Heek et al. 2024), one NFE per step.

    At each ``t_i`` the student's eps gives the DDIM jump to ``t_{i+1}`` (0 after the last). With
    :func:`consistency_timesteps` ``(N, N)`` of an N-boundary student this is exactly the jump to each
    segment's boundary. Guidance is distilled into the student, so only ``cond`` is used.

    Args:
        stochastic (`bool`): Song et al.'s Alg. 1 instead: predict x_0, then re-noise it to ``t_{i+1}`` with
            fresh noise drawn from ``generator`` (on the generator's device, then moved).
        generator (`torch.Generator`, *optional*): the noise source for ``stochastic=True``.
    """
    ts = _check_timesteps(timesteps, scheduler)
    x = x_T
    b = x.shape[0]
    trajectory: list[torch.Tensor] = []
    xts: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else 0
        tv = _tvec(t, b, x.device)
        eps = unet(x, tv, encoder_hidden_states=cond).sample
        x0 = predict_x0(eps, x, tv, scheduler)
        if return_trajectory:
            trajectory.append(x0)
            xts.append(x)
        if callback is not None:
            callback(i, t, x0)
        if stochastic:
            if s == 0:
                x = x0
            else:
                gen_device = generator.device if generator is not None else x.device
                noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
                x = q_sample(x0, _tvec(s, b, x.device), scheduler, noise=noise)
        else:
            x = ddim_solver_step(eps, x, tv, _tvec(s, b, x.device), scheduler)
    return SampleOutput(latents=x, x0_trajectory=trajectory, xt_trajectory=xts, timesteps=ts, nfe=len(ts))


@torch.no_grad()
def sample_scheduler(
    unet: Any,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    card: Any,
    steps: int,
    scheduler: Any,
    *,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """A student that samples with its own diffusers scheduler (LCM-LoRA, TCD, PCM, Hyper-SD, ...): the
    denoising loop of ``StableDiffusionPipeline.__call__`` with that scheduler, on given noise and embeddings.

    ``scheduler.set_timesteps(steps)``, ``x = x_T * init_noise_sigma``, then per timestep
    ``scale_model_input``, one UNet call (two, batched uncond-first and combined by
    :func:`cdlab.math.cfg_eps`, when ``card.guidance > 1`` and ``uncond`` is given, as diffusers does
    for ``guidance_scale > 1``) and ``scheduler.step`` with the card's ``eta`` and ``generator`` where
    the step accepts them. Unlike the other samplers this one steps, so mutates, ``scheduler``: pass a
    fresh one, ``cdlab.students.make_scheduler(pipe, card)``.

    Args:
        card: a ``cdlab.students.StudentCard`` (``guidance``, ``scheduler_kwargs["eta"]``).
        steps (`int`): inference steps.
        return_trajectory (`bool`): keep the x_0 prediction after each step: the step's ``denoised``
            (LCM) or ``pred_original_sample``, else the DDIM identity ``(x_t - sigma_t eps) / alpha_t``
            on the model input (an epsilon model).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps (LCM, TCD with eta > 0).

    Returns:
        `SampleOutput` with the scheduler's timesteps and the UNet calls per image as ``nfe``.
    """
    import inspect

    steps = _check_steps(steps, int(scheduler.config.num_train_timesteps))
    scheduler.set_timesteps(steps, device=x_T.device)
    w = float(getattr(card, "guidance", 1.0) or 1.0)
    use_cfg = uncond is not None and w > 1.0
    emb = torch.cat([uncond, cond]) if use_cfg else cond
    accepts = set(inspect.signature(scheduler.step).parameters)
    step_kwargs: dict[str, Any] = {}
    eta = (getattr(card, "scheduler_kwargs", None) or {}).get("eta")
    if eta is not None and "eta" in accepts:
        step_kwargs["eta"] = float(eta)
    if generator is not None and "generator" in accepts:
        step_kwargs["generator"] = generator
    x = x_T * scheduler.init_noise_sigma
    trajectory: list[torch.Tensor] = []
    xts: list[torch.Tensor] = []
    nfe = 0
    for t in scheduler.timesteps:
        if return_trajectory:
            xts.append(x)
        xin = scheduler.scale_model_input(x, t)
        if use_cfg:
            eps_u, eps_c = unet(torch.cat([xin, xin]), t, encoder_hidden_states=emb).sample.chunk(2)
            eps = cfg_eps(eps_u, eps_c, w)
            nfe += 2
        else:
            eps = unet(xin, t, encoder_hidden_states=emb).sample
            nfe += 1
        out = scheduler.step(eps, t, x, **step_kwargs)
        x = out.prev_sample
        if return_trajectory:
            x0 = getattr(out, "denoised", None)
            if x0 is None:
                x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                x0 = predict_x0(eps, xin, _tvec(int(round(float(t))), xin.shape[0], xin.device), scheduler)
            trajectory.append(x0)
    return SampleOutput(latents=x, x0_trajectory=trajectory, xt_trajectory=xts,
                        timesteps=[int(t) for t in scheduler.timesteps], nfe=nfe)


def sample_student(
    unet: Any,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    card: Any,
    steps: int,
    scheduler: Any,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """A student's ``steps``-step sample by its card's recipe: the one place every entry point (Compare,
    Evaluate, generate, doctor) samples a student.

    ``card.scheduler == "consistency"`` (cdlab's students): :func:`sample_consistency` over
    ``consistency_timesteps(steps, card.num_boundaries)``, no CFG (it is distilled in); any other scheduler
    (LCM-LoRA, TCD, PCM, Hyper-SD): :func:`sample_scheduler` with the card's guidance and ``eta``.

    Args:
        card: a ``cdlab.students.StudentCard``.
        scheduler: ``cdlab.students.make_scheduler(pipe, card)``, a fresh one per call (a diffusers
            scheduler steps, so mutates; the consistency sampler only reads its ``alphas_cumprod``).
        stochastic (`bool`): consistency students only: re-noise between steps (Song et al. 2023, Alg. 1).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps.
    """
    if getattr(card, "scheduler", "consistency") == "consistency":
        k = int(getattr(card, "num_boundaries", 0) or steps)
        ts = consistency_timesteps(steps, k, int(scheduler.config.num_train_timesteps))
        return sample_consistency(unet, x_T, cond, ts, scheduler, stochastic=stochastic, generator=generator,
                                  return_trajectory=return_trajectory)
    return sample_scheduler(unet, x_T, cond, uncond, card, steps, scheduler, return_trajectory=return_trajectory,
                            generator=generator)
