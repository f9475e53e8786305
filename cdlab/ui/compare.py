"""The Compare tab: the teacher and its students side by side, from one noise and one text encoding.

Columns: the teacher at 50 DDIM steps with CFG, the teacher naively at 4 steps, every local student
whose base is the loaded teacher, and (SD1.5 with the hub) the external students. Students are named
peft adapters on the teacher's one UNet, switched per column; the text embeddings and the initial
noise are computed once per request.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TEACHER_50 = "teacher-50 (CFG)"
TEACHER_4 = "teacher-4 (naive)"
STUDENT_STEPS = (1, 2, 4, 8)
MAX_PROMPT_CHARS = 500
SEED_MAX = 2**32 - 1
GUIDANCE_RANGE = (1.0, 20.0)
MAX_TRAJECTORY_FRAMES = 10
MAX_COLUMNS = 32  # teacher-50's strip is subsampled to this many x0 predictions



class InputError(ValueError):
    """A request the app refuses with a message for the user (the server stays up)."""


def tiny_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """A fixed, varied set of tiny-world captions (every shape, both sizes, several positions)."""
    from cdlab.world import Caption, sample_captions

    fixed = [
        Caption("large", "red", "circle", "center", "white"),
        Caption("small", "blue", "square", "top left", "yellow"),
        Caption("large", "green", "triangle", "bottom right", "black"),
        Caption("small", "yellow", "cross", "top right", "blue"),
    ]
    rest = [c for c in sample_captions(n, seed=seed) if c not in fixed] if n > len(fixed) else []
    return [c.text for c in (fixed + rest)[:n]]


def prompt_presets(teacher: Any) -> list[str]:
    """The presets for the loaded teacher: tiny-world captions for the tiny teacher, else the course's prompts."""
    from cdlab.prompts import COURSE_PROMPTS

    return tiny_prompts() if is_tiny(teacher) else list(COURSE_PROMPTS)


def is_tiny(teacher: Any) -> bool:
    from cdlab.teachers import is_tiny as _is_tiny

    return _is_tiny(teacher)


def random_seed() -> int:
    return random.randint(0, 2**31 - 1)


@dataclass
class Column:
    """One column of the comparison: what to sample and how."""

    label: str
    kind: str  # "teacher" | "student" | "external"
    steps: int
    guidance: float = 1.0  # > 1 means CFG (two UNet calls per step)
    student: str | None = None
    card: Any = None


@dataclass
class ColumnResult:
    label: str
    image: Any  # PIL.Image
    seconds: float
    nfe: int
    steps: int
    speedup: float | None = None
    speedup_estimated: bool = False
    trajectory: list[Any] = field(default_factory=list)  # PIL images of x0 after each (shown) step
    trajectory_steps: list[int] = field(default_factory=list)
    error: str | None = None  # set when this column could not be produced (its image says why)

    def caption(self) -> str:
        if self.error:
            return f"{self.label} · failed: {self.error}"
        sp = "–" if self.speedup is None else f"{'≈' if self.speedup_estimated else ''}{self.speedup:.1f}x"
        return f"{self.label} · {self.seconds:.2f} s · NFE {self.nfe} · speedup {sp}"


@dataclass
class CompareResult:
    prompt: str
    seed: int
    guidance: float
    student_steps: int
    teacher: str
    columns: list[ColumnResult]
    warnings: list[str] = field(default_factory=list)
    total_seconds: float = 0.0

    def table(self) -> list[list[Any]]:
        """Rows ``[column, seconds, NFE, speedup]`` for a table."""
        rows = []
        for c in self.columns:
            if c.error:
                rows.append([c.label, None, None, f"failed: {c.error}"])
                continue
            sp = "–" if c.speedup is None else f"{'≈' if c.speedup_estimated else ''}{c.speedup:.1f}x"
            rows.append([c.label, round(c.seconds, 3), c.nfe, sp])
        return rows

    def compose(self, cell: int = 256, with_trajectory: bool | None = None):
        """The whole comparison as one captioned PIL image (the "Download" PNG)."""
        return compose_comparison(self, cell=cell, with_trajectory=with_trajectory)


def validate_request(prompt: Any, seed: Any, guidance: Any, student_steps: Any) -> tuple[str, int, float, int]:
    """Check and normalise the Compare inputs; raise `InputError` with a clear message."""
    if prompt is None or not str(prompt).strip():
        raise InputError("The prompt is empty: type a prompt or pick a preset.")
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, got {type(prompt).__name__}.")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    bad = next((c for c in prompt if (ord(c) < 32 and c not in "\n\t") or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise InputError(f"The prompt contains a control character ({bad!r}); type plain text.")
    try:
        seed_f = float(seed)
    except (TypeError, ValueError):
        raise InputError(f"The seed must be a whole number, got {seed!r}.") from None
    if not math.isfinite(seed_f) or seed_f != int(seed_f) or not 0 <= seed_f <= SEED_MAX:
        raise InputError(f"The seed must be a whole number from 0 to {SEED_MAX}, got {seed!r}.")
    try:
        g = float(guidance)
    except (TypeError, ValueError):
        raise InputError(f"The guidance must be a number, got {guidance!r}.") from None
    lo, hi = GUIDANCE_RANGE
    if not math.isfinite(g) or not lo <= g <= hi:
        raise InputError(f"The guidance must be between {lo:g} and {hi:g}, got {guidance!r}.")
    try:
        steps = int(student_steps)
    except (TypeError, ValueError):
        raise InputError(f"Student steps must be one of {STUDENT_STEPS}, got {student_steps!r}.") from None
    if steps not in STUDENT_STEPS or float(student_steps) != steps:
        raise InputError(f"Student steps must be one of {STUDENT_STEPS}, got {student_steps!r}.")
    return prompt, int(seed_f), g, steps


class Comparer:
    """Runs comparisons on one loaded teacher.

    Args:
        teacher: a `cdlab.teachers.Teacher`.
        adapters_root: where local students live (default: `cdlab.students.ADAPTERS_DIR`).
        allow_external: offer the external students (LCM-LoRA, TCD, ...); only meaningful on SD1.5 with the hub.
    """

    def __init__(self, teacher: Any, adapters_root: Path | None = None, allow_external: bool | None = None):
        self.teacher = teacher
        self.adapters_root = adapters_root
        if allow_external is None:  # SD1.5 LoRAs fit SD1.5's architecture (the hub model or sd15-random)
            allow_external = bool(getattr(teacher, "is_sd15_architecture", not is_tiny(teacher)))
        self.allow_external = allow_external

    # -- columns -----------------------------------------------------------------------------
    def students(self) -> list[Any]:
        """Local students that fit the teacher, read fresh from disk (a new one shows up at once)."""
        from cdlab.students import list_students

        return list_students(root=self.adapters_root, base_model=self.teacher.base_id)

    def external_keys(self) -> list[str]:
        if not self.allow_external:
            return []
        from cdlab.students import EXTERNAL_STUDENTS

        return list(EXTERNAL_STUDENTS)

    def column_choices(self) -> list[str]:
        """Every column the user can tick, in display order."""
        return ([TEACHER_50, TEACHER_4] + [s.name for s in self.students()]
                + [f"{k} (external)" for k in self.external_keys()])

    def _resolve_columns(self, names: list[str], guidance: float, steps: int) -> list[Column]:
        if not names:
            raise InputError("No column selected: tick at least one of the teacher or student columns.")
        if not all(isinstance(n, str) for n in names):
            raise InputError("Columns must be a list of column names.")
        names = list(dict.fromkeys(names))  # each column once: a repeated name would only cost time
        if len(names) > MAX_COLUMNS:
            raise InputError(f"{len(names)} columns selected; the limit is {MAX_COLUMNS}.")
        students = {s.name: s for s in self.students()}
        externals = {f"{k} (external)": k for k in self.external_keys()}
        cols = []
        for name in names:
            if name == TEACHER_50:
                cols.append(Column(TEACHER_50, "teacher", 50, guidance))
            elif name == TEACHER_4:
                cols.append(Column(TEACHER_4, "teacher", 4, guidance))
            elif name in students:
                card = students[name]
                cols.append(Column(f"{name} ({steps} steps)", "student", steps, 1.0, student=name, card=card))
            elif name in externals:
                cols.append(Column(f"{externals[name]} ({steps} steps)", "external", steps, student=externals[name]))
            else:
                raise InputError(
                    f"Unknown column {name[:80]!r}: the student may have been deleted or does not fit the loaded "
                    f"teacher ({self.teacher.base_id}). Refresh the columns."
                )
        return cols

    # -- sampling ----------------------------------------------------------------------------
    def run(
        self,
        prompt: str,
        seed: int,
        guidance: float,
        student_steps: int,
        columns: list[str],
        show_trajectory: bool = False,
        progress: Callable[[float, str], None] | None = None,
    ) -> CompareResult:
        """Sample every selected column from the same noise and text embeddings."""
        import torch

        from cdlab.students import activate_student

        prompt, seed, guidance, student_steps = validate_request(prompt, seed, guidance, student_steps)
        cols = self._resolve_columns(list(columns or []), guidance, student_steps)
        t = self.teacher
        pipe = t.pipe
        warnings = self._prompt_warnings(prompt)
        t_start = time.perf_counter()
        results: list[ColumnResult] = []
        # One lock per teacher: switching adapters and sampling are one unit, whatever the queue's
        # concurrency; Evaluate takes the same lock.
        from cdlab.teachers import teacher_lock

        with teacher_lock(t), torch.inference_mode():
            cond, uncond = t.encode([prompt])  # once for all columns
            x_T = t.initial_noise(seed)  # the same noise for every column
            for i, col in enumerate(cols):
                if progress:
                    progress(i / len(cols), f"sampling {col.label}")
                try:
                    results.append(self._sample_column(col, x_T, cond, uncond, show_trajectory, seed))
                except Exception as e:  # this column fails alone; the others render
                    reason = _short_reason(e)
                    warnings.append(f"{col.label}: {reason}")
                    results.append(ColumnResult(col.label, error_image(reason, t.resolution), 0.0, 0, col.steps,
                                                error=reason))
            activate_student(pipe, None)
        if results and all(r.error for r in results):
            raise InputError("; ".join(f"{r.label}: {r.error}" for r in results))
        _fill_speedups(results)
        if progress:
            progress(1.0, "done")
        return CompareResult(prompt, seed, guidance, student_steps, t.describe(), results, warnings,
                             time.perf_counter() - t_start)

    def _sample_column(self, col: Column, x_T, cond, uncond, show_trajectory: bool, seed: int) -> ColumnResult:
        """Activate the column's adapter (loading it if needed) and sample it; the caller holds the teacher lock."""
        import torch

        from cdlab.samplers import ddim_timesteps, sample_ddim, sample_student
        from cdlab.students import activate_student, load_student, make_scheduler
        from cdlab.timing import sync

        t = self.teacher
        pipe = t.pipe
        if col.kind == "student":
            load_student(pipe, col.student, root=self.adapters_root)
            activate_student(pipe, col.student)
        elif col.kind == "external":
            from cdlab.students import load_external_student

            col.card = load_external_student(pipe, col.student)
            activate_student(pipe, col.card.name)
        else:
            activate_student(pipe, None)
        sync(t.device)
        t0 = time.perf_counter()
        if col.kind == "teacher":
            out = sample_ddim(t.unet, x_T, cond, uncond, col.guidance, ddim_timesteps(col.steps),
                              t.scheduler, return_trajectory=show_trajectory)
        else:  # a local or an external student, by its card (stochastic schedulers: reproducible per seed)
            out = sample_student(t.unet, x_T, cond, uncond, col.card, col.steps, make_scheduler(t.pipe, col.card),
                                 return_trajectory=show_trajectory,
                                 generator=torch.Generator(device="cpu").manual_seed(seed))
        image = t.decode(out.latents)[0]
        sync(t.device)
        seconds = time.perf_counter() - t0
        traj, traj_steps = [], []
        if show_trajectory and out.x0_trajectory:
            idx = _subsample(len(out.x0_trajectory), MAX_TRAJECTORY_FRAMES)
            frames = torch.cat([out.x0_trajectory[j] for j in idx])
            traj, traj_steps = t.decode(frames), [j + 1 for j in idx]
        return ColumnResult(col.label, image, seconds, int(out.nfe), col.steps,
                            trajectory=traj, trajectory_steps=traj_steps)

    def _prompt_warnings(self, prompt: str) -> list[str]:
        tok = self.teacher.tokenizer
        n = len(tok(prompt).input_ids)
        if n > tok.model_max_length:
            return [f"The prompt is {n} tokens; the text encoder reads the first {tok.model_max_length}."]
        return []


def _short_reason(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_image(reason: str, resolution: int = 256, size: int = 256):
    """A grey square that says why a column could not be produced (shown in the column's place)."""
    import textwrap

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.text((8, 8), "column failed:", fill=(160, 0, 0))
    for i, line in enumerate(textwrap.wrap(reason, 38)[:14]):
        d.text((8, 26 + 15 * i), line, fill=(40, 40, 40))
    return img


def _subsample(n: int, k: int) -> list[int]:
    """``k`` evenly spread indices of ``range(n)``, always including the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _fill_speedups(results: list[ColumnResult]) -> None:
    """Speedup against teacher-50: measured when that column ran, else estimated from NFE (marked ≈)."""
    ref = next((r for r in results if r.label == TEACHER_50 and not r.error), None)
    for r in results:
        if r.error:
            continue
        if ref is not None and r.seconds > 0:
            r.speedup = ref.seconds / r.seconds
        elif r.nfe > 0:
            r.speedup, r.speedup_estimated = 100 / r.nfe, True  # teacher-50 with CFG: 100 NFE


def upscale(image, size: int = 256):
    """Enlarge a small image with nearest-neighbour so pixels stay crisp (tiny teacher: 32 px)."""
    from PIL import Image

    if image.width >= size:
        return image
    f = max(1, size // image.width)
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


def trajectory_strip(frames: list[Any], steps: list[int], cell: int = 96):
    """Frames side by side, each labelled with the step after which it was predicted."""
    from PIL import Image, ImageDraw

    if not frames:
        return None
    strip = Image.new("RGB", (cell * len(frames), cell + 14), "white")
    d = ImageDraw.Draw(strip)
    for i, (f, s) in enumerate(zip(frames, steps)):
        strip.paste(f.convert("RGB").resize((cell, cell), Image.NEAREST if f.width < cell else Image.BICUBIC), (i * cell, 0))
        d.text((i * cell + 3, cell + 1), f"step {s}", fill="black")
    return strip


def compose_comparison(result: CompareResult, cell: int = 256, with_trajectory: bool | None = None):
    """One captioned PNG: a header, then per column the image, its numbers and (optionally) its x0 strip."""
    from PIL import Image, ImageDraw

    if with_trajectory is None:
        with_trajectory = any(c.trajectory for c in result.columns)
    n = max(1, len(result.columns))
    line = 14
    header_h = 3 * line + 8
    caption_h = 3 * line + 6
    strips = [trajectory_strip(c.trajectory, c.trajectory_steps, cell=max(32, cell // 4)) if with_trajectory else None
              for c in result.columns]
    strip_h = max((s.height for s in strips if s is not None), default=0)
    strip_w = max((s.width for s in strips if s is not None), default=0)
    width = max(n * (cell + 8) + 8, strip_w + 8 + 8, 480)
    height = header_h + cell + caption_h + (len(result.columns) * (strip_h + line + 4) if strip_h else 0) + 8
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    prompt = result.prompt if len(result.prompt) <= 90 else result.prompt[:87] + "..."
    d.text((8, 4), f"prompt: {prompt}", fill="black")
    d.text((8, 4 + line), f"seed {result.seed} · guidance {result.guidance:g} · student steps {result.student_steps}", fill="black")
    d.text((8, 4 + 2 * line), f"teacher: {result.teacher}", fill="black")
    for i, c in enumerate(result.columns):
        x = 8 + i * (cell + 8)
        img = c.image.convert("RGB")
        img = img.resize((cell, cell), Image.NEAREST if img.width < cell else Image.BICUBIC)
        canvas.paste(img, (x, header_h))
        sp = "–" if c.speedup is None else f"{'≈' if c.speedup_estimated else ''}{c.speedup:.1f}x"
        y = header_h + cell + 2
        d.text((x, y), c.label[:40], fill="black")
        d.text((x, y + line), f"{c.seconds:.2f} s · NFE {c.nfe}", fill="black")
        d.text((x, y + 2 * line), f"speedup {sp}", fill="black")
    y = header_h + cell + caption_h
    for c, s in zip(result.columns, strips):
        if s is None:
            continue
        d.text((8, y), f"x0 predictions: {c.label}", fill="black")
        canvas.paste(s, (8, y + line))
        y += s.height + line + 4
    return canvas
