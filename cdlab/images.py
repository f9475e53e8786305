"""Images in and out of a teacher: PIL images or tensors in [-1, 1] -> checked batches, pixel masks, and the
VAE's encode (images -> scaled latents) and decode (scaled latents -> images in [0, 1]).

Inputs are validated with ``ValueError`` messages that name the field (``what``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from cdlab.metrics import tensor_to_pil

__all__ = ["image_to_tensor", "mask_to_tensor", "encode_image", "decode_unit", "to_pil"]


def image_to_tensor(image: Any, size: int, what: str = "image", resize: bool = True) -> torch.Tensor:
    """A PIL image or a tensor in [-1, 1] (``[3, H, W]`` or ``[B, 3, H, W]``) -> ``[B, 3, size, size]`` float32.

    A PIL image of another size is resized (bicubic) when ``resize``; a tensor of another size is refused
    (resizing it is the caller's choice). ``ValueError`` names ``what``."""
    if image is None:
        raise ValueError(f"{what}: no image given")
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        im = image.convert("RGB")
        if im.size != (size, size):
            if not resize:
                raise ValueError(f"{what}: {im.size[0]}x{im.size[1]} px, expected {size}x{size}")
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        return arr / 127.5 - 1.0
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{what}: expected a PIL image or a tensor in [-1, 1], got {type(image).__name__}")
    x = image.detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected a tensor [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    if tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{what}: {x.shape[-1]}x{x.shape[-2]} px, expected {size}x{size} "
                         "(resize the tensor, or pass a PIL image, which is resized)")
    if not torch.isfinite(x).all() or x.min() < -1.0 - 1e-4 or x.max() > 1.0 + 1e-4:
        raise ValueError(f"{what}: tensor values must be finite and in [-1, 1]")
    return x.clamp(-1, 1)


def mask_to_tensor(mask: Any, size: int, what: str = "mask", *, allow_full: bool = False) -> torch.Tensor:
    """A mask (PIL, numpy or tensor ``[H, W]`` / ``[B, 1, H, W]``; > 0.5 = regenerate) -> ``[B, 1, size, size]``
    in {0, 1}. A PIL mask of another size is resized (nearest). Refuses an empty mask (nothing to inpaint)
    and, unless ``allow_full``, one covering every pixel (that is text-to-image)."""
    if mask is None:
        raise ValueError(f"{what}: no mask given")
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        m = mask.convert("L")
        if m.size != (size, size):
            m = m.resize((size, size), Image.Resampling.NEAREST)
        t = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask.detach().cpu()).float()
    else:
        raise ValueError(f"{what}: expected a PIL image, an array or a tensor, got {type(mask).__name__}")
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None] if t.shape[0] != 1 else t[None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{what}: expected [H, W] or [B, 1, H, W], got {tuple(t.shape)}")
    if tuple(t.shape[-2:]) != (size, size):
        raise ValueError(f"{what}: {t.shape[-1]}x{t.shape[-2]}, expected {size}x{size}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: has non-finite values")
    t = (t > 0.5).float()
    if not t.flatten(1).any(1).all():
        raise ValueError(f"{what}: empty (no pixel > 0.5): nothing to inpaint")
    if not allow_full and t.flatten(1).all(1).any():
        raise ValueError(f"{what}: covers the whole image: that is text-to-image, not inpainting")
    return t


@torch.no_grad()
def encode_image(teacher: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents ``vae.encode(x).latent_dist.mean * scaling_factor`` (deterministic); a
    teacher without a VAE (the flow teacher, whose samples are pixels) maps them itself (``encode_pixels``)."""
    if not hasattr(teacher, "vae"):
        return teacher.encode_pixels(images)
    vae = teacher.vae
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return z.to(teacher.device, teacher.dtype)


@torch.no_grad()
def decode_unit(teacher: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> float32 images in [0, 1], ``[B, 3, H, W]`` (a teacher without a VAE: ``decode_pixels``)."""
    if not hasattr(teacher, "vae"):
        return teacher.decode_pixels(latents)
    vae = teacher.vae
    img = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_pil(pixels: torch.Tensor) -> list:
    """Images in [0, 1], ``[B, 3, H, W]`` -> a list of PIL images (`cdlab.metrics.tensor_to_pil`)."""
    return tensor_to_pil(pixels)
