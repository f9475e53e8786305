"""The UNet of seed 003, part B: §1.1 ("Implementing the UNet"), §2.1 (time conditioning) and §2.4 (class
conditioning), for 28x28 one-channel images.

The seed's text names the blocks; its figures (the course page's Figure 1, "Unconditional UNet", and Figure 2,
"Standard UNet Operations") give the layers, which this module follows. ``D`` is the seed's hidden dimension,
``num_hiddens`` here as in the course's starter code.

**The operations** (Figure 2), each keeping or halving/doubling the 28 -> 14 -> 7 resolution:

=================  ====================================================  ====================================
``Conv``           ``Conv2d(3, stride 1, pad 1) -> BN -> GELU``          same size, new channel count
``DownConv``       ``Conv2d(3, stride 2, pad 1) -> BN -> GELU``          halves H and W
``UpConv``         ``ConvTranspose2d(4, stride 2, pad 1) -> BN -> GELU`` doubles H and W
``Flatten``        ``AvgPool2d(7) -> GELU``                              7x7 -> 1x1 (the bottleneck vector)
``Unflatten``      ``ConvTranspose2d(7, stride 7, pad 0) -> BN -> GELU`` 1x1 -> 7x7
``ConvBlock``      ``Conv -> Conv``                                      deeper, same shape
``DownBlock``      ``DownConv -> ConvBlock``
``UpBlock``        ``UpConv -> ConvBlock``
``FCBlock``        ``Linear -> GELU -> Linear``                          a conditioning vector (§2.1)
=================  ====================================================  ====================================

**The network** (Figure 1), with the skip connections concatenated along channels::

    x [1, 28, 28] -> ConvBlock(1, D) ........................................ e0 [D, 28, 28]
    e0 -> DownBlock(D, D) ................................................... e1 [D, 14, 14]
    e1 -> DownBlock(D, 2D) .................................................. e2 [2D, 7, 7]
    e2 -> Flatten -> Unflatten(2D) .......................................... u0 [2D, 7, 7]
    [u0, e2] -> UpBlock(4D, D) .............................................. u1 [D, 14, 14]
    [u1, e1] -> UpBlock(2D, D) .............................................. u2 [D, 28, 28]
    [u2, e0] -> ConvBlock(2D, D) -> Conv2d(D, 1, 3, pad 1) .................. out [1, 28, 28]

**Conditioning.** ``t`` in ``[0, 1]`` (a ``[B]`` tensor, fed as ``[B, 1]``) goes through two FCBlocks,
``t1 = fc1_t(t)`` of size 2D and ``t2 = fc2_t(t)`` of size D, added where the seed injects it (§2.1)::

    u0 = u0 + t1            u1 = u1 + t2

With a one-hot class ``c`` (§2.4: "2 more FCBlocks", ``c1 = fc1_c(c)``, ``c2 = fc2_c(c)``), the class scales
and the time shifts::

    u0 = c1 * u0 + t1       u1 = c2 * u1 + t2

``c = 0`` (the seed's class dropout, ``P_uncond = 0.1``) is the unconditional model classifier-free guidance
needs; ``fc_c(0)`` is then a learned constant (its biases), not zero.
One class covers the seed's three networks: ``num_classes=0`` is the time-conditioned UNet of §2.1,
``time_conditioned=False`` (and no classes) the unconditional one-step denoiser of §1.1.

**BatchNorm.** Every operation but Flatten has a BatchNorm: in ``train()`` mode it normalises with the batch's
statistics, in ``eval()`` mode with its running averages. Sample in ``eval()`` mode: in train mode the images
of a batch (and CFG's conditional and unconditional halves) would change each other's outputs. An average of
the weights (EMA) cannot reuse the raw model's running statistics (they belong to other weights: in the issue's
sketch such an EMA fell to 0.13 class accuracy); recompute them for the averaged weights with
:func:`recalibrate_batchnorm`.

**Memory layout.** The lab runs the flow teacher with its convolution weights in channels-last order
(:func:`channels_last`, in ``cdlab.flow.train_teacher``: where a teacher is loaded and where its training
starts): on the CPU every convolution then skips a reordering of its input. Same weights, same maths, other
rounding (within 2e-5 of the default layout); about 1.1 to 1.4x the speed of a sampling pass and 1.15 to 1.4x
of a training step on this project's 2-core machine (``python tools/flow_layout.py``, docs/performance.md).
Weights are saved in the default layout.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["Conv", "DownConv", "UpConv", "Flatten", "Unflatten", "ConvBlock", "DownBlock", "UpBlock", "FCBlock",
           "DiscriminatorHead", "PixelDiscriminator", "UNet", "channels_last", "recalibrate_batchnorm"]


class _ConvBNGELU(nn.Sequential):
    """``conv -> BatchNorm2d -> GELU``: the shape of every operation of Figure 2 but Flatten."""

    def __init__(self, conv: nn.Module, out_channels: int) -> None:
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.GELU())


class Conv(_ConvBNGELU):
    """``Conv2d(3, 1, 1) -> BN -> GELU``: changes the channels, keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, 1, 1), out_channels)


class DownConv(_ConvBNGELU):
    """``Conv2d(3, 2, 1) -> BN -> GELU``: halves H and W (28 -> 14 -> 7)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, 2, 1), out_channels)


class UpConv(_ConvBNGELU):
    """``ConvTranspose2d(4, 2, 1) -> BN -> GELU``: doubles H and W (7 -> 14 -> 28)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1), out_channels)


class Flatten(nn.Sequential):
    """``AvgPool2d(7) -> GELU``: the 7x7 map to a 1x1 vector, the bottleneck."""

    def __init__(self) -> None:
        super().__init__(nn.AvgPool2d(7), nn.GELU())


class Unflatten(_ConvBNGELU):
    """``ConvTranspose2d(7, 7, 0) -> BN -> GELU``: the 1x1 bottleneck back to 7x7."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(nn.ConvTranspose2d(in_channels, in_channels, 7, 7, 0), in_channels)


class ConvBlock(nn.Sequential):
    """``Conv -> Conv``: more parameters at the same resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(Conv(in_channels, out_channels), Conv(out_channels, out_channels))


class DownBlock(nn.Sequential):
    """``DownConv -> ConvBlock``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(DownConv(in_channels, out_channels), ConvBlock(out_channels, out_channels))


class UpBlock(nn.Sequential):
    """``UpConv -> ConvBlock``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(UpConv(in_channels, out_channels), ConvBlock(out_channels, out_channels))


class FCBlock(nn.Sequential):
    """``Linear -> GELU -> Linear``: a conditioning vector (the time t, or a one-hot class c) to channels (§2.1)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` -> ``[B, C, 1, 1]``, to act on every pixel of a ``[B, C, H, W]`` map."""
    return v[:, :, None, None]


class UNet(nn.Module):
    """The seed's UNet, ``u_theta(x_t, t, c)`` (the module docstring has the diagram).

    Args:
        in_channels (`int`): image channels (1 for MNIST and Fashion-MNIST).
        num_hiddens (`int`): the seed's D (128 in §1.2, where the seed recommends it; smaller for a CPU).
        num_classes (`int`): the size of the one-hot class c (§2.4); 0: no class (the time-only UNet of §2.1).
        time_conditioned (`bool`): take t (§2.1); ``False``: the unconditional UNet of §1.1 (the denoiser).

    ``forward(x, t=None, c=None)``: ``x`` ``[B, in_channels, 28, 28]``; ``t`` ``[B]`` (or ``[B, 1]``) in
    ``[0, 1]``; ``c`` ``[B, num_classes]`` one-hot, rows of zeros (or ``c=None``, all zeros) unconditional.
    """

    def __init__(self, in_channels: int = 1, num_hiddens: int = 64, num_classes: int = 10,
                 time_conditioned: bool = True) -> None:
        super().__init__()
        if num_classes and not time_conditioned:
            raise ValueError("a class-conditioned UNet is time-conditioned too (§2.4 builds on §2.1)")
        d = num_hiddens
        self.in_channels, self.num_hiddens, self.num_classes = in_channels, d, num_classes
        self.time_conditioned = time_conditioned
        self.conv_in = ConvBlock(in_channels, d)
        self.down1 = DownBlock(d, d)
        self.down2 = DownBlock(d, 2 * d)
        self.flatten = Flatten()
        self.unflatten = Unflatten(2 * d)
        self.up1 = UpBlock(4 * d, d)
        self.up2 = UpBlock(2 * d, d)
        self.conv_out = ConvBlock(2 * d, d)
        self.head = nn.Conv2d(d, in_channels, 3, 1, 1)
        if time_conditioned:
            self.fc1_t, self.fc2_t = FCBlock(1, 2 * d), FCBlock(1, d)
        if num_classes:
            self.fc1_c, self.fc2_c = FCBlock(num_classes, 2 * d), FCBlock(num_classes, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"the UNet takes 28x28 images (7x7 at its bottleneck), got {tuple(x.shape)}")
        if (t is None) == self.time_conditioned:
            raise ValueError("give t exactly when the UNet is time-conditioned")
        if c is not None and not self.num_classes:
            raise ValueError("this UNet has no class conditioning (num_classes=0)")
        e0 = self.conv_in(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        u0 = self.unflatten(self.flatten(e2))
        u0 = self._inject(u0, t, c, self.fc1_t if t is not None else None, getattr(self, "fc1_c", None))
        u1 = self.up1(torch.cat([u0, e2], dim=1))
        u1 = self._inject(u1, t, c, self.fc2_t if t is not None else None, getattr(self, "fc2_c", None))
        u2 = self.up2(torch.cat([u1, e1], dim=1))
        return self.head(self.conv_out(torch.cat([u2, e0], dim=1)))

    def _inject(self, h: torch.Tensor, t: torch.Tensor | None, c: torch.Tensor | None,
                fc_t: nn.Module | None, fc_c: nn.Module | None) -> torch.Tensor:
        """``h + fc_t(t)`` (§2.1), or ``fc_c(c) * h + fc_t(t)`` (§2.4); c ``None`` is the zero (dropped) class."""
        if t is None:
            return h
        shift = _per_channel(fc_t(t.reshape(-1, 1).to(h.dtype)))
        if fc_c is None:
            return h + shift
        if c is None:
            c = h.new_zeros(h.shape[0], self.num_classes)
        return _per_channel(fc_c(c.to(h.dtype))) * h + shift


class DiscriminatorHead(nn.Sequential):
    """DMD2's discriminator head (Yin et al. 2024b, §4.3) for this UNet: it reads ``up1``'s output u1 ``[D, 14,
    14]``, the first map after the class and the time have been injected (the encoder before it sees neither),
    ``Conv2d(4, stride 2, pad 1) -> GELU -> Conv2d(7)`` to one logit, real versus generated
    (:func:`cdlab.loss.gan_logits` hooks ``unet.up1``)."""

    def __init__(self, num_hiddens: int) -> None:
        d = num_hiddens
        super().__init__(nn.Conv2d(d, d, 4, 2, 1), nn.GELU(), nn.Conv2d(d, 1, 7))


class PixelDiscriminator(nn.Module):
    """A discriminator of its own for the 28 x 28 images (``--disc pixel``; :mod:`cdlab.loss`'s notes): a
    class-conditional CNN on the clean image, ``D(x, c) -> [B]`` logits, real versus generated.

    ``x`` clamped to [0, 1] (what the user sees: the pipeline clamps) -> four ``Conv2d -> LeakyReLU(0.2)``
    (28 -> 28 -> 14 -> 7 -> 4) -> features phi ``[16 * width]`` -> ``w . phi + <E c, phi>``: the projection
    discriminator's class term (Miyato & Koyama 2018, "cGANs with Projection Discriminator", eq. 3), so that an
    image is judged as an image of its class. Every layer is spectrally normalised (Miyato et al. 2018, "Spectral
    Normalization for Generative Adversarial Networks"): D is about 1-Lipschitz, so its push on the generator
    stays bounded. No BatchNorm: real and generated images never meet in one normalisation."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [sn(nn.Conv2d(a, b, 3, 1, 1) if i == 0 else nn.Conv2d(a, b, 4 if i < 3 else 3, 2, 1)),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.linear = sn(nn.Linear(16 * chans[-1], 1))
        self.embed = sn(nn.Linear(num_classes, 16 * chans[-1], bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        phi = self.features(x.clamp(0, 1) * 2 - 1)
        return (self.linear(phi)[:, 0] + (self.embed(c.to(phi.dtype)) * phi).sum(1)).reshape(-1)



class FeatureDiscriminator(nn.Module):
    """A discriminator on a frozen network's features (``--disc features``): ADD's (Sauer et al. 2023,
    "Adversarial Diffusion Distillation", §3.2), after Projected GANs (Sauer et al. 2021, "Projected GANs Converge
    Faster"): ``D(x, c) -> [B]`` logits on the clean image, real versus generated.

    ``stages``: a frozen feature network cut in pieces, each reading the one before (a classifier trained on the
    real training images, :meth:`cdlab.flow.classifier.Classifier.stages`: 32 x 14 x 14, 64 x 7 x 7, then 128-d),
    ``shapes`` their outputs' (channels, side; side 0 a vector). Each has a small trainable head (spectrally
    normalised strided convolutions down to 4 x 4, then flattened; a vector as it is) that judges it with the
    projection discriminator's class term, ``w . phi + <E c, phi>`` (as :class:`PixelDiscriminator`); D's logit
    is the sum over the stages::

        D(x, c) = sum_k  w_k . phi_k + <E_k c, phi_k>,    phi_k = head_k(F_k(x)),  F_k = stage_k o ... o stage_1

    The frozen network already tells a garment's shape and texture from the first step, where a discriminator
    learnt from scratch on a few thousand CPU steps stays near chance (DMD2's head read 59 to 64%; this one 77%
    after 200 steps, docs/flow.md). Its weights never train, and its BatchNorms keep their statistics
    (``train()`` leaves the stages in eval mode); the generator's gradient still flows through them to the image. It must not be the network the evaluation scores with
    (:func:`cdlab.flow.distill.make_discriminator` refuses the judge)."""

    def __init__(self, stages: Iterable[nn.Module], shapes: Iterable[tuple[int, int]], num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.stages = nn.ModuleList(stages)
        self.stages.requires_grad_(False)
        heads, sizes = [], []
        for channels, side in shapes:  # (channels, side) of each stage's output; side 0: a vector
            layers: list[nn.Module] = []
            while side > 4:  # strided 3 x 3 convolutions: 14 -> 7 -> 4, 7 -> 4
                layers += [sn(nn.Conv2d(channels, width, 3, 2, 1)), nn.LeakyReLU(0.2)]
                channels, side = width, (side + 1) // 2
            heads.append(nn.Sequential(*layers, nn.Flatten()))
            sizes.append(channels * max(side, 1) ** 2)
        self.heads = nn.ModuleList(heads)
        self.linears = nn.ModuleList(sn(nn.Linear(n, 1)) for n in sizes)
        self.embeds = nn.ModuleList(sn(nn.Linear(num_classes, n, bias=False)) for n in sizes)
        self.stages.eval()

    def train(self, mode: bool = True) -> "FeatureDiscriminator":
        super().train(mode)
        self.stages.eval()  # the frozen network's BatchNorm statistics are the real data's: never updated
        return self

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h, logits = x.clamp(0, 1), 0
        c = c.to(x.dtype)
        for stage, head, linear, embed in zip(self.stages, self.heads, self.linears, self.embeds):
            h = stage(h)
            phi = head(h)
            logits = logits + linear(phi)[:, 0] + (embed(c) * phi).sum(1)
        return logits.reshape(-1)


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels-last order (``memory_format=torch.channels_last``), in place:
    the layout the lab samples and trains the UNet in (the module docstring says why). Adapters attached after
    keep theirs."""
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple]) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance for the model's current weights (an EMA's), as
    ``torch.optim.swa_utils.update_bn`` does: reset them, run ``model(*args)`` in train mode over ``batches``
    with a cumulative average (``momentum=None``), then restore the momenta and put the model in eval mode.

    Args:
        model: the network (its weights are not changed, only its BatchNorm buffers).
        batches: argument tuples of ``model``, e.g. ``(x_t, t, c)`` drawn as training draws them.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for args in batches:
        model(*args)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
