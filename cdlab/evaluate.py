"""Quality against steps: the teacher at 1..50 DDIM+CFG steps and every fitting student at 1..8 steps,
over one fixed prompt/seed set, every column of a prompt starting from the same initial noise.

    python -m cdlab evaluate --model tiny --n 128            # the embedded world (adherence, agreement)
    python -m cdlab evaluate --model sd15 --n 1000 --metadata data/coco/metadata.jsonl   # CLIP, FID-SD, LPIPS

Writes ``evals/<timestamp>/{results.json, table.md, quality_vs_nfe.png}`` (``CDLAB_EVALS_DIR``
overrides ``evals/``). ``run_evaluation``, ``list_evaluations`` and ``load_evaluation`` are the
Python API the app's Evaluate tab uses; nothing here imports Gradio.

NFE counts network evaluations per image (a CFG step counts 2). Seconds per image are wall time
over the batch: the prompt encoding share, the UNet steps and the VAE decode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

TEACHER_STEPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 50)
STUDENT_STEPS: tuple[int, ...] = (1, 2, 4, 8)
REFERENCE_STEPS = 50          # the teacher run every column is compared against
# 128 world captions: 271 tiny-UNet passes (0.2 GFLOP/image each) on 128 images is ~7 TFLOP, about a minute
# at the ~110 GFLOP/s two CPU cores reach; 256 would pass the 2-minute budget.
DEFAULT_N = 128
DEFAULT_GUIDANCE = 7.5        # used only when the teacher carries no default of its own
PROMPT_SEED = 2024            # the fixed caption draw of the tiny world
TEACHER_METHOD = "teacher (DDIM+CFG)"

ProgressFn = Callable[[float, str], Any]

__all__ = [
    "TEACHER_STEPS", "STUDENT_STEPS", "REFERENCE_STEPS", "evals_dir", "run_evaluation", "write_evaluation",
    "render_table", "plot_quality", "list_evaluations", "load_evaluation", "main",
]


class EvaluationError(ValueError):
    """Bad evaluation input (steps, sizes, paths)."""


class EvaluationResult(dict):
    """The results dict, plus ``.path``: the folder it was written to (None when not written)."""

    @property
    def path(self) -> Path | None:
        return Path(self["out_dir"]) if self.get("out_dir") else None


def evals_dir() -> Path:
    """Where evaluations go: ``$CDLAB_EVALS_DIR`` or ``<repo>/evals``."""
    env = os.environ.get("CDLAB_EVALS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "evals"


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


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode(teacher: Any, latents: Any) -> Any:
    """Latents -> float32 images in [0, 1], [B, 3, H, W]."""
    from cdlab.metrics import to_unit

    vae = teacher.vae
    return to_unit(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)


def _run_student(teacher: Any, col: _Column, x_T: Any, cond: Any, uncond: Any) -> Any:
    """Latents of a student column: the consistency sampler, or the card's diffusers scheduler."""
    from cdlab.samplers import consistency_timesteps, sample_consistency

    card = col.card
    if card.scheduler == "consistency":
        ts = consistency_timesteps(col.steps, card.num_boundaries or col.steps)
        out = sample_consistency(teacher.unet, x_T, cond, ts, teacher.scheduler)
        col.nfe = out.nfe
        return out.latents
    # An external student (e.g. LCM-LoRA) samples with its own diffusers scheduler.
    from cdlab.samplers import sample_scheduler
    from cdlab.students import make_scheduler

    out = sample_scheduler(teacher.unet, x_T, cond, uncond, card, col.steps, make_scheduler(teacher.pipe, card))
    col.nfe = out.nfe
    return out.latents


# ----------------------------------------------------------------------------- the evaluation

def _prompts(teacher: Any, world: bool, n: int | None, metadata: str | Path | None,
             seed: int) -> tuple[list[str], list | None, str]:
    from cdlab.prompts import coco_captions, course_prompts

    if world:
        from cdlab.world import sample_captions

        caps = sample_captions(DEFAULT_N if n is None else n, seed=PROMPT_SEED + seed)
        return [c.text for c in caps], caps, "tiny-world captions"
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
) -> EvaluationResult:
    """Evaluate a loaded teacher and its fitting students; write and return the results.

    Args:
        teacher (`cdlab.teachers.Teacher`): the loaded teacher (its pipeline keeps its adapters; the
            plain teacher is active again on return).
        n (`int`, *optional*): prompts (one seed each: ``seed + i``). Default: 128 world captions, or
            all COCO captions / the 8 course prompts once.
        steps: teacher DDIM step counts (guided; NFE = 2 x steps).
        student_steps: student step counts.
        students: student names to include; default every student whose ``base_model`` is the teacher's.
        out_dir: where to write; default ``evals/<timestamp>``.
        progress: ``progress(fraction, message)``, called after each unit of work (``gr.Progress`` fits).
        batch_size: prompts per UNet call (CFG doubles it). Default: all of them at the world's 32 px,
            8 at 512 px.
        seed: first noise seed; also the COCO draw.
        guidance: CFG scale of the teacher; default the teacher's own (``teacher.guidance``) or 7.5.
        metadata: a COCO ``metadata.jsonl`` for SD prompts.
        sd_metrics (`cdlab.metrics.SDMetrics`, *optional*): the SD metric models (default: the real ones).
        suite: ``"world"`` or ``"sd"``; default from the teacher (the world's resolution -> ``"world"``).
        adapters_root: students' folder (default ``cdlab.students.ADAPTERS_DIR``).
        write: write the three files (else only return the dict).
        fuse_lora: fuse each student's LoRA into the UNet while its columns run (unfused after).

    Returns:
        The results dict (also ``results.json``): metadata and one row per column, each with
        ``method, kind, student, steps, nfe, seconds_per_image, speedup`` and the suite's metrics;
        ``out_dir`` when written.
    """
    import torch

    from cdlab.samplers import ddim_timesteps, sample_ddim
    from cdlab.students import activate_student, list_students, load_student

    t_start = time.perf_counter()
    steps = _check_steps(steps, "steps")
    student_steps = _check_steps(student_steps, "student_steps")
    if n is not None and n < 1:
        raise EvaluationError(f"n must be >= 1, got {n}")
    suite = suite or ("world" if _is_world(teacher) else "sd")
    if suite not in ("world", "sd"):
        raise EvaluationError(f"suite must be 'world' or 'sd', got {suite!r}")
    world = suite == "world"
    guidance = _teacher_guidance(teacher) if guidance is None else float(guidance)
    prompts, captions, source = _prompts(teacher, world, n, metadata, seed)
    n = len(prompts)
    if batch_size is None:
        batch_size = n if teacher.resolution <= 64 else 8
    batch_size = max(1, min(int(batch_size), n))
    if not world and n < 2:
        raise EvaluationError("FID needs at least 2 prompts")
    if not world and sd_metrics is None:
        from cdlab.metrics import SDMetrics

        sd_metrics = SDMetrics()

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
            progress(0.0, f"evaluating {len(columns)} columns on {n} prompts")
        try:
            with torch.inference_mode():
                for bi, idx in enumerate(batches):
                    bp = [prompts[i] for i in idx]
                    _sync(teacher.device)
                    t0 = time.perf_counter()
                    cond, uncond = teacher.encode(bp)
                    _sync(teacher.device)
                    enc_s = time.perf_counter() - t0
                    x_T = torch.cat([teacher.initial_noise(seed + i, 1) for i in idx])
                    activate_student(pipe, None)
                    if bi == 0:  # warm-up (allocator, oneDNN/cuDNN primitives), so no column pays for it
                        sample_ddim(teacher.unet, x_T, cond, uncond, guidance, [999], teacher.scheduler)
                        _decode(teacher, x_T)
                    ref = None
                    if not has_ref_col:
                        out = sample_ddim(teacher.unet, x_T, cond, uncond, guidance,
                                          ddim_timesteps(REFERENCE_STEPS), teacher.scheduler)
                        ref = _decode(teacher, out.latents)
                        tick(f"batch {bi + 1}/{len(batches)}: reference, teacher {REFERENCE_STEPS} steps")
                    # The reference column first, so every other column can be compared as it is made.
                    order = sorted(columns, key=lambda c: (c.kind != "teacher", c.steps != REFERENCE_STEPS))
                    active = None
                    ref_feats = None
                    for col in order:
                        if col.student != active:
                            if active is not None and fuse_lora:
                                pipe.unfuse_lora(components=["unet"])
                            activate_student(pipe, col.student)
                            if col.student is not None and fuse_lora:
                                # Fused LoRA is the fast path (1.9x on the tiny student, bench sampling).
                                pipe.fuse_lora(components=["unet"], adapter_names=[col.student])
                            active = col.student
                        _sync(teacher.device)
                        t0 = time.perf_counter()
                        if col.kind == "teacher":
                            out = sample_ddim(teacher.unet, x_T, cond, uncond, guidance,
                                              ddim_timesteps(col.steps), teacher.scheduler)
                            col.nfe, latents = out.nfe, out.latents
                        else:
                            latents = _run_student(teacher, col, x_T, cond, uncond)
                        images = _decode(teacher, latents)
                        _sync(teacher.device)
                        col.seconds += time.perf_counter() - t0 + enc_s
                        col.n += len(idx)
                        if ref is None:  # this is the reference column
                            ref = images
                        if not world and ref_feats is None:  # shared by every column's FID
                            ref_feats = sd_metrics.features(ref)
                        _score(col, images, ref, ref_feats, bp, world)
                        tick(f"batch {bi + 1}/{len(batches)}: {col.method}, {col.steps} steps")
                    if active is not None and fuse_lora:
                        pipe.unfuse_lora(components=["unet"])
        finally:
            if fuse_lora and cards:  # an error mid-column must not leave a student fused into the teacher
                import warnings

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Already unmerged")
                    pipe.unfuse_lora(components=["unet"])
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
        "teacher_steps": list(steps),
        "student_steps": list(student_steps),
        "students": [c.to_dict() if hasattr(c, "to_dict") else {"name": c.name} for c in cards],
        "rows": rows,
        "elapsed_s": time.perf_counter() - t_start,
    })
    if write:
        results["out_dir"] = str(write_evaluation(results, out_dir))
    if progress is not None:
        progress(1.0, "done")
    return results


def _score(col: _Column, images: Any, ref: Any, ref_feats: Any, prompts: list[str], world: bool) -> None:
    from cdlab.metrics import agreement_error

    if world:
        col.err_sum += float(agreement_error(images, ref, reduction="none").sum())
        col.images.append(images.float().cpu())
    else:
        col.sd.update(images, prompts, ref, reference_features=ref_feats)


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
        col.images.clear()
    else:
        row.update(col.sd.compute())
    return row


# ----------------------------------------------------------------------------- outputs

_COLUMNS = {
    "world": [("adherence", "adherence ↑", "{:.3f}"), ("agreement_error", "agreement err ↓", "{:.4f}")],
    "sd": [("clip_score", "CLIP ↑", "{:.2f}"), ("fid_sd", "FID-SD ↓", "{:.2f}"), ("lpips", "LPIPS ↓", "{:.4f}")],
}


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
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
        cells = [r["method"], str(r["steps"]), str(r["nfe"]), *(_fmt(r.get(k), f) for k, _, f in metrics),
                 f"{r['seconds_per_image'] * 1000:.2f} ms" if r["seconds_per_image"] < 1 else
                 f"{r['seconds_per_image']:.2f} s", _fmt(r.get("speedup"), "{:.1f}×")]
        lines.append("| " + " | ".join(cells) + " |")
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
        for m in methods:
            rows = sorted((r for r in results["rows"] if r["method"] == m), key=lambda r: r["nfe"])
            pts = [(r["nfe"], r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            if not pts:
                continue
            style = dict(color="black", linestyle="--", marker="s") if m == TEACHER_METHOD else dict(marker="o")
            ax.plot(*zip(*pts), label=m, **style)
            for (x, y), r in zip(pts, rows):
                ax.annotate(str(r["steps"]), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
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


def write_evaluation(results: dict, out_dir: str | Path | None = None) -> Path:
    """Write results.json, table.md and quality_vs_nfe.png; return the folder."""
    if out_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = evals_dir() / stamp
        k = 1
        while out_dir.exists():
            out_dir = evals_dir() / f"{stamp}-{k}"
            k += 1
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
    parser.add_argument("--n", type=int, default=None, help=f"prompts (default {DEFAULT_N} for the tiny world)")
    parser.add_argument("--out", default=None, help="output folder (default evals/<timestamp>)")
    parser.add_argument("--steps", type=_int_list, default=list(TEACHER_STEPS), help="teacher steps, e.g. 1,2,4,50")
    parser.add_argument("--student-steps", type=_int_list, default=list(STUDENT_STEPS))
    parser.add_argument("--students", default=None, help="comma-separated student names (default: all fitting)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--metadata", default=None, help="COCO metadata.jsonl for SD prompts")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    args = parser.parse_args(argv)

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
            guidance=args.guidance, metadata=args.metadata)
    except (EvaluationError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_table(results))
    print(f"wrote {results['out_dir']} in {results['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
