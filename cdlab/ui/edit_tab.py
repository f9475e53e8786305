"""The Edit tab: the course's editing loops (SDEdit, sketches, inpainting, anagrams, hybrids) with the teacher
and its students side by side. :func:`cdlab.edit.edit` does the sampling and `cdlab.ui.edit_inputs` checks what
the browser sends; this module offers presets, runs an edit in every ticked column from one noise, lays the
result out as Compare does, and builds the tab (`EditTab`, Gradio imported when it is built).

On the tiny teacher the canvas is the world's 32×32 (shown large and pixelated) and every column says what the
world's checker reads off it, so a class sees at once which column did the edit.
"""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

from cdlab.columns import AS_TRAINED, TEACHER_4, TEACHER_50, run_columns, student_column, teacher_columns
from cdlab.edit import edit
from cdlab.evaluate.edit import FAR_SIGMA_PX, inpaint_mask, scribble
from cdlab.students import StudentError, external_card, load_external_student
from cdlab.teachers import class_names, is_tiny, teacher_lock
from cdlab.ui import hosting as H
from cdlab.ui.compare import STEPS_CHOICES, InputError, check_class_prompt
from cdlab.ui.compare_view import row_html, upscale
from cdlab.ui.edit_inputs import (MAX_LAYERS, MAX_UPLOAD_BYTES, PROMPTS, TECHNIQUES, USES_IMAGE, USES_STRENGTH,
                                  EditInputs, cap_decoding, check_editor_payload, check_prompt, check_seed,
                                  check_steps, check_strength, check_technique, editor_inputs)
from cdlab.ui.session import named_errors, user_errors
from cdlab.world import Caption, check, render
from cdlab.world.checker import read
from cdlab.world.grammar import parse_caption

__all__ = ["TECHNIQUES", "TECHNIQUE_LABELS", "PROMPTS", "USES_IMAGE", "USES_STRENGTH", "DEFAULT_STRENGTH", "LEGEND", "FLOW_LEGEND", "legend",
           "editor_inputs", "EditPreset", "presets", "EditColumnView", "EditView", "edit_column_choices", "run_edit",
           "EditTab"]

TECHNIQUE_LABELS = {
    "sdedit": "SDEdit: image or sketch → prompt",
    "inpaint": "Inpaint: repaint the painted region",
    "anagram": "Visual anagram: upright and flipped",
    "hybrid": "Hybrid image: far and near",
}
DEFAULT_STRENGTH = {"sdedit": 0.6, "inpaint": 1.0, "anagram": 1.0, "hybrid": 1.0}
LEGEND = (
    "**input**: what SDEdit and inpainting start from (noised to the strength's timestep) · **teacher-50**: DDIM, "
    "50 steps at strength 1, CFG · **teacher-4**: the same naively at 4 · **students**: distilled LoRAs (CT, CD, "
    "MBCD, DMD) from the boundary at or above the strength's timestep · anagrams show the image and its flip, hybrids the image "
    "and its far (blurred) view · **reads** (tiny world): what the checker sees, ✓ when it is what was asked"
)
FLOW_LEGEND = (
    "**input**: what SDEdit and inpainting start from (noised to the strength's time on the flow's path) · "
    "**teacher-50**: Euler, 50 steps at strength 1, CFG · **teacher-4**: the same naively at 4 · **students**: "
    "LoRAs on the flow teacher (2-rectified flow, multi-boundary CD, DMD), from the strength's time · anagrams "
    "show the image and its flip, hybrids the image and its far (blurred) view"
)


def legend(teacher: Any) -> str:
    """The legend under Edit's row, in the teacher's terms: the flow teacher's (Euler, its students, no checker)
    or the diffusion teachers' (DDIM, the lab's students, the tiny world's checker)."""
    return FLOW_LEGEND if getattr(teacher, "solver", "DDIM") == "Euler" else LEGEND



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
    background: Any = None  # PIL, or a function that makes it when the preset is first used (cached by its maker)
    layer: Any = None  # PIL RGBA: the painted mask (inpainting)

    def editor_value(self) -> dict | None:
        background = self.background() if callable(self.background) else self.background
        if background is None:
            return None
        return {"background": background, "layers": [self.layer] if self.layer is not None else [],
                "composite": _composite(background, self.layer)}


def _composite(bg, layer):
    if layer is None:
        return bg.convert("RGBA")
    return Image.alpha_composite(bg.convert("RGBA"), layer)


def _mask_layer(mask, color=(255, 0, 255, 150)):
    """A paint layer (RGBA) from a mask tensor ``[1, 1, H, W]``: the brush strokes a user would paint."""
    m = mask[0, 0].numpy() > 0.5
    arr = np.zeros(m.shape + (4,), dtype=np.uint8)
    arr[m] = color
    return Image.fromarray(arr, "RGBA")


def presets(teacher: Any) -> list[EditPreset]:
    """Presets that make every technique work in one click: on the tiny teacher from rendered world images
    (the cases `python -m cdlab evaluate --edit` measures); on SD1.5 the course's anagram and hybrid prompts and
    a drawn sketch."""
    if is_tiny(teacher):
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
    if class_names(teacher):
        return flow_presets(teacher)
    size = int(teacher.resolution)
    return [
        EditPreset("Sketch → image: a red circle", "sdedit", "a red apple on a black table, studio photo",
                   strength=0.75, background=scribble(Caption("large", "red", "circle", "center", "black"), 1, size)),
        EditPreset("Anagram (course): campfire / old man", "anagram", "an oil painting of people around a campfire",
                   "an oil painting of an old man"),
        EditPreset("Hybrid (course): skull / waterfall", "hybrid", "a lithograph of a skull",
                   "a lithograph of waterfalls"),
    ]


def flow_presets(teacher: Any) -> list[EditPreset]:
    """The flow teacher's presets (seed 003's loops in its pixel space): a sneaker edited into an ankle boot, a
    pullover's lower half repainted as a dress, a trouser that is a bag upside down, a trouser from afar that
    is a sandal up close. The start images are the teacher's own Euler-50 samples (seeds 0 and 1), sampled when
    a preset is first used, not when the app starts (100 NFE each: seconds on a CPU)."""
    def sample(prompt: str, seed: int) -> Callable[[], Any]:
        return functools.cache(lambda: run_columns(teacher, teacher_columns(teacher.guidance)[:1], [prompt],
                                                   seeds=[seed])[0].images[0])

    sneaker, pullover = sample("Sneaker", 0), sample("Pullover", 1)
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 14:, :] = 1.0  # the lower half
    return [
        EditPreset("SDEdit: a sneaker becomes an ankle boot", "sdedit", "Ankle boot", strength=0.6,
                   background=sneaker),
        EditPreset("Inpaint: a pullover's lower half becomes a dress", "inpaint", "Dress", strength=1.0,
                   background=pullover, layer=_mask_layer(mask)),
        EditPreset("Anagram: a trouser upright, a bag flipped", "anagram", "Trouser", "Bag"),
        EditPreset("Hybrid: a trouser from afar, a sandal up close", "hybrid", "Trouser", "Sandal"),
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
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    prefix: str = ""  # of the row's id (a second Edit tab on the page: the flow teacher's)

    def html(self) -> str:
        cells = [{"label": c.label, "images": c.images, "lines": c.lines, "failed": c.failed} for c in self.columns]
        return row_html(cells, self.prefix + "edit-columns", columns=len(cells), technique=self.technique,
                        result=self.result_id)

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
        far = image.filter(ImageFilter.GaussianBlur(FAR_SIGMA_PX))
        try:
            far_ok = read(far).shape == parse_caption(prompts[0]).shape
        except ValueError:
            far_ok = None
        return f"reads near{mark(ok(image, prompts[1]))} · far{mark(far_ok)}"
    r = read(image)
    return f"reads: {r.size} {r.color} {r.shape}, {r.position}, on {r.background}" + (
        mark(ok(image, prompts[0])) if prompts[0] else "")


def _check_columns(comparer: Any, columns: Any) -> list:
    """Refuse an empty, oversized or unknown list of ticked columns; returns the local students' cards."""
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
    return student_cards


def _edit_columns(teacher: Any, student_cards: list, columns: list[str], steps: int | None) -> tuple[list, list]:
    """The runner's columns for the ticked names (each once, in order), and a failed view for each published
    student that cannot load (it fails alone; the others still run)."""
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
    for col in [c for c in cols if c.kind == "external"]:
        try:
            with teacher_lock(teacher):
                load_external_student(teacher.pipe, col.student, base_model=teacher.base_id)
        except StudentError as e:
            cols.remove(col)
            failed.append(EditColumnView(col.name, [], [col.name, f"not run: {e}"], failed=True))
    return cols, failed


def _input_views(inputs: EditInputs, strength: float) -> list[EditColumnView]:
    """The input column (with the mask in magenta for inpainting); none for anagrams and hybrids."""
    if inputs.image is None:
        return []
    shown = [(upscale(inputs.image), "input")]
    if inputs.mask is not None:
        overlay = inputs.image.convert("RGB").copy()
        overlay.paste(Image.new("RGB", overlay.size, (255, 0, 255)), (0, 0), inputs.mask.point(lambda v: v // 2))
        shown.append((upscale(overlay), "mask"))
    return [EditColumnView("input", shown, ["input", "the mask in magenta" if inputs.mask is not None
                                            else "what the columns start from", f"strength {strength:g}"])]


def _result_view(teacher: Any, r: Any, technique: str, prompts: list[str], t_ref: float | None) -> EditColumnView:
    """One column's result with its full label: steps, start, NFE, seconds, speed and (tiny) what it reads."""
    size = int(teacher.resolution)
    im = r.images[0]
    shown = [(upscale(im), "result")]
    if technique == "anagram":
        shown.append((upscale(im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)), "flipped"))
    elif technique == "hybrid":
        far = im.filter(ImageFilter.GaussianBlur(FAR_SIGMA_PX * size / 32))  # the checker's far view, to scale
        shown.append((upscale(far), "from afar (blurred)"))
    start = f" from t={r.timesteps[0]}" if r.timesteps else " (no step)"
    speed = (f" · {t_ref / r.seconds:.1f}× teacher-50's speed" if t_ref and r.seconds > 0 and r.column != TEACHER_50
             else "")
    lines = [r.column, f"{len(r.timesteps)} steps{start} · NFE {r.nfe}", f"{r.seconds:.2f} s{speed}"]
    reading = _reading(teacher, im, technique, prompts)
    if reading:
        lines.append(reading)
    return EditColumnView(r.column, shown, lines, r.seconds, r.nfe)


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
    prefix: str = "",
) -> EditView:
    """Validate every field (each refusal names it), run the edit in every ticked column from one noise, and
    lay it out: the input first (with the mask for inpainting), then each column with its full label. On a
    class-conditioned teacher (the flow teacher) a prompt is a class name (or empty: unconditional)."""
    technique = check_technique(technique)
    prompts = [check_prompt(prompt, "prompt", allow_empty=technique in ("sdedit", "inpaint"))]
    if PROMPTS[technique][1] is not None:
        prompts.append(check_prompt(prompt_2, "prompt_2", allow_empty=False))
    for name, p in zip(("prompt", "prompt_2"), prompts):
        check_class_prompt(teacher, p, name)
    s = check_strength(strength) if USES_STRENGTH[technique] else 1.0
    seed = check_seed(seed)
    steps = check_steps(student_steps)
    student_cards = _check_columns(comparer, columns)
    inputs = editor_inputs(editor_value, technique, int(teacher.resolution))
    cols, failed = _edit_columns(teacher, student_cards, columns, steps)
    try:
        results = edit(teacher, technique, prompts, cols, image=inputs.image, mask=inputs.mask, strength=s,
                       seed=seed, adapters_root=adapters_root or comparer.adapters_root, fuse=comparer.fuse) if cols else []
    except ValueError as e:
        raise InputError(str(e)) from None
    t_ref = next((r.seconds for r in results if r.column == TEACHER_50), None)
    views = [*_input_views(inputs, s), *(_result_view(teacher, r, technique, prompts, t_ref) for r in results),
             *failed]
    table = [[r.column, round(r.seconds, 3), r.nfe, len(r.timesteps)] for r in results]
    total = sum(r.seconds for r in results)
    summary = (f"{TECHNIQUE_LABELS[technique]} · {len(results)} columns in {total:.2f} s · seed {seed} · "
               f"one initial noise for every column")
    return EditView(technique, views, inputs.notes, summary, table, prefix=prefix)


# ----------------------------------------------------------------------------- the tab (Gradio)

GPU = dict(concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)


def edit_handlers(teacher: Any, comparer: Any, edit_presets: list[EditPreset], prefix: str = "") -> SimpleNamespace:
    """The tab's event functions: ``edit`` (the API's ``/edit``), the technique's labels, the presets (one
    click: the inputs, then the edit), the first visit's result and the columns offered on each visit."""
    import gradio as gr

    @user_errors
    def do_edit(technique, image, prompt, prompt_2, strength, seed, student_steps, columns):
        """Run one edit (sdedit | inpaint | anagram | hybrid) in every ticked column from one noise; returns the
        columns (HTML, one row, the input first), their images with captions, the timings table and a summary."""
        v = run_edit(teacher, comparer, technique, image, prompt, prompt_2, strength, seed, student_steps, columns,
                     prefix=prefix)
        for note in v.notes:
            gr.Info(note)
        return v.html(), v.gallery(), v.table, v.summary

    do_edit = H.gpu(do_edit, duration=120)

    def edit_technique_changed(technique):
        """Labels and visibility follow the technique: two prompts for anagrams and hybrids, no strength there (the
        image editor stays: re-rendering it would drop a drawing; anagrams and hybrids ignore it)."""
        technique = technique if technique in TECHNIQUES else "sdedit"
        first, second = PROMPTS[technique]
        return (gr.Textbox(info=first), gr.Textbox(info=second, visible=second is not None),
                gr.Slider(visible=USES_STRENGTH[technique]))

    @user_errors
    def edit_preset_run(name, student_steps, columns):
        """Fill the inputs from a preset AND run its edit from the preset's own values, in one event (a second
        event reading the inputs back from the page could read them before the page applied them)."""
        p = next((p for p in edit_presets if p.name == name), None)
        if p is None:
            return (gr.skip(),) * 10
        editor = p.editor_value()
        fill = (p.technique, editor if editor is not None else gr.skip(), p.prompt, p.prompt_2, p.strength, p.seed)
        return (*fill, *do_edit(p.technique, editor, p.prompt, p.prompt_2, p.strength, p.seed, student_steps, columns))

    def edit_preset_selected(student_steps, columns, evt):
        return edit_preset_run(evt.value, student_steps, columns)

    # The class itself, not the string `from __future__ import annotations` leaves: Gradio resolves the hint in
    # this module's globals, where gradio is not (it is imported when the tab is built).
    edit_preset_selected.__annotations__["evt"] = gr.SelectData

    def edit_first_visit(row, student_steps, columns):
        """The tab opens with a result: on the first visit (nothing shown yet) the first preset is run."""
        if row or not edit_presets:
            return (gr.skip(),) * 10
        return edit_preset_run(edit_presets[0].name, student_steps, columns)

    def refresh_edit_columns():
        choices = edit_column_choices(comparer)
        return gr.CheckboxGroup(choices=choices, value=choices)

    def edit_columns_on_select(current, known):
        """On every visit of the tab: students that appeared since (a finished training run) are offered and
        ticked; the user's other ticks are kept."""
        choices = edit_column_choices(comparer)
        known = known or []
        value = [c for c in (current or []) if c in choices] + [c for c in choices if c not in known]
        return gr.CheckboxGroup(choices=choices, value=value), choices

    return SimpleNamespace(edit=do_edit, technique_changed=edit_technique_changed, preset_selected=edit_preset_selected,
                           first_visit=edit_first_visit, refresh_columns=refresh_edit_columns,
                           columns_on_select=edit_columns_on_select)


OPENING_LABEL = "Edit (opening the first preset…)"


def edit_controls(teacher: Any, comparer: Any, edit_presets: list[EditPreset], prefix: str = "") -> SimpleNamespace:
    """The left column: presets, technique, the image editor (the teacher's canvas), prompts (a class-conditioned
    teacher's: class names), strength, seed, student steps, columns and the button; ``prefix``: of the elem_ids."""
    import gradio as gr

    ui = SimpleNamespace()
    classes = class_names(teacher)
    label = f"Class ({', '.join(classes)}; empty: unconditional)" if classes else "Prompt"
    ui.preset = gr.Dropdown([p.name for p in edit_presets], value=None, elem_id=prefix + "edit-preset",
                            label="Presets (one click: the inputs, then the edit)")
    ui.tech = gr.Radio([(TECHNIQUE_LABELS[k], k) for k in TECHNIQUES], value="sdedit", label="Technique",
                       elem_id=prefix + "edit-technique")
    canvas = int(teacher.resolution)
    gr.Markdown(f"**Image** ({canvas}×{canvas} px): upload or draw. SDEdit edits the picture as drawn; for "
                "inpainting, paint over the region to regenerate (the paint is the mask).", elem_id=prefix + "edit-image-help")
    ui.image = gr.ImageEditor(
        type="pil", image_mode="RGBA", canvas_size=(canvas, canvas), fixed_canvas=True, format="png",
        sources=("upload", "clipboard"), transforms=(), height=360, elem_id=prefix + "edit-image", label="Image",
        brush=gr.Brush(default_size=max(2, canvas // 10), color_mode="defaults"),
        layers=gr.LayerOptions(allow_additional_layers=False))
    ui.prompt = gr.Textbox("", label=label, info=PROMPTS["sdedit"][0], lines=2, max_lines=4,
                           elem_id=prefix + "edit-prompt")
    ui.prompt2 = gr.Textbox("", label=label.replace(";", " 2;", 1) if classes else "Prompt 2", visible=False,
                            lines=2, max_lines=4, elem_id=prefix + "edit-prompt-2")
    ui.strength = gr.Slider(0.0, 1.0, value=DEFAULT_STRENGTH["sdedit"], step=0.05, label="Strength",
                            info="the noise level the edit starts from (1: pure noise)", elem_id=prefix + "edit-strength")
    with gr.Row(equal_height=True):
        ui.seed = gr.Number(label="Seed", value=0, precision=0, min_width=90)
        ui.steps = gr.Radio(list(STEPS_CHOICES), value=AS_TRAINED, label="Student steps",
                            info="as trained: each student at its card's steps (a 1-step student at 1)")
    ui.choices = edit_column_choices(comparer)
    ui.columns = gr.CheckboxGroup(ui.choices, value=ui.choices, label="Columns",
                                  info="the teacher and the consistency students", elem_id=prefix + "edit-columns-pick")
    # Off until the tab's first visit has filled the inputs from the first preset (`EditTab._wire`): a press
    # before that would send the empty editor the page opened with, and be refused while the preset's image
    # appears in the box.
    ui.btn = gr.Button(OPENING_LABEL, variant="primary", interactive=False, elem_id=prefix + "edit-btn")
    return ui


def edit_results(ui: SimpleNamespace, prefix: str = "", legend_text: str = LEGEND) -> None:
    """The right column, added to ``ui``: summary, the columns' row (the input first), legend, and the images
    and timings as the API returns them."""
    import gradio as gr

    ui.info = gr.Markdown(elem_id=prefix + "edit-info", label="summary")
    ui.row = gr.HTML(elem_id=prefix + "edit-row", padding=False, label="columns html")
    gr.Markdown(legend_text, elem_id=prefix + "edit-legend")
    with gr.Accordion("Images and timings (as the API returns them)", open=False):
        ui.gallery = gr.Gallery(label="Images", height="auto", elem_id=prefix + "edit-gallery", object_fit="contain")
        ui.table = gr.Dataframe(headers=["column", "seconds", "NFE", "steps"], label="Timings", interactive=False)


# ----------------------------------------------------------------------------- the upload, before decoding

MAX_PENDING_BLOBS = 32  # editor values the browser is still sending in pieces (Gradio keeps them in memory)


def check_editor_upload(component: Any, payload: Any) -> None:
    """The image editor's raw payload, before Gradio decodes a pixel (`cdlab.ui.session.named_errors`'s
    ``check``): the files the API names or the pieces the browser sent (``blob_storage``), checked by
    `cdlab.ui.edit_inputs.check_editor_payload` (layer count first, then each header)."""
    if payload is None:
        return
    if getattr(payload, "id", None) is not None:
        blobs = component.blob_storage.get(payload.id)
        if blobs is not None:
            check_editor_payload(blobs.background, blobs.layers, blobs.composite)
        return
    def path(f):  # a FileData: the upload on disk
        return None if f is None else f.path

    check_editor_payload(path(payload.background), [path(f) for f in payload.layers or []], path(payload.composite))


def _accept_blobs(self, data: Any) -> None:
    """The editor's pieces from the browser, refused before they are kept when they could only exhaust memory:
    a layer index past `MAX_LAYERS`, a piece over `MAX_UPLOAD_BYTES`, or too many unfinished values."""
    import gradio as gr

    index = data.data.get("index")
    if data.data.get("type") == "layer" and index not in (None, "null", ""):
        try:
            ok = 0 <= int(index) < MAX_LAYERS
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise gr.Error(f"Image: layer {str(index)[:20]!r}; at most {MAX_LAYERS} layers.")
    if any(len(f[1]) > MAX_UPLOAD_BYTES for f in data.files if isinstance(f[1], (bytes, bytearray))):
        raise gr.Error(f"Image: a piece over {MAX_UPLOAD_BYTES // 2**20} MB.")
    while len(self.blob_storage) >= MAX_PENDING_BLOBS and data.data.get("id") not in self.blob_storage:
        self.blob_storage.pop(next(iter(self.blob_storage)))
    return gr.ImageEditor.accept_blobs(self, data)


_accept_blobs._is_server_fn = True  # a component server function, as gradio.components.base.server marks one


class EditTab:
    """The Edit tab, built inside the page's ``gr.Tabs``: its components, its events, and its part of the page
    load (the columns offered, fresh). It opens with a result: the first visit runs the first preset."""

    def __init__(self, teacher: Any, comparer: Any, prefix: str = ""):
        """``prefix``: of the tab's id, its elem_ids (``"flow-"``) and its API name (``/flow_edit``), for a second
        Edit tab on the page (the flow teacher's)."""
        import gradio as gr

        edit_presets = presets(teacher)
        self.fn = edit_handlers(teacher, comparer, edit_presets, prefix)
        self.api = prefix.replace("-", "_")
        with gr.Tab("Edit" + (f" ({prefix.strip('-')})" if prefix else ""), id=prefix + "edit") as tab:
            with gr.Row():
                with gr.Column(scale=1, min_width=330):
                    ui = edit_controls(teacher, comparer, edit_presets, prefix)
                with gr.Column(scale=3):
                    edit_results(ui, prefix, legend(teacher))
            self.ui = ui
            self._wire(tab)
        self.load_outputs = [ui.columns]

    def _wire(self, tab: Any) -> None:
        import gradio as gr

        ui, fn = self.ui, self.fn
        cap_decoding()
        named_errors(ui.image, check=check_editor_upload, methods={"accept_blobs": _accept_blobs})
        named_errors(ui.tech, ui.prompt, ui.prompt2, ui.strength, ui.seed, ui.steps, ui.columns)
        inputs = [ui.tech, ui.image, ui.prompt, ui.prompt2, ui.strength, ui.seed, ui.steps, ui.columns]
        outputs = [ui.row, ui.gallery, ui.table, ui.info]
        ui.tech.change(fn.technique_changed, ui.tech, [ui.prompt, ui.prompt2, ui.strength], api_visibility="private")
        ui.btn.click(fn.edit, inputs, outputs, api_name=self.api + "edit", **GPU)
        preset_outputs = [ui.tech, ui.image, ui.prompt, ui.prompt2, ui.strength, ui.seed, *outputs]
        known = gr.State(ui.choices)  # the columns offered so far
        tab.select(fn.columns_on_select, [ui.columns, known], [ui.columns, known], api_visibility="private").then(
            fn.first_visit, [ui.row, ui.steps, ui.columns], preset_outputs, api_visibility="private", **GPU).then(
            lambda: gr.Button("Edit", interactive=True), None, ui.btn, api_visibility="private", queue=False)
        # .select carries the option picked (the dropdown's value as read by an .input event can be the
        # previous one); picking the same preset again runs it again.
        ui.preset.select(fn.preset_selected, [ui.steps, ui.columns], preset_outputs, api_visibility="private", **GPU)

    def on_load(self) -> tuple:
        """The columns offered, fresh: a student that appeared since the start shows up."""
        return (self.fn.refresh_columns(),)
