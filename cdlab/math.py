"""The diffusion math of consistency distillation, under the course's own names.

Notation (VP process, epsilon prediction, SD1.5's discrete schedule):

    x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)

with ``abar_t = scheduler.alphas_cumprod[t]``. Timestep 0 is the *clean boundary*:
``alpha_0 = 1, sigma_0 = 0`` (for both ``t`` and ``s``), as in the course notebook, so that a
jump "to 0" returns the model's x_0 prediction.

Every function takes batched integer timestep tensors (shape ``[B]``) on any device, works in
the dtype of its sample argument, and never mutates the scheduler.

The four graded functions of the course (``ddim_solver_step``, ``q_sample``,
``get_xs_from_xt_naive``, ``get_multi_boundary_timesteps``) keep the notebook's signatures, so a
course notebook can switch to cdlab by changing one import.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "alpha_sigma",
    "ddim_solver_step",
    "q_sample",
    "get_xs_from_xt_naive",
    "get_multi_boundary_timesteps",
    "get_zero_boundary_timesteps",
    "cfg_eps",
    "get_xs_from_xt_teacher",
    "predict_boundary",
    "predict_x0",
]


def _alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """``scheduler.alphas_cumprod`` (or a bare tensor of it), read only."""
    ac = scheduler if isinstance(scheduler, torch.Tensor) else scheduler.alphas_cumprod
    return torch.as_tensor(ac)


def alpha_sigma(
    t: torch.Tensor, scheduler: Any, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(alpha_t, sigma_t)`` shaped ``[B, 1, ..., 1]`` to broadcast against ``like``.

    Args:
        t (`torch.Tensor`): integer timesteps, shape ``[B]`` (a scalar is broadcast to the batch).
        scheduler: anything with ``alphas_cumprod`` (e.g. a diffusers ``DDIMScheduler``).
        like (`torch.Tensor`): the sample whose device, dtype and rank the result follows.

    ``t == 0`` gives ``(1, 0)``: the clean boundary.
    """
    # The schedule is gathered in float64 so that alpha/sigma are exact before the cast.
    ac = _alphas_cumprod(scheduler).to(device=like.device, dtype=torch.float64)
    t = torch.as_tensor(t, device=like.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    abar = ac[t]
    clean = t == 0
    abar = torch.where(clean, torch.ones_like(abar), abar)
    alpha = abar.sqrt()
    sigma = (1.0 - abar).clamp(min=0).sqrt()
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha.to(like.dtype).reshape(shape), sigma.to(like.dtype).reshape(shape)


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """x_0 prediction of an epsilon model: ``x_0 = (x_t - sigma_t * eps) / alpha_t``."""
    alpha_t, sigma_t = alpha_sigma(t, scheduler, x_t)
    return (x_t - sigma_t * model_output) / alpha_t


def ddim_solver_step(
    model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from ``t`` to ``s`` for an epsilon-prediction model.

    ``x_0 = (x_t - sigma_t eps) / alpha_t``,  ``x_s = alpha_s x_0 + sigma_s eps``  (Song et al. 2021, eq. 12).

    Args:
        model_output (`torch.Tensor`): the predicted noise eps, ``[B, C, H, W]``.
        x_t (`torch.Tensor`): samples at timestep ``t``.
        t (`torch.Tensor`): current timesteps, ``[B]``.
        s (`torch.Tensor`): target timesteps, ``[B]``; ``s = 0`` returns the x_0 prediction.
        scheduler: the diffusion schedule (``alphas_cumprod``).
    """
    alpha_s, sigma_s = alpha_sigma(s, scheduler, x_t)
    x_0 = predict_x0(model_output, x_t, t, scheduler)
    return alpha_s * x_0 + sigma_s * model_output


def q_sample(x: torch.Tensor, t: torch.Tensor, scheduler: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The forward process ``q(x_t | x_0)``: ``x_t = alpha_t x_0 + sigma_t eps``.

    Args:
        x (`torch.Tensor`): clean samples x_0.
        t (`torch.Tensor`): timesteps, ``[B]``.
        scheduler: the diffusion schedule.
        noise (`torch.Tensor`, *optional*): eps; drawn from N(0, I) when not given.
    """
    if noise is None:
        noise = torch.randn_like(x)
    alpha_t, sigma_t = alpha_sigma(t, scheduler, x)
    return alpha_t * x + sigma_t * noise


def get_xs_from_xt_naive(
    x_0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    scheduler: Any,
    noise: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The consistency-*training* point x_s, analytic from x_0 (Song et al. 2023, CT).

    With the noise that made ``x_t`` the point is exact: ``x_s = alpha_s x_0 + sigma_s eps``.
    Without it, eps is recovered from the pair, ``eps = (x_t - alpha_t x_0) / sigma_t``, which is
    the notebook's ``x_s = (alpha_s - sigma_s alpha_t / sigma_t) x_0 + (sigma_s / sigma_t) x_t``.
    Extra keyword arguments (``prompt_embeds`` …) are accepted and ignored, so CT and CD share
    one call signature.
    """
    if noise is None:
        alpha_t, sigma_t = alpha_sigma(t, scheduler, x_t)
        if bool((sigma_t == 0).any()):
            raise ValueError("get_xs_from_xt_naive: t = 0 needs the noise argument (sigma_t = 0).")
        noise = (x_t - alpha_t * x_0) / sigma_t
    return q_sample(x_0, s, scheduler, noise=noise)


def get_multi_boundary_timesteps(
    timesteps: torch.Tensor, num_boundaries: int = 4, num_timesteps: int = 1000
) -> torch.Tensor:
    """Boundary of each timestep's segment, for multi-boundary consistency (Heek et al. 2024).

    The boundaries are ``{0, T/N, 2T/N, ...}``; a timestep maps to the largest boundary strictly
    below it (0 maps to 0). For N = 4 the boundaries are {0, 250, 500, 750}: 751 maps to 750 and
    750 maps to 500, so a jump to the boundary always goes down in noise.
    """
    if not 1 <= num_boundaries <= num_timesteps:
        raise ValueError(f"num_boundaries must be in [1, num_timesteps={num_timesteps}], got {num_boundaries}")
    step = num_timesteps // num_boundaries
    boundaries = torch.arange(0, num_timesteps, step, device=timesteps.device)[:num_boundaries]
    idx = torch.bucketize(timesteps.long(), boundaries, right=False) - 1
    return boundaries[idx.clamp(min=0)].to(timesteps.dtype)


def get_zero_boundary_timesteps(timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The classic consistency model's single boundary, t = 0."""
    return torch.zeros_like(timesteps)


def cfg_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + w (eps_c - eps_u)``.

    ``guidance`` may be a float or a per-example tensor ``[B]``.
    """
    w = torch.as_tensor(guidance, device=eps_cond.device, dtype=eps_cond.dtype)
    if w.ndim == 1:
        w = w.reshape((-1,) + (1,) * (eps_cond.ndim - 1))
    return eps_uncond + w * (eps_cond - eps_uncond)


def get_xs_from_xt_teacher(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    guidance: float | torch.Tensor,
    scheduler: Any,
) -> torch.Tensor:
    """The consistency-*distillation* point: one teacher DDIM step with CFG from t to s."""
    return ddim_solver_step(cfg_eps(eps_uncond, eps_cond, guidance), x_t, t, s, scheduler)


def predict_boundary(
    model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, boundary: torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """A consistency model's output at the boundary of its segment: the DDIM jump of
    ``eps_theta(x_t, t)`` from ``t`` to ``boundary`` (x_0 itself when the boundary is 0)."""
    return ddim_solver_step(model_output, x_t, t, boundary, scheduler)
