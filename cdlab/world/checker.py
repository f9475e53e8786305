"""A deterministic reader of the embedded world's images: the world's stand-in for CLIP score.

It labels every pixel with its nearest palette colour, takes the background from the image
frame, and fits every (shape, size) template around the object by IoU. No learning, so it is
the same judge for the teacher, the naive few-step teacher and the students.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from cdlab.world.grammar import ATTRIBUTES, PALETTE, SHAPES, SIZES, Caption, parse_caption
from cdlab.world.render import CENTERS, IMAGE_SIZE, RADIUS

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
_SCALES = (0.88, 1.0, 1.12)
_OFFSETS = (-1.0, 0.0, 1.0)


@lru_cache(maxsize=8192)
def _template_masks(cx: float, cy: float, size: int) -> tuple[np.ndarray, list[tuple[str, str, float, float]]]:
    """Boolean masks [K, size, size] of every (shape, size, scale, centre offset) candidate."""
    sub = 2  # 2x2 samples per pixel, then a pixel is "in" when most of it is
    g = (np.arange(size * sub) + 0.5) / sub
    X, Y = np.meshgrid(g, g)
    scale = size / IMAGE_SIZE
    masks, meta = [], []
    for shape in SHAPES:
        for sz in SIZES:
            for sc in _SCALES:
                r = RADIUS[sz] * sc * scale
                for dx in _OFFSETS:
                    for dy in _OFFSETS:
                        x, y = X - (cx + dx * scale), Y - (cy + dy * scale)
                        if shape == "circle":
                            m = x * x + y * y <= r * r
                        elif shape == "square":
                            m = (np.abs(x) <= r) & (np.abs(y) <= r)
                        elif shape == "triangle":
                            m = (y <= r) & (np.abs(x) <= (y + r) / 2)
                        else:  # cross
                            a = r / 3.0
                            m = ((np.abs(x) <= a) & (np.abs(y) <= r)) | ((np.abs(y) <= a) & (np.abs(x) <= r))
                        m = m.reshape(size, sub, size, sub).mean(axis=(1, 3)) >= 0.5
                        masks.append(m)
                        meta.append((shape, sz, cx + dx * scale, cy + dy * scale))
    return np.stack(masks), meta


@dataclass
class Reading:
    """What the checker sees in one image."""

    color: str
    background: str
    shape: str
    size: str
    position: str
    iou: float

    def as_dict(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def read(image: Image.Image) -> Reading:
    """Read the five attributes off an image of the world."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    n = arr.shape[0]
    d = ((arr[:, :, None, :] - _RGB[None, None]) ** 2).sum(-1)
    labels = d.argmin(-1)
    frame = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(frame, minlength=len(_NAMES)).argmax())
    obj = labels != bg
    if obj.sum() == 0:
        return Reading("none", _NAMES[bg], "none", "none", "none", 0.0)
    counts = np.bincount(labels[obj], minlength=len(_NAMES))
    color = int(counts.argmax())
    ys, xs = np.nonzero(obj)
    # The bounding-box centre is the shape's centre for every shape (the triangle's centroid is not).
    cx = (xs.min() + xs.max() + 1) / 2.0
    cy = (ys.min() + ys.max() + 1) / 2.0
    masks, meta = _template_masks(cx, cy, n)
    inter = (masks & obj[None]).sum(axis=(1, 2))
    union = (masks | obj[None]).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    k = int(iou.argmax())
    shape, size, tx, ty = meta[k]
    fx, fy = tx / n, ty / n
    position = min(CENTERS, key=lambda p: (CENTERS[p][0] - fx) ** 2 + (CENTERS[p][1] - fy) ** 2)
    return Reading(_NAMES[color], _NAMES[bg], shape, size, position, float(iou[k]))


def check(image: Image.Image, caption: Caption | str) -> dict[str, bool]:
    """Which attributes of ``caption`` the image satisfies, e.g. ``{"color": True, ...}``."""
    if isinstance(caption, str):
        caption = parse_caption(caption)
    seen = read(image).as_dict()
    want = caption.as_dict()
    return {a: seen[a] == want[a] for a in ATTRIBUTES}


def adherence(images: list[Image.Image], captions: list[Caption | str]) -> dict[str, float]:
    """Fraction of images with every attribute right (``"all"``), and per attribute."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    results = [check(im, c) for im, c in zip(images, captions)]
    out = {a: float(np.mean([r[a] for r in results])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(r.values()) for r in results]))
    return out
