"""Train the class-conditioned flow teacher (seed 003 part B, §2.4 to §2.6) on Fashion-MNIST, for a time budget.

    python -m cdlab.flow.train_teacher --minutes 9 --out runs/flow-teacher
    python -m cdlab.flow.train_teacher --minutes 9 --out runs/flow-teacher --resume     # continue it

Each step is :func:`cdlab.flow.matching.train_step` (the flow-matching loss with 10% of the classes dropped);
the learning rate decays by the seed's exponential schedule once per epoch. The defaults are the CPU sketch of
issue 24 (D = 32, batch 128, Adam 2e-3: recognisable garments after about 9 minutes on 2 cores), not the seed's
GPU settings (:class:`cdlab.flow.matching.SeedRecipe`); ``--epoch-images`` sets what "an epoch" covers.

The folder ``--out`` holds, rewritten after every epoch and at the end:

=========================  ===================================================================================
``unet.safetensors``       the UNet's weights and BatchNorm statistics
``optimizer.safetensors``  Adam's moments, to resume
``state.json``             the config, the step, the epoch and the position in it, the learning rate
``loss.jsonl``             one ``{"step", "epoch", "loss"}`` line per step (the seed's loss curve)
``samples-epoch{E}.png``   after epochs 1, 5 and 10: 4 samples of each class (columns), Euler-50 with CFG 5
=========================  ===================================================================================

An existing folder is never overwritten: ``--resume`` continues it, else choose a new ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cdlab.flow import matching
from cdlab.flow.data import load_fashion_mnist
from cdlab.flow.unet import UNet
from cdlab.paths import load_json_object, write_json_atomic

__all__ = ["TeacherConfig", "GRID_EPOCHS", "train", "class_grid", "load_unet", "main"]

GRID_EPOCHS = (1, 5, 10)  # the seed's deliverables (§2.3, §2.6)


@dataclass(frozen=True)
class TeacherConfig:
    """What a run trains (saved in ``state.json``; a resumed run keeps its own)."""

    num_hiddens: int = 32
    batch_size: int = 128
    lr: float = 2e-3
    num_epochs: int = 10
    epoch_images: int = 60000
    lr_decay_to: float = 0.1
    p_uncond: float = matching.P_UNCOND
    seed: int = 0

    def check(self) -> "TeacherConfig":
        limits = {"num_hiddens": (1, 256), "batch_size": (1, 4096), "num_epochs": (1, 1000),
                  "epoch_images": (1, 60000), "seed": (0, 2 ** 31 - 1)}
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, (lo, hi) in {"lr": (1e-6, 1.0), "lr_decay_to": (1e-4, 1.0), "p_uncond": (0.0, 1.0)}.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        return self


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = {f"{i}.{name}": value.detach().cpu().clone().contiguous()
               for i, state in opt.state_dict()["state"].items() for name, value in state.items()}
    save_file(tensors, str(path))


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


_PROGRESS = ("step", "epoch", "position", "seconds")


def _read_state(folder: Path) -> tuple[TeacherConfig, dict]:
    """A run folder's ``state.json``: its config (every field known, each in range) and its progress."""
    saved = load_json_object(folder / "state.json", what="flow teacher state")
    config = saved.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'state.json'}: no config object")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TeacherConfig)})
    if unknown:
        raise ValueError(f"{folder / 'state.json'}: unknown config field {unknown[0]!r}")
    for k in _PROGRESS:
        v = saved.get(k)
        kinds = (int, float) if k == "seconds" else (int,)
        if isinstance(v, bool) or not isinstance(v, kinds) or not 0 <= v < 2 ** 53:
            raise ValueError(f"{folder / 'state.json'}: {k!r} must be a non-negative {kinds[-1].__name__}, got {v!r}")
    return TeacherConfig(**config).check(), {k: saved[k] for k in _PROGRESS}


def load_unet(folder: str | Path) -> UNet:
    """The UNet of a run folder (its ``state.json`` config and ``unet.safetensors``), in eval mode."""
    folder = Path(folder)
    cfg, _ = _read_state(folder)
    unet = UNet(num_hiddens=cfg.num_hiddens)
    unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
    return unet.eval()


@torch.no_grad()
def class_grid(unet: UNet, per_class: int = 4, num_steps: int = 50, guidance: float = matching.GUIDANCE,
               seed: int = 0) -> Image.Image:
    """The seed's sample figure (§2.6): ``per_class`` rows, one column per class, pixels clipped to [0, 1]."""
    was_training = unet.training
    unet.eval()
    labels = torch.arange(unet.num_classes).repeat(per_class)
    x = matching.sample(unet, labels, num_steps, guidance, generator=torch.Generator().manual_seed(seed))
    unet.train(was_training)
    rows = x.clamp(0, 1).cpu().reshape(per_class, unet.num_classes, 28, 28)
    grid = rows.permute(0, 2, 1, 3).reshape(per_class * 28, unet.num_classes * 28)
    return Image.fromarray((grid.numpy() * 255).round().astype(np.uint8), mode="L")


def _checkpoint(out: Path, unet: UNet, opt: torch.optim.Optimizer, cfg: TeacherConfig, progress: dict) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
    _save_optimizer(opt, out / "optimizer.safetensors")
    write_json_atomic(out / "state.json", {"config": dataclasses.asdict(cfg), **progress,
                                           "lr": opt.param_groups[0]["lr"]})


def _start(out: Path, cfg: TeacherConfig, resume: bool, device: torch.device) -> tuple[TeacherConfig, UNet, torch.optim.Optimizer, dict]:
    """A new run in an empty (or new) folder, or the saved one with ``resume``."""
    progress = {"step": 0, "epoch": 0, "position": 0, "seconds": 0.0}
    if resume:
        cfg, progress = _read_state(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: continue it with --resume, or choose a new --out")
    torch.manual_seed(cfg.seed)
    unet = UNet(num_hiddens=cfg.num_hiddens)
    if resume:
        unet.load_state_dict(load_file(str(out / "unet.safetensors")))
    unet.to(device)
    opt = matching.make_optimizer(unet, cfg.lr)
    if resume:
        _load_optimizer(opt, out / "optimizer.safetensors")
    for group in opt.param_groups:  # where the per-epoch decay left it
        group["lr"] = cfg.lr * (cfg.lr_decay_to ** (1.0 / cfg.num_epochs)) ** progress["epoch"]
    return cfg, unet, opt, progress


def train(out: str | Path, minutes: float, cfg: TeacherConfig = TeacherConfig(), *, data_root: str | None = None,
          resume: bool = False, max_steps: int | None = None, grid_steps: int = 50,
          device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> dict:
    """Train until ``minutes`` have passed, ``cfg.num_epochs`` are done or the run reached ``max_steps`` steps
    in all; returns the progress saved. An epoch covers ``cfg.epoch_images`` (at most the whole set); the
    sample grids take ``grid_steps`` Euler steps."""
    cfg.check()
    log = log or (lambda line: print(line, flush=True))  # flushed: a parent process streams it
    out = Path(out)
    cfg, unet, opt, progress = _start(out, cfg, resume, torch.device(device))
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train", data_root)
    epoch_images = min(cfg.epoch_images, len(images))
    sched = matching.make_lr_scheduler(opt, cfg.num_epochs, cfg.lr_decay_to)
    start, spent = time.monotonic(), progress["seconds"]
    with open(out / "loss.jsonl", "a", encoding="utf-8") as losses:
        while (progress["epoch"] < cfg.num_epochs and time.monotonic() - start < minutes * 60
               and (max_steps is None or progress["step"] < max_steps)):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + progress["epoch"]))
            idx = order[:epoch_images][progress["position"]:progress["position"] + cfg.batch_size]
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + progress["step"])
            loss = matching.train_step(unet, opt, images[idx].to(device), matching.one_hot(labels[idx]).to(device),
                                       p_uncond=cfg.p_uncond, generator=g)
            losses.write(json.dumps({"step": progress["step"], "epoch": progress["epoch"], "loss": loss}) + "\n")
            progress["step"] += 1
            progress["position"] += len(idx)
            if progress["position"] >= epoch_images:
                progress.update(epoch=progress["epoch"] + 1, position=0)
                sched.step()
                losses.flush()
                log(f"epoch {progress['epoch']}/{cfg.num_epochs}: step {progress['step']}, loss {loss:.4f}")
                if progress["epoch"] in GRID_EPOCHS:
                    class_grid(unet, num_steps=grid_steps).save(out / f"samples-epoch{progress['epoch']}.png")
                progress["seconds"] = spent + time.monotonic() - start
                _checkpoint(out, unet, opt, cfg, progress)
    progress["seconds"] = spent + time.monotonic() - start
    _checkpoint(out, unet, opt, cfg, progress)
    log(f"saved {out}: step {progress['step']}, epoch {progress['epoch']} + {progress['position']} images")
    return progress


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab.flow.train_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="time budget (at most 1440)")
    p.add_argument("--out", required=True, help="the run folder (new or empty, or an existing one with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--data", default=None, help="folder of the idx files (default: $CDLAB_FASHION_MNIST or Debian's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop once the run has taken this many steps in all")
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    defaults = TeacherConfig()
    for f in dataclasses.fields(TeacherConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None)
    args = p.parse_args(argv)
    if not (math.isfinite(args.minutes) and 0 < args.minutes <= 1440):
        p.error(f"--minutes must be in (0, 1440], got {args.minutes}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig) if getattr(args, f.name) is not None}
    if args.resume and given:
        p.error(f"--resume keeps the run's own config; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    try:
        train(args.out, args.minutes, TeacherConfig(**{**dataclasses.asdict(defaults), **given}),
              data_root=args.data, resume=args.resume, max_steps=args.max_steps, device=args.device)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
