"""Train the class-conditioned flow teacher (seed 003 part B, §2.4 to §2.6) on Fashion-MNIST, for a time budget.

    python -m cdlab.flow.train_teacher --minutes 9 --out runs/flow-teacher
    python -m cdlab.flow.train_teacher --minutes 9 --out runs/flow-teacher --resume     # continue it

Each step is :func:`cdlab.flow.matching.train_step` (the flow-matching loss with 10% of the classes dropped);
the learning rate decays by the seed's exponential schedule once per epoch. With ``--ema-decay d`` (not in the
seed) the run also keeps an exponential moving average of the weights, ``theta_ema <- d theta_ema + (1 - d) theta``
with the usual warm-up ``d_k = min(d, (1 + k) / (10 + k))``, and the teacher it exports is that average. The
UNet's BatchNorm statistics belong to the raw weights, so the average gets its own, recomputed on training
inputs: averaged weights with the raw statistics sample blobs (issue 24: class accuracy 0.13). The defaults are the CPU sketch of
issue 24 (D = 32, batch 128, Adam 2e-3: recognisable garments after about 9 minutes on 2 cores), not the seed's
GPU settings (:class:`cdlab.flow.matching.SeedRecipe`); ``--epoch-images`` sets what "an epoch" covers (the app's
Train tab starts runs with short epochs: `cdlab.ui.flow_train`).

The folder ``--out`` is a run folder as the app's Train tab reads it (`cdlab.ui.runs`, the same protocol as
``python -m cdlab train``), so a run from the CLI or the app shows its loss and grids live:

=========================  ===================================================================================
``unet.safetensors``       the UNet's weights and BatchNorm statistics (the checkpoint, with the next two)
``optimizer.safetensors``  Adam's moments, to resume
``ema.safetensors``        with ``--ema-decay``: the weights' running average, to resume
``teacher.safetensors``    with ``--ema-decay``: the teacher, that average with its BatchNorm statistics recomputed
                           (:func:`cdlab.flow.unet.recalibrate_batchnorm`); `load_unet` reads it first
``state.json``             the config, the step, the epoch and the position in it, the learning rate
``config.json``            what the run is: ``"kind": "flow-teacher"``, its config, its time budget, the grids'
                           captions (the classes) and Euler steps
``status.json``            running / stopping / finished / stopped / failed, the step, the pid (`cdlab.train.status`)
``metrics.jsonl``          one ``{"step", "epoch", "loss", "lr", ...}`` line per step (the seed's loss curve),
                           flushed every 10 steps or 2 s; ``step`` counts the steps done
``previews/step_S.png``    after every epoch: 4 samples of each class (columns), Euler-50 with CFG 5, 3x pixels
``samples-epoch{E}.png``   the seed's deliverables: the same grid after epochs 1, 5 and 10, at 1x
=========================  ===================================================================================

A run ends "finished" after its epochs; "stopped" (resumable) at the time budget, at ``--max-steps``, on SIGTERM or
SIGINT, or when the app that started it is gone (`cdlab.train.stopping`): each saves a checkpoint first. A folder
that holds a run is never overwritten: ``--resume`` continues it, else choose a new ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
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
from cdlab.flow.data import CLASS_NAMES, load_fashion_mnist
from cdlab.flow.unet import UNet, channels_last, recalibrate_batchnorm
from cdlab.paths import load_json_object, preview_file, write_json_atomic
from cdlab.train.status import FLOW_TEACHER_RUN, MetricsWriter, write_status
from cdlab.train.stopping import StopFlag, watch_parent

__all__ = ["TeacherConfig", "GRID_EPOCHS", "RUN_KIND", "train", "class_grid", "load_unet", "save_optimizer_state", "load_optimizer_state", "total_steps", "main"]

GRID_EPOCHS = (1, 5, 10)  # the seed's deliverables (§2.3, §2.6)
RUN_KIND = FLOW_TEACHER_RUN  # config.json's "kind": how the app's Train tab tells this run from a distillation's
FLUSH_STEPS, FLUSH_SECONDS = 10, 2.0  # metrics.jsonl is flushed this often: the Train tab's curve moves live
TEACHER_FILE = "teacher.safetensors"  # a run with an EMA: the average with its own BatchNorm statistics
EMA_FILE = "ema.safetensors"  # the running average of the parameters (to resume)
RECALIBRATION_BATCHES = 20  # batches of training inputs that recompute the EMA's BatchNorm statistics
PREVIEW_SCALE = 3  # the previews' pixels per image pixel (the page shows 28 px images; the seed's grids stay 1x)
_RUN_FILES = ("state.json", "config.json", "metrics.jsonl")  # a folder holding any of them holds a run


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
    ema_decay: float = 0.0       # 0: no average (the seed's recipe); e.g. 0.999: the teacher is the weights' EMA

    def check(self) -> "TeacherConfig":
        limits = {"num_hiddens": (1, 256), "batch_size": (1, 4096), "num_epochs": (1, 1000),
                  "epoch_images": (1, 60000), "seed": (0, 2 ** 31 - 1)}
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, (lo, hi) in {"lr": (1e-6, 1.0), "lr_decay_to": (1e-4, 1.0), "p_uncond": (0.0, 1.0),
                               "ema_decay": (0.0, 0.99999)}.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        return self


def save_optimizer_state(opt: torch.optim.Optimizer, path: Path) -> None:
    """The optimizer's per-parameter tensors (Adam's moments and step) as safetensors, ``<index>.<name>`` keys."""
    tensors = {f"{i}.{name}": value.detach().cpu().clone().contiguous()
               for i, state in opt.state_dict()["state"].items() for name, value in state.items()}
    save_file(tensors, str(path))


def load_optimizer_state(opt: torch.optim.Optimizer, path: Path) -> None:
    """Read back what :func:`save_optimizer_state` wrote into ``opt`` (its parameter groups as they are)."""
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


def teacher_weights(folder: str | Path) -> Path:
    """The teacher's weights file in a run folder: ``teacher.safetensors`` (the EMA, with its own BatchNorm
    statistics) when the run kept an average, else ``unet.safetensors``."""
    folder = Path(folder)
    return folder / TEACHER_FILE if (folder / TEACHER_FILE).is_file() else folder / "unet.safetensors"


def load_unet(folder: str | Path) -> UNet:
    """The teacher of a run folder (`teacher_weights`), in eval mode and channels-last
    (`cdlab.flow.unet.channels_last`); the architecture from ``state.json``."""
    cfg, _ = _read_state(Path(folder))
    unet = UNet(num_hiddens=cfg.num_hiddens)
    unet.load_state_dict(load_file(str(teacher_weights(folder))))
    return channels_last(unet).eval()


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


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _start(out: Path, cfg: TeacherConfig, resume: bool, device: torch.device) -> tuple[TeacherConfig, UNet, torch.optim.Optimizer, dict]:
    """A new run in an empty (or new) folder, or the saved one with ``resume``."""
    progress = {"step": 0, "epoch": 0, "position": 0, "seconds": 0.0}
    if resume:
        cfg, progress = _read_state(out)
    elif any((out / name).exists() for name in _RUN_FILES):
        raise FileExistsError(f"{out} holds a run: continue it with --resume, or choose a new --out")
    torch.manual_seed(cfg.seed)
    unet = UNet(num_hiddens=cfg.num_hiddens)
    if resume:
        unet.load_state_dict(load_file(str(out / "unet.safetensors")))
    channels_last(unet.to(device))  # before the optimizer: Adam's moments take the weights' layout
    opt = matching.make_optimizer(unet, cfg.lr)
    if resume:
        load_optimizer_state(opt, out / "optimizer.safetensors")
    for group in opt.param_groups:  # where the per-epoch decay left it
        group["lr"] = cfg.lr * (cfg.lr_decay_to ** (1.0 / cfg.num_epochs)) ** progress["epoch"]
    return cfg, unet, opt, progress


def _start_ema(out: Path, unet: UNet, cfg: TeacherConfig, resume: bool) -> dict[str, torch.Tensor] | None:
    """The parameters' running average (``None`` without ``ema_decay``): the saved one on ``resume``, else a copy
    of the weights."""
    if cfg.ema_decay <= 0:
        return None
    ema = {n: p.detach().clone() for n, p in unet.named_parameters()}
    if resume:
        saved = load_file(str(out / EMA_FILE))
        if saved.keys() != ema.keys():
            raise ValueError(f"{out / EMA_FILE}: not this UNet's parameters")
        for n in ema:
            ema[n].copy_(saved[n])
    return ema


def total_steps(cfg: TeacherConfig, epoch_images: int | None = None) -> int:
    """The steps of a whole run: ``num_epochs`` epochs of ``ceil(epoch_images / batch_size)`` steps each
    (``epoch_images``: what an epoch covers here, at most the data set)."""
    return cfg.num_epochs * math.ceil(min(cfg.epoch_images, epoch_images or cfg.epoch_images) / cfg.batch_size)


class _Run:
    """One launch of a teacher run: the loop, and the run-folder protocol the Train tab reads (module docstring)."""

    def __init__(self, out: Path, minutes: float, cfg: TeacherConfig, resume: bool, max_steps: int | None,
                 grid_steps: int, device: torch.device, log: Callable[[str], None]):
        self.out, self.minutes, self.max_steps, self.grid_steps, self.device, self.log = \
            out, minutes, max_steps, grid_steps, device, log
        self.cfg, self.unet, self.opt, self.progress = _start(out, cfg, resume, device)
        self.ema = _start_ema(out, self.unet, self.cfg, resume)
        self.stop = StopFlag()
        self.sched = matching.make_lr_scheduler(self.opt, self.cfg.num_epochs, self.cfg.lr_decay_to)
        self.end = total_steps(self.cfg) if max_steps is None else min(max_steps, total_steps(self.cfg))
        out.mkdir(parents=True, exist_ok=True)
        (out / "previews").mkdir(exist_ok=True)
        write_json_atomic(out / "config.json", {
            "kind": RUN_KIND, "run_name": out.name, "config": dataclasses.asdict(self.cfg), "minutes": minutes,
            "max_steps": self.end, "preview_subject": "teacher",
            "preview_prompts": [name.replace("/", "/ ") for name in CLASS_NAMES],  # "T-shirt/ top" wraps
            "sample_steps": grid_steps, "guidance": matching.GUIDANCE})

    def status(self, state: str, message: str = "") -> None:
        """``status.json``, as the distillation trainer writes it (`cdlab.train.status`; no student: a teacher run)."""
        write_status(self.out, state, step=self.progress["step"], max_steps=self.end, message=message)

    def teacher(self, images: torch.Tensor, labels: torch.Tensor) -> UNet:
        """The model the run exports: the UNet itself, or, with an EMA, a copy holding the average with its
        BatchNorm statistics recomputed on `RECALIBRATION_BATCHES` batches drawn as training draws them (the
        same batches every time: the generator is seeded from the run's seed)."""
        if self.ema is None:
            return self.unet
        model = copy.deepcopy(self.unet)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.ema[n])
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 - 1)
        batches = []
        for _ in range(RECALIBRATION_BATCHES):
            idx = torch.randint(len(images), (min(self.cfg.batch_size, len(images)),), generator=g)
            inputs, _ = matching.training_inputs(images[idx].to(self.device), matching.one_hot(labels[idx]).to(self.device),
                                                 p_uncond=self.cfg.p_uncond, generator=g)
            batches.append(inputs)
        return recalibrate_batchnorm(model, batches)

    def save(self, teacher: UNet) -> None:
        """A checkpoint: the weights, Adam's state, the average and the exported teacher, then ``state.json``."""
        _save_weights(self.unet.state_dict(), self.out / "unet.safetensors")
        save_optimizer_state(self.opt, self.out / "optimizer.safetensors")
        if self.ema is not None:
            _save_weights(self.ema, self.out / EMA_FILE)
            _save_weights(teacher.state_dict(), self.out / TEACHER_FILE)
        write_json_atomic(self.out / "state.json", {"config": dataclasses.asdict(self.cfg), **self.progress,
                                                    "lr": self.opt.param_groups[0]["lr"]})

    def grids(self, teacher: UNet) -> None:
        """After an epoch: the teacher's class grid as the run's preview row, and as the seed's figure after
        epochs 1, 5 and 10."""
        grid = class_grid(teacher, num_steps=self.grid_steps)
        big = grid.resize((grid.width * PREVIEW_SCALE, grid.height * PREVIEW_SCALE), Image.Resampling.NEAREST)
        big.save(self.out / "previews" / preview_file(self.progress["step"]))
        if self.progress["epoch"] in GRID_EPOCHS:
            grid.save(self.out / f"samples-epoch{self.progress['epoch']}.png")

    def why_stop(self, start: float) -> tuple[str, str] | None:
        """The run's final state and message when it should end before its next step, else None."""
        p, cfg = self.progress, self.cfg
        if p["epoch"] >= cfg.num_epochs:
            return "finished", f"done: {cfg.num_epochs} epochs, {p['step']} steps"
        if self.stop.requested:
            return "stopped", ("stopped at a checkpoint: the app that started it is gone" if self.stop.orphaned
                               else "stopped at a checkpoint")
        if time.monotonic() - start >= self.minutes * 60:
            return "stopped", f"stopped at a checkpoint: the time budget ({self.minutes:g} min) ran out; resume it"
        if self.max_steps is not None and p["step"] >= self.max_steps:
            return "stopped", f"stopped at a checkpoint: reached the step limit ({self.max_steps})"
        return None

    def step(self, images: torch.Tensor, labels: torch.Tensor, epoch_images: int) -> dict:
        """One training step (the data order and noise depend only on the seed, the epoch and the step, so a
        resumed run repeats an uninterrupted one); returns its metrics row."""
        cfg, p = self.cfg, self.progress
        t0 = time.perf_counter()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + p["epoch"]))
        idx = order[:epoch_images][p["position"]:p["position"] + cfg.batch_size]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + p["step"])
        lr = self.opt.param_groups[0]["lr"]
        loss = matching.train_step(self.unet, self.opt, images[idx].to(self.device),
                                   matching.one_hot(labels[idx]).to(self.device), p_uncond=cfg.p_uncond, generator=g)
        if self.ema is not None:  # the usual warm-up: the average forgets the first steps' weights quickly
            decay = min(cfg.ema_decay, (1 + p["step"]) / (10 + p["step"]))
            with torch.no_grad():
                for n, param in self.unet.named_parameters():
                    self.ema[n].lerp_(param.detach(), 1.0 - decay)
        p["step"] += 1
        p["position"] += len(idx)
        return {"step": p["step"], "epoch": p["epoch"], "loss": loss, "lr": lr,
                "samples_per_s": round(len(idx) / max(time.perf_counter() - t0, 1e-9), 2), "max_steps": self.end}

    def loop(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[str, str]:
        """Steps until `why_stop` says; metrics flushed often, an epoch's end decays the rate, draws the grids and
        saves a checkpoint. Returns the final state and message."""
        cfg, p = self.cfg, self.progress
        epoch_images = min(cfg.epoch_images, len(images))
        self.end = min(self.end, total_steps(cfg, len(images)))  # a data set smaller than an epoch
        start, spent = time.monotonic(), p["seconds"]
        with MetricsWriter(self.out, FLUSH_STEPS, FLUSH_SECONDS) as metrics:
            while (end := self.why_stop(start)) is None:
                row = self.step(images, labels, epoch_images)
                row["elapsed_s"] = round(spent + time.monotonic() - start, 3)
                if metrics.write(row):
                    self.status("running", f"step {p['step']}, epoch {p['epoch'] + 1}/{cfg.num_epochs}")
                if p["position"] >= epoch_images:
                    p.update(epoch=p["epoch"] + 1, position=0)
                    self.sched.step()
                    metrics.flush()
                    self.log(f"epoch {p['epoch']}/{cfg.num_epochs}: step {p['step']}, loss {row['loss']:.4f}")
                    teacher = self.teacher(images, labels)
                    self.grids(teacher)
                    p["seconds"] = spent + time.monotonic() - start
                    self.save(teacher)
        p["seconds"] = spent + time.monotonic() - start
        return end


def train(out: str | Path, minutes: float, cfg: TeacherConfig = TeacherConfig(), *, data_root: str | None = None,
          resume: bool = False, max_steps: int | None = None, grid_steps: int = 50,
          device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> dict:
    """Train until ``minutes`` have passed, ``cfg.num_epochs`` are done, the run reached ``max_steps`` steps in
    all, or a stop signal came (module docstring); returns the progress saved. An epoch covers
    ``cfg.epoch_images`` (at most the whole set); the sample grids take ``grid_steps`` Euler steps.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is off. ValueError: a bad config or saved state.
        FileNotFoundError: no Fashion-MNIST (the message says how to install it; ``status.json`` says it too).
    """
    cfg.check()
    if not isinstance(grid_steps, int) or not 1 <= grid_steps <= 1000:
        raise ValueError(f"grid_steps must be an integer in [1, 1000], got {grid_steps!r}")
    log = log or (lambda line: print(line, flush=True))  # flushed: a parent process streams it
    run = _Run(Path(out), minutes, cfg, resume, max_steps, grid_steps, torch.device(device), log)
    with run.stop.installed():  # then the app's death (a SIGTERM to itself) lands on the flag
        watch_parent(run.stop.on_orphaned)
        try:
            run.status("running", "loading Fashion-MNIST")
            images, labels = load_fashion_mnist("train", data_root)
            run.status("running", f"step {run.progress['step']}")
            state, message = run.loop(images, labels)
            if state == "stopped":
                run.status("stopping", "saving a checkpoint")
            run.save(run.teacher(images, labels))
        except BaseException as e:
            run.status("failed", f"{type(e).__name__}: {e}")
            raise
    run.status(state, message)
    p = run.progress
    log(f"{state}: saved {out}: step {p['step']}, epoch {p['epoch']} + {p['position']} images; {message}")
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab.flow.train_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="time budget (at most 1440)")
    p.add_argument("--out", required=True, help="the run folder (new or empty, or an existing one with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--data", default=None, help="folder of the idx files (default: $CDLAB_FASHION_MNIST or Debian's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop once the run has taken this many steps in all")
    p.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    p.add_argument("--grid-steps", type=int, default=50, help="Euler steps of the sample grids (default 50)")
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
              data_root=args.data, resume=args.resume, max_steps=args.max_steps, grid_steps=args.grid_steps,
              device=args.device)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
