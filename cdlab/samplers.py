"""Samplers: one loop, three step rules, and the course's named samplers (k-diffusion style), with diffusers as
the reference.

:func:`sample_loop` runs a model (:class:`cdlab.models.EpsModel`) from a start x over timesteps with a step rule:

=======================  ===================================================================================
:class:`DDIMStep`        the DDIM jump of eps from t to the next timestep (:func:`cdlab.math.ddim_solver_step`)
:class:`ConsistencyStep` a consistency student's jump: the DDIM jump, or (stochastic) x_0 re-noised
:class:`SchedulerStep`   an external student's own diffusers scheduler (``scheduler.step``)
=======================  ===================================================================================

and three hooks: which eps the step takes, what happens after each step and what the trajectory keeps (the
edit techniques of :mod:`cdlab.edit` are these hooks). The named samplers are thin entry points on it: they
take the UNet, the initial latent ``x_T ~ N(0, I)``, text embeddings, a list of integer timesteps from high
to low noise and anything with ``alphas_cumprod`` (the scheduler is read, never mutated or stepped). After
the last timestep they jump to ``t = 0``, the clean boundary of :mod:`cdlab.math`.

    from cdlab.samplers import ddim_timesteps, sample_ddim
    out = sample_ddim(unet, x_T, cond, uncond, 7.5, ddim_timesteps(50), scheduler)
    out.latents, out.nfe   # nfe == 100: each CFG step is one batched call of 2B, counted as 2

``sample_ddim`` equals ``StableDiffusionPipeline.__call__`` with a trailing ``DDIMScheduler`` and
``set_alpha_to_one=True`` (tests/test_samplers.py) whenever ``num_steps`` divides 1000; for other
step counts diffusers' ``step`` jumps by ``1000 // num_steps`` instead of to the next listed
timestep, and cdlab follows the listed timesteps.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from cdlab.math import ddim_solver_step, predict_x0, q_sample
from cdlab.models import EpsModel

__all__ = ["SampleOutput", "ddim_timesteps", "consistency_timesteps", "SHIFT_RANGE", "check_shift", "grid_shift", "student_timesteps", "sample_loop", "StepRule", "DDIMStep",
           "ConsistencyStep", "SchedulerStep", "sample_ddim", "sample_consistency", "sample_scheduler", "sample_student"]

# callback(i, t, x0_pred): called after step i at timestep t with that step's x_0 prediction.
Callback = Callable[[int, int, torch.Tensor], Any]


class StepRule(Protocol):
    """One step of a sampler from t to s (see "step rules" below)."""

    def model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor: ...

    def __call__(self, eps: torch.Tensor, x: torch.Tensor, t: Any, s: Any,
                 x_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


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
    # numpy's float arange, as diffusers does, so that every num_steps rounds the same way
    num_steps = _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps / num_steps
    return [int(t) - 1 for t in np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64)]


def consistency_timesteps(num_steps: int, num_boundaries: int, num_train_timesteps: int = 1000,
                          shift: float = 1.0) -> list[int]:
    """Multistep consistency timesteps (Song et al. 2023, Alg. 1; Heek et al. 2024): ``T - i T / k``, the first
    mapped to ``T - 1``. With ``k == N`` they are the student's boundaries from the top: N=4 -> [999, 750, 500, 250].

    For ``k != N`` the points are still evenly spaced in k (so they do not depend on ``num_boundaries``, which is
    checked and documents intent): ``k > N`` adds points inside segments, where the student's eps still jumps to
    the next listed timestep (a DDIM step with the student's eps, not a consistency jump), e.g. N=4, k=8 ->
    [999, 875, 750, ...]; ``k < N`` skips boundaries, so a jump crosses several segments and extrapolates the
    student's eps with DDIM beyond the boundary it was trained to reach, e.g. N=4, k=2 -> [999, 500].
    ``num_steps`` is at most ``2 T / 3`` (666), so that the rounded timesteps stay strictly decreasing.

    ``shift`` moves every point but the first by SD3's timestep shift (Esser et al. 2024, §5.3.2), on
    ``u = t / T``: ``u' = s u / (1 + (s - 1) u)``; ``s < 1`` puts the steps nearer the data, e.g. 4 steps at
    ``s = 0.3`` -> [999, 474, 231, 91]. A student trained on a shifted grid carries its ``s`` in its card
    (:func:`grid_shift`). A shift that makes two rounded points meet, or one reach 0, is refused.
    """
    # Beyond 2T/3 steps the spacing drops below 1.5 and rounding would repeat a timestep.
    num_steps = _check_steps(num_steps, num_train_timesteps * 2 // 3)
    if not 1 <= num_boundaries <= num_train_timesteps:
        raise ValueError(f"num_boundaries must be in [1, {num_train_timesteps}], got {num_boundaries!r}")
    shift = check_shift(shift)
    T = num_train_timesteps
    ts_f = [T - i * T / num_steps for i in range(num_steps)]
    if shift != 1.0:
        ts_f = [T * shift * (t / T) / (1 + (shift - 1) * (t / T)) for t in ts_f]
    ts = [int(round(t)) for t in ts_f]
    ts[0] = T - 1
    if any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 1:
        raise ValueError(f"shift {shift:g} at {num_steps} steps gives timesteps {ts}: they must stay strictly "
                         "decreasing and above 0; use fewer steps or a shift nearer 1")
    return ts


SHIFT_RANGE = (0.05, 20.0)  # the timestep shifts a card or a recipe may carry


def check_shift(shift: Any) -> float:
    """``shift`` as a float in :data:`SHIFT_RANGE` (finite), else ValueError naming it."""
    lo, hi = SHIFT_RANGE
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not lo <= float(shift) <= hi:
        raise ValueError(f"shift must be a number in [{lo:g}, {hi:g}], got {shift!r}")
    return float(shift)


def grid_shift(card: Any) -> float:
    """The timestep shift a consistency student samples with: its card's ``scheduler_kwargs["shift"]`` (1: none)."""
    return check_shift((getattr(card, "scheduler_kwargs", None) or {}).get("shift", 1.0))


def student_timesteps(card: Any, steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """A consistency student's ``steps`` timesteps by its card: ``consistency_timesteps(steps, N, T, shift)`` with its
    ``num_boundaries`` N (None: ``steps``) and its :func:`grid_shift`; what :func:`sample_student` runs."""
    n = int(getattr(card, "num_boundaries", 0) or steps)
    return consistency_timesteps(steps, n, num_train_timesteps, grid_shift(card))


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


# ----------------------------------------------------------------------------- step rules
#
# A step rule takes the eps of step i and moves x from t_i to s = t_{i+1} (0 after the last):
# ``rule(eps, x, t, s, x_in) -> (x_s, x0_prediction)``; ``rule.model_input(x, t)`` is what the network sees
# at t (``x_in``: x itself for the jumps, ``scale_model_input`` for a diffusers scheduler).

class DDIMStep:
    """The DDIM jump (Song et al. 2021, eq. 12, eta = 0) from t to s (:func:`cdlab.math.ddim_solver_step`), and
    the x_0 prediction ``(x_t - sigma_t eps) / alpha_t``: the teacher's step, and a consistency student's
    deterministic one (its jump to the next boundary).

    Args:
        scheduler: the schedule (``alphas_cumprod``), read only.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def model_input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return x

    def __call__(self, eps: torch.Tensor, x: torch.Tensor, t: int, s: int,
                 x_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        tv = _tvec(t, b, x.device)
        return (ddim_solver_step(eps, x, tv, _tvec(s, b, x.device), self.scheduler),
                predict_x0(eps, x, tv, self.scheduler))


class ConsistencyStep(DDIMStep):
    """A consistency student's step (Song et al. 2023, Alg. 1). Deterministic: the DDIM jump of its eps
    (:class:`DDIMStep`). Stochastic: predict x_0, then re-noise it to s with fresh noise,
    ``x_s = alpha_s x_0 + sigma_s z``, z drawn from ``generator`` (on the generator's device, then moved);
    the last step (s = 0) returns x_0.

    Args:
        scheduler: the schedule (``alphas_cumprod``), read only.
        stochastic (`bool`): re-noise between steps.
        generator (`torch.Generator`, *optional*): the noise source of the stochastic steps.
    """

    def __init__(self, scheduler: Any, *, stochastic: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(scheduler)
        self.stochastic = stochastic
        self.generator = generator

    def __call__(self, eps: torch.Tensor, x: torch.Tensor, t: int, s: int,
                 x_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.stochastic:
            return super().__call__(eps, x, t, s)
        b = x.shape[0]
        x0 = predict_x0(eps, x, _tvec(t, b, x.device), self.scheduler)
        if s == 0:
            return x0, x0
        gen_device = self.generator.device if self.generator is not None else x.device
        noise = torch.randn(x.shape, generator=self.generator, device=gen_device, dtype=x.dtype).to(x.device)
        return q_sample(x0, _tvec(s, b, x.device), self.scheduler, noise=noise), x0


class SchedulerStep:
    """An external student's step: its own diffusers scheduler, as ``StableDiffusionPipeline`` steps it:
    ``scale_model_input`` before the network, then ``step(eps, t, x, eta=..., generator=...)`` with ``eta``
    and ``generator`` where the step accepts them (LCM and TCD re-noise with ``generator``; DDIM is
    deterministic). The x_0 prediction is the step's ``denoised`` (LCM) or ``pred_original_sample``, else the
    DDIM identity ``(x_in - sigma_t eps) / alpha_t`` on the model input (an epsilon model).

    Call it over exactly the timesteps the scheduler was set to, in order (a scheduler keeps its step index,
    so it mutates: use a fresh one, ``cdlab.students.make_scheduler(pipe, card)``); ``s`` is not read.

    Args:
        scheduler: a diffusers scheduler, its timesteps set.
        eta (`float`, *optional*): the card's ``scheduler_kwargs["eta"]`` (TCD's gamma).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps.
    """

    def __init__(self, scheduler: Any, *, eta: float | None = None, generator: torch.Generator | None = None) -> None:
        self.scheduler = scheduler
        accepts = set(inspect.signature(scheduler.step).parameters)
        self.kwargs: dict[str, Any] = {}
        if eta is not None and "eta" in accepts:
            self.kwargs["eta"] = float(eta)
        if generator is not None and "generator" in accepts:
            self.kwargs["generator"] = generator

    def model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return self.scheduler.scale_model_input(x, t)

    def __call__(self, eps: torch.Tensor, x: torch.Tensor, t: Any, s: Any,
                 x_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.scheduler.step(eps, t, x, **self.kwargs)
        x0 = getattr(out, "denoised", None)
        if x0 is None:
            x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x_in = x if x_in is None else x_in
            x0 = predict_x0(eps, x_in, _tvec(int(round(float(t))), x_in.shape[0], x_in.device), self.scheduler)
        return out.prev_sample, x0


# ----------------------------------------------------------------------------- the loop

@torch.no_grad()
def sample_loop(
    model: EpsModel,
    x: torch.Tensor,
    timesteps: Sequence[Any],
    step: StepRule,
    *,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    eps: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    after_step: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_trajectory: bool = False,
    callback: Callback | None = None,
) -> SampleOutput:
    """The one sampling loop: from ``x`` at ``timesteps[0]``, for each ``t_i`` (with ``s = t_{i+1}``, 0 after
    the last) ``x_in = step.model_input(x, t_i)``, ``e = eps(x_in, t_i)``, ``x, x0 = step(e, x, t_i, s, x_in)``,
    ``x = after_step(x, s)``.

    Args:
        model (`cdlab.models.EpsModel`): the network; ``nfe`` is what it counted during the loop.
        x (`torch.Tensor`): the start, x at ``timesteps[0]`` (the noise; SDEdit's noised image).
        timesteps: high to low noise; ints (the jumps) or a diffusers scheduler's timesteps. Empty: returns ``x``.
        step: the step rule, :class:`DDIMStep`, :class:`ConsistencyStep` or :class:`SchedulerStep`.
        cond, uncond (`torch.Tensor`): the embeddings of the default eps, ``model(x, t, cond, uncond)``.
        eps: hook, which eps the step takes: ``eps(x_t, t)`` (a technique's combined eps).
        after_step: hook, what happens after each step: ``after_step(x_s, s) -> x_s`` (inpainting's projection).
        keep: hook, what the trajectory keeps of each x_0 prediction (inpainting: the known region pasted in).
        return_trajectory (`bool`): keep x_t and the x_0 prediction of every step.
        callback: ``callback(i, t, x0)`` after the network call of step i.
    """
    eps_fn = eps if eps is not None else (lambda z, t: model(z, t, cond, uncond))
    ts = list(timesteps)
    nfe0 = model.nfe
    x0s: list[torch.Tensor] = []
    xts: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else 0
        if return_trajectory:
            xts.append(x)
        x_in = step.model_input(x, t)
        x, x0 = step(eps_fn(x_in, t), x, t, s, x_in)
        if return_trajectory:
            x0s.append(keep(x0) if keep is not None else x0)
        if callback is not None:
            callback(i, int(t), x0)
        if after_step is not None:
            x = after_step(x, s)
    return SampleOutput(latents=x, x0_trajectory=x0s, xt_trajectory=xts, timesteps=[int(t) for t in ts],
                        nfe=model.nfe - nfe0)


# ----------------------------------------------------------------------------- the named samplers

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
    model_class: type[EpsModel] = EpsModel,
) -> SampleOutput:
    """Deterministic DDIM (Song et al. 2021, eta = 0) with classifier-free guidance (Ho & Salimans 2022):
    :func:`sample_loop` with :class:`DDIMStep` and ``EpsModel(unet, guidance)``.

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
        model_class: what the network predicts, as an eps model (default :class:`cdlab.models.EpsModel`, a
            diffusers UNet; :class:`cdlab.flow.model.FlowModel`, a flow velocity, where DDIM is Euler).
    """
    ts = _check_timesteps(timesteps, scheduler)
    return sample_loop(model_class(unet, guidance), x_T, ts, DDIMStep(scheduler), cond=cond, uncond=uncond,
                       return_trajectory=return_trajectory, callback=callback)


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
    model_class: type[EpsModel] = EpsModel,
) -> SampleOutput:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Heek et al. 2024), one NFE per step:
    :func:`sample_loop` with :class:`ConsistencyStep`.

    At each ``t_i`` the student's eps gives the DDIM jump to ``t_{i+1}`` (0 after the last). With
    :func:`consistency_timesteps` ``(N, N)`` of an N-boundary student this is exactly the jump to each
    segment's boundary. Guidance is distilled into the student, so only ``cond`` is used.

    Args:
        stochastic (`bool`): Song et al.'s Alg. 1 instead: predict x_0, then re-noise it to ``t_{i+1}`` with
            fresh noise drawn from ``generator`` (on the generator's device, then moved).
        generator (`torch.Generator`, *optional*): the noise source for ``stochastic=True``.
        model_class: as in :func:`sample_ddim`.
    """
    ts = _check_timesteps(timesteps, scheduler)
    step = ConsistencyStep(scheduler, stochastic=stochastic, generator=generator)
    return sample_loop(model_class(unet), x_T, ts, step, cond=cond, return_trajectory=return_trajectory,
                       callback=callback)


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

    ``scheduler.set_timesteps(steps)``, ``x = x_T * init_noise_sigma``, then :func:`sample_loop` with
    :class:`SchedulerStep` (the card's ``eta``) and one UNet call a step (two, batched uncond-first and combined
    by :func:`cdlab.math.cfg_eps`, when ``card.guidance > 1`` and ``uncond`` is given, as diffusers does for
    ``guidance_scale > 1``). Unlike the other samplers this one steps, so mutates, ``scheduler``: pass a
    fresh one, ``cdlab.students.make_scheduler(pipe, card)``.

    Args:
        card: a ``cdlab.students.StudentCard`` (``guidance``, ``scheduler_kwargs["eta"]``).
        steps (`int`): inference steps.
        return_trajectory (`bool`): keep the x_0 prediction after each step (see :class:`SchedulerStep`).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps (LCM, TCD with eta > 0).

    Returns:
        `SampleOutput` with the scheduler's timesteps and the UNet calls per image as ``nfe``.
    """
    steps = _check_steps(steps, int(scheduler.config.num_train_timesteps))
    scheduler.set_timesteps(steps, device=x_T.device)
    w = float(getattr(card, "guidance", 1.0) or 1.0)
    eta = (getattr(card, "scheduler_kwargs", None) or {}).get("eta")
    step = SchedulerStep(scheduler, eta=eta, generator=generator)
    return sample_loop(EpsModel(unet, w if w > 1.0 else None), x_T * scheduler.init_noise_sigma,
                       scheduler.timesteps, step, cond=cond, uncond=uncond, return_trajectory=return_trajectory)


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
    model_class: type[EpsModel] = EpsModel,
) -> SampleOutput:
    """A student's ``steps``-step sample by its card's recipe: the one place every entry point (Compare,
    Evaluate, generate, doctor) samples a student.

    ``card.scheduler == "consistency"`` (cdlab's students): :func:`sample_consistency` over
    :func:`student_timesteps` (its boundaries and its grid's shift), no CFG (it is distilled in); any other scheduler
    (LCM-LoRA, TCD, PCM, Hyper-SD): :func:`sample_scheduler` with the card's guidance and ``eta``.

    Args:
        card: a ``cdlab.students.StudentCard``.
        scheduler: ``cdlab.students.make_scheduler(pipe, card)``, a fresh one per call (a diffusers
            scheduler steps, so mutates; the consistency sampler only reads its ``alphas_cumprod``).
        stochastic (`bool`): consistency students only: re-noise between steps (Song et al. 2023, Alg. 1).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps.
        model_class: as in :func:`sample_ddim` (a flow student: consistency jumps on the flow are Euler steps).
    """
    if getattr(card, "scheduler", "consistency") == "consistency":
        ts = student_timesteps(card, steps, int(scheduler.config.num_train_timesteps))
        return sample_consistency(unet, x_T, cond, ts, scheduler, stochastic=stochastic, generator=generator,
                                  return_trajectory=return_trajectory, model_class=model_class)
    if model_class is not EpsModel:
        raise ValueError(f"student {getattr(card, 'name', '')!r}: scheduler {card.scheduler!r} samples a diffusers "
                         "UNet only")
    return sample_scheduler(unet, x_T, cond, uncond, card, steps, scheduler, return_trajectory=return_trajectory,
                            generator=generator)
