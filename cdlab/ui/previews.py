"""The Train tab's preview: the run's per-row preview files composed into one labelled comparison.

The trainer writes plain rows under ``<run>/previews/`` (one image per preview caption, side by side, all
from the same fixed noise): ``reference.png`` (the teacher, DDIM with CFG, written once per run, with
``reference.json`` saying its steps and guidance) and ``step_XXXXXX.png`` (the student with its own few
steps, at step 0 before any update and at every preview). `compose` lays them out as the page shows
them: a header with each caption (wrapped), then the rows "teacher-50 (CFG), reference", "student, 4
steps, at step 0" and "student, 4 steps, at step S" (the newest), each labelled at its left.
No Gradio here; PIL only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cdlab.paths import PREVIEW_REFERENCE, preview_rows, read_json

REFERENCE = PREVIEW_REFERENCE

LABEL_WIDTH = 210   # px of the left column that holds the row labels
MAX_CELL = 256      # px: a row's images are shown at most this tall (SD1.5's 512 px previews are halved)
PAD = 8
CAPTION_FONT = 15
LABEL_FONT = 16


@dataclass
class PreviewRow:
    """One row of the composed preview: its label and its image file (a plain row of the run's previews)."""

    label: str
    path: Path
    step: int | None = None  # None for the teacher's reference


@dataclass
class PreviewSet:
    """What a run's previews folder holds, in the order the page shows it."""

    prompts: list[str] = field(default_factory=list)
    rows: list[PreviewRow] = field(default_factory=list)
    reference: dict[str, Any] | None = None  # reference.json: steps, guidance, nfe, seconds
    sample_steps: int = 4
    subject: str = "student"  # whose rows: a distillation run's student, or a teacher run's own samples

    @property
    def student_steps(self) -> list[int]:
        return [r.step for r in self.rows if r.step is not None]

    @property
    def has_reference(self) -> bool:
        return any(r.step is None for r in self.rows)


def student_previews(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``previews/step_XXXXXX.png`` of a run as (step, path), oldest first."""
    return preview_rows(Path(run_dir) / "previews")


def read_previews(run_dir: Path) -> PreviewSet:
    """The rows to show for a run: the teacher's reference (when written), the student's first preview
    (step 0, before any update) and its newest one (when it is a later step).

    Captions and the student's step count come from the run's ``config.json`` (``preview_prompts``,
    ``sample_steps``; ``preview_subject`` names the rows' model: "teacher" in a flow teacher's run, whose rows are
    its class grids, `cdlab.flow.train_teacher`); the reference's steps from ``previews/reference.json`` (default
    50)."""
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json") or {}
    prompts = cfg.get("preview_prompts") if isinstance(cfg.get("preview_prompts"), list) else []
    ref_meta = read_json(run_dir / "previews" / "reference.json")
    if ref_meta and isinstance(ref_meta.get("prompts"), list):
        prompts = ref_meta["prompts"]
    try:
        n = int(cfg.get("sample_steps") or 4)
    except (TypeError, ValueError):
        n = 4
    subject = cfg.get("preview_subject") if cfg.get("preview_subject") in ("student", "teacher") else "student"
    ps = PreviewSet(prompts=[str(p) for p in prompts], reference=ref_meta, sample_steps=n, subject=subject)
    ref = run_dir / "previews" / REFERENCE
    if ref.is_file():
        steps = (ref_meta or {}).get("steps", 50)
        ps.rows.append(PreviewRow(f"teacher-{steps} (CFG), reference", ref))
    students = student_previews(run_dir)
    if students:
        first, last = students[0], students[-1]
        ps.rows.append(PreviewRow(f"{subject}, {n} steps, at step {first[0]}", first[1], first[0]))
        if last[0] != first[0]:
            ps.rows.append(PreviewRow(f"{subject}, {n} steps, at step {last[0]}", last[1], last[0]))
    return ps


def caption(ps: PreviewSet) -> str:
    """The Markdown line under the composed preview: which rows, which steps, how the reference was made."""
    steps = ps.student_steps
    if not steps:
        return "no preview yet" + (" (the teacher's reference is ready)" if ps.has_reference else "")
    shown = " and ".join(f"step {s}" for s in steps)
    text = f"preview at step {steps[-1]}: the {ps.subject} ({ps.sample_steps} steps) at {shown}"
    if ps.subject == "teacher":
        text += "; each grid: 4 samples of each class (the columns), from the same noise"
    elif ps.has_reference:
        ref = ps.reference or {}
        how = f"DDIM {ref.get('steps', 50)} steps, CFG {float(ref.get('guidance', 0)):g}" if ref.get("guidance") \
            else f"DDIM {ref.get('steps', 50)} steps with CFG"
        text += f", under the teacher's reference ({how}); same captions, same initial noise in every row"
    else:
        text += "; no teacher reference for this run"
    return text


@lru_cache(maxsize=8)
def font(size: int):
    """A scalable sans-serif font of ``size`` px: DejaVu Sans when the system has it, else Pillow's own."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int, fnt: Any) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` px in ``fnt`` (a longer word stays whole)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=fnt) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def compose(ps: PreviewSet) -> Any:
    """One labelled image of the run's preview rows (a PIL image), or None when there is no row.

    Each row is scaled to the same cell height (its own, at most `MAX_CELL`); with one caption per
    image the header puts every caption, wrapped, above its column."""
    rows = []
    for r in ps.rows:
        try:
            with Image.open(r.path) as im:
                rows.append((r, im.convert("RGB")))
        except OSError:
            continue
    if not rows:
        return None
    n = max(1, len(ps.prompts))
    cell = min(MAX_CELL, min(im.height for _, im in rows))
    scaled = []
    for r, im in rows:
        w = round(im.width * cell / im.height)
        scaled.append((r, im if im.height == cell else im.resize((w, cell), Image.Resampling.LANCZOS)))
    width = max(im.width for _, im in scaled)
    col = width / n
    cap_font, label_font = font(CAPTION_FONT), font(LABEL_FONT)
    line_h = CAPTION_FONT + 4
    wrapped = [wrap(p, int(col) - PAD, cap_font) for p in ps.prompts]
    header = (max((len(w) for w in wrapped), default=0) * line_h + 2 * PAD) if wrapped else 0
    total_w = LABEL_WIDTH + width + PAD
    total_h = header + len(scaled) * (cell + PAD) + PAD
    out = Image.new("RGB", (total_w, total_h), "white")
    draw = ImageDraw.Draw(out)
    for k, lines in enumerate(wrapped):
        x = LABEL_WIDTH + k * col + PAD / 2
        for i, line in enumerate(lines):
            draw.text((x, PAD + i * line_h), line, fill="#222", font=cap_font)
    y = header
    for r, im in scaled:
        out.paste(im, (LABEL_WIDTH, y))
        lines = wrap(r.label, LABEL_WIDTH - 2 * PAD, label_font)
        ty = y + (cell - len(lines) * (LABEL_FONT + 5)) / 2
        for i, line in enumerate(lines):
            draw.text((PAD, ty + i * (LABEL_FONT + 5)), line, fill="#000" if r.step is not None else "#335",
                      font=label_font)
        y += cell + PAD
    return out
