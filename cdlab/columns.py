"""Columns: the one way cdlab samples "the teacher and its students side by side".

A :class:`Column` says what to sample (the teacher at ``steps`` DDIM steps with CFG, a consistency student at
``steps`` consistency steps, or an external student with its own diffusers scheduler); :func:`run_columns`
samples a list of them on the same prompts from the same initial noise, and returns each column's images,
latents, NFE, timings and (optionally) its x_0 / x_t trajectory. Compare (micro-batching and a cache on top),
Edit (a technique on top), Evaluate (metrics on top), ``generate``, ``figures``, ``bench`` and ``doctor`` all
sample through it::

    from cdlab.columns import run_columns, student_column, teacher_columns
    runs = run_columns(teacher, teacher_columns(7.5) + [student_column(card, 4)], ["a red circle"], seeds=[0])
    [(r.column.label, r.nfe, r.seconds) for r in runs]

**The seeding rule** (:func:`initial_noise`, :func:`step_generator`): image ``i`` of a call starts from
``teacher.initial_noise(seeds[i])`` (a CPU generator, so a seed gives the same latents on every device), the
same noise in every column; a stochastic sampler draws its noise from a CPU generator seeded with the first
image's seed (a diffusers scheduler: LCM, TCD), or with that seed + 1 for consistency re-noising (Song et al.
2023, Alg. 1), so its first draw is not ``x_T`` again.

**The student switch**: each student column runs inside ``use_student(pipe, name, fuse=...)``: its fused
weights ``W + dW`` swapped into the UNet (computed once, outside the timed sampling: ``load_seconds``), or with
``fuse=False`` peft's unfused adapter; the plain teacher is active again afterwards.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cdlab.models import EpsModel
from cdlab.samplers import SampleOutput, consistency_timesteps, ddim_timesteps, grid_shift, sample_ddim, sample_student
from cdlab.students import load_external_student, load_student, make_scheduler, prepare_student, use_student
from cdlab.teachers import teacher_lock
from cdlab.timing import sync

__all__ = ["TEACHER_50", "TEACHER_4", "STUDENT_STEPS", "AS_TRAINED", "Column", "ColumnRun", "teacher_columns",
           "column_steps", "steps_text", "student_column",
           "check_strength", "scheduler_timesteps", "start_timesteps", "initial_noise", "step_generator",
           "encode_prompts", "sample_column", "short_reason", "run_columns"]

TEACHER_50 = "teacher-50 (CFG)"
TEACHER_4 = "teacher-4 (naive)"
STUDENT_STEPS = (1, 2, 4, 8)
AS_TRAINED = "as trained"  # the student-steps choice that runs each student at its card's ``steps``

Cond = tuple[torch.Tensor, "torch.Tensor | None"]  # one prompt role's (cond, uncond) embeddings, a row per image
# technique(teacher, column, card, x_T, conds, *, generator, return_trajectory) -> SampleOutput (cdlab.edit)
Technique = Callable[..., SampleOutput]


@dataclass
class Column:
    """One column: the teacher at ``steps`` DDIM+CFG steps, a consistency student at ``steps`` consistency
    steps, or an external student (LCM-LoRA, TCD, PCM, Hyper-SD) at ``steps`` steps of its own scheduler.

    Args:
        name (`str`): ``TEACHER_50``, ``TEACHER_4``, or the student's name (an external student: its key).
        kind (`str`): ``"teacher"``, ``"student"`` (a consistency student) or ``"external"`` (a student with its
            own diffusers scheduler, its card's ``scheduler``).
        steps (`int`): sampling steps.
        guidance (`float`): the CFG scale (teacher: its own; consistency students: 1, distilled in; external
            students: their card's, 1 for the four published ones). Above 1 a step costs 2 NFE.
        num_boundaries (`int`, *optional*): a student's N (its card's ``num_boundaries``).
        student (`str`, *optional*): the adapter to switch on (an external student: its catalogue key).
        card (*optional*): the student's card; when None, the card the runner loads is used.
        label (`str`): what the column is called on screen (default ``name``; Compare shows
            ``"<name> (<steps> steps)"`` for a student).
    """

    name: str
    kind: str
    steps: int
    guidance: float = 1.0
    num_boundaries: int | None = None
    student: str | None = None
    card: Any = field(default=None, compare=False, repr=False)
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("teacher", "student", "external"):
            raise ValueError(f"column {self.name!r}: kind must be teacher, student or external, got {self.kind!r}")
        if not self.label:
            self.label = self.name

    def method(self, teacher: Any = None) -> str:
        """What the column is, in words (Compare's caption line); a teacher column names ``teacher``'s solver."""
        if self.kind == "teacher":
            return (f"teacher · {getattr(teacher, 'solver', 'DDIM')} {self.steps} steps" + (f" · CFG {self.guidance:g}" if self.guidance != 1 else "")
                    + (" (naive)" if self.steps < 50 else ""))
        m = str(getattr(self.card, "method", "") or "").upper()
        if self.kind == "external":
            return f"{self.student} · published LoRA · {getattr(self.card, 'scheduler', '') or 'own scheduler'}"
        n = getattr(self.card, "num_boundaries", None)
        return f"student · {m}" + (f" · N={n}" if n else "")


def teacher_columns(guidance: float) -> list[Column]:
    """The two teacher columns of Compare and Edit: 50 DDIM+CFG steps, and naively 4."""
    return [Column(TEACHER_50, "teacher", 50, float(guidance)), Column(TEACHER_4, "teacher", 4, float(guidance))]


def column_steps(card: Any, steps: int | None) -> int:
    """The steps a student's column runs: ``steps``, or None (`AS_TRAINED`) for the card's own ``steps`` (a 1-step
    student at 1, a 4-step one at 4); ``card`` is a `StudentCard` or a published student's entry."""
    return int(card.steps) if steps is None else int(steps)


def steps_text(steps: int) -> str:
    """``"1 step"``, ``"4 steps"``: a column's step count in its label and caption."""
    return f"{steps} step{'' if steps == 1 else 's'}"


def student_column(card: Any, steps: int | None = 4, label: str = "") -> Column:
    """A student's column from its card: ``"student"`` for a consistency student (cdlab's own), ``"external"``
    for one that samples with its own diffusers scheduler (LCM-LoRA, TCD, PCM, Hyper-SD: ``card.scheduler``).
    ``steps`` None: the card's own (a 1-step student at 1 step, a 4-step one at 4)."""
    steps = column_steps(card, steps)
    if getattr(card, "scheduler", "consistency") == "consistency":
        nb = getattr(card, "num_boundaries", None)  # None: a student of any step count (2-rectified flow)
        return Column(card.name, "student", int(steps), 1.0, int(nb) if nb else None, card.name, label=label)
    nb = getattr(card, "num_boundaries", None)
    return Column(card.name, "external", int(steps), float(getattr(card, "guidance", 1.0) or 1.0),
                  int(nb) if nb else None, card.name, card, label=label)


# ----------------------------------------------------------------------------- strength: where a column starts

def check_strength(strength: Any, what: str = "strength") -> float:
    """A finite number in [0, 1], or ``ValueError`` naming the field."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ValueError(f"{what}: expected a number in [0, 1], got {strength!r}")
    s = float(strength)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise ValueError(f"{what}: must be a finite number in [0, 1], got {strength!r}")
    return s


def _img2img_tail(timesteps: Sequence[int], steps: int, strength: float) -> list[int]:
    """diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: the last ``min(int(N s), N)`` of N."""
    k = min(int(steps * strength), steps)
    ts = [int(t) for t in timesteps]
    return ts[len(ts) - k:] if k > 0 else []


def scheduler_timesteps(scheduler: Any, steps: int, strength: float = 1.0) -> list[int]:
    """An external student's timesteps at ``strength``, as diffusers' ``StableDiffusionImg2ImgPipeline`` runs
    them with that scheduler (the pipeline LCM-LoRA's, TCD's, PCM's and Hyper-SD's img2img snippets use):
    ``scheduler.set_timesteps(steps)``, then the last ``min(int(N s), N)``, and ``set_begin_index`` where the
    scheduler has it. This sets (mutates) ``scheduler``: pass a fresh one
    (``cdlab.students.make_scheduler``) and step it over exactly these timesteps (:class:`SchedulerStep`)."""
    s = check_strength(strength)
    scheduler.set_timesteps(int(steps))
    all_ts = [int(t) for t in scheduler.timesteps]
    ts = _img2img_tail(all_ts, len(all_ts), s)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(len(all_ts) - len(ts))
    return ts


def start_timesteps(column: Column, strength: float = 1.0, num_train_timesteps: int = 1000,
                    scheduler: Any = None, card: Any = None) -> list[int]:
    """The timesteps a column runs at ``strength`` (the first is where the image is noised to; [] = no step).

    Teacher (diffusers' img2img ``get_timesteps``): the last ``min(int(N s), N)`` of ``ddim_timesteps(N)``;
    50 steps at s = 0.5 -> 25 steps from 499. Student (its boundaries B = ``consistency_timesteps(N, N)``,
    999/750/500/250 for N = 4): ``consistency_timesteps(k, N)`` restricted to ``<= min{b in B : b >= s T}``;
    k = N = 4 at s = 0.5 -> [500, 250], at s = 0.6 -> [750, 500, 250]; an N = 1 student always starts at 999.
    A student whose card (``card``, else ``column.card``) carries a timestep shift has it on both grids
    (:func:`cdlab.samplers.grid_shift`).
    External student: :func:`scheduler_timesteps` of its fresh ``scheduler`` (required), diffusers' rule.
    """
    s = check_strength(strength)
    T = int(num_train_timesteps)
    if column.kind == "external":
        if scheduler is None:
            raise ValueError(f"column {column.name!r}: an external student's timesteps need its scheduler")
        return scheduler_timesteps(scheduler, column.steps, s)
    if s == 0.0:
        return []
    if column.kind == "teacher":
        return _img2img_tail(ddim_timesteps(column.steps, T), column.steps, s)
    n = int(column.num_boundaries or column.steps)
    shift = grid_shift(card if card is not None else column.card)
    boundaries = consistency_timesteps(n, n, T, shift)
    t_start = min(int(round(s * T)), T - 1)
    top = min(b for b in boundaries if b >= t_start)
    return [t for t in consistency_timesteps(column.steps, n, T, shift) if t <= top]


# ----------------------------------------------------------------------------- the seeding rule

def initial_noise(teacher: Any, seeds: Sequence[int]) -> torch.Tensor:
    """``x_T`` for a call: image ``i`` from ``teacher.initial_noise(seeds[i])``, the same in every column."""
    return torch.cat([teacher.initial_noise(int(s), 1) for s in seeds])


def step_generator(seeds: Sequence[int], *, renoise: bool = False) -> torch.Generator:
    """The noise source of a stochastic sampler: a CPU generator seeded with the first image's seed (the
    diffusers schedulers of LCM and TCD), or with it + 1 for consistency re-noising (``renoise``), whose
    first draw must not repeat ``x_T``."""
    return torch.Generator(device="cpu").manual_seed(int(seeds[0]) + (1 if renoise else 0))


def encode_prompts(teacher: Any, prompts: Sequence[str | Sequence[str]]) -> list[Cond]:
    """One ``(cond, uncond)`` per prompt role, from one prompt (or one tuple of prompts: an anagram's or a
    hybrid's two) per image; plain sampling has one role, encoded in one text-encoder call."""
    rows = [(p,) if isinstance(p, str) else tuple(p) for p in prompts]
    return [teacher.encode(list(role)) for role in zip(*rows)]


# ----------------------------------------------------------------------------- the student switch

def _load(teacher: Any, col: Column, root: Any, check_base: bool, fuse: bool) -> tuple[Any, str | None]:
    """Load ``col``'s student (idempotent) and, when ``fuse``, compute its fused weights: ``(card, adapter)``."""
    pipe = teacher.pipe
    base = teacher.base_id if check_base else None
    card = col.card
    if col.kind == "student":
        fingerprint = teacher.base_fingerprint if check_base else None
        loaded = load_student(pipe, col.student, root=root, base_model=base, base_fingerprint=fingerprint,
                              activate=False)
        card = loaded if card is None else card
    elif col.kind == "external":
        loaded = load_external_student(pipe, col.student, base_model=base)
        card = loaded if card is None else card
    adapter = None if col.kind == "teacher" else col.student
    if adapter is not None and fuse:
        prepare_student(pipe, adapter)  # computed once per version of the student: load time, not sampling
    return card, adapter


# ----------------------------------------------------------------------------- the runner

@dataclass
class ColumnRun:
    """One column's output for every image of a :func:`run_columns` call.

    Args:
        column (`Column`): the column.
        card: the student's card (None for the teacher).
        images: ``decode(latents)``: a list of PIL images by default (None when ``decode=None``).
        latents (`torch.Tensor`): the final latents ``[B, C, h, w]``.
        nfe (`int`): network evaluations per image (a CFG step counts 2).
        timesteps (`list[int]`): where the network was evaluated.
        seconds (`float`): wall time of the sampling and decoding of all images (device-synchronised).
        load_seconds (`float`): loading the student and preparing its fused weights (first use), apart.
        x0_trajectory, xt_trajectory (`list[torch.Tensor]`): per step, the x_0 prediction and the x_t it was
            made from, ``[B, C, h, w]`` each (empty unless ``return_trajectory``).
        error (`BaseException`, *optional*): why the column failed (``capture_errors=True`` only).
    """

    column: Column
    card: Any = None
    images: Any = None
    latents: torch.Tensor | None = None
    nfe: int = 0
    timesteps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0
    x0_trajectory: list[torch.Tensor] = field(default_factory=list)
    xt_trajectory: list[torch.Tensor] = field(default_factory=list)
    error: BaseException | None = None


def sample_column(teacher: Any, column: Column, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                  *, card: Any = None, guidance: Any = None, generator: torch.Generator | None = None,
                  stochastic: bool = False, return_trajectory: bool = False, unet: Any = None,
                  scheduler: Any = None) -> SampleOutput:
    """One column's plain sampling, with the student already switched on: the teacher by DDIM with CFG
    (`sample_ddim` over ``ddim_timesteps(steps)``), a student by its card's recipe (`sample_student`).

    Args:
        card: the student's card (default ``column.card``).
        guidance: the teacher's CFG scale, a float or one per image (default ``column.guidance``).
        generator: the noise of stochastic samplers (:func:`step_generator`).
        unet: the network to call (default ``teacher.unet``; ``bench`` passes a compiled one).
        scheduler: a student's schedule (default a fresh ``make_scheduler(pipe, card)``).
    """
    unet = teacher.unet if unet is None else unet
    model_class = getattr(teacher, "model_class", EpsModel)  # a flow teacher: FlowModel, where DDIM is Euler
    if column.kind == "teacher":
        w = float(column.guidance) if guidance is None else guidance
        return sample_ddim(unet, x_T, cond, uncond, w, ddim_timesteps(column.steps), teacher.scheduler,
                           return_trajectory=return_trajectory, model_class=model_class)
    card = column.card if card is None else card
    scheduler = make_scheduler(teacher.pipe, card) if scheduler is None else scheduler
    return sample_student(unet, x_T, cond, uncond, card, column.steps, scheduler, stochastic=stochastic,
                          generator=generator, return_trajectory=return_trajectory, model_class=model_class)


def short_reason(e: BaseException, limit: int = 300) -> str:
    """An exception in one line of at most ``limit`` characters (what a failed column shows)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(n: int, col: Column, guidance: Sequence[float] | None, max_rows: int | None) -> list[slice]:
    """Row chunks of at most ``max_rows`` UNet rows each (a CFG image counts 2)."""
    if max_rows is None:
        return [slice(0, n)]
    g = col.guidance if guidance is None else guidance[0]
    per = max(1, int(max_rows) // (2 if (col.kind == "teacher" and g != 1.0) else 1))
    return [slice(lo, min(lo + per, n)) for lo in range(0, n, per)]


def _guidance(col: Column, guidance: Sequence[float] | None, rows: slice, like: torch.Tensor) -> Any:
    """The CFG scale of a chunk: the column's, or per image (a ``[B]`` tensor; a float for one image)."""
    if guidance is None:
        return float(col.guidance)
    g = list(guidance)[rows]
    return torch.tensor(g, device=like.device, dtype=like.dtype) if len(g) > 1 else float(g[0])


def _join(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [x for p in parts for x in p]


def _run_one(teacher: Any, col: Column, card: Any, adapter: str | None, x_T: torch.Tensor, conds: list[Cond],
             seeds: Sequence[int], *, guidance, technique, stochastic, return_trajectory, decode, fuse,
             max_rows) -> ColumnRun:
    """Sample and decode one (loaded) column for every image, timed apart from its loading."""
    run = ColumnRun(col, card)
    sync(teacher.device)
    t0 = time.perf_counter()
    outs, images = [], []
    with use_student(teacher.pipe, adapter, fuse=fuse):
        for rows in _chunks(x_T.shape[0], col, guidance, max_rows):
            x = x_T[rows] if rows != slice(0, x_T.shape[0]) else x_T
            part = [(c[rows], None if u is None else u[rows]) if x is not x_T else (c, u) for c, u in conds]
            gen = step_generator(list(seeds)[rows], renoise=stochastic and col.kind == "student")
            if technique is not None:
                o = technique(teacher, col, card, x, part, generator=gen, return_trajectory=return_trajectory)
            else:
                o = sample_column(teacher, col, x, *part[0], card=card, guidance=_guidance(col, guidance, rows, x),
                                  generator=gen, stochastic=stochastic, return_trajectory=return_trajectory)
            outs.append(o)
            if decode is not None:
                images.append(decode(o.latents))
    sync(teacher.device)
    run.seconds = time.perf_counter() - t0
    run.images = _join(images) if images else None
    run.latents = _join([o.latents for o in outs])
    run.nfe, run.timesteps = int(outs[-1].nfe), list(outs[-1].timesteps)
    if return_trajectory:
        run.x0_trajectory = [_join(list(f)) for f in zip(*[o.x0_trajectory for o in outs])]
        run.xt_trajectory = [_join(list(f)) for f in zip(*[o.xt_trajectory for o in outs])]
    return run


def _load_and_run(teacher: Any, col: Column, x_T: torch.Tensor, conds: list[Cond], seeds: Sequence[int], *,
                  adapters_root: Any, check_base: bool, capture_errors: bool, **sampling: Any) -> ColumnRun:
    """Load one column's student (timed apart), then sample it; with ``capture_errors`` a failure is its ``error``."""
    card = col.card
    try:
        t_load = time.perf_counter()
        card, adapter = _load(teacher, col, adapters_root, check_base, sampling["fuse"])
        load_seconds = time.perf_counter() - t_load
        run = _run_one(teacher, col, card, adapter, x_T, conds, seeds, **sampling)
        run.load_seconds = load_seconds
        return run
    except Exception as e:  # with capture_errors this column fails alone; the others run
        if not capture_errors:
            raise
        return ColumnRun(col, card, error=e)


@torch.no_grad()
def run_columns(
    teacher: Any,
    columns: Sequence[Column],
    prompts: Sequence[str | Sequence[str]],
    seeds: Sequence[int],
    *,
    noise: torch.Tensor | None = None,
    embeddings: Sequence[Cond] | None = None,
    guidance: Sequence[float] | None = None,
    technique: Technique | None = None,
    stochastic: bool = False,
    return_trajectory: bool = False,
    decode: Callable[[torch.Tensor], Any] | None | str = "pil",
    fuse: bool = True,
    adapters_root: Any = None,
    check_base: bool = True,
    max_rows: int | None = None,
    capture_errors: bool = False,
) -> list[ColumnRun]:
    """Sample every column on the same prompts from the same initial noise.

    Args:
        teacher (`cdlab.teachers.Teacher`): the teacher; students run on its UNet (the student switch above).
        columns: :func:`teacher_columns`, :func:`student_column` or :class:`Column` entries.
        prompts: one prompt per image (an anagram's or a hybrid's technique: a tuple of its prompts per image).
        seeds: one seed per image: the seeding rule (:func:`initial_noise`, :func:`step_generator`).
        noise (`torch.Tensor`, *optional*): ``x_T`` itself instead of the seeds' (the seeds still drive
            stochastic samplers).
        embeddings (*optional*): the prompts already encoded, ``[(cond, uncond)]`` per prompt role.
        guidance (*optional*): a CFG scale per image for teacher columns (Compare's batched requests), instead
            of the column's.
        technique (*optional*): ``technique(teacher, column, card, x_T, conds, *, generator, return_trajectory)
            -> SampleOutput`` instead of plain sampling (an edit: ``cdlab.edit.EditTechnique``); it gets every
            image at once (``max_rows`` does not split it).
        stochastic (`bool`): consistency students re-noise between steps (Song et al. 2023, Alg. 1).
        return_trajectory (`bool`): keep each step's x_0 prediction and x_t.
        decode: ``decode(latents)`` inside the timed sampling; ``"pil"`` (default) ``teacher.decode``; None: none.
        fuse (`bool`): students run with fused weights (default) or peft's unfused adapter.
        adapters_root: where local students live (default ``cdlab.paths.adapters_dir()``).
        check_base (`bool`): refuse a student of another base model when loading it.
        max_rows (`int`, *optional*): the most UNet rows one call gets (a CFG image counts 2; plain sampling only).
        capture_errors (`bool`): a column that fails gets ``error`` and the others still run; default: raise.

    Returns:
        One :class:`ColumnRun` per column, in order.
    """
    decode = teacher.decode if decode == "pil" else decode
    runs: list[ColumnRun] = []
    with teacher_lock(teacher):
        conds = list(embeddings) if embeddings is not None else encode_prompts(teacher, prompts)
        x_T = initial_noise(teacher, seeds) if noise is None else noise
        try:
            for col in columns:
                runs.append(_load_and_run(teacher, col, x_T, conds, seeds, adapters_root=adapters_root,
                                          check_base=check_base, capture_errors=capture_errors, guidance=guidance,
                                          technique=technique, stochastic=stochastic,
                                          return_trajectory=return_trajectory, decode=decode, fuse=fuse,
                                          max_rows=None if technique is not None else max_rows))
        finally:
            with use_student(teacher.pipe, None):  # loading an external student activates it: the teacher again
                pass
    return runs
