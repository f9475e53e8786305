"""The Edit tab: the course's editing loops (SDEdit, sketches, inpainting, anagrams, hybrids) with the teacher
and its students side by side. Logic only (no Gradio): :func:`cdlab.edit.edit` does the sampling; this module
validates what the browser sends, turns the image editor's value into an image and a mask, offers presets
and lays the result out as Compare does.

The image editor's value is ``{"background", "layers", "composite"}`` (PIL, RGBA):

* **SDEdit / image-to-image / sketches** edit the *composite* (the picture with whatever was painted on it,
  flattened on white): a drawing on an empty canvas is a sketch to project (§1.7.1), a rendered image with a
  new prompt is text-conditional image-to-image (§1.7.3);
* **inpainting** keeps the *background* and regenerates where any layer was painted (alpha > 0): the paint
  layer is the mask (§1.7.2);
* **anagrams and hybrids** take no image, only their two prompts (§1.8, §1.9).

On the tiny teacher the canvas is the world's 32×32 (shown large and pixelated) and every column says what the
world's checker reads off it, so a class sees at once which column did the edit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cdlab.columns import STUDENT_STEPS, TEACHER_4, TEACHER_50
from cdlab.ui.compare import InputError, is_tiny, validate_request

TECHNIQUES = ("sdedit", "inpaint", "anagram", "hybrid")
TECHNIQUE_LABELS = {
    "sdedit": "SDEdit: image or sketch → prompt",
    "inpaint": "Inpaint: repaint the painted region",
    "anagram": "Visual anagram: upright and flipped",
    "hybrid": "Hybrid image: far and near",
}
# (label of the first prompt, label of the second or None, whether an image is used, whether strength is)
PROMPTS = {
    "sdedit": ("Prompt (empty: project onto the images the teacher knows)", None),
    "inpaint": ("Prompt for the painted region", None),
    "anagram": ("Prompt upright", "Prompt flipped (upside down)"),
    "hybrid": ("Prompt seen from afar (low frequencies)", "Prompt seen up close (high frequencies)"),
}
USES_IMAGE = {"sdedit": True, "inpaint": True, "anagram": False, "hybrid": False}
USES_STRENGTH = {"sdedit": True, "inpaint": True, "anagram": False, "hybrid": False}
DEFAULT_STRENGTH = {"sdedit": 0.6, "inpaint": 1.0, "anagram": 1.0, "hybrid": 1.0}
MAX_UPLOAD_SIDE = 4096      # px; a larger upload is refused before anything is resized
MIN_UPLOAD_SIDE = 8
MAX_ASPECT = 1.25           # the teachers are square: a clearly non-square upload is refused (crop it first)
LEGEND = (
    "**input**: what SDEdit and inpainting start from (noised to the strength's timestep) · **teacher-50**: DDIM, "
    "50 steps at strength 1, CFG · **teacher-4**: the same naively at 4 · **students**: distilled LoRAs (CT, CD, "
    "MBCD, DMD) from the boundary at or above the strength's timestep · anagrams show the image and its flip, hybrids the image "
    "and its far (blurred) view · **reads** (tiny world): what the checker sees, ✓ when it is what was asked"
)


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


def check_steps(steps: Any) -> int:
    try:
        return validate_request("x", 0, 1.0, steps)[3]
    except InputError as e:
        raise InputError(f"student_steps: {e}") from None


def _as_pil(value: Any, what: str):
    """A PIL image from what the editor (PIL), the API (a path) or a test (numpy) gives; refuses the rest."""
    from PIL import Image, UnidentifiedImageError

    if value is None:
        return None
    if isinstance(value, Image.Image):
        im = value
    elif isinstance(value, str):
        try:
            with Image.open(value) as f:
                if max(f.size) > MAX_UPLOAD_SIDE:
                    raise InputError(f"{what}: {f.size[0]}×{f.size[1]} px is too large; at most "
                                     f"{MAX_UPLOAD_SIDE} px a side.")
                im = f.copy()
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{what}: not a readable image ({type(e).__name__}).") from None
    else:
        import numpy as np

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
    from PIL import Image

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
    from PIL import Image, ImageChops

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
        bg = _as_pil(value.get("background"), "image (background)")
        layers_in = value.get("layers") or []
        if not isinstance(layers_in, (list, tuple)) or len(layers_in) > 16:
            raise InputError("image: layers must be a list of at most 16 images.")
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


# ----------------------------------------------------------------------------- presets

@dataclass
class EditPreset:
    """One click's worth of Edit inputs: the technique, the prompts, the strength and the editor's value."""

    name: str
    technique: str
    prompt: str
    prompt_2: str = ""
    strength: float = 1.0
    seed: int = 0
    background: Any = None  # PIL
    layer: Any = None  # PIL RGBA: the painted mask (inpainting)

    def editor_value(self) -> dict | None:
        if self.background is None:
            return None
        return {"background": self.background, "layers": [self.layer] if self.layer is not None else [],
                "composite": _composite(self.background, self.layer)}


def _composite(bg, layer):
    from PIL import Image

    if layer is None:
        return bg.convert("RGBA")
    return Image.alpha_composite(bg.convert("RGBA"), layer)


def _mask_layer(mask, color=(255, 0, 255, 150)):
    """A paint layer (RGBA) from a mask tensor ``[1, 1, H, W]``: the brush strokes a user would paint."""
    import numpy as np
    from PIL import Image

    m = mask[0, 0].numpy() > 0.5
    arr = np.zeros(m.shape + (4,), dtype=np.uint8)
    arr[m] = color
    return Image.fromarray(arr, "RGBA")


def presets(teacher: Any) -> list[EditPreset]:
    """Presets that make every technique work in one click: on the tiny teacher from rendered world images
    (the cases `python -m cdlab evaluate --edit` measures); on SD1.5 the course's anagram and hybrid prompts and
    a drawn sketch."""
    from cdlab.world import Caption, render

    if is_tiny(teacher):
        from cdlab.edit_eval import inpaint_mask, scribble

        size = int(teacher.resolution)
        factor = int(getattr(teacher.pipe, "vae_scale_factor", 4))
        src = Caption("large", "red", "circle", "center", "white")
        sk = Caption("large", "green", "square", "top left", "black")
        ip = Caption("large", "blue", "triangle", "center", "yellow")
        return [
            EditPreset("SDEdit: a red circle becomes blue", "sdedit", src.text.replace("red", "blue"),
                       strength=0.6, background=render(src, 1, size)),
            EditPreset("Sketch → image: a scribbled green square", "sdedit", sk.text, strength=0.6,
                       background=scribble(sk, 7919, size)),
            EditPreset("Inpaint: the triangle becomes a cross", "inpaint", ip.text.replace("triangle", "cross"),
                       strength=1.0, background=render(ip, 2, size),
                       layer=_mask_layer(inpaint_mask(ip, size, factor))),
            EditPreset("Anagram: top left upright, bottom left flipped", "anagram",
                       "a large red square at the top left on a white background",
                       "a large red square at the bottom left on a white background"),
            EditPreset("Hybrid: a circle from afar, a cross up close", "hybrid",
                       "a large blue circle in the center on a white background",
                       "a large blue cross in the center on a white background"),
        ]
    from cdlab.edit_eval import scribble

    size = int(teacher.resolution)
    return [
        EditPreset("Sketch → image: a red circle", "sdedit", "a red apple on a black table, studio photo",
                   strength=0.75, background=scribble(Caption("large", "red", "circle", "center", "black"), 1, size)),
        EditPreset("Anagram (course): campfire / old man", "anagram", "an oil painting of people around a campfire",
                   "an oil painting of an old man"),
        EditPreset("Hybrid (course): skull / waterfall", "hybrid", "a lithograph of a skull",
                   "a lithograph of waterfalls"),
    ]


# ----------------------------------------------------------------------------- the run

@dataclass
class EditColumnView:
    label: str
    images: list  # [(PIL, alt)]
    lines: list[str]
    seconds: float = 0.0
    nfe: int = 0
    failed: bool = False


@dataclass
class EditView:
    """What the tab shows: the input and each column, labelled in full, plus a table and a summary."""

    technique: str
    columns: list[EditColumnView]
    notes: list[str]
    summary: str
    table: list[list[Any]]
    result_id: str = field(default_factory=lambda: __import__("uuid").uuid4().hex[:12])

    def html(self) -> str:
        from cdlab.ui.compare_view import row_html

        cells = [{"label": c.label, "images": c.images, "lines": c.lines, "failed": c.failed} for c in self.columns]
        return row_html(cells, "edit-columns", columns=len(cells), technique=self.technique, result=self.result_id)

    def gallery(self) -> list[tuple[Any, str]]:
        return [(im, f"{c.label} · {alt}") for c in self.columns for im, alt in c.images]


EXTERNAL_SUFFIX = " (external)"  # as Compare names them


def edit_column_choices(comparer: Any, cards: list | None = None) -> list[str]:
    """The columns the Edit tab offers, as Compare names them: both teacher columns, the local consistency
    students (``cards``: the students already read from disk; default ``comparer.students()``) and, on SD1.5's
    architecture, the published students (``"lcm-lora (external)"``, ...), each on its own scheduler."""
    cards = comparer.students() if cards is None else cards
    names = [s.name for s in cards if getattr(s, "scheduler", "consistency") == "consistency"]
    return [TEACHER_50, TEACHER_4] + names + [f"{k}{EXTERNAL_SUFFIX}" for k in comparer.external_keys()]


def _reading(teacher: Any, image, technique: str, prompts: list[str]) -> str:
    """On the tiny teacher: what the world's checker reads, and whether it is what was asked."""
    if not is_tiny(teacher):
        return ""
    from PIL import Image, ImageFilter

    from cdlab.world import check
    from cdlab.world.checker import read
    from cdlab.world.grammar import parse_caption

    def ok(im, prompt):
        try:
            return all(check(im, parse_caption(prompt)).values())
        except ValueError:  # not a caption of the grammar: nothing to check against
            return None

    def mark(v):
        return "" if v is None else (" ✓" if v else " ✗")

    if technique == "anagram":
        flipped = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return f"reads upright{mark(ok(image, prompts[0]))} · flipped{mark(ok(flipped, prompts[1]))}"
    if technique == "hybrid":
        from cdlab.edit_eval import FAR_SIGMA_PX

        far = image.filter(ImageFilter.GaussianBlur(FAR_SIGMA_PX))
        try:
            far_ok = read(far).shape == parse_caption(prompts[0]).shape
        except ValueError:
            far_ok = None
        return f"reads near{mark(ok(image, prompts[1]))} · far{mark(far_ok)}"
    r = read(image)
    return f"reads: {r.size} {r.color} {r.shape}, {r.position}, on {r.background}" + (
        mark(ok(image, prompts[0])) if prompts[0] else "")


def run_edit(
    teacher: Any,
    comparer: Any,
    technique: Any,
    editor_value: Any,
    prompt: Any,
    prompt_2: Any,
    strength: Any,
    seed: Any,
    student_steps: Any,
    columns: Any,
    adapters_root: Any = None,
) -> EditView:
    """Validate every field (each refusal names it), run the edit in every ticked column from one noise, and
    lay it out: the input first (with the mask for inpainting), then each column with its full label."""
    from PIL import Image, ImageFilter

    from cdlab.edit import TEACHER_50 as E50, edit, student_column, teacher_columns
    from cdlab.students import StudentError, external_card, load_external_student
    from cdlab.teachers import teacher_lock
    from cdlab.edit_eval import FAR_SIGMA_PX
    from cdlab.ui.compare_view import upscale

    technique = check_technique(technique)
    first, second = PROMPTS[technique]
    p1 = check_prompt(prompt, "prompt", allow_empty=technique in ("sdedit", "inpaint"))
    prompts = [p1]
    if second is not None:
        prompts.append(check_prompt(prompt_2, "prompt_2", allow_empty=False))
    s = check_strength(strength) if USES_STRENGTH[technique] else 1.0
    seed = check_seed(seed)
    steps = check_steps(student_steps)
    if not isinstance(columns, (list, tuple)) or not columns:
        raise InputError("columns: tick at least one column.")
    if len(columns) > 32 or not all(isinstance(c, str) for c in columns):
        raise InputError("columns: a list of at most 32 column names.")
    student_cards = comparer.students()
    allowed = edit_column_choices(comparer, student_cards)
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise InputError(f"columns: unknown or not editable {unknown[0][:60]!r} (this teacher's columns: "
                         f"{', '.join(allowed)}).")
    size = int(teacher.resolution)
    inputs = editor_inputs(editor_value, technique, size)
    cards = {c.name: c for c in student_cards}
    t50, t4 = teacher_columns(float(teacher.guidance))
    cols = []
    for name in dict.fromkeys(columns):
        if name in (TEACHER_50, TEACHER_4):
            cols.append(t50 if name == TEACHER_50 else t4)
        elif name.endswith(EXTERNAL_SUFFIX):
            cols.append(student_column(external_card(name[:-len(EXTERNAL_SUFFIX)]), steps))
        else:
            cols.append(student_column(cards[name], steps))
    failed: list[EditColumnView] = []
    for col in [c for c in cols if c.kind == "external"]:  # a published student that cannot load fails alone
        try:
            with teacher_lock(teacher):
                load_external_student(teacher.pipe, col.student, base_model=teacher.base_id)
        except StudentError as e:
            cols.remove(col)
            failed.append(EditColumnView(col.name, [], [col.name, f"not run: {e}"], failed=True))
    try:
        results = edit(teacher, technique, prompts, cols, image=inputs.image, mask=inputs.mask, strength=s,
                       seed=seed, adapters_root=adapters_root or comparer.adapters_root) if cols else []
    except ValueError as e:
        raise InputError(str(e)) from None
    views: list[EditColumnView] = []
    if inputs.image is not None:
        shown = [(upscale(inputs.image), "input")]
        if inputs.mask is not None:
            overlay = inputs.image.convert("RGB").copy()
            overlay.paste(Image.new("RGB", overlay.size, (255, 0, 255)), (0, 0), inputs.mask.point(lambda v: v // 2))
            shown.append((upscale(overlay), "mask"))
        views.append(EditColumnView("input", shown, ["input", "the mask in magenta" if inputs.mask is not None
                                                     else "what the columns start from",
                                                     f"strength {s:g}"]))
    t_ref = next((r.seconds for r in results if r.column == E50), None)
    table = []
    for r in results:
        im = r.images[0]
        shown = [(upscale(im), "result")]
        if technique == "anagram":
            shown.append((upscale(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)), "flipped"))
        elif technique == "hybrid":
            far = im.filter(ImageFilter.GaussianBlur(FAR_SIGMA_PX * size / 32))  # the checker's far view, to scale
            shown.append((upscale(far), "from afar (blurred)"))
        start = f" from t={r.timesteps[0]}" if r.timesteps else " (no step)"
        speed = f" · {t_ref / r.seconds:.1f}× teacher-50's speed" if t_ref and r.seconds > 0 and r.column != E50 else ""
        lines = [r.column, f"{len(r.timesteps)} steps{start} · NFE {r.nfe}", f"{r.seconds:.2f} s{speed}"]
        reading = _reading(teacher, im, technique, prompts)
        if reading:
            lines.append(reading)
        views.append(EditColumnView(r.column, shown, lines, r.seconds, r.nfe))
        table.append([r.column, round(r.seconds, 3), r.nfe, len(r.timesteps)])
    views.extend(failed)
    total = sum(r.seconds for r in results)
    summary = (f"{TECHNIQUE_LABELS[technique]} · {len(results)} columns in {total:.2f} s · seed {seed} · "
               f"one initial noise for every column")
    return EditView(technique, views, inputs.notes, summary, table)
