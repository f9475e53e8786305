"""The consistency loss: one function for consistency training (CT), consistency distillation (CD)
and multi-boundary CD, in the style of openai/consistency_models (a teacher switches CT to CD;
the result is a dict of terms).

Notation as in :mod:`cdlab.math` (``x_t = alpha_t x_0 + sigma_t eps``, timestep 0 is the clean
boundary). For a batch of clean latents x_0 and text embeddings c:

1. Timesteps on the course's grid with skip k (``step_size``) on T training timesteps::

       i ~ U{1, ..., T/k},   t = k i - 1,   s = max(t - k, 0)

   ``i = T/k`` gives ``t = T - 1 = 999``, where every sampler starts (the course's grid stopped at
   979). With probability ``sampler_prob`` an example instead takes a timestep the few-step sampler
   visits (e.g. ``[999, 750, 500, 250]``) with ``s = t - k``, so those exact timesteps are trained.
2. The boundary of s's segment: ``b = B_N(s)``, the largest of ``{0, T/N, 2T/N, ...}`` strictly
   below s (0 for s = 0); N = 1 is the classic consistency model, b = 0.
3. ``x_t = alpha_t x_0 + sigma_t eps``, eps ~ N(0, I).
4. The second point x_s on the same trajectory:

   * CT (no teacher):  ``x_s = alpha_s x_0 + sigma_s eps``  (``get_xs_from_xt_naive``);
   * CD (a teacher):   one DDIM step of the guided teacher from t to s,
     ``eps_w = eps_u + w (eps_c - eps_u)``,  ``x_s = alpha_s (x_t - sigma_t eps_w) / alpha_t + sigma_s eps_w``,
     where eps_c and eps_u come from ONE batched teacher call on ``[x_t, x_t]`` with ``[c, c_u]``.

5. Student and target both jump to the same boundary with a DDIM step (``predict_boundary``)::

       f_theta(x, t, b) = alpha_b (x - sigma_t eps_theta(x, t)) / alpha_t + sigma_b eps_theta(x, t)
       pred   = f_theta(x_t, t, b)
       target = sg[f_theta^-(x_s, s, b)]      (theta^- = theta, or an EMA of it)

   When s is itself the boundary (s = b = 0) the target is exactly x_s: alpha_0 = 1, sigma_0 = 0.
6. ``d = pred - target`` (in fp32) and the loss is the mean over elements of

   * ``"l2"``:          d^2
   * ``"pseudo_huber"``: sqrt(d^2 + c^2) - c      (Song & Dhariwal 2023; c = ``huber_c``)
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from cdlab.math import (
    ddim_solver_step,
    get_multi_boundary_timesteps,
    get_xs_from_xt_naive,
    predict_boundary,
    predict_x0,
    q_sample,
)
from cdlab.models import EpsModel
from cdlab.students.roles import adapter_role, swapped_weights

__all__ = ["consistency_loss", "sample_timesteps", "LOSS_TYPES"]

LOSS_TYPES = ("l2", "pseudo_huber")


def sample_timesteps(
    batch_size: int,
    *,
    step_size: int = 20,
    num_train_timesteps: int = 1000,
    sampler_timesteps: Sequence[int] | None = None,
    sampler_prob: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(t, s)`` on the skip-k grid: ``t = k i - 1`` for ``i ~ U{1..T/k}``, ``s = max(t - k, 0)``.

    With probability ``sampler_prob`` per example, ``t`` is drawn from ``sampler_timesteps`` instead
    (the timesteps a few-step sampler visits), again with ``s = max(t - k, 0)``.
    """
    if step_size < 1 or num_train_timesteps % step_size:
        raise ValueError(f"step_size must divide num_train_timesteps ({num_train_timesteps}), got {step_size}")
    num_intervals = num_train_timesteps // step_size
    index = torch.randint(1, num_intervals + 1, (batch_size,), generator=generator)
    t = step_size * index - 1
    if sampler_timesteps and sampler_prob > 0:
        extra = torch.as_tensor(list(sampler_timesteps), dtype=torch.long)
        if bool(((extra < 1) | (extra >= num_train_timesteps)).any()):
            raise ValueError(f"sampler_timesteps must lie in [1, {num_train_timesteps - 1}], got {list(sampler_timesteps)}")
        pick = extra[torch.randint(0, len(extra), (batch_size,), generator=generator)]
        use = torch.rand(batch_size, generator=generator) < sampler_prob
        t = torch.where(use, pick, t)
    s = (t - step_size).clamp(min=0)
    return t.to(device), s.to(device)


def _fp32_eps(unet: Any, autocast_dtype: torch.dtype | None, guidance: Any = None,
              model_class: type[EpsModel] = EpsModel) -> EpsModel:
    """The losses' eps model: the UNet under ``torch.autocast`` when asked, its eps in fp32. With a
    ``guidance`` (the CD teacher, DMD's real score) it always guides, one batched call of 2B, even at w = 1.
    ``model_class`` says what the network predicts and on which path (:class:`cdlab.flow.model.FlowModel`: a
    flow velocity)."""
    return model_class(unet, guidance, autocast_dtype=autocast_dtype, output_dtype=torch.float32, guide_at_one=True)


def _per_example(v: Any, bsz: int, device: torch.device) -> torch.Tensor:
    """Given timesteps (a scalar or ``[B]``) as a ``[B]`` long tensor."""
    return torch.as_tensor(v, device=device).long().expand(bsz).contiguous()


def _expand_uncond(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The unconditional embeddings ``[1 or B, L, D]`` in ``cond``'s device, dtype and batch."""
    return uncond.to(device=cond.device, dtype=cond.dtype).expand(cond.shape[0], *cond.shape[1:])


def _check_loss_inputs(latents: torch.Tensor, cond: torch.Tensor, teacher: Any, uncond: Any, loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if latents.ndim != 4 or cond.ndim not in (2, 3) or cond.shape[0] != latents.shape[0]:
        raise ValueError(f"expected latents [B, C, H, W] and cond [B, L, D] (or a class vector [B, K]) with the same B, got "
                         f"{tuple(latents.shape)} and {tuple(cond.shape)}")
    if teacher is not None and uncond is None:
        raise ValueError("consistency distillation (a teacher) needs uncond embeddings for classifier-free guidance")


def _guidance_scales(guidance: float | tuple[float, float], bsz: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The teacher's CFG scale per example ``[B]`` (CPU): ``guidance``, or ``U[w_min, w_max]`` for a range."""
    if isinstance(guidance, (tuple, list)):
        lo, hi = map(float, guidance)
        return lo + (hi - lo) * torch.rand(bsz, generator=generator)
    return torch.full((bsz,), float(guidance))


def _teacher_point(teacher: Any, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor, w: torch.Tensor, scheduler: Any,
                  autocast_dtype: torch.dtype | None = None, model_class: type[EpsModel] = EpsModel) -> torch.Tensor:
    """CD's second point (step 4 above): one DDIM step from t to s of the guided teacher, the base model with every
    adapter off: ``eps_w = eps_u + w (eps_c - eps_u)`` from ONE batched call, ``x_s = ddim_solver_step(eps_w)``
    (:func:`cdlab.math.get_xs_from_xt_teacher`)."""
    with adapter_role(teacher, None):
        eps_w = _fp32_eps(teacher, autocast_dtype, w, model_class)(x_t, t, cond, _expand_uncond(uncond, cond))
    return ddim_solver_step(eps_w, x_t, t, s, scheduler)


def _boundary_target(net: Any, weights: Mapping[str, torch.Tensor] | None, x_s: torch.Tensor, s: torch.Tensor,
                    b: torch.Tensor, cond: torch.Tensor, scheduler: Any,
                    autocast_dtype: torch.dtype | None = None, model_class: type[EpsModel] = EpsModel) -> torch.Tensor:
    """The stop-gradient target (step 5 above), ``f_theta^-(x_s, s, b)``, with ``weights`` (e.g. an EMA of the
    LoRA weights) swapped into ``net`` for this pass only."""
    with torch.no_grad(), swapped_weights(net, weights):
        return predict_boundary(_fp32_eps(net, autocast_dtype, model_class=model_class)(x_s, s, cond), x_s, s, b,
                                scheduler)


def _distance(d: torch.Tensor, loss_type: str = "l2", huber_c: float = 1e-3) -> torch.Tensor:
    """The per-example loss of ``d = pred - target`` (step 6 above): the mean of ``d^2`` or of the pseudo-Huber
    ``sqrt(d^2 + c^2) - c`` over each example's elements, ``[B]``."""
    per_elem = d.pow(2) if loss_type == "l2" else torch.sqrt(d.pow(2) + huber_c ** 2) - huber_c
    return per_elem.flatten(1).mean(1)


def consistency_loss(
    unet: Any, latents: torch.Tensor, cond: torch.Tensor, scheduler: Any, *,
    teacher: Any = None, uncond: torch.Tensor | None = None, guidance: float | tuple[float, float] = 1.0,
    num_boundaries: int = 1, step_size: int = 20, num_train_timesteps: int = 1000,
    sampler_timesteps: Sequence[int] | None = None, sampler_prob: float = 0.0,
    loss_type: str = "l2", huber_c: float = 1e-3,
    target_model: Any = None, target_weights: Mapping[str, torch.Tensor] | None = None,
    timesteps: tuple[torch.Tensor, torch.Tensor] | None = None, noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
    model_class: type[EpsModel] = EpsModel,
) -> dict[str, torch.Tensor]:
    """Consistency loss of ``unet`` on a batch of clean latents (CT, or CD when ``teacher`` is given).

    See the module docstring for the equations.

    Args:
        unet: the student, an epsilon-prediction UNet (``unet(x, t, encoder_hidden_states=c).sample``);
            gradients flow through its pass at ``(x_t, t)`` only.
        latents (`torch.Tensor`): clean latents x_0 ``[B, C, H, W]`` (already scaled by the VAE factor).
        cond (`torch.Tensor`): text embeddings ``[B, L, D]``.
        scheduler: the diffusion schedule (``alphas_cumprod``).
        teacher: ``None`` for consistency training; otherwise the teacher UNet for distillation. Pass the
            student's own (unwrapped) UNet to use its base weights: the teacher always runs with LoRA
            adapters disabled (`cdlab.students.roles.adapter_role` ``None``), so only one UNet is in memory.
        uncond (`torch.Tensor`, *optional*): unconditional embeddings ``[B or 1, L, D]``; needed for CD.
        guidance: the teacher's CFG scale w, a float or a ``(w_min, w_max)`` range sampled per example.
        num_boundaries (`int`): N; 1 = classic consistency model (boundary 0), 4 = multi-boundary CD.
        step_size (`int`): k, the skip between t and s on the grid.
        sampler_timesteps / sampler_prob: the few-step sampler's timesteps, mixed in with this probability.
        loss_type (`str`): ``"l2"`` or ``"pseudo_huber"`` (with ``huber_c``).
        target_model: the module for the stop-gradient target pass; default ``unet`` (under ``no_grad``).
        target_weights: parameter name -> tensor of ``target_model`` (e.g. an EMA of the LoRA weights),
            swapped in for the target pass only.
        timesteps: ``(t, s)`` to use instead of sampling them (tests, ablations).
        noise (`torch.Tensor`, *optional*): eps for x_t; drawn with ``generator`` when not given.
        generator (`torch.Generator`, *optional*): CPU generator for timesteps, noise and w.
        autocast_dtype: run the UNet passes under ``torch.autocast`` with this dtype (fp16/bf16);
            everything else, the loss included, is computed in fp32.
        model_class: the eps model of ``unet`` and ``teacher`` (default :class:`cdlab.models.EpsModel`, a diffusers
            UNet); :class:`cdlab.flow.model.FlowModel` distils a flow teacher, with ``scheduler`` its
            ``FLOW_SCHEDULE``: there the teacher's DDIM step is an Euler step of its velocity, and ``cond`` /
            ``uncond`` are one-hot classes ``[B, 10]`` and zeros.

    Returns:
        dict: ``loss`` (scalar, differentiable), ``loss_per_example`` ``[B]`` and, detached, ``pred``,
        ``target``, ``x_t``, ``x_s``, ``t``, ``s``, ``boundary``, ``guidance`` ``[B]``.
    """
    _check_loss_inputs(latents, cond, teacher, uncond, loss_type)
    device, bsz = latents.device, latents.shape[0]
    x_0 = latents.float()
    if timesteps is None:  # 1. t and s on the grid; 2. the boundary of s's segment
        t, s = sample_timesteps(bsz, step_size=step_size, num_train_timesteps=num_train_timesteps,
                                sampler_timesteps=sampler_timesteps, sampler_prob=sampler_prob,
                                generator=generator, device=device)
    else:
        t, s = (_per_example(v, bsz, device) for v in timesteps)
    b = get_multi_boundary_timesteps(s, num_boundaries, num_train_timesteps)
    noise = (torch.randn(x_0.shape, generator=generator).to(device) if noise is None else noise).float()
    x_t = q_sample(x_0, t, scheduler, noise=noise)  # 3.
    w = _guidance_scales(guidance, bsz, generator).to(device)
    with torch.no_grad():  # 4. x_s: no gradient in either mode
        x_s = (get_xs_from_xt_naive(x_0, x_t, t, s, scheduler, noise=noise) if teacher is None
               else _teacher_point(teacher, x_t, t, s, cond, uncond, w, scheduler, autocast_dtype, model_class))
    target = _boundary_target(unet if target_model is None else target_model, target_weights, x_s, s, b, cond,
                             scheduler, autocast_dtype, model_class)  # 5.
    # The student's pass comes last: the teacher's adapter toggle and the EMA swap above change
    # parameters in place, which must not happen while the student's graph is alive.
    pred = predict_boundary(_fp32_eps(unet, autocast_dtype, model_class=model_class)(x_t, t, cond), x_t, t, b,
                            scheduler)
    per_example = _distance(pred - target, loss_type, huber_c)  # 6.
    return {"loss": per_example.mean(), "loss_per_example": per_example, "pred": pred.detach(),
            "target": target.detach(), "x_t": x_t.detach(), "x_s": x_s.detach(), "t": t, "s": s, "boundary": b,
            "guidance": w}


# ============================================================================================ DMD / DMD2
#
# Distribution matching distillation (Yin et al. 2024, arXiv 2311.18828; DMD2, arXiv 2405.14867), in LoRA form
# on ONE UNet, with three roles:
#
#   real score   the frozen base UNet (every adapter off) with CFG:   eps_real = eps_u + w (eps_c - eps_u)
#   fake score   a second LoRA adapter (``fake_adapter``), fitted to the generator's own samples
#   generator    the student's LoRA (``generator_adapter``): G(x, t) = x0-prediction of its eps at (x, t)
#
# A K-step generator runs on the timesteps tau = consistency_timesteps(K, K) (999/750/500/250 for K = 4), the
# same deterministic multistep sampler as the consistency students (cdlab.samplers.sample_consistency): from
# x_{tau_0} = z ~ N(0, I), x_{tau_{i+1}} = DDIM jump of eps_G(x_{tau_i}, tau_i) to tau_{i+1}, image = G at the
# last. Training uses DMD2's *backward simulation*: draw j ~ U{0..K-1}, run the generator itself (no grad) from
# z to x_{tau_j}, and train its output there, x_g = G(x_{tau_j}, tau_j) (with grad). K = 1: x_g = G(z, 999).
#
# Distribution matching (the generator's loss). Diffuse x_g: t ~ U[t_min, t_max], x_t = alpha_t x_g + sigma_t n.
# The KL gradient of DMD is E[(s_fake(x_t) - s_real(x_t)) dG/dtheta]; with s = -(x_t - alpha_t x0_hat)/sigma_t^2
# that is, per pixel and up to the positive factor alpha_t / sigma_t^2, proportional to
#
#     grad = (x0_fake - x0_real) / mean_{CHW} |x_g - x0_real|          (DMD eq. 8's normaliser)
#
# and it is applied through the surrogate  loss_dm = 0.5 * mean (x_g - sg[x_g - grad])^2, whose gradient with
# respect to x_g is grad / numel: descending it moves x_g towards what the real score denoises to and away from
# what the fake one does. Where the generator's distribution IS the data's, x0_fake = x0_real and grad = 0.
#
# The fake score's loss: the ordinary denoising loss on the generator's samples (detached),
#     t ~ U{0..T-1}, x_t = alpha_t sg[x_g] + sigma_t n,   loss_fake = mean (eps_fake(x_t, t, c) - n)^2,
# taken ``fake_steps`` times per generator step (DMD2's two time-scale update rule; 5 there).
#
# DMD2 drops DMD's regression loss by default; ``regression_weight > 0`` adds it back for comparison:
# loss_reg = mean (G(z, 999) - y)^2 on pairs (z, y) of the teacher's own ODE (DDIM with CFG from noise z).
# DMD itself measures that distance with LPIPS (Yin et al. 2024, eq. 6), a network this lab does not have for
# every world. ``regression_distance="l1"`` takes mean |G(z, 999) - y| instead: its gradient is the sign, so a
# pixel off by 0.03 is pulled back as hard as one off by 0.5, where the squared distance's pull on it is 2 x 0.03.
# The squared one leaves small, dense errors (a faint speckle over a black background) to the matching term.
#
# DMD2's GAN term (Yin et al. 2024b, §4.3), the one part of DMD that sees real images. A discriminator is a small
# head on the fake score's features (``gan = (feature_module, head)``: the fake UNet's layer whose output the head
# reads, a forward hook) at a diffused point. With softplus(a) = log(1 + e^a) (the non-saturating GAN loss):
#
#     generator:    loss_gan = mean softplus(-D(x_t(G)))             x_t(G) = alpha_t x_g + sigma_t n (with grad)
#     fake score:   loss_disc = mean softplus(D(x_t(sg[x_g]))) + mean softplus(-D(x_t(x_real)))
#
# so the generator is moved towards what the discriminator takes for real data, not only towards the teacher's
# distribution: DMD2's route past its teacher's FID. The generator's pass through the fake score trains neither
# the fake score nor the head (their parameters are frozen for it).
#
# A discriminator of its own (``gan`` an ``nn.Module``, ``D(x, c) -> logits``) judges the clean images instead, as
# ADD's does (Sauer et al. 2023, "Adversarial Diffusion Distillation", §3.2): the same two losses with x_g and
# x_real in place of their diffused points. It shares nothing with the fake score, so it can be as strong as it
# needs to be; the head above sees only what the fake score learns for denoising. ADD's own reads the features of
# a frozen pretrained network through trainable heads (the flow track's ``FeatureDiscriminator``): the generator's
# gradient flows through the frozen network to x_g, and nothing of it trains.

__all__ += ["dmd_gradient", "dmd_generator_loss", "dmd_fake_loss", "dmd_fake_updates", "first_noisy_timestep",
            "generator_sample", "gan_logits", "discriminate", "DMD_T_RANGE", "REGRESSION_DISTANCES"]

DMD_T_RANGE = (20, 980)  # DMD2's min_step / max_step: 0.02 T and 0.98 T
REGRESSION_DISTANCES = ("l2", "l1")  # DMD's regression: the squared distance, or the absolute one (notes above)


def dmd_gradient(x_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """DMD's per-sample gradient on the generator's output (module notes above): ``(x0_fake - x0_real)``
    divided by ``mean_CHW |x_g - x0_real|``. Returns ``grad`` and the ``normalizer`` ``[B, 1, 1, 1]``."""
    x_g, x0_real, x0_fake = x_g.float(), x0_real.float(), x0_fake.float()
    dims = tuple(range(1, x_g.ndim))
    normalizer = (x_g - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return {"grad": (x0_fake - x0_real) / normalizer, "normalizer": normalizer}


def generator_sample(
    unet: Any,
    noise: torch.Tensor,
    cond: torch.Tensor,
    scheduler: Any,
    *,
    gen_timesteps: Sequence[int],
    steps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad: bool = True,
    model_class: type[EpsModel] = EpsModel,
) -> dict[str, torch.Tensor]:
    """The generator's output with DMD2's backward simulation (module notes above).

    ``unet`` runs with the generator's adapter active (the caller's `adapter_role`). Each example draws
    its step j (``steps``, or ``U{0..K-1}`` with ``generator``), is carried from ``noise`` to ``x_{tau_j}`` by the
    generator's own deterministic jumps without gradient, and returns ``x_g = G(x_{tau_j}, tau_j)`` (with
    gradient when ``grad``). Returns ``x_g``, ``x_start`` (``x_{tau_j}``) and ``t_start`` (``tau_j``) ``[B]``.
    """
    device, bsz = noise.device, noise.shape[0]
    taus = [int(t) for t in gen_timesteps]
    if not taus or any(b >= a for a, b in zip(taus, taus[1:])):
        raise ValueError(f"gen_timesteps must be decreasing, got {taus}")
    k = len(taus)
    if steps is None:
        steps = torch.randint(0, k, (bsz,), generator=generator)
    steps = steps.to(device).long()
    x = noise.float()
    model = _fp32_eps(unet, autocast_dtype, model_class=model_class)
    with torch.no_grad():
        for i in range(k - 1):  # carry every example still below its own step one jump further
            move = steps > i
            if not bool(move.any()):
                break
            t = torch.full((bsz,), taus[i], device=device, dtype=torch.long)
            s = torch.full((bsz,), taus[i + 1], device=device, dtype=torch.long)
            nxt = predict_boundary(model(x, t, cond), x, t, s, scheduler)
            x = torch.where(move.view(-1, *([1] * (x.ndim - 1))), nxt, x)
    t_start = torch.as_tensor(taus, device=device)[steps]
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        x_g = predict_x0(model(x, t_start, cond), x, t_start, scheduler)
    return {"x_g": x_g, "x_start": x.detach(), "t_start": t_start}


def _scores_x0(unet: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float, scheduler: Any, fake_adapter: str, autocast_dtype: torch.dtype | None,
               model_class: type[EpsModel] = EpsModel) -> tuple[torch.Tensor, torch.Tensor]:
    """What the real score (the frozen base, every adapter off, with CFG) and the fake score (its adapter) denoise
    ``x_t`` to: ``(x0_real, x0_fake)``, without gradient."""
    with torch.no_grad():
        with adapter_role(unet, None):
            eps_real = _fp32_eps(unet, autocast_dtype, guidance, model_class)(x_t, t, cond,
                                                                             _expand_uncond(uncond, cond))
        x0_real = predict_x0(eps_real, x_t, t, scheduler)
        with adapter_role(unet, fake_adapter):
            x0_fake = predict_x0(_fp32_eps(unet, autocast_dtype, model_class=model_class)(x_t, t, cond), x_t, t,
                                 scheduler)
    return x0_real, x0_fake


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module):
    """Every parameter of ``modules`` without gradient inside the block (restored after): a pass that must move
    only its input (the generator's GAN term through the fake score and the discriminator's head)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gan_logits(unet: Any, gan: tuple[torch.nn.Module, torch.nn.Module], x_t: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor, scheduler: Any, *, fake_adapter: str = "fake",
               autocast_dtype: torch.dtype | None = None, model_class: type[EpsModel] = EpsModel
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD2's discriminator on diffused points ``x_t`` (module notes above): the fake score's pass (its adapter
    active) with ``gan = (feature_module, head)`` reading ``feature_module``'s output. Returns the logits ``[B]``
    and the fake score's eps (the same pass: its denoising loss needs no second one)."""
    feature_module, head = gan
    store: list[torch.Tensor] = []
    hook = feature_module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        with adapter_role(unet, fake_adapter):
            eps = _fp32_eps(unet, autocast_dtype, model_class=model_class)(x_t, t, cond)
    finally:
        hook.remove()
    if len(store) != 1:
        raise ValueError(f"the GAN's feature module ran {len(store)} times in one pass of the fake score, not once")
    return head(store[0].float()).reshape(-1), eps


def discriminate(unet: Any, gan: tuple[torch.nn.Module, torch.nn.Module] | torch.nn.Module, x: torch.Tensor,
                 t: torch.Tensor, noise: torch.Tensor | None, cond: torch.Tensor, scheduler: Any, **kw: Any
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GAN term's logits ``[B]`` on images ``x`` (module notes above), for either discriminator: one of its own
    (an ``nn.Module``) judges ``x`` itself, and the eps returned is None; DMD2's ``(feature_module, head)`` judges
    ``x`` diffused to ``t`` with ``noise`` (:func:`gan_logits`, ``kw`` its keywords), with the fake score's eps of
    that point."""
    if isinstance(gan, torch.nn.Module):
        return gan(x, cond).reshape(-1), None
    return gan_logits(unet, gan, q_sample(x, t, scheduler, noise=noise), t, cond, scheduler, **kw)


def _regression_loss(unet: Any, regression: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cond: torch.Tensor,
                     scheduler: Any, generator_adapter: str, t_first: int,
                     autocast_dtype: torch.dtype | None, model_class: type[EpsModel] = EpsModel,
                     distance: str = "l2") -> torch.Tensor:
    """DMD's regression term on teacher ODE pairs ``(z, y, c)``: ``mean (G(z, tau_0, c) - y)^2``, or with
    ``distance="l1"`` ``mean |G(z, tau_0, c) - y|`` (the notes above)."""
    if distance not in REGRESSION_DISTANCES:
        raise ValueError(f"regression distance must be one of {', '.join(REGRESSION_DISTANCES)}, got {distance!r}")
    z, y, c = regression
    device = cond.device
    with adapter_role(unet, generator_adapter):
        one = torch.full((z.shape[0],), int(t_first), device=device, dtype=torch.long)
        c = c.to(device=device, dtype=cond.dtype)
        z = z.to(device).float()
        y_hat = predict_x0(_fp32_eps(unet, autocast_dtype, model_class=model_class)(z, one, c), z, one, scheduler)
    error = y_hat - y.to(device).float()
    return error.abs().mean() if distance == "l1" else error.pow(2).mean()


def dmd_generator_loss(
    unet: Any, cond: torch.Tensor, scheduler: Any, *, uncond: torch.Tensor, guidance: float = 1.0,
    generator_adapter: str = "default", fake_adapter: str = "fake",
    gen_timesteps: Sequence[int] = (999,), t_range: tuple[int, int] = DMD_T_RANGE,
    noise: torch.Tensor | None = None, latent_shape: Sequence[int] | None = None,
    regression: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, regression_weight: float = 0.0,
    regression_distance: str = "l2",
    gan: tuple[torch.nn.Module, torch.nn.Module] | torch.nn.Module | None = None, gan_weight: float = 0.0,
    gan_range: tuple[float, float] | None = None, dm_weight: float = 1.0, steps: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
    model_class: type[EpsModel] = EpsModel,
) -> dict[str, torch.Tensor]:
    """The generator's DMD2 loss on one batch of conditions (module notes above for the equations).

    Args:
        unet: the UNet carrying both adapters; gradients reach the generator's adapter only (the real and fake
            passes run without gradient, through the surrogate's stop-gradient target).
        cond / uncond: text embeddings ``[B, L, D]`` and the unconditional ``[1 or B, L, D]`` (real score CFG).
        guidance (`float`): the real score's CFG scale w.
        gen_timesteps: the generator's timesteps tau (``[999]``: one step).
        t_range: the diffusion timesteps of the matching, ``U[t_min, t_max]``.
        noise / latent_shape: the generator's input z, or the shape to draw it (``[C, H, W]``).
        regression: optional ``(z, y, c)`` teacher ODE pairs (noise, the teacher's image latents from it, the
            caption embeddings); with ``regression_weight > 0`` adds ``weight * mean (G(z, 999, c) - y)^2``.
        regression_distance (`str`): ``"l2"`` (that squared distance) or ``"l1"`` (``mean |G(z, 999, c) - y|``).
        gan / gan_weight: DMD2's GAN term (module notes above): ``(feature_module, head)`` of the discriminator,
            and with ``gan_weight > 0`` adds ``gan_weight * mean softplus(-D(x_t(G)))`` at the matching's t and n;
            or a discriminator of its own ``D(x, c)``, and the term is ``mean softplus(-D(G(z), c))``.
        gan_range: ``(lo, hi)``: the discriminator judges the images as shown, ``clip(x_g, lo, hi)``. Real images
            never leave the data's range; unclipped, a generator value beyond it (a pixel below black) is a tell
            the discriminator learns, and the GAN term then pushes every such pixel back inside, where the clip
            would have shown it the same (on the flow track: grey backgrounds, docs/flow.md).
        dm_weight (`float`): the distribution-matching term's weight (1; 0 with a regression weight is the
            regression-only ablation: the same generator, sampler and pairs without DMD).
        steps / timesteps: the backward-simulation step per example and the matching t (tests).
        model_class: the eps model of ``unet`` (:class:`cdlab.flow.model.FlowModel` on a flow teacher, with
            ``scheduler`` its path, as in :func:`consistency_loss`).

    Returns:
        dict: ``loss`` (differentiable: ``dm_weight * loss_dm + regression_weight * loss_reg + gan_weight *
        loss_gan``), ``loss_dm``, ``loss_reg``, ``loss_gan``,
        and detached ``x_g``, ``grad``, ``normalizer``, ``x0_real``, ``x0_fake``, ``t``, ``t_start``.
    """
    device, bsz = cond.device, cond.shape[0]
    if noise is None:
        if latent_shape is None:
            raise ValueError("dmd_generator_loss: give noise or latent_shape")
        noise = torch.randn((bsz, *latent_shape), generator=generator).to(device)
    with adapter_role(unet, generator_adapter):
        sim = generator_sample(unet, noise, cond, scheduler, gen_timesteps=gen_timesteps, steps=steps,
                               generator=generator, autocast_dtype=autocast_dtype, model_class=model_class)
    x_g = sim["x_g"]
    lo, hi = int(t_range[0]), int(t_range[1])
    t = (torch.randint(lo, hi + 1, (bsz,), generator=generator).to(device) if timesteps is None
         else _per_example(timesteps, bsz, device))
    n = torch.randn(x_g.shape, generator=generator).to(device)
    with torch.no_grad():
        x_t = q_sample(x_g.detach(), t, scheduler, noise=n)
    x0_real, x0_fake = _scores_x0(unet, x_t, t, cond, uncond, guidance, scheduler, fake_adapter, autocast_dtype,
                                  model_class)
    g = dmd_gradient(x_g.detach(), x0_real, x0_fake)
    loss_dm = 0.5 * (x_g - (x_g.detach() - g["grad"])).pow(2).mean()
    loss_reg = torch.zeros((), device=device)
    if regression is not None and regression_weight > 0:
        loss_reg = _regression_loss(unet, regression, cond, scheduler, generator_adapter, gen_timesteps[0],
                                    autocast_dtype, model_class, regression_distance)
    loss_gan = torch.zeros((), device=device)
    if gan is not None and gan_weight > 0:
        trained = gan if isinstance(gan, torch.nn.Module) else gan[1]
        with _frozen(unet, trained):  # the generator's pass moves x_g only (through x_g's graph)
            shown = x_g if gan_range is None else x_g.clamp(*gan_range)
            logits, _ = discriminate(unet, gan, shown, t, n, cond, scheduler, fake_adapter=fake_adapter,
                                     autocast_dtype=autocast_dtype, model_class=model_class)
        loss_gan = torch.nn.functional.softplus(-logits).mean()
    return {
        "loss": float(dm_weight) * loss_dm + float(regression_weight) * loss_reg + float(gan_weight) * loss_gan,
        "loss_dm": loss_dm, "loss_reg": loss_reg, "loss_gan": loss_gan,
        "x_g": x_g.detach(), "grad": g["grad"], "normalizer": g["normalizer"],
        "x0_real": x0_real, "x0_fake": x0_fake, "x_t": x_t, "t": t, "t_start": sim["t_start"],
    }


def dmd_fake_updates(count: int, samples: tuple[torch.Tensor, torch.Tensor],
                     fresh: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     update: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """DMD2's two time-scale update rule (Yin et al. 2024b, §4.1): ``count`` fake-score updates per generator
    update, so that the fake score keeps up with the generator's distribution. The first runs on this step's
    ``samples`` ``(x_g, cond)``, each other on ``fresh()`` generator samples; ``update(x_g, cond)`` is one step of
    the fake score's optimiser on :func:`dmd_fake_loss` (the trainer's: it owns the optimiser). Returns the sum of
    the updates' losses."""
    total = 0.0
    for k in range(count):
        total += update(*(samples if k == 0 else fresh()))
    return total


def first_noisy_timestep(scheduler: Any) -> int:
    """The first timestep whose state holds noise (``alphas_cumprod < 1``): 0 on a diffusion schedule, 1 on the
    flow path (:data:`cdlab.flow.model.FLOW_SCHEDULE`, whose timestep 0 is t = 1, the data)."""
    ac = scheduler.alphas_cumprod
    return int((torch.as_tensor(ac) >= 1.0).sum())


def dmd_fake_loss(
    unet: Any,
    x_g: torch.Tensor,
    cond: torch.Tensor,
    scheduler: Any,
    *,
    fake_adapter: str = "fake",
    num_train_timesteps: int = 1000,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    model_class: type[EpsModel] = EpsModel,
    gan: tuple[torch.nn.Module, torch.nn.Module] | torch.nn.Module | None = None,
    real: torch.Tensor | None = None,
    gan_weight: float = 0.0,
    gan_range: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The fake score's denoising loss on the generator's samples (detached): ``mean (eps_fake(x_t) - n)^2``
    with ``t ~ U{t_0..T-1}``, ``t_0`` the first timestep that has noise (:func:`first_noisy_timestep`: 0 on SD1.5's
    schedule, 1 on the flow path, whose timestep 0 is the data itself and whose noise there cannot be predicted);
    gradients reach the fake adapter only. With ``gan`` and ``gan_weight > 0`` it also trains DMD2's discriminator
    (module notes above) on those points and on the ``real`` images diffused to the same t (the head's and the fake
    adapter's gradients), or a discriminator of its own (an ``nn.Module``) on ``x_g`` and ``real`` themselves:
    ``loss = loss_denoise + gan_weight * loss_disc``. ``gan_range``: the discriminator judges the samples as
    shown, clipped to the data's range (:func:`dmd_generator_loss`); the denoising loss stays on them as they are,
    the distribution the fake score must follow. Returns ``loss``, ``loss_denoise``,
    ``loss_disc``, ``t``, ``x_t``."""
    device, bsz = x_g.device, x_g.shape[0]
    x0 = x_g.detach().float()
    lo = first_noisy_timestep(scheduler)
    t = (torch.randint(lo, num_train_timesteps, (bsz,), generator=generator).to(device) if timesteps is None
         else _per_example(timesteps, bsz, device))
    n = (torch.randn(x0.shape, generator=generator).to(device) if noise is None else noise.float())
    x_t = q_sample(x0, t, scheduler, noise=n)
    loss_disc, eps = torch.zeros((), device=device), None
    if gan is not None and gan_weight > 0:
        if real is None or real.shape != x0.shape:
            raise ValueError(f"dmd_fake_loss: the GAN term needs real images of the samples' shape {tuple(x0.shape)}")
        kw = dict(fake_adapter=fake_adapter, autocast_dtype=autocast_dtype, model_class=model_class)
        shown = x0 if gan_range is None else x0.clamp(*gan_range)
        logits_fake, eps = discriminate(unet, gan, shown, t, n, cond, scheduler, **kw)  # DMD2's: eps of that pass
        if gan_range is not None:  # that pass saw the clipped samples: the denoising loss needs its own
            eps = None
        own = isinstance(gan, torch.nn.Module)  # its own judges the clean images: no noise for the real ones
        n_real = None if own else torch.randn(x0.shape, generator=generator).to(device)
        logits_real, _ = discriminate(unet, gan, real.float().to(device), t, n_real, cond, scheduler, **kw)
        sp = torch.nn.functional.softplus
        loss_disc = sp(logits_fake).mean() + sp(-logits_real).mean()
    if eps is None:  # no pass of the fake score yet
        with adapter_role(unet, fake_adapter):
            eps = _fp32_eps(unet, autocast_dtype, model_class=model_class)(x_t, t, cond)
    loss_denoise = (eps - n).pow(2).mean()
    return {"loss": loss_denoise + float(gan_weight) * loss_disc, "loss_denoise": loss_denoise,
            "loss_disc": loss_disc, "t": t, "x_t": x_t.detach()}
