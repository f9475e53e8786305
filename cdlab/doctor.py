"""``python -m cdlab doctor``: the first command to run on a new machine. Does the SD1.5 path work here?

    python -m cdlab doctor              # GPU + hub: SD1.5 at 512², the four published students, Compare, 5 CD steps
    python -m cdlab doctor --offline    # no hub: SD1.5's architecture with random weights at 64² (the CPU is fine)
    python -m cdlab doctor --offline --teacher-steps 10    # quicker: the reference teacher at 10 steps, not 50

It runs the product's own code, part by part, and prints for each ``PASS``, ``SKIP`` (with why) or ``FAIL``
(with the error):

1. teacher: load it (the hub's SD1.5, or ``sd15-random``) and time the load;
2. external students: LCM-LoRA, TCD, PCM, Hyper-SD through the catalogue (hub download or cache; offline
   and not cached reads SKIP), each with the number of LoRA layers it put on the UNet;
3. compare: one Compare request as the app runs it (teacher-50 with CFG, teacher-4, a 4-step LoRA student
   made for the check, and every external student that loaded), each column's latency and NFE, and the
   teacher-50 ÷ student-4 latency ratio;
4. train: 5 consistency-distillation steps (teacher with CFG, target, student forward and backward, AdamW
   on a rank-64 LoRA; ``--student-rank`` sets this rank and the compare part's student's) at the teacher's
   resolution: samples/s, MFU (FLOPs counted over a whole step) and peak memory.

Exit status 0 when no part failed, 1 otherwise. With random weights the numbers say the code runs and how
fast; they say nothing about image quality.
"""
from __future__ import annotations

import argparse
import os
import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cdlab.bench import STUDENT_RANK  # the bench's student rank, 64 (LCM-LoRA's); cdlab.bench imports no hub module

# The modules that import diffusers / huggingface_hub are imported in the functions: ``--offline`` sets
# HF_HUB_OFFLINE in main(), and huggingface_hub reads it when it is first imported.

PROMPT = "a photo of a cat sitting on a wooden table"


@dataclass
class Part:
    name: str
    status: str = "PASS"  # PASS | SKIP | FAIL
    lines: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def _peak_mem_mb(device: Any) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak(device: Any) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def check_teacher(offline: bool, resolution: int | None, device: str | None) -> tuple[Part, Any]:
    from cdlab.teachers import load_teacher

    part = Part("teacher")
    t0 = time.perf_counter()
    if offline:
        teacher = load_teacher("sd15-random", device=device or "cpu", resolution=resolution or 64)
    else:
        teacher = load_teacher("sd15", device=device)
    part.data["load_s"] = time.perf_counter() - t0
    part.lines.append(f"{teacher.describe()} loaded in {part.data['load_s']:.1f} s "
                      f"({teacher.resolution}², latents {tuple(teacher.latent_shape)}, "
                      f"text {teacher.tokenizer.model_max_length} tokens)")
    return part, teacher


def check_externals(teacher: Any, offline: bool) -> Part:
    from cdlab.students import EXTERNAL_STUDENTS, StudentError, load_external_student

    part = Part("external students")
    loaded, skipped = [], []
    for key, ext in EXTERNAL_STUDENTS.items():
        try:
            load_external_student(teacher, key, activate=False)  # loaded, the plain teacher still active
            layers = sum(1 for n, _ in teacher.unet.named_modules() if n.endswith(f"lora_A.{key}"))
            part.lines.append(f"{ext.title}: loaded, {layers} LoRA layers on the UNet ({ext.scheduler})")
            loaded.append(key)
        except StudentError as e:
            if offline and "could not get" in str(e):
                skipped.append(key)
                part.lines.append(f"{ext.title}: skipped: offline and not in the Hugging Face cache")
            else:
                part.status = "FAIL"
                part.lines.append(f"{ext.title}: FAILED: {e}")
    if not loaded and skipped and part.status != "FAIL":
        part.status = "SKIP"
    part.data["loaded"] = loaded
    return part


def check_compare(teacher: Any, externals: list[str], guidance: float | None = None, teacher_steps: int = 50,
                  student_rank: int = STUDENT_RANK) -> Part:
    """Compare's columns (teacher-50, teacher-4, a 4-step student, the externals that loaded) through the column
    runner as Compare runs them: fused students, each column failing alone.

    ``teacher_steps``: the reference teacher's DDIM steps (50, Compare's teacher-50; fewer for a quicker check on
    a CPU, where the ratio is then teacher-N ÷ student-4); ``student_rank``: the check's student's LoRA rank
    (64, LCM-LoRA's: fusing it into SD1.5's UNet is about 10 s on one CPU thread, on top of its 4 steps)."""
    from cdlab.bench import random_student
    from cdlab.columns import Column, run_columns, short_reason, teacher_columns

    part = Part("compare")
    name = "doctor-student"
    g = teacher.guidance if guidance is None else float(guidance)
    cols = teacher_columns(g)
    if teacher_steps != cols[0].steps:
        cols[0] = Column(f"teacher-{teacher_steps} (CFG)", "teacher", int(teacher_steps), g)
    cols += [Column(k, kind, 4, student=k, label=f"{k} (4 steps)")
             for k, kind in [(name, "student")] + [(k, "external") for k in externals]]
    with random_student(teacher, name, rank=student_rank) as root:
        _reset_peak(teacher.device)
        with torch.inference_mode():
            runs = run_columns(teacher, cols, [PROMPT], [0], adapters_root=root, check_base=False,
                               capture_errors=True)
    try:
        teacher.pipe.delete_adapters(name)
    except Exception:  # not loaded (it failed) or already gone
        pass
    for r in runs:
        if r.error is not None:
            part.status = "FAIL"
            part.lines.append(f"{r.column.label}: FAILED: {short_reason(r.error)}")
        else:
            part.lines.append(f"{r.column.label}: {r.seconds:.2f} s, NFE {r.nfe}")
    ref = runs[0] if runs[0].error is None else None  # the reference teacher (teacher-50, or teacher-N)
    s4 = next((r for r in runs if r.column.label.startswith(name) and r.error is None), None)
    if ref and s4:
        part.data["ratio"] = ref.seconds / s4.seconds
        part.lines.append(f"teacher-{ref.column.steps} ÷ student-4 latency: {part.data['ratio']:.1f}x "
                          f"(NFE {ref.nfe} vs {s4.nfe})")
    part.data["peak_mem_mb"] = _peak_mem_mb(teacher.device)
    part.lines.append(f"peak memory {part.data['peak_mem_mb']:.0f} MB")
    return part


def check_train(teacher: Any, steps: int = 5, batch: int | None = None, student_rank: int = STUDENT_RANK) -> Part:
    from cdlab.bench import bench_train

    part = Part("train")
    cuda = str(teacher.device).startswith("cuda")
    batch = batch or (8 if cuda else 1)
    _reset_peak(teacher.device)
    r = bench_train(teacher, batch=batch, steps=steps, rank=student_rank, out=lambda *_: None)
    part.data.update(r, peak_mem_mb=_peak_mem_mb(teacher.device))
    part.lines.append(f"{steps} CD steps, rank-{student_rank} LoRA, batch {batch} at {teacher.resolution}²: "
                      f"{r['samples_per_s']:.2f} samples/s "
                      f"({r['step_s'] * 1000:.0f} ms/step)")
    mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "unknown (no peak for this device)"
    part.lines.append(f"MFU {mfu} of {r['peak_source']}; {r['forwards_per_step']:.2f} UNet forwards a step "
                      "(counted); peak memory " + f"{part.data['peak_mem_mb']:.0f} MB")
    return part


def _run(name: str, fn: Callable[[], Part]) -> Part:
    try:
        return fn()
    except Exception as e:  # a part fails alone; the report goes on
        part = Part(name, "FAIL")
        part.lines.append(f"{type(e).__name__}: {e}")
        part.lines.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
        return part


def run_doctor(offline: bool = False, *, teacher: Any = None, resolution: int | None = None,
               device: str | None = None, train_steps: int = 5, guidance: float | None = None,
               teacher_steps: int = 50, student_rank: int = STUDENT_RANK,
               out: Callable[[str], Any] = print) -> list[Part]:
    """Run every part and print it; returns the parts (``status`` PASS / SKIP / FAIL).

    ``guidance``: the teacher columns' CFG scale in the compare part (default: the teacher's; 1 turns CFG off,
    which halves teacher-50's cost on a CPU); ``teacher_steps``: the reference teacher's steps (default 50);
    ``student_rank``: the LoRA rank of the compare part's student and of the train part's LoRA (default 64)."""
    out(f"cdlab doctor ({'offline: SD1.5 architecture, random weights' if offline else 'SD1.5 from the hub'}) · "
        f"torch {torch.__version__} · CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
        f" · {torch.get_num_threads()} CPU threads")
    parts: list[Part] = []

    def show(part: Part) -> Part:
        out(f"[{part.status}] {part.name}")
        for line in part.lines:
            out(f"       {line}")
        parts.append(part)
        return part

    if teacher is None:
        try:
            tpart, teacher = check_teacher(offline, resolution, device)
        except Exception as e:
            show(Part("teacher", "FAIL", [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]))
            for name in ("external students", "compare", "train"):
                show(Part(name, "SKIP", ["no teacher"]))
            out("RESULT: FAIL (teacher)")
            return parts
    else:
        tpart = Part("teacher", "PASS", [f"{teacher.describe()} (given)"])
    show(tpart)
    ext = show(_run("external students", lambda: check_externals(teacher, offline)))
    show(_run("compare", lambda: check_compare(teacher, ext.data.get("loaded", []), guidance, teacher_steps,
                                               student_rank)))
    show(_run("train", lambda: check_train(teacher, train_steps, student_rank=student_rank)))
    failed = [p.name for p in parts if p.status == "FAIL"]
    out("RESULT: " + (f"FAIL ({', '.join(failed)})" if failed else "all parts passed"
                      + (" (some skipped)" if any(p.status == "SKIP" for p in parts) else "")))
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab doctor", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--offline", action="store_true", help="SD1.5's architecture with random weights, no hub")
    p.add_argument("--resolution", type=int, default=None, help="offline: image side (default 64)")
    p.add_argument("--device", default=None, help="default: cuda when available (offline: cpu)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of the teacher columns (default: the teacher's, 7.5; 1: no CFG, half the time)")
    p.add_argument("--teacher-steps", type=int, default=50, metavar="N",
                   help="DDIM steps of the reference teacher column (default 50; fewer: a quicker check on a CPU)")
    p.add_argument("--student-rank", type=int, default=STUDENT_RANK, metavar="R",
                   help="LoRA rank of the check's student and of the trained LoRA (default 64, LCM-LoRA's; "
                        "lower: a quicker check on a CPU)")
    a = p.parse_args(argv)
    if not 1 <= a.teacher_steps <= 1000:
        p.error(f"--teacher-steps must be 1 to 1000, got {a.teacher_steps}")
    if not 1 <= a.student_rank <= 256:
        p.error(f"--student-rank must be 1 to 256, got {a.student_rank}")
    if a.offline:  # no network retries: the hub is not asked, only its local cache
        os.environ["HF_HUB_OFFLINE"] = "1"
    parts = run_doctor(a.offline, resolution=a.resolution, device=a.device, guidance=a.guidance,
                       teacher_steps=a.teacher_steps, student_rank=a.student_rank)
    return 1 if any(x.status == "FAIL" for x in parts) else 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
