"""Generate one image from a teacher (DDIM + CFG) or a student (multistep consistency sampling).

    python -m cdlab generate --model tiny --prompt "a red circle above a blue square" --seed 0 --out sample.png
    python -m cdlab generate --model tiny --student my-student --prompt "..." --steps 4 --out student.png
    python -m cdlab generate --model sd15 --prompt "a photo of a cat" --steps 50 --guidance 7.5 --out cat.png

Prints the sampling time in seconds and the number of network evaluations (a CFG step counts 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

TEACHER_STEPS = 50   # DDIM steps for the teacher when --steps is not given


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cdlab generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="teacher: tiny | sd15 | PATH to a diffusers pipeline folder")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (>= 0)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (teacher default {TEACHER_STEPS}; a student's default is its card's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the teacher's own, 5 for tiny and 7.5 for SD1.5; a student's default is its card's)")
    p.add_argument("--student", default=None, help="a student in adapters/ or an external student key")
    p.add_argument("--stochastic", action="store_true", help="consistency students: Song et al.'s Alg. 1 re-noising")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--out", default="sample.png", help="output image file (.png)")
    return p


def _check(args: argparse.Namespace) -> str | None:
    """A message for bad input, or None."""
    if not args.prompt.strip():
        return "--prompt must not be empty"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.steps is not None and not 1 <= args.steps <= 1000:
        return f"--steps must be in [1, 1000], got {args.steps}"
    if args.guidance is not None and not args.guidance >= 0:
        return f"--guidance must be >= 0, got {args.guidance}"
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        return f"--out must end in .png (or .jpg/.webp), got {args.out!r}"
    return None


def _student_sample(teacher: Any, args: argparse.Namespace, x_T: Any) -> tuple[Any, int, str]:
    """Latents, NFE and a label from the student named in ``args.student``."""
    import torch

    from cdlab import students  # imported only when a student is asked for
    from cdlab.samplers import consistency_timesteps, sample_student

    if args.student in students.EXTERNAL_STUDENTS:
        card = students.load_external_student(teacher, args.student)
    else:
        card = students.load_student(teacher, args.student)
    steps = args.steps or card.steps
    if card.scheduler == "consistency":
        if args.guidance not in (None, 1.0):
            print(f"note: --guidance is ignored for consistency student {card.name!r} (guidance is distilled in)")
        gen = torch.Generator("cpu").manual_seed(args.seed + 1) if args.stochastic else None
        label = f"student {card.name} ({steps} consistency steps {consistency_timesteps(steps, card.num_boundaries or steps)})"
    else:  # a diffusers-scheduler student (LCM, TCD, ...): its card's scheduler, as in Compare (same seed, same image)
        if args.guidance is not None:
            card = dataclasses.replace(card, guidance=float(args.guidance))
        gen = torch.Generator("cpu").manual_seed(args.seed)
        label = f"student {card.name} ({steps} steps, {card.scheduler})"
    cond, uncond = teacher.encode([args.prompt])
    out = sample_student(teacher.unet, x_T, cond, uncond, card, steps, students.make_scheduler(teacher.pipe, card),
                         stochastic=bool(args.stochastic), generator=gen)
    return out.latents, out.nfe, label


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from cdlab.samplers import ddim_timesteps, sample_ddim
    from cdlab.teachers import TeacherLoadError, load_teacher

    try:
        teacher = load_teacher(args.model, device=args.device)
    except TeacherLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    x_T = teacher.initial_noise(args.seed)
    start = time.perf_counter()
    if args.student:
        try:
            latents, nfe, label = _student_sample(teacher, args, x_T)
        except ValueError as e:  # StudentError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        steps = args.steps or TEACHER_STEPS
        guidance = teacher.guidance if args.guidance is None else args.guidance  # the teacher's own default
        cond, uncond = teacher.encode([args.prompt])
        out = sample_ddim(teacher.unet, x_T, cond, uncond, guidance, ddim_timesteps(steps), teacher.scheduler)
        latents, nfe, label = out.latents, out.nfe, f"teacher DDIM {steps} steps, guidance {guidance:g}"
    image = teacher.decode(latents)[0]
    seconds = time.perf_counter() - start
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    print(f"{teacher.describe()} · {label}")
    print(f"saved {out_path} ({image.size[0]}x{image.size[1]}) in {seconds:.2f} s, NFE {nfe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
