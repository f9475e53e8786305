"""Score a run's checkpoint on the tiny world without saving a student: adherence and diversity.

    python -m cdlab.train.probe runs/<run>                       # the newest checkpoint, at the run's own steps
    python -m cdlab.train.probe runs/<run> --step 150 --steps 1  # checkpoint 150, sampled in one step
    python -m cdlab.train.probe runs/<run> --ema                 # the checkpoint's EMA (ema.safetensors) instead
    python -m cdlab.train.probe --plain --steps 1                # the plain teacher on the same sampler

The checkpoint's student LoRA (``lora.safetensors``: for DMD the generator, never the fake score) is loaded on
the tiny teacher and sampled by the deterministic multistep consistency sampler (`cdlab.samplers.sample_consistency`
over ``consistency_timesteps(steps, num_boundaries)``), as Compare and Evaluate sample a saved student. Prompts:
``n`` world captions (``sample_captions(n, seed=999)``), the i-th from ``teacher.initial_noise(i)``.

* adherence: the share of samples the world's checker reads right in every attribute;
* diversity: the mean |a - b| in [0, 1] pixels between samples of one caption under 8 seeds, over 8 captions (the
  quantity `python -m cdlab evaluate` reports per column, on its own captions and seeds);
* ``--teacher``: the same two numbers for the teacher at 50 DDIM steps with CFG, on the same prompts and noise.

This is for watching a run (a few seconds on the CPU); the numbers a README quotes for a shipped student come
from `python -m cdlab evaluate`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cdlab.images import decode_unit as decode_latents
from cdlab.metrics import seed_diversity, tensor_to_pil
from cdlab.samplers import consistency_timesteps, ddim_timesteps, sample_consistency, sample_ddim
from cdlab.students import attach_lora, use_student
from cdlab.teachers import load_teacher
from cdlab.train.checkpoints import checkpoint_name, latest_checkpoint
from cdlab.world import sample_captions
from cdlab.world.checker import adherence

__all__ = ["probe", "main"]


@torch.no_grad()
def probe(run: str | Path | None, *, step: int | None = None, steps: int | None = None, n: int = 128,
          teacher_50: bool = False, ema: bool = False, div_captions: int = 8, div_seeds: int = 8) -> dict:
    """Adherence and diversity of a run's checkpoint (``run=None``: the plain teacher) at ``steps`` steps;
    ``ema``: its ``ema.safetensors`` (a run with ``ema_decay > 0``) instead of ``lora.safetensors``."""
    teacher = load_teacher("tiny", device="cpu")
    num_boundaries, label = steps or 4, "plain teacher"
    if run is not None:
        run = Path(run)
        cfg = json.loads((run / "config.json").read_text())
        if cfg.get("model", "tiny") != "tiny":
            raise ValueError(f"run: {run} trained on {cfg.get('model')!r}; the probe reads tiny-world runs only")
        ck = run / "checkpoints" / checkpoint_name(step) if step is not None else latest_checkpoint(run, complete=True)
        weights = "ema.safetensors" if ema else "lora.safetensors"
        if ck is None or not (ck / weights).is_file():
            raise ValueError(f"run: no complete checkpoint{'' if step is None else f' at step {step}'} with {weights}"
                             f" in {run}")
        attach_lora(teacher.unet, rank=int(cfg["lora_rank"]), alpha=cfg.get("lora_alpha"))
        result = teacher.unet.load_state_dict(load_file(str(ck / weights)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{ck}: keys that are not this LoRA's, e.g. {result.unexpected_keys[:2]}")
        num_boundaries = int(cfg["num_boundaries"])
        steps = steps or int(cfg.get("sample_steps") or num_boundaries)
        label = f"{run.name} {ck.name}" + (" (EMA)" if ema else "")
    steps = int(steps or num_boundaries)
    texts = [c.text for c in sample_captions(n, seed=999)]
    rep = [c for c in texts[:div_captions] for _ in range(div_seeds)]
    x = torch.cat([teacher.initial_noise(i) for i in range(n)])
    x_div = torch.cat([teacher.initial_noise(10_000 + i) for i in range(len(rep))])
    out: dict[str, Any] = {"label": label, "steps": steps, "n": n}

    def score(sample) -> tuple[float, float]:
        cond, uncond = teacher.encode(texts)
        imgs = decode_latents(teacher, sample(x, cond, uncond))
        adh = adherence(tensor_to_pil(imgs), texts)
        out.setdefault("attributes", []).append({k: round(v, 3) for k, v in adh.items() if k != "all"})
        c2, u2 = teacher.encode(rep)
        return adh["all"], seed_diversity(decode_latents(teacher, sample(x_div, c2, u2)), div_seeds)

    ts = consistency_timesteps(steps, num_boundaries)
    out["adherence"], out["diversity"] = score(lambda z, c, u: sample_consistency(teacher.unet, z, c, ts,
                                                                                  teacher.scheduler).latents)
    if teacher_50:
        with use_student(teacher, None):  # the plain teacher: the run's LoRA off
            out["teacher50_adherence"], out["teacher50_diversity"] = score(
                lambda z, c, u: sample_ddim(teacher.unet, z, c, u, teacher.guidance, ddim_timesteps(50),
                                            teacher.scheduler).latents)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab.train.probe", description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", help="a run folder (runs/<run>)")
    p.add_argument("--plain", action="store_true", help="the plain teacher instead of a run")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest complete one)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    p.add_argument("--n", type=int, default=128, help="captions (default 128)")
    p.add_argument("--teacher", action="store_true", help="also the teacher at 50 DDIM steps with CFG")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (runs with ema_decay > 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a = p.parse_args(argv)
    if bool(a.run) == a.plain:
        p.error("give a run folder or --plain (one of them)")
    if a.n < 8 or a.n > 4096:
        p.error("--n: between 8 and 4096")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ema and a.plain:
        p.error("--ema: a run's checkpoint only")
    r = probe(None if a.plain else a.run, step=a.step, steps=a.steps, n=a.n, teacher_50=a.teacher, ema=a.ema)
    line = f"{r['label']}: {r['steps']} steps, n={r['n']}: adherence {r['adherence']:.3f}, diversity {r['diversity']:.4f}"
    if "teacher50_adherence" in r:
        line += f"; teacher-50: adherence {r['teacher50_adherence']:.3f}, diversity {r['teacher50_diversity']:.4f}"
    print(line)
    print("  per attribute: " + " | ".join(", ".join(f"{k} {v:.3f}" for k, v in a.items()) for a in r["attributes"]))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
