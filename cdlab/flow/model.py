"""The flow UNet as the lab's epsilon model: :class:`FlowModel`, a :class:`cdlab.models.EpsModel` whose network
predicts a flow velocity, so that the lab's samplers, losses and students (:mod:`cdlab.samplers`,
:mod:`cdlab.loss`) can run on a flow teacher.

**Two names for x_0.** The seed's flow (:mod:`cdlab.flow.matching`) goes from noise x_0 at t = 0 to data x_1 at
t = 1. The lab's VP process (:mod:`cdlab.math`) goes from data x_0 at timestep 0 to noise at timestep 999. In this
module "data" and "noise" are said in words.

**The map.** The flow's point ``x_t = t * data + (1 - t) * noise`` has the coefficients ``(t, 1 - t)``, whose
squares do not sum to 1. Divided by ``n(t) = sqrt(t^2 + (1 - t)^2)`` it is a VP point::

    x_vp = x_t / n(t) = alpha * data + sigma * noise,   alpha = t / n(t),  sigma = (1 - t) / n(t)

so the flow path IS a VP process with ``alphas_cumprod = t^2 / (t^2 + (1 - t)^2)`` once its states are rescaled
(Kingma et al. 2021, "Variational Diffusion Models": a process is defined by its signal-to-noise ratio,
here ``t^2 / (1 - t)^2``; Gao et al. 2024, "Diffusion meets Flow Matching"). The lab's integer timestep k maps
to flow time ``t = 1 - k / 1000`` (:func:`flow_time`): k = 0 is the data (t = 1, the lab's clean boundary),
k = 999 is t = 0.001. :data:`FLOW_SCHEDULE` holds that ``alphas_cumprod``.

:class:`FlowModel` takes the VP state, gives the UNet ``x_t = n(t) x_vp`` and the flow time, and turns its
velocity u into eps, the noise estimate ``eps = x_t - t u`` (:func:`cdlab.flow.matching.velocity_to_noise`).
With it DDIM's jump from k to k' is exactly Euler's step from t to t' (:mod:`cdlab.flow.matching`: both are
the point at t' of the straight line through x_t with slope u), up to float rounding; tests/test_flow.py
checks a whole sampling loop against Euler.

**Where the map stops: t = 0.** The seed's sampler starts at pure noise, t = 0, where ``alpha = 0``: DDIM's data
prediction ``(x_vp - sigma eps) / alpha`` divides by zero, and near t = 0 it divides rounding errors by a small
alpha. So the seed's Euler sampler stays flow-native (:func:`cdlab.flow.matching.sample_euler`, from t = 0, on
float times): it is the teacher's reference (Euler-50 with CFG) and the naive few-step baseline. The lab's
grid starts at k = 999 (t = 0.001), so the eps-world samplers treat pure noise as the state at t = 0.001: the
same approximation SD1.5 makes (its ``alphas_cumprod[999] = 0.0047`` is not 0 either). That is what students
need: consistency distillation noises data at k in 1..999 (:func:`cdlab.math.q_sample` on
:data:`FLOW_SCHEDULE` is the flow path, rescaled) and takes the teacher's DDIM step, an Euler step.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from cdlab.models import EpsModel, _timesteps

__all__ = ["NUM_TRAIN_TIMESTEPS", "FLOW_SCHEDULE", "flow_time", "vp_scale", "FlowModel"]

NUM_TRAIN_TIMESTEPS = 1000


def flow_time(k: torch.Tensor | int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The flow time ``t = 1 - k / T`` of the lab's integer timestep k (k = 0: data, t = 1)."""
    return 1.0 - torch.as_tensor(k, dtype=torch.float64) / num_train_timesteps


def vp_scale(t: torch.Tensor) -> torch.Tensor:
    """``n(t) = sqrt(t^2 + (1 - t)^2)``: the flow's ``x_t`` is ``n(t)`` times the VP state."""
    return (t ** 2 + (1 - t) ** 2).sqrt()


def _flow_schedule(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> SimpleNamespace:
    t = flow_time(torch.arange(num_train_timesteps), num_train_timesteps)
    return SimpleNamespace(alphas_cumprod=(t / vp_scale(t)) ** 2,
                           config=SimpleNamespace(num_train_timesteps=num_train_timesteps))


# The flow path as a VP schedule (``alphas_cumprod[k] = t^2 / (t^2 + (1 - t)^2)``, t = 1 - k / 1000), with the
# ``config.num_train_timesteps`` the lab's samplers read: the ``scheduler`` of a flow teacher.
FLOW_SCHEDULE = _flow_schedule()


class FlowModel(EpsModel):
    """A flow UNet ``unet(x_t, t, c) -> u`` as an epsilon model on :data:`FLOW_SCHEDULE` (the module's map).

    Args:
        unet: :class:`cdlab.flow.unet.UNet` (in eval mode to sample).
        guidance (`float`, *optional*): the CFG scale gamma; ``None``: the conditional network only.
        guide_at_one (`bool`): as :class:`cdlab.models.EpsModel`.

    ``model(x_vp, k, cond, uncond)``: ``cond`` the one-hot classes ``[B, 10]``, ``uncond`` zeros of that shape
    (the seed's dropped class); guidance combines the velocities (as eps, it is the same: eps is affine in u).
    """

    def __init__(self, unet: Any, guidance: float | torch.Tensor | None = None, *, guide_at_one: bool = False,
                 output_dtype: torch.dtype | None = None, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(unet, guidance, "epsilon", FLOW_SCHEDULE, output_dtype=output_dtype,
                         guide_at_one=guide_at_one, autocast_dtype=autocast_dtype)
        self.prediction_type = "flow_velocity"  # what the network predicts; to_eps below converts it

    def _flow(self, t: int | torch.Tensor, x: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow time ``[copies B]`` and ``n(t)`` shaped ``[copies B, 1, 1, 1]``, in x's dtype and device."""
        k = _timesteps(t, x, copies)
        if k.ndim == 0:
            k = k.expand(x.shape[0])
        tf = flow_time(k.cpu(), len(self.scheduler.alphas_cumprod)).to(device=x.device)
        return tf.to(x.dtype), vp_scale(tf).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))

    def _run(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The velocity at the flow point ``n(t) x_vp`` (x and t already stacked for CFG by the base class)."""
        tf, n = self._flow(t, x, 1)
        u = self.unet(n * x, tf, emb)
        return u if self.output_dtype is None else u.to(self.output_dtype)

    def to_eps(self, output: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """eps = the noise estimate ``x_t - t u`` at the flow point ``x_t = n(t) x_vp``."""
        tf, n = self._flow(t, x, 1)
        return n * x - tf.reshape(n.shape) * output
