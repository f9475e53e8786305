"""Quality against steps: the teacher at 1..50 DDIM+CFG steps and every fitting student at 1..8 steps,
over one fixed prompt/seed set, every column of a prompt starting from the same initial noise.

Every column is sampled by :func:`cdlab.columns.run_columns` (the seeding rule, the student switch, the timing);
this module adds only the metrics. On the tiny world (:func:`cdlab.teachers.is_tiny`) they are the checker's
adherence, the agreement error with the teacher at ``REFERENCE_STEPS`` from the same noise, and the diversity
between one caption's samples under several seeds; on SD1.5 they are CLIP score, FID-SD and LPIPS
(`cdlab.metrics.SDMetrics`; FID-SD reads ``n/a`` below its minimum sample count and the notes say how many
prompts it needs).

The teacher is left bit-identical: a student runs as its fused weights ``W + dW`` swapped into the UNet only
while its own columns sample, and the teacher's own weight tensors are put back afterwards (the student switch
of `cdlab.columns`, as Compare and Edit run students).

NFE counts network evaluations per image (a CFG step counts 2). Seconds per image are wall time over the
batch: the prompt encoding share, the UNet steps and the VAE decode.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cdlab.columns import STUDENT_STEPS, Column, ColumnRun, initial_noise, run_columns
from cdlab.evaluate.prompts import EvaluationError, evaluation_prompts
from cdlab.evaluate.report import notes
from cdlab.evaluate.store import EvaluationResult, check_out_dir, write_evaluation
from cdlab.images import decode_unit
from cdlab.metrics import SDMetrics, agreement_error, seed_diversity, world_adherence
from cdlab.paths import shown_path
from cdlab.students import load_student, students_of
from cdlab.teachers import is_tiny, teacher_lock
from cdlab.timing import sync

__all__ = ["TEACHER_STEPS", "STUDENT_STEPS", "REFERENCE_STEPS", "TEACHER_METHOD", "RowScores", "run_evaluation"]

TEACHER_STEPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 50)
REFERENCE_STEPS = 50          # the teacher run every column is compared against
DEFAULT_GUIDANCE = 7.5        # used only when the teacher carries no default of its own
TEACHER_METHOD = "teacher (DDIM+CFG)"
DIVERSITY_SEED = 10_000       # the diversity samples start from seeds DIVERSITY_SEED + seed + j

ProgressFn = Callable[[float, str], Any]


@dataclass
class RowScores:
    """One row of the table in the making: a column and what its images have scored so far."""

    column: Column
    method: str
    nfe: int = 0
    seconds: float = 0.0
    n: int = 0
    err_sum: float = 0.0           # tiny world: summed per-image agreement error
    images: list = field(default_factory=list)   # tiny world: [0, 1] tensors, for the checker
    sd: Any = None                 # SD1.5: cdlab.metrics.ColumnMetrics
    diversity: float | None = None  # tiny world: mean pixel distance between one caption's samples (seeds)


@dataclass
class _Evaluation:
    """One evaluation's settings, checked, and its progress."""

    teacher: Any
    world: bool
    texts: list[str]
    captions: list | None
    source: str
    steps: tuple[int, ...]
    student_steps: tuple[int, ...]
    seed: int
    guidance: float
    batch_size: int
    sd_metrics: Any
    fuse: bool = True
    adapters_root: Any = None
    progress: ProgressFn | None = None
    units: int = 1
    done: int = 0

    def sample(self, column: Column, prompts: list[str], seeds: list[int], noise: torch.Tensor | None = None,
               cond: Any = None) -> ColumnRun:
        """One column on these prompts and seeds (:func:`run_columns`), decoded to [0, 1] images."""
        [run] = run_columns(self.teacher, [column], prompts, seeds, noise=noise,
                            embeddings=None if cond is None else [cond],
                            decode=functools.partial(decode_unit, self.teacher), fuse=self.fuse,
                            adapters_root=self.adapters_root)
        return run

    def tick(self, msg: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done / self.units, 1.0), msg)


def _check_steps(steps: Sequence[int], what: str) -> tuple[int, ...]:
    steps = tuple(int(s) for s in steps)
    bad = [s for s in steps if s < 1 or s > 1000]
    if bad:
        raise EvaluationError(f"{what}: step counts must be in 1..1000, got {bad}")
    return tuple(sorted(set(steps)))


def _teacher_guidance(teacher: Any) -> float:
    """The teacher's own default CFG scale (`cdlab.teachers.Teacher.guidance`)."""
    g = getattr(teacher, "guidance", None)
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return float(g)
    return DEFAULT_GUIDANCE


def _settings(teacher: Any, *, n, steps, student_steps, suite, guidance, metadata, seed, prompts, batch_size,
              sd_metrics, **rest: Any) -> _Evaluation:
    """The arguments of :func:`run_evaluation`, checked, and the prompts drawn."""
    steps = _check_steps(steps, "steps")
    student_steps = _check_steps(student_steps, "student_steps")
    if n is not None and n < 1:
        raise EvaluationError(f"n must be >= 1, got {n}")
    suite = suite or ("world" if is_tiny(teacher) else "sd")
    if suite not in ("world", "sd"):
        raise EvaluationError(f"suite must be 'world' or 'sd', got {suite!r}")
    world = suite == "world"
    guidance = _teacher_guidance(teacher) if guidance is None else float(guidance)
    texts, captions, source = evaluation_prompts(world, n, metadata, seed, prompts)
    n = len(texts)
    if batch_size is None:
        batch_size = n if teacher.resolution <= 64 else 8
    batch_size = max(1, min(int(batch_size), n))
    if not world and sd_metrics is None:
        sd_metrics = SDMetrics()
    return _Evaluation(teacher, world, texts, captions, source, steps, student_steps, seed, guidance, batch_size,
                       sd_metrics, **rest)


def _fitting_students(teacher: Any, students: Sequence[str] | None, adapters_root: Any) -> list:
    """The cards of the students to evaluate (default: every one whose base model is the teacher's), loaded."""
    cards = students_of(teacher, adapters_root)
    if students is not None:
        wanted = set(students)
        missing = wanted - {c.name for c in cards}
        if missing:
            raise EvaluationError(
                f"student(s) {sorted(missing)} not found for base model {teacher.base_id!r}; "
                f"available: {[c.name for c in cards] or 'none'}")
        cards = [c for c in cards if c.name in wanted]
    for card in cards:  # every student loads (or fails) before anything samples
        load_student(teacher, card.name, root=adapters_root, activate=False)  # its base and fingerprint
    return cards


def _student_column(card: Any, steps: int) -> Column:
    """A local student's column: sampled by its card's recipe (`cdlab.samplers.sample_student`)."""
    nb = getattr(card, "num_boundaries", None)
    return Column(card.name, "student", int(steps), 1.0, int(nb) if nb else None, card.name, card)


def _row_scores(ev: _Evaluation, cards: list) -> list[RowScores]:
    """The rows to fill, in table order: the teacher at each of ``steps``, then each student at each of
    ``student_steps``."""
    rows = [RowScores(Column(TEACHER_METHOD, "teacher", k, ev.guidance), TEACHER_METHOD) for k in ev.steps]
    rows += [RowScores(_student_column(c, k), c.name) for c in cards for k in ev.student_steps]
    for row in rows:
        row.sd = None if ev.world else ev.sd_metrics.column()
    return rows


def _evaluate_batch(ev: _Evaluation, rows: list[RowScores], bi: int, idx: range, n_batches: int) -> None:
    """Sample and score every column on one batch of prompts, the reference column first, so every other
    column is compared with it as it is made."""
    teacher = ev.teacher
    prompts, seeds = [ev.texts[i] for i in idx], [ev.seed + i for i in idx]
    sync(teacher.device)
    t0 = time.perf_counter()
    cond = teacher.encode(prompts)
    sync(teacher.device)
    enc_s = time.perf_counter() - t0
    x_T = initial_noise(teacher, seeds)
    if bi == 0:  # warm-up (allocator, oneDNN/cuDNN primitives), so no column pays for it
        ev.sample(Column("warm-up", "teacher", 1, ev.guidance), prompts, seeds, x_T, cond)
    ref = ref_feats = None
    if REFERENCE_STEPS not in ev.steps:
        ref = ev.sample(Column(TEACHER_METHOD, "teacher", REFERENCE_STEPS, ev.guidance), prompts, seeds, x_T,
                        cond).images
        ev.tick(f"batch {bi + 1}/{n_batches}: reference, teacher {REFERENCE_STEPS} steps")
    for row in sorted(rows, key=lambda r: (r.column.kind != "teacher", r.column.steps != REFERENCE_STEPS)):
        run = ev.sample(row.column, prompts, seeds, x_T, cond)
        row.nfe = run.nfe
        row.seconds += run.seconds + enc_s
        row.n += len(idx)
        if ref is None:  # this is the reference column
            ref = run.images
        if ev.world:
            row.err_sum += float(agreement_error(run.images, ref, reduction="none").sum())
            row.images.append(run.images.float().cpu())
        else:
            if ref_feats is None:  # shared by every column's FID
                ref_feats = ev.sd_metrics.features(ref)
            row.sd.update(run.images, prompts, ref, reference_features=ref_feats)
        ev.tick(f"batch {bi + 1}/{n_batches}: {row.method}, {row.column.steps} steps")


def _measure_diversity(ev: _Evaluation, rows: list[RowScores], captions: int, seeds: int) -> None:
    """Each row's ``diversity``: ``seeds`` samples of each of the first ``captions`` captions (seeds
    ``DIVERSITY_SEED + seed + j``, the same noise in every column), the mean |a - b| over every pair of one
    caption's samples, averaged."""
    texts = ev.texts[:captions]
    prompts = [p for p in texts for _ in range(seeds)]
    seed_list = [DIVERSITY_SEED + ev.seed + j for _ in texts for j in range(seeds)]
    runs = run_columns(ev.teacher, [r.column for r in rows], prompts, seed_list,
                       decode=functools.partial(decode_unit, ev.teacher), fuse=ev.fuse, adapters_root=ev.adapters_root)
    for row, run in zip(rows, runs):
        row.diversity = seed_diversity(run.images, seeds)


def _table_row(s: RowScores, world: bool, captions: list | None) -> dict:
    """A row of ``results.json`` from its scores."""
    row: dict[str, Any] = {
        "method": s.method, "kind": s.column.kind, "student": s.column.student, "steps": s.column.steps,
        "nfe": s.nfe, "seconds_per_image": s.seconds / max(s.n, 1),
    }
    if s.column.card is not None:
        row["num_boundaries"] = s.column.card.num_boundaries
    if world:
        adh = world_adherence(torch.cat(s.images), captions)
        row["adherence"] = adh.pop("all")
        row["adherence_by_attribute"] = adh
        row["agreement_error"] = s.err_sum / max(s.n, 1)
        row["diversity"] = s.diversity
        s.images.clear()
    else:
        row.update(s.sd.compute())
        if math.isnan(row["fid_sd"]):  # refused (fid_sd_note says why); JSON has no NaN
            row["fid_sd"] = None
    return row


def _card_record(card: Any) -> dict:
    """A student's card as ``results.json`` records it; its training run's folder shown relative to the
    repository (`cdlab.paths.shown_path`), so an evaluation names no machine's path."""
    d = card.to_dict() if hasattr(card, "to_dict") else {"name": card.name}
    run_dir = (d.get("metrics") or {}).get("run_dir")
    if run_dir and Path(run_dir).is_absolute():
        d["metrics"] = {**d["metrics"], "run_dir": shown_path(run_dir)}
    return d


def _results(ev: _Evaluation, scores: list[RowScores], cards: list, fid_min: int | None,
             t_start: float) -> EvaluationResult:
    """The results dict: metadata, one row per column (with its speed-up over the reference), the notes."""
    teacher = ev.teacher
    rows = [_table_row(s, ev.world, ev.captions) for s in scores]
    base = next((r for r in rows if r["kind"] == "teacher" and r["steps"] == REFERENCE_STEPS), None)
    for r in rows:
        r["speedup"] = (base["seconds_per_image"] / r["seconds_per_image"]
                        if base and r["seconds_per_image"] > 0 else None)
    return EvaluationResult({
        "created": datetime.now().isoformat(timespec="seconds"), "model": getattr(teacher, "name", "teacher"),
        "base_id": teacher.base_id, "base_fingerprint": teacher.base_fingerprint,
        "describe": teacher.describe() if hasattr(teacher, "describe") else "",
        "device": str(teacher.device), "dtype": str(teacher.dtype).replace("torch.", ""),
        "suite": "world" if ev.world else "sd",
        "primary_metric": "adherence" if ev.world else "clip_score",
        "error_metric": "agreement_error" if ev.world else "lpips",
        "n": len(ev.texts), "seed": ev.seed, "batch_size": ev.batch_size, "guidance": ev.guidance,
        "reference_steps": REFERENCE_STEPS, "prompt_source": ev.source, "fid_min_samples": fid_min,
        "teacher_steps": list(ev.steps), "student_steps": list(ev.student_steps),
        "students": [_card_record(c) for c in cards], "rows": rows, "notes": notes(rows, len(ev.texts)),
        "elapsed_s": time.perf_counter() - t_start,
    })


def run_evaluation(
    teacher: Any, *, n: int | None = None, steps: Sequence[int] = TEACHER_STEPS,
    student_steps: Sequence[int] = STUDENT_STEPS, students: Sequence[str] | None = None,
    out_dir: str | Path | None = None, progress: ProgressFn | None = None, batch_size: int | None = None,
    seed: int = 0, guidance: float | None = None, metadata: str | Path | None = None, sd_metrics: Any = None,
    suite: str | None = None, adapters_root: str | Path | None = None, write: bool = True, fuse_lora: bool = True,
    prompts: str | os.PathLike | Sequence[str] | None = None, diversity_captions: int = 16,
    diversity_seeds: int = 8, overwrite: bool = False,
) -> EvaluationResult:
    """Evaluate a loaded teacher and its fitting students; write and return the results.

    Args:
        teacher (`cdlab.teachers.Teacher`): the loaded teacher (its pipeline keeps its adapters; the
            plain teacher is active again on return).
        n (`int`, *optional*): prompts (one seed each: ``seed + i``). Default: 128 world captions, or
            all of ``prompts`` / all COCO captions / the 8 course prompts once. FID-SD is reported only
            from ``sd_metrics.fid_min_samples`` prompts on (2048 with InceptionV3).
        steps: teacher DDIM step counts (guided; NFE = 2 x steps).
        student_steps: student step counts.
        students: student names to include; default every student whose ``base_model`` is the teacher's.
        out_dir: where to write; default ``evals/<timestamp>``. One that holds an evaluation is refused
            before any sampling unless ``overwrite``.
        progress: ``progress(fraction, message)``, called after each unit of work (``gr.Progress`` fits).
        batch_size: prompts per UNet call (CFG doubles it). Default: all of them at the world's 32 px, 8 at 512 px.
        seed: first noise seed; also the COCO draw.
        guidance: CFG scale of the teacher; default the teacher's own (``teacher.guidance``) or 7.5.
        metadata: a COCO ``metadata.jsonl`` for SD prompts, ``n`` of them drawn by ``seed``.
        sd_metrics (`cdlab.metrics.SDMetrics`, *optional*): the SD metric models (default: the real ones).
        suite: ``"world"`` or ``"sd"``; default from the teacher (the world's resolution -> ``"world"``).
        adapters_root: students' folder (default ``cdlab.paths.adapters_dir()``).
        write: write the three files (else only return the dict).
        fuse_lora: run each student as its fused weights while its columns sample; the teacher's base
            weights are restored exactly after (the student switch of `cdlab.columns`). False: the LoRA
            layers run unfused (the active adapter), the slow path of the same model.
        prompts: the SD captions: a prompt file (`read_prompts`: ``.txt``, ``.json`` list, ``metadata.jsonl``;
            its first ``n``) or a list of caption strings. Not for the tiny world.
        diversity_captions / diversity_seeds: the tiny world's diversity, per column: the mean pixel distance
            (mean |a - b| in [0, 1]) between the samples of one caption under ``diversity_seeds`` seeds
            (every pair), averaged over the first ``diversity_captions`` captions (0: not measured). A
            collapsed generator (one image per caption, whatever the noise) scores 0.

    Returns:
        The results dict (also ``results.json``): metadata and one row per column, each with
        ``method, kind, student, steps, nfe, seconds_per_image, speedup`` and the suite's metrics;
        ``out_dir`` when written. SD rows also carry ``fid_sd_samples`` and ``fid_sd_min_samples``;
        a refused FID-SD is ``None`` with ``fid_sd_note`` (``"n/a (8 < 2048 samples)"``), and
        ``notes`` (lines under the table) says how many prompts it needs.
    """
    t_start = time.perf_counter()
    if write:
        check_out_dir(out_dir, "results.json", overwrite)
    ev = _settings(teacher, n=n, steps=steps, student_steps=student_steps, suite=suite, guidance=guidance,
                   metadata=metadata, seed=seed, prompts=prompts, batch_size=batch_size, sd_metrics=sd_metrics,
                   fuse=fuse_lora, adapters_root=adapters_root, progress=progress)
    fid_min = None if ev.world else int(ev.sd_metrics.fid_min_samples)
    n = len(ev.texts)
    with teacher_lock(teacher):  # adapter switching and sampling hold the teacher's lock (Compare takes it too)
        cards = _fitting_students(teacher, students, adapters_root)
        rows = _row_scores(ev, cards)
        batches = [range(i, min(i + ev.batch_size, n)) for i in range(0, n, ev.batch_size)]
        ev.units = len(batches) * (len(rows) + (0 if REFERENCE_STEPS in ev.steps else 1))
        if progress is not None:
            start = f"evaluating {len(rows)} columns on {n} prompts"
            if fid_min is not None and n < fid_min:
                start += f" (FID-SD needs {fid_min}: it will read n/a)"
            progress(0.0, start)
        with torch.inference_mode():
            for bi, idx in enumerate(batches):
                _evaluate_batch(ev, rows, bi, idx, len(batches))
            if ev.world and diversity_captions > 0 and diversity_seeds > 1:
                _measure_diversity(ev, rows, diversity_captions, diversity_seeds)
    results = _results(ev, rows, cards, fid_min, t_start)
    if write:
        results["out_dir"] = str(write_evaluation(results, out_dir, overwrite))
    if progress is not None:
        progress(1.0, "done")
    return results
