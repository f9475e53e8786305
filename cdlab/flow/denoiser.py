"""The one-step denoiser of seed 003 part B, §1.2 ("Using the UNet to Train a Denoiser"), before flow matching.

**Noising** (§1.2): a clean image x in ``[0, 1]`` plus Gaussian noise of standard deviation sigma::

    z = x + sigma eps,   eps ~ N(0, I)                                     (add_noise)

The seed's figure shows ``sigma`` in :data:`SIGMAS` = (0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0).

**Training** (§1.2.1): the unconditional UNet (:class:`cdlab.flow.unet.UNet` with ``time_conditioned=False``,
``num_classes=0``) as a denoiser ``D_theta``, the L2 loss (the seed's eq. B.1) at sigma = 0.5, fresh noise on
every batch::

    L = E_{x, eps} || D_theta(x + sigma eps) - x ||^2                       (denoiser_loss)

§1.2.2 applies the sigma = 0.5 denoiser to the other sigmas (out of distribution).

**Denoising pure noise** (§1.2.3): the input is ``z = eps`` alone, independent of x. The best L2 prediction of x
from something independent of it is its mean, ``E[x]``: so the trained "generator" outputs (close to) the mean
image of the training set, the blur of all classes, whatever the noise. Flow matching (§2) fixes this by
moving in many small steps, each from a point that still carries information about the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SIGMA", "SIGMAS", "add_noise", "denoiser_loss"]

SIGMA = 0.5                                       # §1.2.1: the training noise level
SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)      # §1.2 and §1.2.2: the figure's noise levels


def add_noise(x: torch.Tensor, sigma: float, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``z = x + sigma eps`` (§1.2); ``noise`` is eps (drawn from ``generator`` when not given)."""
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + sigma * noise


def denoiser_loss(unet: nn.Module, x: torch.Tensor, sigma: float | None = SIGMA, *,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The seed's eq. B.1, ``mean || D(z) - x ||^2`` with ``z = x + sigma eps``; ``sigma=None``: ``z = eps``
    alone, §1.2.3's pure-noise denoiser (its optimum is the data's mean image)."""
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    z = noise if sigma is None else add_noise(x, sigma, noise)
    return F.mse_loss(unet(z), x)
