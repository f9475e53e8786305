"""Flow matching, seed 003 part B §2: the path, the loss, class dropout, classifier-free guidance and Euler.

**The path** (§2, "the simplest approach would be a linear interpolation"). Noise ``x_0 ~ N(0, I)`` at
``t = 0``, a training image ``x_1`` at ``t = 1``::

    x_t = (1 - t) x_0 + t x_1                                              (interpolate)

Its velocity ``d x_t / dt = x_1 - x_0`` is the "flow" the UNet ``u_theta(x_t, t)`` learns (§2.2)::

    L = E_{x_0, x_1, t ~ U[0, 1]} || u_theta(x_t, t) - (x_1 - x_0) ||^2          (flow_matching_loss)

(Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 23 with sigma_min = 0; Liu et al. 2023,
"Flow Straight and Fast", eq. 1: rectified flow.) The loss here is the mean over pixels and images, as
``nn.MSELoss`` computes it.

**Class conditioning** (§2.4): ``u_theta(x_t, t, c)`` with a one-hot c, set to 0 with probability
``P_uncond = 0.1`` during training (:func:`drop_class`), so that the same network is also the unconditional
model. **Classifier-free guidance** (§2.6; Ho & Salimans 2022) with ``gamma = 5``::

    u = u_uncond + gamma (u_cond - u_uncond)                               (guided_velocity)

from one batched call of 2B (unconditional half first), as the lab's :class:`cdlab.models.EpsModel` does.

**Sampling** (§2.3, Euler's method on ``dx/dt = u``), from noise at t = 0 to an image at t = 1::

    x_{t + dt} = x_t + dt u_theta(x_t, t)                                  (sample_euler)

**Estimates along the path.** Given ``x_t`` and a velocity u, the straight line through them reaches::

    x̂_1 = x_t + (1 - t) u     (the data estimate: where the line is at t = 1)     (velocity_to_data)
    x̂_0 = x_t - t u           (the noise estimate: where it was at t = 0)         (velocity_to_noise)

exact when ``u = x_1 - x_0`` (the linear path). Euler's step from t to s is ``s x̂_1 + (1 - s) x̂_0``: the
point at s of that line, which is what DDIM's jump is on the VP path (:mod:`cdlab.flow.model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdlab.math import cfg_eps

__all__ = ["P_UNCOND", "GUIDANCE", "NUM_CLASSES", "ROWS", "SeedRecipe", "Velocity", "interpolate", "velocity_to_data",
           "velocity_to_noise", "one_hot", "drop_class", "training_inputs", "flow_matching_loss", "guided_velocity",
           "euler_timesteps", "sample_euler", "sample", "make_optimizer", "make_lr_scheduler", "train_step"]

P_UNCOND = 0.1      # §2.4: the class is dropped 10% of the time
GUIDANCE = 5.0      # §2.6: classifier-free guidance gamma
NUM_CLASSES = 10
# UNet rows a call when sampling many images on the CPU (a CFG image counts 2): the evaluation's and the reflow pairs'.
# A call of 400 rows spends 40% of its time in the kernel (page faults: its activations are fresh memory at every
# step, likely above glibc's mmap threshold): `python tools/flow_eval_rows.py --n 200 --rows 400 50` read 395 ms an
# image at 400 rows and 241 at 50 (1.64x), the samples equal bit for bit there (in eval() mode an image does not
# see the others of its call; other sizes can differ by float rounding: `--pairs --n 16 --rows 32 10` read 5.4e-7).
ROWS = 50

# velocity(x_t, t) -> u: t a [B] tensor in [0, 1]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SeedRecipe:
    """The seed's training and sampling settings for the flow UNets (§2.2, §2.5, §2.6).

    The seed's extracted text (``../shared/seeds/003_*.txt``) carries P_uncond = 0.1, gamma = 5, the
    exponential learning-rate scheduler and the epoch-1/5/10 deliverables; its training figures are images
    that did not survive extraction. The batch size, D, Adam's rate and the decay factor below are the course's
    published values for §2.2 as we know them (batch 64, D = 64, Adam 1e-2, ``gamma = 0.1 ** (1 / epochs)``),
    not checked against the seed's text: confirm them against the course page before quoting them. The
    CPU teacher departs from them (:mod:`cdlab.flow.train_teacher`, issue 24) and records its own settings.
    """

    num_hiddens: int = 64           # the UNet's D for §2 (§1.2's denoiser recommends 128)
    batch_size: int = 64
    lr: float = 1e-2                # Adam's initial learning rate
    num_epochs: int = 10            # the deliverables show epochs 1, 5 and 10
    lr_decay_to: float = 0.1        # ExponentialLR: the rate falls to 0.1 x lr over num_epochs
    p_uncond: float = P_UNCOND
    guidance: float = GUIDANCE
    num_steps: int = 50             # Euler steps of the sampler


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` times -> ``[B, 1, 1, 1]`` (broadcast over an image batch), in ``like``'s dtype."""
    return t.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x_0 + t x_1``: noise x_0 at t = 0, data x_1 at t = 1; ``t`` is ``[B]``."""
    t = _per_example(t, x1)
    return (1 - t) * x0 + t * x1


def velocity_to_data(x_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The data estimate ``x̂_1 = x_t + (1 - t) u``: follow the velocity from t to 1."""
    return x_t + (1 - _per_example(t, x_t)) * u


def velocity_to_noise(x_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The noise estimate ``x̂_0 = x_t - t u``: follow the velocity back from t to 0."""
    return x_t - _per_example(t, x_t) * u


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Integer labels ``[B]`` -> one-hot float vectors ``[B, num_classes]`` (§2.4's c)."""
    return F.one_hot(labels.long(), num_classes).float()


def drop_class(c: torch.Tensor, p_uncond: float = P_UNCOND, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free dropout (§2.4): each row of c set to 0 with probability ``p_uncond``."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    keep = torch.rand(c.shape[0], generator=generator) >= p_uncond
    return c * keep.to(device=c.device, dtype=c.dtype)[:, None]


def training_inputs(x1: torch.Tensor, c: torch.Tensor | None = None, *, x0: torch.Tensor | None = None,
                    t: torch.Tensor | None = None, p_uncond: float = P_UNCOND,
                    generator: torch.Generator | None = None) -> tuple[tuple, torch.Tensor]:
    """What the flow-matching loss feeds the network, and its target: ``((x_t, t, c), x_1 - x_0)``.

    ``x0`` ~ N(0, I) and ``t`` ~ U[0, 1) are drawn from ``generator`` (in that order) when not given, then the
    classes are dropped with ``p_uncond`` (§2.4). Arguments as in :func:`flow_matching_loss`.
    """
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    if t is None:
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype).to(x1.device)
    if c is not None and p_uncond > 0:
        c = drop_class(c, p_uncond, generator)
    return (interpolate(x0, x1, t), t, c), x1 - x0


def flow_matching_loss(unet: nn.Module, x1: torch.Tensor, c: torch.Tensor | None = None, *,
                       x0: torch.Tensor | None = None, t: torch.Tensor | None = None, p_uncond: float = P_UNCOND,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow-matching loss of §2.2, ``mean || u_theta(x_t, t, c) - (x_1 - x_0) ||^2``.

    Args:
        unet: ``unet(x_t, t, c) -> u`` (:class:`cdlab.flow.unet.UNet`).
        x1 (`torch.Tensor`): training images ``[B, 1, 28, 28]`` in ``[0, 1]``.
        c (`torch.Tensor`, *optional*): one-hot classes ``[B, 10]``, dropped with ``p_uncond`` (§2.4);
            ``None``: the time-conditioned model of §2.1.
        x0, t (`torch.Tensor`, *optional*): the noise ``[B, 1, 28, 28]`` and times ``[B]``; drawn
            (``N(0, I)`` and ``U[0, 1)``, from ``generator``) when not given.
        p_uncond (`float`): the class-dropout probability (0: keep every class).
    """
    inputs, target = training_inputs(x1, c, x0=x0, t=t, p_uncond=p_uncond, generator=generator)
    return F.mse_loss(unet(*inputs), target)


def guided_velocity(unet: nn.Module, c: torch.Tensor | None, guidance: float | None = GUIDANCE) -> Velocity:
    """The velocity the sampler follows, with classifier-free guidance (§2.6).

    ``u = u_uncond + gamma (u_cond - u_uncond)`` (:func:`cdlab.math.cfg_eps`: guidance is linear in the
    output, whatever it predicts), ``u_uncond`` and ``u_cond`` from ONE call on ``[x, x]`` with ``[0, c]``.
    ``c=None``, ``guidance=None`` or ``guidance == 1``: the network with c alone, one call (as
    :class:`cdlab.models.EpsModel` does).

    Raises:
        ValueError: the network is in train mode (its BatchNorms would mix the images of the batch).
    """
    if unet.training:
        raise ValueError("sample with the UNet in eval() mode: in train mode its BatchNorms use the batch's "
                         "statistics, so the images (and CFG's two halves) would change each other")
    if c is None or guidance is None or float(guidance) == 1.0:
        return lambda x, t: unet(x, t, c)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u_uncond, u_cond = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(c), c])).chunk(2)
        return cfg_eps(u_uncond, u_cond, guidance)

    return velocity


def euler_timesteps(num_steps: int) -> torch.Tensor:
    """``num_steps + 1`` evenly spaced times from 0 (noise) to 1 (data): 4 -> [0, 0.25, 0.5, 0.75, 1]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= 1000:
        raise ValueError(f"num_steps must be an integer in [1, 1000], got {num_steps!r}")
    return torch.linspace(0.0, 1.0, num_steps + 1)


@torch.no_grad()
def sample_euler(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor,
                 callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler's method on ``dx/dt = u`` (§2.3), k-diffusion style: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)``.

    Args:
        velocity: ``velocity(x, t) -> u`` (:func:`guided_velocity`), ``t`` a ``[B]`` tensor.
        x (`torch.Tensor`): the start at ``ts[0]`` (noise ``N(0, I)`` at t = 0).
        ts (`torch.Tensor`): increasing times (:func:`euler_timesteps`); ``len(ts) - 1`` steps.
        callback: ``callback(i, t_i, x̂_1)`` after step i's velocity, with its data estimate.
    """
    for i in range(len(ts) - 1):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=x.dtype, device=x.device)
        u = velocity(x, t)
        if callback is not None:
            callback(i, float(ts[i]), velocity_to_data(x, t, u))
        x = x + (ts[i + 1] - ts[i]).to(x.dtype) * u
    return x


@torch.no_grad()
def sample(unet: nn.Module, labels: torch.Tensor | None, num_steps: int = 50, guidance: float | None = GUIDANCE, *,
           num_samples: int | None = None, generator: torch.Generator | None = None, x0: torch.Tensor | None = None,
           batch_size: int | None = None) -> torch.Tensor:
    """Images from noise (§2.3 and §2.6): Euler over :func:`euler_timesteps` with :func:`guided_velocity`.

    Args:
        labels (`torch.Tensor`, *optional*): the classes ``[B]``; ``None``: unconditional, ``num_samples`` of them.
        generator: the noise ``x_0 ~ N(0, I)``.
        x0 (`torch.Tensor`, *optional*): the noise to start from instead (``[B, 1, 28, 28]``, any device).
        batch_size (`int`, *optional*): at most this many images a network pass (default: all at once).

    Returns:
        ``[B, 1, 28, 28]`` on the UNet's device, in the data's range (about ``[0, 1]``; not clipped).
    """
    c = None if labels is None else one_hot(labels, getattr(unet, "num_classes", NUM_CLASSES) or NUM_CLASSES)
    n = len(x0) if x0 is not None else (num_samples if c is None else c.shape[0])
    if n is None:
        raise ValueError("give labels or num_samples")
    if c is not None and c.shape[0] != n:
        raise ValueError(f"{c.shape[0]} labels for {n} noises")
    device = next(unet.parameters()).device
    if x0 is None:
        x0 = torch.randn((n, getattr(unet, "in_channels", 1), 28, 28), generator=generator)
    ts, bs = euler_timesteps(num_steps).to(device), batch_size or max(n, 1)
    return torch.cat([sample_euler(guided_velocity(unet, None if c is None else c[i:i + bs].to(device), guidance),
                                   x0[i:i + bs].to(device), ts) for i in range(0, n, bs)])


def make_optimizer(unet: nn.Module, lr: float = SeedRecipe.lr) -> torch.optim.Adam:
    """Adam on every parameter (§2.2)."""
    return torch.optim.Adam(unet.parameters(), lr=lr)


def make_lr_scheduler(opt: torch.optim.Optimizer, num_epochs: int = SeedRecipe.num_epochs,
                      decay_to: float = SeedRecipe.lr_decay_to) -> torch.optim.lr_scheduler.ExponentialLR:
    """The seed's exponential schedule: ``gamma = decay_to ** (1 / num_epochs)``, stepped once per epoch, so the
    rate reaches ``decay_to x lr`` after ``num_epochs`` (the seed's last deliverable asks to do without it)."""
    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay_to ** (1.0 / num_epochs))


def train_step(unet: nn.Module, opt: torch.optim.Optimizer, x1: torch.Tensor, c: torch.Tensor | None = None, *,
               p_uncond: float = P_UNCOND, generator: torch.Generator | None = None) -> float:
    """One optimisation step of :func:`flow_matching_loss` (in train mode); returns the loss."""
    unet.train()
    loss = flow_matching_loss(unet, x1, c, p_uncond=p_uncond, generator=generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
