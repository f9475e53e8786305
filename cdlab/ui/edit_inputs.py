"""What the Edit tab's browser (or API caller) sends, checked field by field: the technique, the prompts, the
strength, the seed, the student steps, and the image editor's value turned into an image and a mask. Every
refusal is an `InputError` that names its field. No Gradio; PIL.

The image editor's value is ``{"background", "layers", "composite"}`` (PIL, RGBA):

* **SDEdit / image-to-image / sketches** edit the *composite* (the picture with whatever was painted on it,
  flattened on white): a drawing on an empty canvas is a sketch to project (§1.7.1), a rendered image with a
  new prompt is text-conditional image-to-image (§1.7.3);
* **inpainting** keeps the *background* and regenerates where any layer was painted (alpha > 0): the paint
  layer is the mask (§1.7.2);
* **anagrams and hybrids** take no image, only their two prompts (§1.8, §1.9).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageChops, UnidentifiedImageError

from cdlab.ui.compare import InputError, validate_request

TECHNIQUES = ("sdedit", "inpaint", "anagram", "hybrid")
# per technique: (label of the first prompt, label of the second or None); whether an image is used; whether strength is
PROMPTS = {
    "sdedit": ("Prompt (empty: project onto the images the teacher knows)", None),
    "inpaint": ("Prompt for the painted region", None),
    "anagram": ("Prompt upright", "Prompt flipped (upside down)"),
    "hybrid": ("Prompt seen from afar (low frequencies)", "Prompt seen up close (high frequencies)"),
}
USES_IMAGE = {"sdedit": True, "inpaint": True, "anagram": False, "hybrid": False}
USES_STRENGTH = {"sdedit": True, "inpaint": True, "anagram": False, "hybrid": False}
MAX_UPLOAD_SIDE = 4096      # px; a larger upload is refused before anything is resized
MIN_UPLOAD_SIDE = 8
MAX_ASPECT = 1.25           # the teachers are square: a clearly non-square upload is refused (crop it first)
MAX_LAYERS = 16             # paint layers in one editor value (the canvas offers one)
MAX_UPLOAD_BYTES = 20 * 2**20   # one image file (= the app's upload limit, hosting.MAX_FILE_SIZE "20mb")
MAX_UPLOAD_PIXELS = 2 * MAX_UPLOAD_SIDE ** 2  # all the images of one editor value together, read from headers
# Pillow refuses to open (DecompressionBombError) an image of more than twice this many pixels, anywhere in the
# process; Gradio opens uploads with its warnings silenced. Set by `cap_decoding`, when a page is built.
PILLOW_MAX_IMAGE_PIXELS = MAX_UPLOAD_SIDE ** 2


# ----------------------------------------------------------------------------- validation

def check_technique(technique: Any) -> str:
    if not isinstance(technique, str) or technique not in TECHNIQUES:
        raise InputError(f"technique: expected one of {', '.join(TECHNIQUES)}, got {str(technique)[:40]!r}.")
    return technique


def check_prompt(prompt: Any, field_name: str, allow_empty: bool) -> str:
    """The Compare checks (length, control characters) with the field named; empty allowed where it means
    the unconditional projection (SDEdit, inpainting)."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise InputError(f"{field_name}: must be text, got {type(prompt).__name__}.")
    if not prompt.strip():
        if allow_empty:
            return ""
        raise InputError(f"{field_name}: empty; type a prompt or pick a preset.")
    try:
        return validate_request(prompt, 0, 1.0, 4)[0]
    except InputError as e:
        raise InputError(f"{field_name}: {e}") from None


def check_strength(strength: Any) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise InputError(f"strength: must be a number from 0 to 1, got {str(strength)[:40]!r}.") from None
    if isinstance(strength, bool) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise InputError(f"strength: must be a number from 0 to 1, got {str(strength)[:40]!r}.")
    return s


def check_seed(seed: Any) -> int:
    try:
        return validate_request("x", seed, 1.0, 4)[1]
    except InputError as e:
        raise InputError(f"seed: {e}") from None


def check_steps(steps: Any) -> int | None:
    try:
        return validate_request("x", 0, 1.0, steps)[3]
    except InputError as e:
        raise InputError(f"student_steps: {e}") from None


# ----------------------------------------------------------------------------- before decoding

def cap_decoding() -> None:
    """Restore Pillow's decompression-bomb guard, at the upload limit: an image of more than twice
    `PILLOW_MAX_IMAGE_PIXELS` pixels is refused by ``Image.open`` itself, before its pixels are decoded."""
    Image.MAX_IMAGE_PIXELS = PILLOW_MAX_IMAGE_PIXELS


def upload_header(source: Any, what: str) -> tuple[int, int]:
    """The size (w, h) of an uploaded image (a path or bytes), from its header only: the file size and the
    pixels are checked before anything is decoded (``Image.open`` reads the header; the pixels wait for
    ``load``). Refuses, naming ``what``, a file over `MAX_UPLOAD_BYTES`, one that is not an image, and one
    over `MAX_UPLOAD_SIDE` px a side."""
    import io
    import os

    try:
        n = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
    except (OSError, TypeError):
        raise InputError(f"{what}: the upload cannot be read.") from None
    if n > MAX_UPLOAD_BYTES:
        raise InputError(f"{what}: {n / 2**20:.1f} MB is too large; at most {MAX_UPLOAD_BYTES // 2**20} MB.")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            w, h = im.size  # the header: no pixel decoded
    except Image.DecompressionBombError:
        raise InputError(f"{what}: far too many pixels; at most {MAX_UPLOAD_SIDE} px a side.") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{what}: not a readable image ({type(e).__name__}).") from None
    if max(w, h) > MAX_UPLOAD_SIDE:
        raise InputError(f"{what}: {w}×{h} px is too large; at most {MAX_UPLOAD_SIDE} px a side.")
    return w, h


def check_editor_payload(background: Any, layers: Any, composite: Any) -> None:
    """The image editor's raw value (paths or bytes, nothing decoded yet): at most `MAX_LAYERS` layers,
    counted before any is opened, then each image's header (`upload_header`) and all their pixels together
    (at most `MAX_UPLOAD_PIXELS`). Raises `InputError` naming the part."""
    layers = list(layers or [])
    if len(layers) > MAX_LAYERS:
        raise InputError(f"image: {len(layers)} layers; at most {MAX_LAYERS}.")
    parts = [("image (background)", background)] + [(f"image (layer {i + 1})", v) for i, v in enumerate(layers)]
    total = 0
    for what, source in parts + [("image (composite)", composite)]:
        if source is not None:
            w, h = upload_header(source, what)
            total += w * h
    if total > MAX_UPLOAD_PIXELS:
        raise InputError(f"image: {total} pixels in all; at most {MAX_UPLOAD_PIXELS} (background, layers and "
                         "composite together).")


def _as_pil(value: Any, what: str):
    """A PIL image from what the editor (PIL), the API (a path) or a test (numpy) gives; refuses the rest."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        im = value
    elif isinstance(value, str):
        upload_header(value, what)  # size and pixels before decoding
        try:
            with Image.open(value) as f:
                im = f.copy()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{what}: not a readable image ({type(e).__name__}).") from None
    else:
        if not isinstance(value, np.ndarray) or value.ndim not in (2, 3) or value.dtype != np.uint8:
            raise InputError(f"{what}: expected an image, got {type(value).__name__}.")
        im = Image.fromarray(value)
    w, h = im.size
    if max(w, h) > MAX_UPLOAD_SIDE:
        raise InputError(f"{what}: {w}×{h} px is too large; at most {MAX_UPLOAD_SIDE} px a side.")
    if min(w, h) < MIN_UPLOAD_SIDE:
        raise InputError(f"{what}: {w}×{h} px is too small; at least {MIN_UPLOAD_SIDE} px a side.")
    return im


def _flatten(im, background=(255, 255, 255)):
    """RGB of ``im``, transparent parts on ``background`` (the paper a sketch is drawn on)."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass
class EditInputs:
    """What the editor's value means for one technique: the image (``size`` px, RGB), the mask (``L``, 255 =
    regenerate) and notes for the user (e.g. that the upload was resized)."""

    image: Any = None
    mask: Any = None
    notes: list[str] = field(default_factory=list)


def editor_inputs(value: Any, technique: str, size: int) -> EditInputs:
    """Turn the image editor's value into the inputs of ``technique`` at ``size`` px, or refuse it clearly.

    ``value`` is ``{"background", "layers", "composite"}`` (PIL images, paths or None) or a single image.
    """
    technique = check_technique(technique)
    if not USES_IMAGE[technique]:
        return EditInputs()
    if value is None or (isinstance(value, dict) and not any(
            value.get(k) is not None for k in ("background", "composite")) and not value.get("layers")):
        raise InputError("image: no image; upload one, draw one, or pick a preset.")
    if isinstance(value, dict):
        unknown = set(value) - {"background", "layers", "composite", "id"}
        if unknown:
            raise InputError(f"image: unknown keys {sorted(unknown)}; expected background, layers, composite.")
        layers_in = value.get("layers") or []
        if not isinstance(layers_in, (list, tuple)) or len(layers_in) > MAX_LAYERS:  # counted before any is read
            raise InputError(f"image: layers must be a list of at most {MAX_LAYERS} images.")
        bg = _as_pil(value.get("background"), "image (background)")
        layers = [_as_pil(v, f"image (layer {i + 1})") for i, v in enumerate(layers_in)]
        layers = [x for x in layers if x is not None]
        comp = _as_pil(value.get("composite"), "image (composite)")
    else:
        bg, layers, comp = _as_pil(value, "image"), [], None
    ref = bg or comp or (layers[0] if layers else None)
    if ref is None:
        raise InputError("image: no image; upload one, draw one, or pick a preset.")
    w, h = ref.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"image: {w}×{h} px is not square; the teacher draws {size}×{size}. Crop it square first.")
    notes = []
    if (w, h) != (size, size):
        notes.append(f"The image ({w}×{h} px) was resized to the teacher's {size}×{size}.")

    def fit(im, resample):
        return im if im.size == (size, size) else im.resize((size, size), resample)

    out = EditInputs(notes=notes)
    if technique == "inpaint":
        if bg is None:
            raise InputError("image: inpainting needs a background image to keep (upload one or pick a preset); "
                             "paint the region to regenerate on top of it.")
        out.image = fit(_flatten(bg), Image.Resampling.BICUBIC)
        alpha = Image.new("L", bg.size, 0)
        for layer in layers:  # painted anywhere, in any layer: regenerate
            a = layer.convert("RGBA").getchannel("A")
            if a.size != alpha.size:
                a = a.resize(alpha.size, Image.Resampling.NEAREST)
            alpha = ImageChops.lighter(alpha, a)
        mask = fit(alpha.point(lambda v: 255 if v > 0 else 0), Image.Resampling.BOX).point(
            lambda v: 255 if v >= 128 else 0)
        lo, hi = mask.getextrema()
        if hi == 0:
            raise InputError("mask: empty; paint over the region to regenerate (the brush's layer is the mask).")
        if lo == 255:
            raise InputError("mask: covers the whole image; that is text-to-image, not inpainting. Leave some of "
                             "the image unpainted.")
        out.mask = mask
        return out
    base = comp if comp is not None else bg
    if base is None:  # only strokes: a sketch on white paper
        base = Image.new("RGBA", ref.size, (255, 255, 255, 255))
        for layer in layers:
            stroke = layer.convert("RGBA")
            if stroke.size != base.size:
                stroke = stroke.resize(base.size, Image.Resampling.NEAREST)
            base = Image.alpha_composite(base, stroke)
    out.image = fit(_flatten(base), Image.Resampling.BICUBIC)
    return out
