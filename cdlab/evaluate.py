"""Quality against steps: the teacher at 1..50 DDIM+CFG steps and every fitting student at 1..8 steps,
over one fixed prompt/seed set, every column of a prompt starting from the same initial noise.

    python -m cdlab evaluate --model tiny --n 128            # the embedded world (adherence, agreement)
    python -m cdlab evaluate --edit [--n 128]                # the edits of cdlab.edit (cdlab.edit_eval)
    python -m cdlab evaluate --model sd15 --n 2048 --prompts data/coco/metadata.jsonl   # CLIP, FID-SD, LPIPS

Writes ``evals/<timestamp>/{results.json, table.md, quality_vs_nfe.png}`` (``CDLAB_EVALS_DIR``
overrides ``evals/``). ``run_evaluation``, ``list_evaluations`` and ``load_evaluation`` are the
Python API the app's Evaluate tab uses; nothing here imports Gradio.

``--prompts FILE`` is the caption list of an SD1.5 run: a ``.txt`` (one caption a line; blank lines and
lines starting with ``#`` skipped), a ``.json`` list of strings, or a COCO ``metadata.jsonl`` (the COCO
recipe's format; ``--metadata`` is an alias); ``--n`` takes its first n captions. FID-SD needs at least
``cdlab.metrics.FID_MIN_SAMPLES`` (2048) prompts: below that its cells read ``n/a (n < 2048 samples)``
and the table says how many are needed; CLIP score and LPIPS are reported at any n.

The teacher is left bit-identical: a student runs as its fused weights ``W + ΔW`` swapped into the UNet only
while its own columns sample, and the teacher's own weight tensors are put back afterwards
(`cdlab.students.activation.swapped_student`, as Compare and Edit run students).

NFE counts network evaluations per image (a CFG step counts 2). Seconds per image are wall time
over the batch: the prompt encoding share, the UNet steps and the VAE decode.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from cdlab.timing import sync
from cdlab.paths import evals_dir

TEACHER_STEPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 50)
STUDENT_STEPS: tuple[int, ...] = (1, 2, 4, 8)
REFERENCE_STEPS = 50          # the teacher run every column is compared against
# 128 world captions: 271 tiny-UNet passes (0.2 GFLOP/image each) on 128 images is ~7 TFLOP, about a minute
# at the ~110 GFLOP/s two CPU cores reach; 256 would pass the 2-minute budget.
DEFAULT_N = 128
DEFAULT_GUIDANCE = 7.5        # used only when the teacher carries no default of its own
PROMPT_SEED = 2024            # the fixed caption draw of the tiny world
TEACHER_METHOD = "teacher (DDIM+CFG)"
MAX_CAPTION_CHARS = 1000      # a longer "caption" in a prompt file is a wrong file, not a caption

ProgressFn = Callable[[float, str], Any]

__all__ = [
    "TEACHER_STEPS", "STUDENT_STEPS", "REFERENCE_STEPS", "evals_dir", "run_evaluation", "write_evaluation",
    "render_table", "plot_quality", "list_evaluations", "load_evaluation", "read_prompts", "check_prompts", "main",
]


class EvaluationError(ValueError):
    """Bad evaluation input (steps, sizes, paths)."""


class EvaluationResult(dict):
    """The results dict, plus ``.path``: the folder it was written to (None when not written)."""

    @property
    def path(self) -> Path | None:
        return Path(self["out_dir"]) if self.get("out_dir") else None


# ----------------------------------------------------------------------------- columns

@dataclass
class _Column:
    """One (method, step count) cell row of the evaluation."""

    method: str
    kind: str                      # "teacher" | "student"
    steps: int
    student: str | None = None
    card: Any = None
    nfe: int = 0
    seconds: float = 0.0
    n: int = 0
    err_sum: float = 0.0           # tiny world: summed per-image agreement error
    images: list = field(default_factory=list)   # tiny world: [0, 1] tensors, for the checker
    sd: Any = None                 # SD1.5: cdlab.metrics.ColumnMetrics
    diversity: float | None = None  # tiny world: mean pixel distance between one caption's samples (seeds)


def _teacher_guidance(teacher: Any) -> float:
    """The teacher's own default CFG scale (`cdlab.teachers.Teacher.guidance`)."""
    g = getattr(teacher, "guidance", None)
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return float(g)
    return DEFAULT_GUIDANCE


def _is_world(teacher: Any) -> bool:
    """The tiny world's metrics apply to a tiny-world teacher (the embedded one, or a pipeline of its architecture)."""
    from cdlab.teachers import is_tiny

    return is_tiny(teacher)


def _check_steps(steps: Sequence[int], what: str) -> tuple[int, ...]:
    steps = tuple(int(s) for s in steps)
    bad = [s for s in steps if s < 1 or s > 1000]
    if bad:
        raise EvaluationError(f"{what}: step counts must be in 1..1000, got {bad}")
    return tuple(sorted(set(steps)))


def decode_latents(teacher: Any, latents: Any) -> Any:
    """Latents -> float32 images in [0, 1], [B, 3, H, W] (the teacher's VAE)."""
    from cdlab.metrics import to_unit

    vae = teacher.vae
    return to_unit(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)


def _run_student(teacher: Any, col: _Column, x_T: Any, cond: Any, uncond: Any, seed: int) -> Any:
    """Latents of a student column, by its card's recipe (`cdlab.samplers.sample_student`); ``seed`` drives
    the noise of stochastic schedulers (LCM, TCD), so a column is reproducible."""
    import torch

    from cdlab.samplers import sample_student
    from cdlab.students import make_scheduler

    out = sample_student(teacher.unet, x_T, cond, uncond, col.card, col.steps, make_scheduler(teacher.pipe, col.card),
                         generator=torch.Generator(device="cpu").manual_seed(seed))
    col.nfe = out.nfe
    return out.latents


# ----------------------------------------------------------------------------- the evaluation

def check_prompts(captions: Sequence[Any], what: str = "prompts",
                  labels: Sequence[str] | None = None) -> list[str]:
    """Validate a caption list: at least one, each a non-empty string (surrounding whitespace stripped)
    of at most ``MAX_CAPTION_CHARS`` characters without control characters.

    Args:
        captions: the captions.
        what (`str`): the field or flag named in errors (``"--prompts"`` on the command line).
        labels: where each caption came from (``"<file>:3"``), for errors; default ``"caption <i>"``.

    Returns:
        The stripped captions.

    Raises:
        EvaluationError: one line naming ``what`` and the bad caption.
    """
    if isinstance(captions, (str, bytes)) or not isinstance(captions, Sequence):
        raise EvaluationError(f"{what}: expected a list of caption strings, got {type(captions).__name__}")
    if not captions:
        raise EvaluationError(f"{what}: no captions")
    out = []
    for i, text in enumerate(captions):
        where = labels[i] if labels is not None else f"caption {i + 1}"
        if not isinstance(text, str):
            raise EvaluationError(f"{what}: {where}: a caption must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise EvaluationError(f"{what}: {where}: empty caption")
        bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise EvaluationError(f"{what}: {where}: caption has a control character (U+{ord(bad):04X})")
        if len(text) > MAX_CAPTION_CHARS:
            raise EvaluationError(
                f"{what}: {where}: caption of {len(text)} characters (at most {MAX_CAPTION_CHARS})")
        out.append(text)
    return out


def read_prompts(path: str | os.PathLike, n: int | None = None, *, what: str = "prompts") -> list[str]:
    """The captions of a prompt file, in file order, validated by `check_prompts`.

    Args:
        path: a ``.txt`` file (one caption a line; blank lines and lines starting with ``#`` skipped), a
            ``.json`` list of strings, or a ``metadata.jsonl`` (the COCO recipe's format, read by
            `cdlab.prompts.coco_captions`; a folder holding one works too).
        n (`int`, *optional*): take the first ``n`` captions (default all); the file must hold that many.
        what (`str`): the field or flag named in errors (``"--prompts"`` on the command line).

    Raises:
        EvaluationError: missing or unreadable file, unknown format, no captions, a bad caption, or fewer
            captions than ``n``; one line naming ``what``.
    """
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"{what}: no such file: {p}")
    suffix = p.suffix.lower()
    labels: list[str] | None = None
    try:
        if p.is_dir() or suffix == ".jsonl":
            from cdlab.prompts import coco_captions

            captions: Any = coco_captions(p)
            labels = [f"{p.name if p.is_file() else p}: caption {i + 1}" for i in range(len(captions))]
        elif suffix == ".json":
            try:
                captions = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{what}: {p} is not valid JSON ({e.msg}, line {e.lineno})") from None
            if not isinstance(captions, list):
                raise EvaluationError(
                    f"{what}: {p} must hold a JSON list of caption strings, got a {type(captions).__name__}")
            labels = [f"{p.name}[{i}]" for i in range(len(captions))]
        elif suffix in (".txt", ""):
            captions, labels = [], []
            # split("\n"), not splitlines(): a form feed or other control character is an error, not a line break
            for lineno, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    captions.append(text)
                    labels.append(f"{p.name}:{lineno}")
        else:
            raise EvaluationError(f"{what}: {p}: expected a .txt (one caption a line), a .json list of strings "
                                  f"or a metadata.jsonl, not {p.suffix!r}")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{what}: {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (FileNotFoundError, ValueError, TypeError) as e:  # coco_captions: no metadata.jsonl, bad rows
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"{what}: {e}") from None
    except OSError as e:
        raise EvaluationError(f"{what}: cannot read {p}: {e.strerror or e}") from None
    if not captions:
        raise EvaluationError(f"{what}: {p} holds no captions")
    captions = check_prompts(captions, what, labels)
    if n is not None:
        if n < 1:
            raise EvaluationError(f"n must be >= 1, got {n}")
        if n > len(captions):
            raise EvaluationError(f"{what}: {p} holds {len(captions)} captions, fewer than the {n} asked for")
        captions = captions[:n]
    return captions


def _prompts(teacher: Any, world: bool, n: int | None, metadata: str | Path | None,
             seed: int, prompts: str | os.PathLike | Sequence[str] | None = None,
             ) -> tuple[list[str], list | None, str]:
    from cdlab.prompts import coco_captions, course_prompts

    if prompts is not None and metadata:
        raise EvaluationError("give prompts or metadata, not both")
    if world:
        if prompts is not None:
            raise EvaluationError("prompts: a caption list is for the SD metrics (suite 'sd'); the tiny world "
                                  "draws its own captions, which its checker reads")
        from cdlab.world import sample_captions

        caps = sample_captions(DEFAULT_N if n is None else n, seed=PROMPT_SEED + seed)
        return [c.text for c in caps], caps, "tiny-world captions"
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts, n), None, f"captions from {Path(prompts).name}"
    if prompts is not None:
        texts = check_prompts(prompts, "prompts")
        if n is not None and n > len(texts):
            raise EvaluationError(f"prompts: {len(texts)} captions given, fewer than the {n} asked for")
        return texts[:n], None, "given captions"
    if metadata:
        texts = coco_captions(metadata, n, seed=seed)
        return texts, None, f"COCO captions ({Path(metadata).name})"
    return course_prompts(n), None, "the course's 8 prompts"


def run_evaluation(
    teacher: Any,
    *,
    n: int | None = None,
    steps: Sequence[int] = TEACHER_STEPS,
    student_steps: Sequence[int] = STUDENT_STEPS,
    students: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    metadata: str | Path | None = None,
    sd_metrics: Any = None,
    suite: str | None = None,
    adapters_root: str | Path | None = None,
    write: bool = True,
    fuse_lora: bool = True,
    prompts: str | os.PathLike | Sequence[str] | None = None,
    diversity_captions: int = 16,
    diversity_seeds: int = 8,
    overwrite: bool = False,
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
        batch_size: prompts per UNet call (CFG doubles it). Default: all of them at the world's 32 px,
            8 at 512 px.
        seed: first noise seed; also the COCO draw.
        guidance: CFG scale of the teacher; default the teacher's own (``teacher.guidance``) or 7.5.
        metadata: a COCO ``metadata.jsonl`` for SD prompts, ``n`` of them drawn by ``seed``.
        sd_metrics (`cdlab.metrics.SDMetrics`, *optional*): the SD metric models (default: the real ones).
        suite: ``"world"`` or ``"sd"``; default from the teacher (the world's resolution -> ``"world"``).
        adapters_root: students' folder (default ``cdlab.students.ADAPTERS_DIR``).
        write: write the three files (else only return the dict).
        fuse_lora: run each student as its fused weights while its columns sample; the teacher's base
            weights are restored exactly after (`cdlab.students.activation.swapped_student`). False: the
            LoRA layers run unfused (the active adapter), the slow path of the same model.
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
    import torch

    from cdlab.samplers import ddim_timesteps, sample_ddim
    from cdlab.students import activate_student, list_students, load_student

    t_start = time.perf_counter()
    if write:
        check_out_dir(out_dir, "results.json", overwrite)
    steps = _check_steps(steps, "steps")
    student_steps = _check_steps(student_steps, "student_steps")
    if n is not None and n < 1:
        raise EvaluationError(f"n must be >= 1, got {n}")
    suite = suite or ("world" if _is_world(teacher) else "sd")
    if suite not in ("world", "sd"):
        raise EvaluationError(f"suite must be 'world' or 'sd', got {suite!r}")
    world = suite == "world"
    guidance = _teacher_guidance(teacher) if guidance is None else float(guidance)
    texts, captions, source = _prompts(teacher, world, n, metadata, seed, prompts)
    n = len(texts)
    if batch_size is None:
        batch_size = n if teacher.resolution <= 64 else 8
    batch_size = max(1, min(int(batch_size), n))
    if not world and sd_metrics is None:
        from cdlab.metrics import SDMetrics

        sd_metrics = SDMetrics()
    fid_min = None if world else int(sd_metrics.fid_min_samples)

    from cdlab.teachers import teacher_lock

    # Adapter switching, fusing and sampling hold the teacher's lock (Compare takes the same one).
    with teacher_lock(teacher):
        pipe = teacher.pipe
        cards = list_students(root=adapters_root, base_model=teacher.base_id)
        if students is not None:
            wanted = set(students)
            missing = wanted - {c.name for c in cards}
            if missing:
                raise EvaluationError(
                    f"student(s) {sorted(missing)} not found for base model {teacher.base_id!r}; "
                    f"available: {[c.name for c in cards] or 'none'}")
            cards = [c for c in cards if c.name in wanted]
        for card in cards:
            load_student(pipe, card.name, root=adapters_root, base_model=teacher.base_id)

        columns = [_Column(TEACHER_METHOD, "teacher", k) for k in steps]
        columns += [_Column(c.name, "student", k, student=c.name, card=c) for c in cards for k in student_steps]
        for col in columns:
            if not world:
                col.sd = sd_metrics.column()

        batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        has_ref_col = REFERENCE_STEPS in steps
        units = len(batches) * (len(columns) + (0 if has_ref_col else 1))
        done = 0

        def tick(msg: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(min(done / units, 1.0), msg)

        if progress is not None:
            start = f"evaluating {len(columns)} columns on {n} prompts"
            if fid_min is not None and n < fid_min:
                start += f" (FID-SD needs {fid_min}: it will read n/a)"
            progress(0.0, start)
        try:
            # `fused` holds the active student's swapped-in weights; closing it restores the teacher exactly,
            # also when a column raises.
            with torch.inference_mode(), contextlib.ExitStack() as fused:
                for bi, idx in enumerate(batches):
                    bp = [texts[i] for i in idx]
                    sync(teacher.device)
                    t0 = time.perf_counter()
                    cond, uncond = teacher.encode(bp)
                    sync(teacher.device)
                    enc_s = time.perf_counter() - t0
                    x_T = torch.cat([teacher.initial_noise(seed + i, 1) for i in idx])
                    activate_student(pipe, None)
                    if bi == 0:  # warm-up (allocator, oneDNN/cuDNN primitives), so no column pays for it
                        sample_ddim(teacher.unet, x_T, cond, uncond, guidance, [999], teacher.scheduler)
                        decode_latents(teacher, x_T)
                    ref = None
                    if not has_ref_col:
                        out = sample_ddim(teacher.unet, x_T, cond, uncond, guidance,
                                          ddim_timesteps(REFERENCE_STEPS), teacher.scheduler)
                        ref = decode_latents(teacher, out.latents)
                        tick(f"batch {bi + 1}/{len(batches)}: reference, teacher {REFERENCE_STEPS} steps")
                    # The reference column first, so every other column can be compared as it is made.
                    order = sorted(columns, key=lambda c: (c.kind != "teacher", c.steps != REFERENCE_STEPS))
                    active = None
                    ref_feats = None
                    for col in order:
                        if col.student != active:
                            _switch_student(pipe, col.student, fused, fuse_lora)
                            active = col.student
                        sync(teacher.device)
                        t0 = time.perf_counter()
                        if col.kind == "teacher":
                            out = sample_ddim(teacher.unet, x_T, cond, uncond, guidance,
                                              ddim_timesteps(col.steps), teacher.scheduler)
                            col.nfe, latents = out.nfe, out.latents
                        else:
                            latents = _run_student(teacher, col, x_T, cond, uncond, seed + int(idx[0]))
                        images = decode_latents(teacher, latents)
                        sync(teacher.device)
                        col.seconds += time.perf_counter() - t0 + enc_s
                        col.n += len(idx)
                        if ref is None:  # this is the reference column
                            ref = images
                        if not world and ref_feats is None:  # shared by every column's FID
                            ref_feats = sd_metrics.features(ref)
                        _score(col, images, ref, ref_feats, bp, world)
                        tick(f"batch {bi + 1}/{len(batches)}: {col.method}, {col.steps} steps")
                    fused.close()
                if world and diversity_captions > 0 and diversity_seeds > 1:
                    _diversity(teacher, columns, texts[:diversity_captions], diversity_seeds, guidance, seed,
                               fuse_lora, fused)
        finally:
            activate_student(pipe, None)

    rows = [_row(col, world, captions) for col in columns]
    base = next((r for r in rows if r["kind"] == "teacher" and r["steps"] == REFERENCE_STEPS), None)
    for r in rows:
        r["speedup"] = (base["seconds_per_image"] / r["seconds_per_image"]
                        if base and r["seconds_per_image"] > 0 else None)
    results = EvaluationResult({
        "created": datetime.now().isoformat(timespec="seconds"),
        "model": getattr(teacher, "name", "teacher"),
        "base_id": teacher.base_id,
        "describe": teacher.describe() if hasattr(teacher, "describe") else "",
        "device": str(teacher.device),
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "suite": suite,
        "primary_metric": "adherence" if world else "clip_score",
        "error_metric": "agreement_error" if world else "lpips",
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        "guidance": guidance,
        "reference_steps": REFERENCE_STEPS,
        "prompt_source": source,
        "fid_min_samples": fid_min,
        "teacher_steps": list(steps),
        "student_steps": list(student_steps),
        "students": [c.to_dict() if hasattr(c, "to_dict") else {"name": c.name} for c in cards],
        "rows": rows,
        "notes": _notes(rows, n),
        "elapsed_s": time.perf_counter() - t_start,
    })
    if write:
        results["out_dir"] = str(write_evaluation(results, out_dir, overwrite))
    if progress is not None:
        progress(1.0, "done")
    return results


def _switch_student(pipe: Any, student: str | None, fused: Any, fuse_lora: bool) -> None:
    """Make ``student`` (None: the plain teacher) the model the UNet runs: with ``fuse_lora`` its fused weights
    swapped in (`swapped_student`, computed once per version of its file and kept, as Compare and Edit do), else
    its adapter active. ``fused`` (an ExitStack) holds the swap, and closing it restores the teacher exactly."""
    from cdlab.students import activate_student
    from cdlab.students.activation import swapped_student

    fused.close()
    if student is not None and fuse_lora:  # fused weights are the fast path (1.9x on the tiny student, bench sampling)
        fused.enter_context(swapped_student(pipe, student))
    else:
        activate_student(pipe, student)


def _diversity(teacher: Any, columns: list, texts: list[str], seeds: int, guidance: float, seed: int,
               fuse_lora: bool, fused: Any) -> None:
    """Each column's ``diversity``: ``seeds`` samples of each caption (seeds ``10_000 + seed + j``, the same
    noise for every column), the mean |a - b| over every pair of one caption's samples, averaged."""
    import torch

    from cdlab.metrics import seed_diversity
    from cdlab.samplers import ddim_timesteps, sample_ddim
    from cdlab.students import activate_student

    rep = [p for p in texts for _ in range(seeds)]
    cond, uncond = teacher.encode(rep)
    x_T = torch.cat([teacher.initial_noise(10_000 + seed + j, 1) for _ in texts for j in range(seeds)])
    active: Any = _switch_student  # none yet: the first column always switches (the last student may be active)
    for col in sorted(columns, key=lambda c: c.student or ""):
        if col.student != active:
            _switch_student(teacher.pipe, col.student, fused, fuse_lora)
            active = col.student
        if col.kind == "teacher":
            latents = sample_ddim(teacher.unet, x_T, cond, uncond, guidance, ddim_timesteps(col.steps),
                                  teacher.scheduler).latents
        else:
            nfe = col.nfe
            latents = _run_student(teacher, col, x_T, cond, uncond, 10_000 + seed)
            col.nfe = nfe
        img = decode_latents(teacher, latents)
        col.diversity = seed_diversity(img, seeds)
    fused.close()
    activate_student(teacher.pipe, None)


def _score(col: _Column, images: Any, ref: Any, ref_feats: Any, prompts: list[str], world: bool) -> None:
    from cdlab.metrics import agreement_error

    if world:
        col.err_sum += float(agreement_error(images, ref, reduction="none").sum())
        col.images.append(images.float().cpu())
    else:
        col.sd.update(images, prompts, ref, reference_features=ref_feats)


def _notes(rows: list[dict], n: int) -> list[str]:
    """Lines under the table: why a metric is missing and what would give it."""
    refused = [r for r in rows if r.get("fid_sd_note")]
    if not refused:
        return []
    need = max(int(r["fid_sd_min_samples"]) for r in refused)
    return [f"FID-SD needs at least {need} samples (prompts); this run had {n}. "
            f"Run with --n {need} or more (--prompts FILE with a caption list)."]


def _row(col: _Column, world: bool, captions: list | None) -> dict:
    import torch

    row: dict[str, Any] = {
        "method": col.method, "kind": col.kind, "student": col.student, "steps": col.steps, "nfe": col.nfe,
        "seconds_per_image": col.seconds / max(col.n, 1),
    }
    if col.card is not None:
        row["num_boundaries"] = col.card.num_boundaries
    if world:
        from cdlab.metrics import world_adherence

        adh = world_adherence(torch.cat(col.images), captions)
        row["adherence"] = adh.pop("all")
        row["adherence_by_attribute"] = adh
        row["agreement_error"] = col.err_sum / max(col.n, 1)
        row["diversity"] = col.diversity
        col.images.clear()
    else:
        row.update(col.sd.compute())
        if math.isnan(row["fid_sd"]):  # refused (fid_sd_note says why); JSON has no NaN
            row["fid_sd"] = None
    return row


# ----------------------------------------------------------------------------- outputs

_COLUMNS = {
    "world": [("adherence", "adherence ↑", "{:.3f}"), ("agreement_error", "agreement err ↓", "{:.4f}"),
              ("diversity", "diversity (8 seeds) ↑", "{:.4f}")],
    "sd": [("clip_score", "CLIP ↑", "{:.2f}"), ("fid_sd", "FID-SD ↓", "{:.2f}"), ("lpips", "LPIPS ↓", "{:.4f}")],
}


def _fmt(v: Any, f: str, note: str | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return note or "—"
    return f.format(v)


def render_table(results: dict) -> str:
    """The Markdown table of an evaluation: one line per (method, steps)."""
    metrics = _COLUMNS[results["suite"]]
    head = ["method", "steps", "NFE", *(h for _, h, _ in metrics), "s / image", "speed-up"]
    lines = [
        f"Evaluation of **{results['model']}** ({results.get('describe') or results['device']}), "
        f"{results['n']} prompts ({results['prompt_source']}), guidance {results['guidance']:g}, "
        f"compared with the teacher at {results['reference_steps']} steps from the same noise. "
        f"{results['created']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in results["rows"]:
        cells = [r["method"], str(r["steps"]), str(r["nfe"]),
                 *(_fmt(r.get(k), f, r.get(f"{k}_note")) for k, _, f in metrics),
                 f"{r['seconds_per_image'] * 1000:.2f} ms" if r["seconds_per_image"] < 1 else
                 f"{r['seconds_per_image']:.2f} s", _fmt(r.get("speedup"), "{:.1f}×")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("notes"):
        lines += ["", *results["notes"]]
    return "\n".join(lines) + "\n"


def plot_quality(results: dict, path: str | Path) -> Path:
    """The quality-vs-NFE figure: one line per method, NFE on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _COLUMNS[results["suite"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    for ax, (key, label, _) in zip(axes[0], metrics):
        plotted = False
        for m in methods:
            rows = sorted((r for r in results["rows"] if r["method"] == m), key=lambda r: r["nfe"])
            rows = [r for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            if not rows:
                continue
            plotted = True
            style = dict(color="black", linestyle="--", marker="s") if m == TEACHER_METHOD else dict(marker="o")
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], label=m, **style)
            for r in rows:
                ax.annotate(str(r["steps"]), (r["nfe"], r[key]), textcoords="offset points", xytext=(3, 4),
                            fontsize=7)
        note = next((r[f"{key}_note"] for r in results["rows"] if r.get(f"{key}_note")), None)
        if not plotted and note:  # e.g. FID-SD refused below its minimum sample count
            ax.text(0.5, 0.5, f"{label}: {note}", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per image (CFG step = 2)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: quality vs NFE ({results['n']} prompts, "
                 f"reference: teacher {results['reference_steps']} steps)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_out_dir(out_dir: str | Path | None, marker: str, overwrite: bool = False) -> None:
    """Refuse an ``out_dir`` that already holds an evaluation (its ``marker`` file) unless ``overwrite``: an
    evaluation is somebody's work, and replacing it is an explicit choice (``--overwrite``). Called before any
    sampling, so a refused run costs nothing."""
    if out_dir is not None and not overwrite and (Path(out_dir) / marker).exists():
        raise FileExistsError(f"--out: {out_dir} already holds an evaluation ({marker}); choose another folder "
                              "or pass --overwrite to replace it")


def write_evaluation(results: dict, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write results.json, table.md and quality_vs_nfe.png; return the folder. A given ``out_dir`` that holds
    an evaluation is refused unless ``overwrite`` (`check_out_dir`)."""
    if out_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = evals_dir() / stamp
        k = 1
        while out_dir.exists():
            out_dir = evals_dir() / f"{stamp}-{k}"
            k += 1
    check_out_dir(out_dir, "results.json", overwrite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k != "out_dir"}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "table.md").write_text(render_table(results))
    plot_quality(results, out / "quality_vs_nfe.png")
    return out


def load_evaluation(path: str | Path) -> EvaluationResult:
    """An evaluation folder (or its results.json) -> its results, with ``out_dir``, ``table_md`` and
    ``plot`` (the PNG path, or None)."""
    p = Path(path)
    folder = p.parent if p.name == "results.json" else p
    f = folder / "results.json"
    if not f.is_file():
        raise FileNotFoundError(f"no evaluation at {folder} (results.json missing)")
    try:
        results = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{f} is not valid JSON: {e.msg}") from None
    if not isinstance(results, dict) or "rows" not in results:
        raise EvaluationError(f"{f} is not an evaluation (no 'rows')")
    results = EvaluationResult(results, out_dir=str(folder))
    table = folder / "table.md"
    results["table_md"] = table.read_text() if table.is_file() else render_table(results)
    plot = folder / "quality_vs_nfe.png"
    results["plot"] = str(plot) if plot.is_file() else None
    return results


def list_evaluations(root: str | Path | None = None) -> list[dict]:
    """Evaluations under ``root`` (default ``evals_dir()``), newest first: each
    ``{"path", "name", "created", "model", "n", "suite", "rows", "plot"}``. Unreadable folders are skipped."""
    root = evals_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        f = d / "results.json"
        if not f.is_file():
            continue
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(r, dict):
            continue
        plot = d / "quality_vs_nfe.png"
        found.append({
            "path": str(d), "name": d.name, "created": r.get("created", ""), "model": r.get("model", "?"),
            "n": r.get("n"), "suite": r.get("suite"), "rows": len(r.get("rows", [])),
            "plot": str(plot) if plot.is_file() else None, "_mtime": f.stat().st_mtime,
        })
    found.sort(key=lambda e: (e["created"], e["_mtime"], e["name"]), reverse=True)
    for e in found:
        del e["_mtime"]
    return found


# ----------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdlab evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | sd15 | a local pipeline folder (default tiny)")
    parser.add_argument("--n", type=int, default=None,
                        help=f"prompts (default {DEFAULT_N} for the tiny world, all of --prompts, or the course's 8); "
                             "FID-SD needs 2048 or more")
    parser.add_argument("--out", default=None, help="output folder (default evals/<timestamp>); one that holds an "
                                                    "evaluation is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the evaluation in --out")
    parser.add_argument("--steps", type=_int_list, default=list(TEACHER_STEPS), help="teacher steps, e.g. 1,2,4,50")
    parser.add_argument("--student-steps", type=_int_list, default=list(STUDENT_STEPS))
    parser.add_argument("--students", default=None, help="comma-separated student names (default: all fitting)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="SD captions: a .txt (one a line, # comments), a .json list of strings or a COCO "
                             "metadata.jsonl; --n takes the first n")
    parser.add_argument("--metadata", default=None, metavar="FILE", help="alias of --prompts (a COCO metadata.jsonl)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    parser.add_argument("--edit", action="store_true",
                        help="measure the edits of cdlab.edit (SDEdit, inpainting, sketches, anagrams, hybrids) "
                             "on the tiny world instead (cdlab.edit_eval; --n cases per technique, default 128)")
    parser.add_argument("--techniques", default=None,
                        help="with --edit: comma-separated subset of sdedit,inpaint,sketch,sketch_text,anagram,hybrid")
    args = parser.parse_args(argv)
    if args.edit:
        from cdlab import edit_eval

        students = [s for s in args.students.split(",") if s] if args.students else None
        techniques = [t for t in args.techniques.split(",") if t] if args.techniques else None
        return edit_eval.main(model=args.model, n=args.n, seed=args.seed, out=args.out, students=students,
                              guidance=args.guidance, device=args.device, techniques=techniques,
                              overwrite=args.overwrite)
    if args.prompts and args.metadata:
        print("error: --prompts and --metadata (its alias): give one, not both", file=sys.stderr)
        return 1
    flag, prompt_file = ("--metadata", args.metadata) if args.metadata else ("--prompts", args.prompts)
    try:  # checked before the (slow) teacher load
        check_out_dir(args.out, "results.json", args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if prompt_file:  # checked before the (slow) teacher load
        try:
            read_prompts(prompt_file, args.n, what=flag)
        except EvaluationError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    from cdlab.teachers import TeacherLoadError, load_teacher

    try:
        import torch

        dtype = getattr(torch, args.dtype) if args.dtype else None
        teacher = load_teacher(args.model, device=args.device, dtype=dtype)
    except (TeacherLoadError, AttributeError, OSError, ValueError) as e:
        print(f"error: could not load the teacher {args.model!r}: {e}", file=sys.stderr)
        return 1
    print(f"teacher: {teacher.describe()}", file=sys.stderr)

    def progress(frac: float, msg: str) -> None:
        print(f"[{frac * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)

    students = [s for s in args.students.split(",") if s] if args.students else None
    try:
        results = run_evaluation(
            teacher, n=args.n, steps=args.steps, student_steps=args.student_steps, students=students,
            out_dir=args.out, progress=progress, batch_size=args.batch_size, seed=args.seed,
            guidance=args.guidance, prompts=prompt_file, overwrite=args.overwrite)
    except (EvaluationError, FileNotFoundError, FileExistsError, ModuleNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_table(results))
    print(f"wrote {results['out_dir']} in {results['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
