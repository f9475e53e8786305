"""A run's preview rows: the teacher's reference once, then the student every ``preview_every`` steps.

    python -m cdlab train --model tiny --preview_every 100 --preview_prompts "a red circle,a blue square"

``<run>/previews/reference.png`` is the teacher (DDIM, ``preview_reference_steps`` steps, CFG at the run's
guidance, every adapter off) and ``reference.json`` says how it was made; ``step_<step>.png`` is the student at
that step (its own consistency sampler). Every row starts from the same fixed noise (`preview_noise`), so the
rows of one run compare image by image; the app shows them (`cdlab.ui.previews`). Images are written under a
temporary name and renamed. The reference is the same for every run of one teacher and recipe, so it is cached
beside the latents and read back by the next run (`preview_reference`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cdlab.paths import PREVIEW_REFERENCE, preview_file, preview_rows, shown_path, write_json_atomic
from cdlab.samplers import ddim_timesteps, sample_consistency, sample_ddim
from cdlab.students.roles import TEACHER, adapter_role
from cdlab.train.checkpoints import evenly_spaced
from cdlab.train.config import cache_root
from cdlab.train.data import base_fingerprint

__all__ = ["REFERENCE_NAME", "MAX_PREVIEWS", "preview_noise", "preview_row", "preview", "preview_reference",
           "prune_previews"]

REFERENCE_NAME = PREVIEW_REFERENCE  # previews/: the teacher's reference row, beside step_XXXXXX.png
MAX_PREVIEWS = 40  # student rows kept per run (`prune_previews`): a long run with preview_every=1 stays small


def preview_noise(n: int, channels: int, size: int) -> torch.Tensor:
    """The fixed initial noise of a run's ``n`` previews, ``[n, channels, size, size]`` on the CPU: image ``i``
    from ``torch.Generator().manual_seed(i)``, the same for the teacher's reference and every student row."""
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(i))
                      for i in range(n)])


def preview_row(images: list) -> Image.Image:
    """One preview row: the images side by side, upscaled 4x (nearest) when they are under 128 px wide."""
    w, h = images[0].size
    row = Image.new("RGB", (len(images) * w, h), "white")
    for k, im in enumerate(images):
        row.paste(im, (k * w, 0))
    if w < 128:  # tiny images: upscale so the row is readable
        row = row.resize((row.width * 4, row.height * 4), Image.Resampling.NEAREST)
    return row


@torch.no_grad()
def preview(tr: Any) -> Path | None:
    """The student's row at this step, ``previews/step_<step>.png``: one image per preview caption, from the
    run's fixed noise, with the student's own sampler timesteps. ``tr``: the `cdlab.train.trainer.Trainer`."""
    if not tr.acc.is_main_process or not tr.cfg.preview_prompts:
        return None
    _, cond, _, x_T = _inputs(tr)
    with _autocast(tr):
        out = sample_consistency(tr.unet, x_T, cond, tr.sampler_timesteps, tr.teacher.scheduler)
    path = _write_row(tr, tr.teacher.decode(out.latents), preview_file(tr.step))
    prune_previews(tr.run_dir / "previews")
    return path


def prune_previews(folder: Path, cap: int = MAX_PREVIEWS) -> list[Path]:
    """Keep at most ``cap`` student rows in ``folder`` (the first, the newest and evenly spaced ones between;
    ``reference.png`` always). Returns the removed files."""
    rows = [p for _, p in preview_rows(folder)]  # only our own rows
    keep = set(evenly_spaced(rows, cap))
    removed = [p for p in rows if p not in keep]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


@torch.no_grad()
def preview_reference(tr: Any) -> Path | None:
    """The teacher's reference row, ``previews/reference.png``: DDIM with ``preview_reference_steps`` steps and
    CFG at the run's guidance, LoRA off, from the same noise as the student's rows. Written once per run:
    an existing one (a resumed run) is kept. ``previews/reference.json`` says how it was made."""
    cfg = tr.cfg
    if not tr.acc.is_main_process or not cfg.preview_prompts or not cfg.preview_reference_steps:
        return None
    path = tr.run_dir / "previews" / REFERENCE_NAME
    if path.is_file():
        return path
    cached = _reference_cache(tr)
    if cached is not None and _copy_pair(cached, path):
        tr.log(f"preview reference: teacher-{cfg.preview_reference_steps} (CFG {cfg.guidance:g}) read from "
               f"{shown_path(cached)}")
        return path
    t0 = time.perf_counter()
    prompts, cond, uncond, x_T = _inputs(tr)
    with _autocast(tr), adapter_role(tr.unet, TEACHER):
        out = sample_ddim(tr.unet, x_T, cond, uncond, float(cfg.guidance),
                          ddim_timesteps(cfg.preview_reference_steps, cfg.num_train_timesteps),
                          tr.teacher.scheduler)
    images = tr.teacher.decode(out.latents)
    write_json_atomic(path.with_suffix(".json"), {
        "steps": cfg.preview_reference_steps, "guidance": float(cfg.guidance), "nfe": out.nfe,
        "prompts": prompts, "seconds": round(time.perf_counter() - t0, 3)})
    path = _write_row(tr, images, REFERENCE_NAME)
    tr.log(f"preview reference: teacher-{cfg.preview_reference_steps} (CFG {cfg.guidance:g}) in "
           f"{time.perf_counter() - t0:.1f} s")
    if cached is not None:
        try:
            _copy_pair(path, cached)
        except OSError as e:  # a read-only cache costs the next run the teacher's steps, nothing else
            tr.log(f"preview reference: could not cache it in {shown_path(cached)}: {e}")
    return path


def _reference_cache(tr: Any) -> Path | None:
    """Where the reference row of this teacher and recipe is cached (with ``cache_latents``; None without), as
    the latents and DMD's pairs are: it costs ``2 x preview_reference_steps`` UNet passes (about 90 s for SD1.5
    on a CPU), the same for every run of the same teacher weights, captions, steps, guidance, resolution and
    precision, so only a run's first pays for it."""
    cfg = tr.cfg
    if not cfg.cache_latents:
        return None
    key = hashlib.sha256(json.dumps([
        "preview-reference-v1", tr.model_fingerprint, base_fingerprint(tr.unet),
        list(cfg.preview_prompts), cfg.preview_reference_steps, float(cfg.guidance), cfg.num_train_timesteps,
        cfg.resolution, str(tr.autocast_dtype), str(tr.teacher.pipe.unet.dtype), tr.device.type]).encode())
    return cache_root(cfg) / f"preview-reference-{key.hexdigest()[:20]}.png"


def _copy_pair(src: Path, dest: Path) -> bool:
    """Copy a reference row and its ``.json`` (each under a temporary name, then renamed; the row last, as
    `preview_reference` reads it); False when ``src`` has either missing."""
    if not (src.is_file() and src.with_suffix(".json").is_file()):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src.with_suffix(".json"), dest.with_suffix(".json")), (src, dest)):
        tmp = b.with_name(f".{b.name}.{os.getpid()}.tmp")
        shutil.copyfile(a, tmp)
        os.replace(tmp, b)
    return True


def _inputs(tr: Any) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's fixed preview captions, their (cond, uncond) embeddings and their fixed initial noise."""
    prompts = list(tr.cfg.preview_prompts)
    cond, uncond = tr.teacher.encode(prompts)
    x_T = preview_noise(len(prompts), tr.teacher.pipe.unet.config.in_channels,
                        tr.cfg.resolution // tr.teacher.pipe.vae_scale_factor)
    return prompts, cond, uncond, x_T.to(tr.device, tr.teacher.pipe.unet.dtype)


def _autocast(tr: Any):
    return torch.autocast(tr.device.type, tr.autocast_dtype) if tr.autocast_dtype else torch.no_grad()


def _write_row(tr: Any, images: list, name: str) -> Path:
    path = tr.run_dir / "previews" / name
    tmp = path.with_name(f".{path.name}.tmp.png")
    preview_row(images).save(tmp)
    os.replace(tmp, path)
    return path
