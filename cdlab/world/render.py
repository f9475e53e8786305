"""Pillow renderer of the embedded world."""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from cdlab.world.grammar import PALETTE, Caption

IMAGE_SIZE = 32
# Half-extent of the shape in pixels, before the per-seed jitter.
RADIUS = {"small": 5.0, "large": 8.5}
# Object centre as a fraction of the image side.
CENTERS = {
    "center": (0.5, 0.5),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of a shape centred at (cx, cy) with half-extent r; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        a = r / 3.0
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(caption: Caption, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``caption`` as an RGB image; ``seed`` jitters the exact centre and size."""
    rng = random.Random(seed)
    scale = size / IMAGE_SIZE
    # Drawn at 4x and downsampled, so edges are anti-aliased like a natural image.
    ss = 4
    img = Image.new("RGB", (size * ss, size * ss), PALETTE[caption.background])
    draw = ImageDraw.Draw(img)
    r = RADIUS[caption.size] * (1.0 + rng.uniform(-0.12, 0.12)) * scale
    fx, fy = CENTERS[caption.position]
    cx = fx * size + rng.uniform(-1.0, 1.0) * scale
    cy = fy * size + rng.uniform(-1.0, 1.0) * scale
    draw_shape(draw, caption.shape, cx * ss, cy * ss, r * ss, PALETTE[caption.color])
    return img.resize((size, size), Image.Resampling.BOX)
