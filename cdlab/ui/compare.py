"""The Compare tab: the teacher and its students side by side, from one noise and one text encoding.

Columns: the teacher at 50 DDIM steps with CFG, the teacher naively at 4 steps, every local student
whose base is the loaded teacher, and (SD1.5 with the hub) the external students. Students are named
peft adapters on the teacher's one UNet, switched per column; the text embeddings and the initial
noise are computed once per request. `Comparer.stream` yields each request's columns as they finish, the
students' first; what a request returns is in `cdlab.ui.compare_result`.
"""
from __future__ import annotations

import copy
import math
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cdlab.batching import MicroBatcher
from cdlab.columns import (AS_TRAINED, STUDENT_STEPS, TEACHER_4, TEACHER_50, Column, run_columns, short_reason,
                           steps_text, column_steps)
from cdlab.prompts import COURSE_PROMPTS, tiny_prompts
from cdlab.samplers import consistency_timesteps, grid_shift, student_timesteps
from cdlab.students import EXTERNAL_STUDENTS, students_of
from cdlab.teachers import class_names, is_tiny, serving_rows, teacher_lock
from cdlab.ui.compare_result import ColumnResult, CompareResult, fill_speedups
from cdlab.ui.compare_view import error_image
from cdlab.world.grammar import MAX_PROMPT_CHARS, nearest_caption

__all__ = ["TEACHER_50", "TEACHER_4", "STUDENT_STEPS", "AS_TRAINED", "STEPS_CHOICES", "InputError", "Column", "ColumnResult", "CompareResult",
           "Comparer", "tiny_prompts", "prompt_presets", "is_tiny", "random_seed", "validate_request", "check_class_prompt",
           "trajectory_grid", "align_to_grid"]

SEED_MAX = 2**32 - 1
GUIDANCE_RANGE = (1.0, 20.0)
MAX_COLUMNS = 32

class InputError(ValueError):
    """A request the app refuses with a message for the user (the server stays up)."""


def prompt_presets(teacher: Any) -> list[str]:
    """The presets for the loaded teacher: tiny-world captions for the tiny teacher, else the course's prompts."""
    return tiny_prompts() if is_tiny(teacher) else list(COURSE_PROMPTS)


def random_seed() -> int:
    return random.randint(0, 2**31 - 1)


def check_class_prompt(teacher: Any, prompt: str, field_name: str) -> None:
    """For a class-conditioned teacher (`cdlab.teachers.class_names`), refuse a prompt that is not one of its
    classes with `InputError` naming ``field_name``; an empty prompt (unconditional) and a text teacher's pass."""
    if prompt and class_names(teacher):
        try:
            teacher.class_index(prompt)
        except ValueError as e:
            raise InputError(f"{field_name}: {e}") from None


STEPS_CHOICES = (AS_TRAINED, *(str(k) for k in STUDENT_STEPS))  # the student-steps radio, Compare's and Edit's


def validate_request(prompt: Any, seed: Any, guidance: Any,
                     student_steps: Any) -> tuple[str, int, float, int | None]:
    """Check and normalise the Compare inputs; raise `InputError` with a clear message. The student steps are
    one of `STUDENT_STEPS`, or None for `AS_TRAINED` (each student at its card's steps)."""
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
    if student_steps == AS_TRAINED:
        return prompt, int(seed_f), g, None
    want = f"Student steps must be {AS_TRAINED!r} or one of {STUDENT_STEPS}, got {str(student_steps)[:40]!r}."
    try:
        steps = int(student_steps)
    except (TypeError, ValueError, OverflowError):
        raise InputError(want) from None
    if isinstance(student_steps, bool) or steps not in STUDENT_STEPS or float(student_steps) != steps:
        raise InputError(want)
    return prompt, int(seed_f), g, steps


def trajectory_grid(student_steps: int | None, columns: list[Column]) -> list[int]:
    """The timesteps a trajectory is shown at: the students' own (``consistency_timesteps(k, k)``: 999, 750,
    500, 250 for 4 steps), and at least the naive teacher's 4 when that column is shown, so every step of
    every few-step column has its cell. A student sampled on a shifted grid (its card's shift,
    :func:`cdlab.samplers.grid_shift`: 999, 474, 231, 91 at 0.3) adds the steps of it that are farther than
    half a spacing from every point (91: [999, 750, 500, 250, 91]); its others share the nearest cell."""
    ks = [c.steps for c in columns if c.kind != "teacher" or c.steps < 50] + ([student_steps] if student_steps else [])
    k = max(ks or [4])
    grid = consistency_timesteps(k, k)
    half = (grid[0] - grid[1]) / 2 if len(grid) > 1 else grid[0]
    for c in columns:
        if c.kind == "student" and c.card is not None and grid_shift(c.card) != 1.0:
            grid += [t for t in student_timesteps(c.card, c.steps) if all(abs(t - g) > half for g in grid)]
    return sorted(set(grid), reverse=True)


def align_to_grid(timesteps: list[int], grid: list[int]) -> list[int | None]:
    """For each grid timestep, the index of the column's step nearest to it, or None when the column has no
    step within half a grid spacing (a 4-step column on an 8-step grid fills every other cell). A column with
    many steps (teacher-50: every 20) contributes its step nearest each grid point, ties to the noisier one."""
    if not timesteps:
        return [None] * len(grid)
    spacing = (grid[0] - grid[1]) if len(grid) > 1 else grid[0]
    out: list[int | None] = []
    for g in grid:
        j = min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - g), -timesteps[i]))
        out.append(j if abs(timesteps[j] - g) <= spacing / 2 else None)
    return out


@dataclass
class _Request:
    """One validated Compare request, as the batcher holds it."""

    prompt: str
    seed: int
    guidance: float
    student_steps: int | None  # None: each student at its card's steps
    columns: list[Column]
    show_trajectory: bool
    warnings: list[str]
    t_submit: float = 0.0
    partial: Callable[[CompareResult], None] | None = None  # called with each partial result (`Comparer.stream`)
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # its partials and result share it


@dataclass
class _Sampled:
    """A column's raw output for one request, before decoding the trajectory onto the grid."""

    latents_image: Any  # PIL image
    seconds: float
    nfe: int
    timesteps: list[int]
    x0: list[Any]  # latents per step (empty unless a trajectory was asked)
    xt: list[Any]
    batch: int = 1
    cached: bool = False
    load_seconds: float = 0.0


@dataclass
class _Batch:
    """The requests one `Comparer._serve` call samples (it grows as requests join), their text embeddings, the
    columns done per request, and the units still to sample (column key -> its ``(request index, column)``s)."""

    reqs: list[_Request] = field(default_factory=list)
    conds: list[Any] = field(default_factory=list)
    unconds: list[Any] = field(default_factory=list)
    done: list[dict[str, ColumnResult]] = field(default_factory=list)
    units: dict[tuple, list[tuple[int, Column]]] = field(default_factory=dict)


class Comparer:
    """Runs comparisons on one loaded teacher.

    Requests go through a `cdlab.batching.MicroBatcher`: requests that arrive while one is sampling are
    served together, each column's UNet calls batched across them (each request keeps its own prompt,
    seed, noise and guidance, so its images are the ones it would get alone, up to float rounding of a
    larger batch). Teacher columns are cached by (prompt, seed, guidance, steps): changing only the
    student steps or the student columns does not sample the teacher again. Columns are sampled by
    `cdlab.columns.run_columns`: students with their fused weights swapped into the UNet, so they cost what a
    plain UNet costs. A batch samples its cheapest columns first (students, then the naive teacher, then
    teacher-50), and `stream` yields each request's columns as they finish: the lesson first.

    Args:
        teacher: a `cdlab.teachers.Teacher`.
        adapters_root: where local students live (default: `cdlab.students.ADAPTERS_DIR`).
        allow_external: offer the external students (LCM-LoRA, TCD, ...); only meaningful on SD1.5 with the hub.
        batching (`bool`): serve concurrent requests together (default on).
        max_batch_requests (`int`): the most requests one batch takes.
        max_rows (`int`, *optional*): the most rows one UNet call gets (a CFG request counts 2); default
            `cdlab.teachers.serving_rows`: 128 on a small UNet (the tiny and flow teachers), SD1.5's 8 on CUDA, 4
            on the CPU.
        cache_size (`int`): teacher columns kept (least recently used dropped).
        fuse (`bool`): run students with fused weights (default on); off: peft's unfused LoRA layers.
    """

    def __init__(self, teacher: Any, adapters_root: Path | None = None, allow_external: bool | None = None,
                 *, batching: bool = True, max_batch_requests: int = 32, max_rows: int | None = None,
                 cache_size: int = 64, fuse: bool = True):
        self.teacher = teacher
        self.adapters_root = adapters_root
        if allow_external is None:  # SD1.5 LoRAs fit SD1.5's architecture (the hub model or sd15-random)
            allow_external = bool(getattr(teacher, "is_sd15_architecture", not is_tiny(teacher)))
        self.allow_external = allow_external
        self.max_rows = max(2, int(serving_rows(teacher) if max_rows is None else max_rows))
        self.fuse = fuse
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, _Sampled] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.batcher = MicroBatcher(self._serve, max_items=max_batch_requests) if batching else None

    # -- columns -----------------------------------------------------------------------------
    def students(self) -> list[Any]:
        """Local students that fit the teacher, read fresh from disk (a new one shows up at once)."""
        return students_of(self.teacher, self.adapters_root)

    def external_keys(self) -> list[str]:
        if not self.allow_external:
            return []
        return list(EXTERNAL_STUDENTS)

    def column_choices(self) -> list[str]:
        """Every column the user can tick, in display order."""
        return ([TEACHER_50, TEACHER_4] + [s.name for s in self.students()]
                + [f"{k} (external)" for k in self.external_keys()])

    def _resolve_columns(self, names: list[str], guidance: float, steps: int | None) -> list[Column]:
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
                k = column_steps(card, steps)
                cols.append(Column(name, "student", k, 1.0, student=name, card=card, label=f"{name} ({steps_text(k)})"))
            elif name in externals:
                key = externals[name]
                k = column_steps(EXTERNAL_STUDENTS[key], steps)
                cols.append(Column(key, "external", k, student=key, label=f"{key} ({steps_text(k)})"))
            else:
                raise InputError(
                    f"Unknown column {name[:80]!r}: the student may have been deleted or does not fit the loaded "
                    f"teacher ({self.teacher.base_id}). Refresh the columns."
                )
        return cols

    def prompt_notice(self, prompt: str) -> tuple[str, str | None]:
        """For the tiny teacher: a notice when ``prompt`` is not a caption of its grammar, naming the words it
        does not know, and the nearest caption (offered in one click). ``("", None)`` for a caption of the
        grammar and for SD1.5 (which takes any prompt)."""
        if not is_tiny(self.teacher) or not isinstance(prompt, str) or not prompt.strip():
            return "", None
        if len(prompt) > MAX_PROMPT_CHARS:  # refused before any parsing, as Compare refuses it
            return f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.", None
        caption, unknown = nearest_caption(prompt)
        if caption.text == " ".join(prompt.lower().split()).rstrip("."):
            return "", None
        words = ", ".join(f"“{w}”" for w in unknown[:8]) + (" …" if len(unknown) > 8 else "")
        why = f"it does not know {words}" if unknown else "the words are not in its caption order"
        return (f"The tiny teacher only knows its world's captions (size, colour, shape, position, background): "
                f"{why}, so expect shapeless colour. Nearest caption: “{caption.text}”.", caption.text)

    # -- sampling ----------------------------------------------------------------------------
    def run(self, prompt: str, seed: int, guidance: float, student_steps: int | str, columns: list[str],
            show_trajectory: bool = False, progress: Callable[[float, str], None] | None = None) -> CompareResult:
        """Sample every selected column from the same noise and text embeddings (validated first): the last
        result of `stream`."""
        for res in self.stream(prompt, seed, guidance, student_steps, columns, show_trajectory, progress):
            pass
        return res

    def stream(self, prompt: str, seed: int, guidance: float, student_steps: int | str, columns: list[str],
               show_trajectory: bool = False, progress: Callable[[float, str], None] | None = None
               ) -> Iterator[CompareResult]:
        """`run`, yielding partial results as the request's columns finish (``pending`` names the rest; the
        newest only, when several finished since the last one was taken), then the whole result. Columns are
        sampled cheapest first (students, the naive teacher, then teacher-50), so the students' images come
        before teacher-50's. Without the batcher (``batching=False``) only the whole result is yielded.

        Raises:
            InputError: the inputs are refused, or every column failed.
        """
        prompt, seed, guidance, student_steps = validate_request(prompt, seed, guidance, student_steps)
        check_class_prompt(self.teacher, prompt, "Class")  # a class-conditioned teacher: its "prompt" is a class
        cols = self._resolve_columns(list(columns or []), guidance, student_steps)
        req = _Request(prompt, seed, guidance, student_steps, cols, bool(show_trajectory),
                       self.teacher.prompt_warnings(prompt), time.perf_counter())
        if self.batcher is None:
            out = self._serve([req])[0]
            if isinstance(out, BaseException):
                raise InputError(str(out)) if isinstance(out, _AllColumnsFailed) else out
            yield self._finish(out, progress)
            return
        updates: queue.Queue[CompareResult] = queue.Queue()
        req.partial = updates.put
        ticket = self.batcher.enqueue(req)
        said = ""
        while not ticket.done.is_set():
            try:
                latest = updates.get(timeout=0.25)
            except queue.Empty:  # still waiting: say so, once per change (not four messages a second)
                note = self._wait_note(ticket)
                if progress and note != said:
                    progress(0.0, note)
                said = note
                continue
            while not updates.empty():
                latest = updates.get_nowait()
            if not ticket.done.is_set():
                yield latest
        if isinstance(ticket.error, _AllColumnsFailed):
            raise InputError(str(ticket.error))
        if ticket.error is not None:
            raise ticket.error
        yield self._finish(ticket.result, progress)

    def _wait_note(self, ticket) -> str:
        if ticket.status != "waiting":
            return f"sampling, {ticket.status}"
        ahead = self.batcher.waiting_ahead(ticket)
        return f"waiting: {ahead} request{'s' * (ahead != 1)} ahead"

    @staticmethod
    def _finish(res: CompareResult, progress) -> CompareResult:
        if progress:
            progress(1.0, "done")
        return res

    def _serve(self, reqs: list[_Request]) -> list[CompareResult | BaseException]:
        """One batch: sample each column for all the requests that asked for it, cheapest first (`_unit_cost`),
        telling each request its partial result after each of its columns; before each column, the requests queued
        since the batch began join it (`MicroBatcher.adopt`: their students run before this batch's teacher-50).
        Returns each request's result (in its own column order), the adopted ones' after the others."""
        b = _Batch()
        with teacher_lock(self.teacher), torch.inference_mode():
            self._admit(b, reqs)
            while b.units:
                if self.batcher is not None:  # _serve runs on the batcher's worker
                    self._admit(b, self.batcher.adopt())
                key = min(b.units, key=_unit_cost)
                members = b.units.pop(key)
                self._run_unit(members, b.reqs, b.conds, b.unconds, b.done)
                self._publish(b.reqs, b.done, sorted({ri for ri, _ in members}))
            out: list[CompareResult | BaseException] = []
            for ri, r in enumerate(b.reqs):
                try:
                    out.append(self._result(r, b.done[ri], len(b.reqs)))
                except BaseException as e:
                    out.append(e)
        return out

    def _admit(self, b: _Batch, reqs: list[_Request]) -> None:
        """Add ``reqs`` to batch ``b``: their prompts encoded in one text-encoder call, their cached teacher columns
        done (and told), the others added to the batch's units."""
        if not reqs:
            return
        prompts = list(dict.fromkeys(r.prompt for r in reqs))
        cond_all, uncond_all = self.teacher.encode(prompts)
        index = {p: i for i, p in enumerate(prompts)}
        for r in reqs:
            ri, i = len(b.reqs), index[r.prompt]
            b.reqs.append(r)
            b.conds.append(cond_all[i:i + 1])
            b.unconds.append(uncond_all[i:i + 1])
            b.done.append({})
            for col in r.columns:
                hit = self._cache_get(self._cache_key(r, col), r.show_trajectory) if col.kind == "teacher" else None
                if hit is not None:
                    b.done[ri][col.label] = self._column_result(r, col, hit)
                else:
                    b.units.setdefault(self._unit_key(col, r, ri), []).append((ri, col))
            if b.done[ri]:
                self._publish(b.reqs, b.done, [ri])

    def _run_unit(self, members: list[tuple[int, Column]], reqs: list[_Request], conds, unconds,
                  done: list[dict[str, ColumnResult]]) -> None:
        """Sample one unit (a column for every request in ``members``) into ``done``; a failure fails this column
        alone, for every request in it (the other columns render)."""
        try:
            sampled = self._sample_unit(members, reqs, conds, unconds)
        except Exception as e:
            sampled = [e] * len(members)
        for (ri, col), s in zip(members, sampled):
            if not isinstance(s, BaseException):
                try:
                    done[ri][col.label] = self._column_result(reqs[ri], col, s)
                    if col.kind == "teacher":
                        self._cache_put(self._cache_key(reqs[ri], col), s)
                    continue
                except Exception as e:
                    s = e
            reason = short_reason(s)
            done[ri][col.label] = ColumnResult(col.label, _error_image(reason), 0.0, 0, col.steps,
                                               method=col.method(self.teacher), error=reason)

    def _publish(self, reqs: list[_Request], done: list[dict[str, ColumnResult]], which: list[int]) -> None:
        """Tell each request in ``which`` that still waits for a column its partial result."""
        for ri in which:
            r = reqs[ri]
            if r.partial is not None and len(done[ri]) < len(r.columns):
                r.partial(self._result(r, done[ri], len(reqs), partial=True))

    @staticmethod
    def _unit_key(col: Column, r: _Request, ri: int) -> tuple:
        """Columns with the same key are sampled in one batch across requests. External students step a
        diffusers scheduler whose noise comes from one generator per call: batched, a request's noise would
        depend on its neighbours, so each request's external column is its own unit."""
        if col.kind == "teacher":
            return ("teacher", col.steps, col.guidance != 1.0)
        if col.kind == "external":
            return ("external", col.student, col.steps, ri)
        return ("student", col.student, col.steps)

    def _cache_key(self, r: _Request, col: Column) -> tuple:
        return (self.teacher.base_id, r.prompt, r.seed, float(col.guidance), col.steps)

    def _cache_get(self, key: tuple, need_trajectory: bool) -> _Sampled | None:
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is None or (need_trajectory and not hit.x0):
                return None
            self._cache.move_to_end(key)
        return _Sampled(hit.latents_image, hit.seconds, hit.nfe, hit.timesteps, hit.x0, hit.xt, hit.batch, True)

    def _cache_put(self, key: tuple, s: _Sampled) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            self._cache[key] = s
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def _sample_unit(self, members: list[tuple[int, Column]], reqs: list[_Request], conds, unconds) -> list[_Sampled]:
        """Sample one column for every request in ``members`` through `cdlab.columns.run_columns` (each request
        from its own seed's noise, in row chunks of at most ``max_rows``); the caller holds the teacher lock. The
        time is the unit's wall time, activation and decoding included; loading is ``load_seconds``."""
        col = members[0][1]
        rows = [ri for ri, _ in members]
        emb = (torch.cat([conds[ri] for ri in rows]), torch.cat([unconds[ri] for ri in rows]))
        run = run_columns(self.teacher, [col], [reqs[ri].prompt for ri in rows], [reqs[ri].seed for ri in rows],
                          embeddings=[emb], guidance=[c.guidance for _, c in members],
                          return_trajectory=any(reqs[ri].show_trajectory for ri in rows), fuse=self.fuse,
                          adapters_root=self.adapters_root, check_base=False, max_rows=self.max_rows)[0]
        for _, c in members:
            c.card = run.card
        result: list[_Sampled] = []
        for j, ri in enumerate(rows):
            keep = reqs[ri].show_trajectory or col.kind == "teacher"  # a cached teacher column can show it later
            x0 = [f[j:j + 1] for f in run.x0_trajectory] if keep else []
            xt = [f[j:j + 1] for f in run.xt_trajectory] if x0 else []
            result.append(_Sampled(run.images[j], run.seconds, run.nfe, run.timesteps, x0, xt, batch=len(members),
                                   load_seconds=run.load_seconds))
        return result

    def _column_result(self, r: _Request, col: Column, s: _Sampled) -> ColumnResult:
        """One request's column from its sampled output, its trajectory decoded onto the request's grid."""
        cr = ColumnResult(col.label, s.latents_image, s.seconds, s.nfe, col.steps, method=col.method(self.teacher),
                          batch=s.batch, cached=s.cached, timesteps=s.timesteps,
                          load_seconds=0.0 if s.cached else s.load_seconds)
        grid = trajectory_grid(r.student_steps, r.columns) if r.show_trajectory else []
        if grid and s.x0:
            idx = align_to_grid(s.timesteps, grid)
            picked = [j for j in idx if j is not None]
            if picked:
                with torch.inference_mode():
                    frames = self.teacher.decode(torch.cat([s.x0[j] for j in picked] + [s.xt[j] for j in picked]))
                it0, itt = iter(frames[:len(picked)]), iter(frames[len(picked):])
                cr.trajectory = [next(it0) if j is not None else None for j in idx]
                cr.trajectory_xt = [next(itt) if j is not None else None for j in idx]
                cr.trajectory_timesteps = [s.timesteps[j] if j is not None else None for j in idx]
        return cr

    def _result(self, r: _Request, done: dict[str, ColumnResult], batch: int, partial: bool = False) -> CompareResult:
        """The request's result from its columns done so far (copies: speed-ups are filled per result); a
        ``partial`` one lists the rest as ``pending``, a whole one fails when every column failed."""
        results = [copy.copy(done[c.label]) for c in r.columns if c.label in done]
        pending = [c.label for c in r.columns if c.label not in done]
        if not partial:
            for col in (c for c in r.columns if c.label in pending):  # not reached: every unit fills its columns
                results.insert(r.columns.index(col), ColumnResult(col.label, _error_image("not sampled"), 0.0, 0,
                                                                  col.steps, method=col.method(self.teacher), error="not sampled"))
            pending = []
            if results and all(c.error for c in results):
                raise _AllColumnsFailed("; ".join(f"{c.label}: {c.error}" for c in results))
        fill_speedups(results)
        warnings = list(r.warnings) + [f"{c.label}: {c.error}" for c in results if c.error]
        return CompareResult(r.prompt, r.seed, r.guidance, r.student_steps, self.teacher.describe(), results,
                             warnings, time.perf_counter() - r.t_submit,
                             grid=trajectory_grid(r.student_steps, r.columns) if r.show_trajectory else [],
                             batch=batch, result_id=r.result_id, pending=pending,
                             labels=[c.label for c in r.columns])


class _AllColumnsFailed(ValueError):
    """Every column of a request failed: the request itself is the error."""


def _error_image(reason: str):
    return error_image(reason)


def _unit_cost(key: tuple) -> tuple[int, bool]:
    """The order a batch samples its units in: by network evaluations per image (a student's 4 steps, the naive
    teacher's 4 with CFG, teacher-50's 50 with CFG), students first on a tie."""
    if key[0] == "teacher":
        return (key[1] * (2 if key[2] else 1), True)
    return (key[2], key[0] != "student")
