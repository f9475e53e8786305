"""The epsilon model: the one place the network is called for a noise prediction.

Every sampler (:mod:`cdlab.samplers`), every edit technique (:mod:`cdlab.edit`) and every training loss
(:mod:`cdlab.loss`: the CD teacher, DMD's real and fake scores, the student) calls the UNet through
:class:`EpsModel`::

    model = EpsModel(unet, guidance=7.5)
    eps = model(x_t, t, cond, uncond)      # one batched UNet call of 2B, uncond first
    model.nfe                              # 2: network evaluations per image so far

**Classifier-free guidance** (Ho & Salimans 2022): ``eps = eps_u + w (eps_c - eps_u)``
(:func:`cdlab.math.cfg_eps`), ``eps_u`` and ``eps_c`` from ONE call on ``[x, x]`` with ``[uncond, cond]``,
as diffusers' pipelines batch it. Without ``uncond``, or with ``w == 1``, the model is the conditional
network alone (1 NFE).

**Prediction types.** The network may predict something other than eps; :meth:`EpsModel.to_eps` converts
its (guided) output to eps on the VP process ``x_t = alpha_t x_0 + sigma_t eps`` of :mod:`cdlab.math`:

=================  =========================================================================================
``"epsilon"``      the output is eps (the tiny teacher, SD1.5).
``"v_prediction"`` ``v = alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022, §4): ``eps = sigma_t x_t + alpha_t v``.
``"sample"``       the output is x_0: ``eps = (x_t - alpha_t x_0) / sigma_t``.
=================  =========================================================================================

A teacher on another process (e.g. a flow-matching velocity ``u = x_1 - x_0`` on
``x_t = (1 - t) x_0 + t x_1``, noise x_0 to data x_1) is one subclass that overrides :meth:`EpsModel.to_eps`
and :meth:`EpsModel.to_x0` (there ``x_1 = x_t + (1 - t) u`` and the noise is ``x_t - t u``); the samplers,
techniques and losses only ever see eps. On that linear path the DDIM jump of :mod:`cdlab.samplers` from t
to s is exactly Euler's step ``x_s = x_t + (s - t) u``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from cdlab.math import alpha_sigma, cfg_eps, predict_x0

__all__ = ["EpsModel", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class EpsModel:
    """A network as an epsilon model ``model(x_t, t, cond, uncond=None) -> eps``, counting its evaluations.

    Args:
        unet: ``unet(x, t, encoder_hidden_states=emb).sample`` (a diffusers UNet; a student active on it).
        guidance (`float` or `torch.Tensor`, *optional*): the CFG scale w, or one per example (``[B]``). ``None``
            (a student, guidance distilled in): the conditional network only.
        prediction_type (`str`): what the network predicts, one of :data:`PREDICTION_TYPES`.
        scheduler: the schedule (``alphas_cumprod``); needed by every prediction type but ``"epsilon"``.
        autocast_dtype (`torch.dtype`, *optional*): run the network under ``torch.autocast`` in this dtype
            (fp16/bf16 training); ``None`` or fp32: no autocast.
        output_dtype (`torch.dtype`, *optional*): cast the network's output to this dtype (the losses compute in
            fp32); ``None``: the network's own dtype.
        guide_at_one (`bool`): also run the batched CFG call when every w is 1. By default ``w == 1`` is the
            conditional network alone (1 NFE), as diffusers' pipelines do; the training losses' teachers draw w
            per example and always guide, so their eps is ``eps_u + w (eps_c - eps_u)`` for every w.

    ``nfe`` counts network evaluations per image: a guided call counts 2. Gradients flow when the caller's
    context enables them (the samplers run under ``torch.no_grad``, a student's training pass does not).
    """

    prediction_type: str = "epsilon"

    def __init__(self, unet: Any, guidance: float | torch.Tensor | None = None, prediction_type: str = "epsilon",
                 scheduler: Any = None, *, autocast_dtype: torch.dtype | None = None,
                 output_dtype: torch.dtype | None = None, guide_at_one: bool = False) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != "epsilon" and scheduler is None:
            raise ValueError(f"prediction_type {prediction_type!r} needs the scheduler (alphas_cumprod)")
        self.unet = unet
        self.guidance = guidance
        self.prediction_type = prediction_type
        self.scheduler = scheduler
        self.autocast_dtype = autocast_dtype
        self.output_dtype = output_dtype
        self.guided = guidance is not None and (guide_at_one or _differs_from_one(guidance))
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
        """eps at ``(x_t, t)``: ``t`` an int, a 0-d or a ``[B]`` tensor; ``cond``/``uncond`` ``[B, L, D]``."""
        return self.to_eps(self.network_output(x, t, cond, uncond), x, t)

    def network_output(self, x: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output at ``(x_t, t)``, guided (one batched call of 2B, uncond first) when the model
        guides and ``uncond`` is given. Guidance combines the raw outputs, which is linear in each type."""
        if self.guided and uncond is not None:
            out_u, out_c = self._run(torch.cat([x, x]), _timesteps(t, x, 2), torch.cat([uncond, cond])).chunk(2)
            self.nfe += 2
            return cfg_eps(out_u, out_c, self.guidance)
        self.nfe += 1
        return self._run(x, _timesteps(t, x, 1), cond)

    def to_eps(self, output: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The network's output as eps (the module's table); the override point of another process."""
        if self.prediction_type == "epsilon":
            return output
        alpha_t, sigma_t = alpha_sigma(_timesteps(t, x, 1), self.scheduler, x)
        if self.prediction_type == "v_prediction":
            return sigma_t * x + alpha_t * output
        return (x - alpha_t * output) / sigma_t

    def to_x0(self, eps: torch.Tensor, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The x_0 prediction of eps: ``x_0 = (x_t - sigma_t eps) / alpha_t`` (:func:`cdlab.math.predict_x0`)."""
        return predict_x0(eps, x, _timesteps(t, x, 1), self.scheduler)

    def _run(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        autocast = (contextlib.nullcontext() if self.autocast_dtype in (None, torch.float32)
                    else torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype))
        with autocast:
            out = self.unet(x, t, encoder_hidden_states=emb).sample
        return out if self.output_dtype is None else out.to(self.output_dtype)


def _differs_from_one(guidance: float | torch.Tensor) -> bool:
    if isinstance(guidance, torch.Tensor) and guidance.ndim > 0:
        return bool((guidance != 1.0).any())
    return float(guidance) != 1.0


def _timesteps(t: int | torch.Tensor, x: torch.Tensor, copies: int) -> torch.Tensor:
    """The UNet's timestep argument for ``copies`` stacked batches of ``x``: an int becomes a ``[copies B]`` long
    tensor; a 0-d tensor (a diffusers scheduler's timestep) is passed as is; a ``[B]`` tensor is repeated."""
    if not isinstance(t, torch.Tensor):
        return torch.full((copies * x.shape[0],), int(t), dtype=torch.long, device=x.device)
    if t.ndim == 0 or copies == 1:
        return t
    return torch.cat([t] * copies)
