"""The distillation trainer: LoRA on the teacher's UNet, on accelerate, crash-safe (CT, CD, MBCD and DMD).

    python -m cdlab train --model tiny --method mbcd --max_steps 600           # one process
    python -m cdlab train --model tiny --method dmd --num_boundaries 1         # DMD2, a one-step generator
    torchrun --nproc_per_node 2 -m cdlab train --model tiny ...               # data parallel, same code
    python -m cdlab train --resume runs/<run_name>                            # continue a run

This module is the loop; each job beside it has its own module, read in this order:

    trainer.py       `train`, `Trainer`: setup (accelerator, teacher, data, adapters, optimisers), the loop, the
                     metrics rows, stop signals, the saved student
    consistency.py   one consistency step (CT, CD, MBCD: `cdlab.loss.consistency_loss`) and the probe loss
    dmd.py           one DMD2 step (generator, then fake score) and the regression pairs
    checkpoints.py   save and resume (``checkpoints/ckpt_*``), the folder helpers the app reads
    previews.py      the teacher's reference row and the student's rows (``previews/``)

One step: a batch of cached latents and text embeddings -> the method's loss (the teacher is the same UNet with
its LoRA disabled, `cdlab.students.roles`) -> backward through the LoRA weights only (fp32, under fp16/bf16
autocast when asked) -> clip -> AdamW. The run directory (``$CDLAB_RUNS_DIR`` or ``<repo>/runs``) holds
``config.json``, ``metrics.jsonl``, ``status.json``, ``previews/`` (``reference.png``, ``step_*.png``) and
``checkpoints/ckpt_*`` (written under a temporary name and renamed, the last ``keep_checkpoints`` kept).
SIGTERM / SIGINT save a checkpoint and stop cleanly; a trainer the app started (``CDLAB_PARENT_PID``) does the same
when the app is gone (`watch_parent`), and an orphan never publishes its student; ``--resume`` continues from the newest complete checkpoint
with the LoRA, optimiser, LR schedule, step and RNG states restored, so a resumed run repeats an uninterrupted one.

``method="dmd"`` (`cdlab.loss`'s DMD notes): a second adapter ``fake`` on the same UNet is the fake score, with
its own optimiser; a step is one generator update then ``dmd_fake_steps`` fake-score updates. Checkpoints add
``fake.safetensors`` and ``fake_optimizer.pt``; the student saved is the generator's adapter alone (its EMA when
``ema_decay > 0``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradScalerKwargs, broadcast_object_list

from cdlab.paths import adapters_dir, runs_dir, shown_path, write_json_atomic
from cdlab.samplers import consistency_timesteps
from cdlab.students import StudentCard, attach_lora, save_student
from cdlab.students.roles import FAKE_SCORE, GENERATOR, swapped_weights
from cdlab.teachers import load_teacher
from cdlab.train.checkpoints import list_checkpoints, load_latest, save_checkpoint
from cdlab.train.config import TrainConfig, cache_root, card_method, check_destination, resolve
from cdlab.train.consistency import consistency_step, probe_batch, probe_loss
from cdlab.train.data import make_source, model_fingerprint, prepare_data
from cdlab.train.dmd import dmd_step, regression_pairs
from cdlab.train.previews import preview, preview_reference
from cdlab.train.schedule import rate_factor
from cdlab.train.status import write_status
from cdlab.train.stopping import StopFlag, watch_parent  # watch_parent: re-exported

__all__ = ["train", "Trainer", "TrainResult", "list_checkpoints", "watch_parent"]


@dataclass
class TrainResult:
    state: str                  # "finished" | "stopped"
    step: int
    run_dir: Path
    student_dir: Path | None
    metrics: dict


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=None) -> TrainResult:
    """Train a student; returns when finished or stopped by a signal (see the module docstring)."""
    return Trainer(cfg, resume=resume, log=log).run()

class Trainer:
    """Holds one run. ``Trainer(cfg, resume=run_dir).run()``; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=None):
        self.cfg_in = cfg
        self.resume = Path(resume) if resume else None
        self._log = log
        self.stop = StopFlag()  # SIGTERM / SIGINT, or the app gone (``orphaned``: stop, publish nothing)

    # ----------------------------------------------------------------------------------- helpers

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            (self._log or (lambda m: print(m, flush=True)))(f"[cdlab train] {msg}")

    def status(self, state: str, message: str = "") -> None:
        if not self.acc.is_main_process:
            return
        write_status(self.run_dir, state, step=self.step, max_steps=self.cfg.max_steps, message=message,
                     student=self.cfg.student_name, run_name=self.cfg.run_name)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_start)

    # ------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Accelerator, teacher and resolved config, run folder, data, adapters and optimisers, RNGs; resume."""
        cfg = self.cfg_in
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        weight_dtype = self._start_accelerator(cfg)
        self._load_teacher(cfg, weight_dtype)
        self._open_run_dir()
        cfg, acc = self.cfg, self.acc
        pipe = self.teacher.pipe
        source = make_source(cfg.data, data_size=cfg.data_size, data_seed=cfg.data_seed, resolution=cfg.resolution,
                             image_column=cfg.image_column, caption_column=cfg.caption_column,
                             data_split=cfg.data_split)
        # the teacher's VAE and text encoder, hashed once: the keys of the latent, DMD-pair and preview caches
        self.model_fingerprint = model_fingerprint(pipe)
        with acc.main_process_first():
            self.data = prepare_data(source, pipe, cfg.resolution, cache=cfg.cache_latents,
                                     cache_root=cache_root(cfg), log=self.log, fingerprint=self.model_fingerprint)
        self.uncond = self.data.uncond.to(self.device)
        self._attach_adapters()

        self.data_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank)
        self.loss_gen = torch.Generator().manual_seed(cfg.seed * 104729 + 17 + self.rank)
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.elapsed_before = 0.0
        self.samples_seen = 0
        self.sampler_timesteps = consistency_timesteps(cfg.sample_steps, cfg.num_boundaries, cfg.num_train_timesteps)
        vae_f = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_shape = (self.unet.config.in_channels, cfg.resolution // vae_f, cfg.resolution // vae_f)
        self.regression = regression_pairs(self) if self.dmd and cfg.dmd_regression_weight > 0 else None
        self.probe = probe_batch(self)
        if self.resume:
            load_latest(self)
        self.log(f"{card_method(cfg)} N={cfg.num_boundaries} on {self.teacher.describe()}, {len(self.data)} items, "
                 f"{sum(p.numel() for p in self.params)} LoRA params, batch {cfg.batch_size}x{cfg.grad_accum}"
                 f"x{self.world}, run {shown_path(self.run_dir)}")

    def _start_accelerator(self, cfg: TrainConfig) -> torch.dtype:
        """The accelerator, its mixed precision and the fp16 loss scaler; returns the teacher's weight dtype."""
        mp = cfg.mixed_precision
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if mp == "auto":  # bf16 where the GPU has it (no loss scaling needed), else fp16; none on the CPU
            mp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one process-wide state; a second in-process run (tests, a notebook) may
            # want another precision. Under torchrun the state belongs to the launch and is kept.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        self.acc = acc = Accelerator(mixed_precision=mp, cpu=not cuda,
                                     kwargs_handlers=[GradScalerKwargs(init_scale=cfg.loss_scale)])
        self.mixed_precision = mp
        # fp16 needs loss scaling. accelerate scales on a GPU; on the CPU it has no scaler, so the run
        # keeps torch's own (the same GradScaler algorithm): an overflowing step is skipped, the scale halved.
        self.own_scaler = (torch.amp.GradScaler("cpu", init_scale=cfg.loss_scale)
                           if mp == "fp16" and acc.scaler is None else None)
        self.scaler = acc.scaler if acc.scaler is not None else self.own_scaler
        self.skipped_steps = 0
        self.device = acc.device
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        self.autocast_dtype = None if weight_dtype == torch.float32 else weight_dtype
        return weight_dtype

    def _load_teacher(self, cfg: TrainConfig, weight_dtype: torch.dtype) -> None:
        """The teacher, then the config resolved against it (``self.cfg``), one run name for every rank."""
        self.teacher = load_teacher(cfg.model, device=self.device, dtype=weight_dtype,
                                    resolution=cfg.resolution if cfg.model == "sd15-random" else None)
        if cfg.guidance is None:  # the teacher's own default CFG scale (Teacher.guidance), as every entry point
            cfg = dataclasses.replace(cfg, guidance=self.teacher.guidance)
        cfg = resolve(cfg, self.teacher.resolution)
        if not self.resume:
            check_destination(cfg)  # an existing student is replaced only with overwrite; refuse before training
        # One run name for every rank (it holds a timestamp).
        names = [cfg.run_name]
        broadcast_object_list(names)
        self.cfg = dataclasses.replace(cfg, run_name=names[0])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes

    def _open_run_dir(self) -> None:
        """``runs/<run_name>`` (or the resumed run): ``config.json``, ``checkpoints/``, ``previews/``, a status."""
        cfg, acc = self.cfg, self.acc
        self.run_dir = self.resume if self.resume else runs_dir() / cfg.run_name
        if not self.resume and acc.is_main_process and (self.run_dir / "config.json").exists():
            raise ValueError(f"config: run_name {cfg.run_name!r}: {self.run_dir} already holds a run; resume it "
                             "(--resume) or pick another run_name")
        if acc.is_main_process:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "previews").mkdir(exist_ok=True)
            write_json_atomic(self.run_dir / "config.json", cfg.to_dict())
        self.step = 0
        self.status("running", "loading data")
        acc.wait_for_everyone()

    def _attach_adapters(self) -> None:
        """The student's LoRA (DMD: and the fake score's) on the teacher's UNet, their optimisers, the EMA."""
        cfg, acc = self.cfg, self.acc
        unet = self.teacher.pipe.unet
        torch.manual_seed(cfg.seed)  # the LoRA init: the same on every rank and in every run of this seed
        attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        self.dmd = cfg.method == "dmd"
        if self.dmd:  # the fake score: a second adapter, initialised (B = 0) as the teacher, as in DMD2
            attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, adapter_name=FAKE_SCORE)
            unet.set_adapter(GENERATOR)
            for n, p in unet.named_parameters():  # both roles trainable, each by its own optimiser
                p.requires_grad_(f".{GENERATOR}." in n or f".{FAKE_SCORE}." in n)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        self.names = [n for n, p in trainable if f".{FAKE_SCORE}." not in n]
        self.params = [p for n, p in trainable if f".{FAKE_SCORE}." not in n]
        self.fake_names = [n for n, p in trainable if f".{FAKE_SCORE}." in n]
        self.fake_params = [p for n, p in trainable if f".{FAKE_SCORE}." in n]
        optimizer = _make_optimizer(self.params, cfg, self.device, self.log)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
        # The scheduler is stepped by hand, once per optimiser step (accelerate would step it per process).
        if self.dmd:
            fake_cfg = dataclasses.replace(cfg, lr=cfg.dmd_fake_lr or cfg.lr)
            fake_opt = _make_optimizer(self.fake_params, fake_cfg, self.device, self.log)
            self.student, self.optimizer, self.fake_optimizer = acc.prepare(unet, optimizer, fake_opt)
        else:
            self.student, self.optimizer = acc.prepare(unet, optimizer)
            self.fake_optimizer = None
        self.fake_loss: float | None = None
        self.ema = ({n: p.detach().clone() for n, p in zip(self.names, self.params)} if cfg.ema_decay > 0 else None)

    # -------------------------------------------------------------------------------------- loop

    def run(self) -> TrainResult:
        """Set up, then train to ``max_steps`` (or a stop signal); checkpoints, previews and the student."""
        watch_parent(self.stop.on_orphaned)
        try:
            self.setup()
        except BaseException as e:
            if hasattr(self, "run_dir") and hasattr(self, "cfg"):
                self.status("failed", f"{type(e).__name__}: {e}")
            raise
        self.t_start = time.time()
        with self.stop.installed():
            return self._train()

    def _train(self) -> TrainResult:
        """Reference and first previews, the loop, the end (signal handlers installed by `run`)."""
        try:
            self.status("running", f"step {self.step}")
            if self.cfg.preview_every:
                preview_reference(self)  # once per run: kept across resumes
            if self.step == 0 and self.cfg.preview_every:
                preview(self)  # "before": the student at step 0, before any update
            state = self._loop()
            return self._finish(state)
        except BaseException as e:
            self.status("failed", f"{type(e).__name__}: {e}")
            raise

    def _loop(self) -> str:
        """Steps until ``max_steps`` ("finished") or an agreed stop signal ("stopped", after a checkpoint)."""
        cfg = self.cfg
        losses, norms, step_time, window_steps = [], [], 0.0, 0
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            loss, gnorm = dmd_step(self) if self.dmd else consistency_step(self)
            step_time += time.perf_counter() - t0
            self.step += 1
            window_steps += 1
            self.samples_seen += cfg.batch_size * cfg.grad_accum * self.world
            losses.append(loss)
            norms.append(gnorm)
            stop = self._stop_agreed()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or stop:
                self._log_row(losses, norms, window_steps, step_time, stop)
                losses, norms, step_time, window_steps = [], [], 0.0, 0
            if stop:
                self.status("stopping", "signal received: saving a checkpoint")
                save_checkpoint(self)
                return "stopped"
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                save_checkpoint(self)
            if cfg.preview_every and self.step % cfg.preview_every == 0 and self.step < cfg.max_steps:
                preview(self)
        return "finished"

    def _log_row(self, losses: list[float], norms: list[float], window_steps: int, step_time: float,
                 stop: bool) -> None:
        """One ``metrics.jsonl`` row for the steps since the last one (main process), a log line, the status."""
        cfg, acc = self.cfg, self.acc
        mean_loss = torch.tensor([sum(losses) / len(losses)], device=self.device)
        if self.world > 1:
            mean_loss = acc.reduce(mean_loss, "mean")
        row = {"step": self.step, "loss": float(mean_loss.item()), "lr": self.lr_sched.get_last_lr()[0],
               "samples_per_s": window_steps * cfg.batch_size * cfg.grad_accum * self.world / max(step_time, 1e-9),
               "elapsed_s": round(self.elapsed(), 3), "peak_mem_mb": round(_peak_mem_mb(self.device), 1),
               "max_steps": cfg.max_steps, "grad_norm": sum(norms) / len(norms),
               "skipped_steps": self.skipped_steps}
        if self.dmd:
            row["fake_loss"] = self.fake_loss
        if acc.is_main_process:
            row["probe_loss"] = probe_loss(self)
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            probe = "" if row["probe_loss"] is None else f" probe {row['probe_loss']:.5f}"
            skipped = f" ({self.skipped_steps} skipped by the fp16 scaler)" if self.skipped_steps else ""
            if self.dmd:
                probe = f" fake {row['fake_loss']:.5f}"
            self.log(f"step {self.step}/{cfg.max_steps} loss {row['loss']:.5f}{probe} "
                     f"lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s{skipped}")
        self.status("stopping" if stop else "running", f"step {self.step}")
        self.last_row = row

    def _finish(self, state: str) -> TrainResult:
        """A finished run: its last checkpoint and preview, then the student; the final status either way."""
        cfg, acc = self.cfg, self.acc
        student_dir = None
        if self.stop.orphaned:  # the app that started it is gone: nobody asked for this student any more
            state = "stopped"
        if state == "finished":
            if not list_checkpoints(self.run_dir) or list_checkpoints(self.run_dir)[-1][0] != self.step:
                save_checkpoint(self)
            if cfg.preview_every:
                preview(self)
            if cfg.save_student and acc.is_main_process:
                student_dir = self.save_student()
        metrics = dict(getattr(self, "last_row", {}))
        self.status(state, f"saved {shown_path(student_dir)}" if student_dir else
                    ("stopped at a checkpoint: the app that started it is gone" if self.stop.orphaned else
                     "stopped at a checkpoint" if state == "stopped" else "done"))
        acc.wait_for_everyone()
        return TrainResult(state, self.step, self.run_dir, student_dir, metrics)

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        if self.world > 1:
            flag = self.acc.gather(flag).max()
        return bool(flag.item() > 0)

    @torch.no_grad()
    def update_ema(self) -> None:
        """After an applied optimiser step: the EMA of the student's LoRA weights moves towards them."""
        if self.ema is not None:
            for n, p in zip(self.names, self.params):
                self.ema[n].lerp_(p.detach(), 1.0 - self.cfg.ema_decay)

    # ----------------------------------------------------------------------------------- student

    def save_student(self) -> Path:
        """``adapters/<student_name>/``: the LoRA and its card. DMD with ``ema_decay > 0`` saves the generator's
        EMA (the average, as GAN generators are evaluated); a consistency student is saved as trained (its EMA
        is the target network, not the student)."""
        cfg = self.cfg
        row = getattr(self, "last_row", {})
        card = StudentCard(
            name=cfg.student_name, base_model=self.teacher.base_id, base_fingerprint=self.teacher.base_fingerprint,
            method=card_method(cfg),
            num_boundaries=cfg.num_boundaries, steps=cfg.sample_steps, guidance=1.0, scheduler="consistency",
            training_config=cfg.to_dict(),
            metrics={"train_steps": self.step, "final_loss": row.get("loss"), "final_probe_loss": row.get("probe_loss"),
                     "samples_per_s": row.get("samples_per_s"), "train_time_s": round(self.elapsed(), 1),
                     "samples_seen": self.samples_seen, "run_dir": shown_path(self.run_dir)})
        name = cfg.student_name
        if not cfg.overwrite and (adapters_dir() / name).exists():
            # The name was free at the start (checked in setup) and was taken meanwhile, by another run or by
            # hand: keep both, under a fresh name, rather than replace somebody's work.
            name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            k = 2
            while (adapters_dir() / name).exists():
                name, k = f"{cfg.student_name}-{time.strftime('%Y%m%d-%H%M%S')}-{k}", k + 1
            self.log(f"student {cfg.student_name!r} appeared during the run; saving this one as {name!r}")
            card = dataclasses.replace(card, name=name)
        with swapped_weights(self.unet, self.ema if self.dmd else None):
            path = save_student(self.unet, name, card, overwrite=cfg.overwrite)
        self.log(f"student saved to {shown_path(path)}" + (" (the generator's EMA)" if self.dmd and self.ema is not None else ""))
        return path


# ------------------------------------------------------------------------------------ optimiser

def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _lr_lambda(cfg: TrainConfig):
    """The run's schedule for ``LambdaLR``: warm-up, then constant or cosine (`cdlab.train.schedule`)."""
    return lambda step: rate_factor(step, cfg.max_steps, cfg.warmup_steps, cosine=cfg.lr_schedule == "cosine")


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device, log):
    if cfg.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            log("optimizer: bitsandbytes AdamW8bit")
            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            log("optimizer: bitsandbytes not installed, using torch AdamW")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
