"""The distillation trainer: LoRA on the teacher's UNet, on accelerate, crash-safe (CT, CD, MBCD and DMD).

    python -m cdlab train --model tiny --method mbcd --max_steps 600           # one process
    python -m cdlab train --model tiny --method dmd --num_boundaries 1         # DMD2, a one-step generator
    torchrun --nproc_per_node 2 -m cdlab train --model tiny ...               # data parallel, same code
    python -m cdlab train --resume runs/<run_name>                            # continue a run

One step: a batch of cached latents and text embeddings -> `cdlab.loss.consistency_loss` (the teacher is the
same UNet with its LoRA disabled) -> backward through the LoRA weights only (fp32, under fp16/bf16 autocast
when asked) -> clip -> AdamW. The run directory (``$CDLAB_RUNS_DIR`` or ``<repo>/runs``) holds
``config.json``, ``metrics.jsonl``, ``status.json``, ``previews/`` (``reference.png``, ``step_*.png``) and ``checkpoints/ckpt_*``
(written under a temporary name and renamed, the last ``keep_checkpoints`` kept). SIGTERM / SIGINT save
a checkpoint and stop cleanly; ``--resume`` continues from the newest complete checkpoint with the LoRA,
optimiser, LR schedule, step and RNG states restored, so a resumed run repeats an uninterrupted one.

``method="dmd"`` (`cdlab.loss`'s DMD notes): a second adapter ``fake`` on the same UNet is the fake score, with
its own optimiser; a step is one generator update (`cdlab.loss.dmd_generator_loss`) then ``dmd_fake_steps``
fake-score updates (`cdlab.loss.dmd_fake_loss`). Checkpoints add ``fake.safetensors`` and
``fake_optimizer.pt``; the student saved is the generator's adapter alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdlab.train.checkpoints import (  # list_checkpoints, CKPT_RE: re-exported, importable from here
    BAD_PREFIX,
    CKPT_RE,
    OLD_PREFIX,
    STATE,
    TMP_PREFIX,
    CheckpointError,
    checkpoint_name,
    file_sizes,
    fsync_dir,
    fsync_tree,
    list_checkpoints,
    verify_files,
)
from cdlab.paths import adapters_dir, runs_dir, shown_path, write_json_atomic
from cdlab.train.config import TrainConfig, cache_root, card_method, check_destination, resolve


@dataclass
class TrainResult:
    state: str                  # "finished" | "stopped"
    step: int
    run_dir: Path
    student_dir: Path | None
    metrics: dict


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            frac = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * frac))
        return warm
    return f


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device, log):
    if cfg.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            log("optimizer: bitsandbytes AdamW8bit")
            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            log("optimizer: bitsandbytes not installed, using torch AdamW")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


REFERENCE_NAME = "reference.png"  # previews/: the teacher's reference row, beside step_XXXXXX.png


def preview_noise(n: int, channels: int, size: int) -> torch.Tensor:
    """The fixed initial noise of a run's ``n`` previews, ``[n, channels, size, size]`` on the CPU: image ``i``
    from ``torch.Generator().manual_seed(i)``, the same for the teacher's reference and every student row."""
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(i))
                      for i in range(n)])


def preview_row(images: list) -> Any:
    """One preview row: the images side by side, upscaled 4x (nearest) when they are under 128 px wide."""
    from PIL import Image

    w, h = images[0].size
    row = Image.new("RGB", (len(images) * w, h), "white")
    for k, im in enumerate(images):
        row.paste(im, (k * w, 0))
    if w < 128:  # tiny images: upscale so the row is readable
        row = row.resize((row.width * 4, row.height * 4), Image.Resampling.NEAREST)
    return row


def _base_fingerprint(unet: torch.nn.Module) -> str:
    """A hash of a UNet's base weights (per-tensor sums; LoRA tensors skipped): what the teacher computes."""
    h = hashlib.sha256()
    for n, p in unet.state_dict().items():
        if "lora_" in n:
            continue
        x = p.detach().double()
        h.update(f"{n}:{tuple(p.shape)}:{x.sum().item():.10e}".encode())
    return h.hexdigest()


class Trainer:
    """Holds one run. ``Trainer(cfg, resume=run_dir).run()``; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=None):
        self.cfg_in = cfg
        self.resume = Path(resume) if resume else None
        self._log = log
        self.stop_requested = False

    # ----------------------------------------------------------------------------------- helpers

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            (self._log or (lambda m: print(m, flush=True)))(f"[cdlab train] {msg}")

    def status(self, state: str, message: str = "") -> None:
        if not self.acc.is_main_process:
            return
        write_json_atomic(self.run_dir / "status.json", {
            "state": state, "step": self.step, "max_steps": self.cfg.max_steps, "pid": os.getpid(),
            "message": message, "student": self.cfg.student_name, "updated": time.time(),
            "run_name": self.cfg.run_name})

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True

    # ------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list

        from cdlab.students import attach_lora
        from cdlab.teachers import load_teacher
        from cdlab.train.data import make_source, prepare_data

        cfg = self.cfg_in
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        mp = cfg.mixed_precision
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if mp == "auto":  # bf16 where the GPU has it (no loss scaling needed), else fp16; none on the CPU
            mp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one process-wide state; a second in-process run (tests, a notebook) may
            # want another precision. Under torchrun the state belongs to the launch and is kept.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        from accelerate.utils import GradScalerKwargs

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
        self.cfg = cfg = dataclasses.replace(cfg, run_name=names[0])
        self.rank, self.world = acc.process_index, acc.num_processes

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

        pipe = self.teacher.pipe
        source = make_source(cfg.data, data_size=cfg.data_size, data_seed=cfg.data_seed, resolution=cfg.resolution,
                             image_column=cfg.image_column, caption_column=cfg.caption_column,
                             data_split=cfg.data_split)
        with acc.main_process_first():
            self.data = prepare_data(source, pipe, cfg.resolution, cache=cfg.cache_latents,
                                     cache_root=cache_root(cfg), log=self.log)
        self.uncond = self.data.uncond.to(self.device)

        unet = pipe.unet
        torch.manual_seed(cfg.seed)  # the LoRA init: the same on every rank and in every run of this seed
        attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        self.dmd = cfg.method == "dmd"
        if self.dmd:  # the fake score: a second adapter, initialised (B = 0) as the teacher, as in DMD2
            attach_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, adapter_name=FAKE_ADAPTER)
            unet.set_adapter("default")
            for n, p in unet.named_parameters():  # both roles trainable, each by its own optimiser
                p.requires_grad_(".default." in n or f".{FAKE_ADAPTER}." in n)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = unet
        trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        self.names = [n for n, p in trainable if f".{FAKE_ADAPTER}." not in n]
        self.params = [p for n, p in trainable if f".{FAKE_ADAPTER}." not in n]
        self.fake_names = [n for n, p in trainable if f".{FAKE_ADAPTER}." in n]
        self.fake_params = [p for n, p in trainable if f".{FAKE_ADAPTER}." in n]
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

        self.data_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank)
        self.loss_gen = torch.Generator().manual_seed(cfg.seed * 104729 + 17 + self.rank)
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        self.elapsed_before = 0.0
        self.samples_seen = 0
        from cdlab.samplers import consistency_timesteps

        self.sampler_timesteps = consistency_timesteps(cfg.sample_steps, cfg.num_boundaries, cfg.num_train_timesteps)
        vae_f = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_shape = (unet.config.in_channels, cfg.resolution // vae_f, cfg.resolution // vae_f)
        self.regression = self._regression_pairs() if self.dmd and cfg.dmd_regression_weight > 0 else None
        self._make_probe()
        if self.resume:
            self._load_latest()
        self.log(f"{card_method(cfg)} N={cfg.num_boundaries} on {self.teacher.describe()}, {len(self.data)} items, "
                 f"{sum(p.numel() for p in self.params)} LoRA params, batch {cfg.batch_size}x{cfg.grad_accum}"
                 f"x{self.world}, run {self.run_dir}")

    def _make_probe(self) -> None:
        cfg = self.cfg
        n = min(cfg.probe_size, len(self.data))
        if n == 0:
            self.probe = None
            return
        g = torch.Generator().manual_seed(12345)
        idx = torch.arange(n)
        x0, cond = self.data.batch(idx, g, self.device)
        m = cfg.num_train_timesteps // cfg.step_size
        i = torch.linspace(1, m, n).round().long()
        t = cfg.step_size * i - 1
        self.probe = dict(latents=x0, cond=cond, timesteps=(t, (t - cfg.step_size).clamp(min=0)),
                          noise=torch.randn(x0.shape, generator=g).to(self.device))

    def _loss_kwargs(self) -> dict:
        cfg = self.cfg
        guidance = cfg.guidance if cfg.guidance_max is None else (cfg.guidance, cfg.guidance_max)
        return dict(teacher=self.unet if cfg.method != "ct" else None, uncond=self.uncond, guidance=guidance,
                    num_boundaries=cfg.num_boundaries, step_size=cfg.step_size,
                    num_train_timesteps=cfg.num_train_timesteps, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                    autocast_dtype=self.autocast_dtype)

    @torch.no_grad()
    def probe_loss(self) -> float | None:
        from cdlab.loss import consistency_loss

        if self.probe is None or self.dmd:  # DMD logs its fake score's loss instead (``fake_loss``)
            return None
        kw = self._loss_kwargs()
        kw["guidance"] = self.cfg.guidance
        out = consistency_loss(self.unet, self.probe["latents"], self.probe["cond"], self.teacher.scheduler,
                               timesteps=self.probe["timesteps"], noise=self.probe["noise"], **kw)
        return float(out["loss"])

    # ------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/ckpt_<step>`` under a temporary name, fsync every file and the folder, then
        rename it into place and fsync ``checkpoints/``: a published checkpoint is complete and on disk.
        ``state.json`` lists the other files with their sizes. The last ``keep_checkpoints`` are kept."""
        from safetensors.torch import save_file

        acc = self.acc
        folder = self.run_dir / "checkpoints"
        name = checkpoint_name(self.step)
        tmp = folder / f"{TMP_PREFIX}{name}"
        final = folder / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"data_gen": self.data_gen.get_state(), "loss_gen": self.loss_gen.get_state(),
               "torch": torch.get_rng_state(), "python": random.getstate(),
               # per-rank fingerprint of the LoRA weights: data-parallel ranks must hold identical ones
               "lora_sums": torch.stack([p.detach().double().sum().cpu() for p in self.params])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_file({n: p.detach().float().cpu().contiguous() for n, p in zip(self.names, self.params)},
                      str(tmp / "lora.safetensors"))
            if self.ema is not None:
                save_file({n: v.float().cpu().contiguous() for n, v in self.ema.items()}, str(tmp / "ema.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.dmd:
                save_file({n: p.detach().float().cpu().contiguous() for n, p in zip(self.fake_names, self.fake_params)},
                          str(tmp / "fake.safetensors"))
                torch.save(self.fake_optimizer.state_dict(), tmp / "fake_optimizer.pt")
            torch.save(self.lr_sched.state_dict(), tmp / "lr_scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            write_json_atomic(tmp / STATE, {
                "step": self.step, "elapsed_s": self.elapsed(), "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world, "saved": time.time(),
                "files": file_sizes(tmp)})  # every rank's rng file is there (the barrier above)
            fsync_tree(tmp)  # every file, then the folder itself: durable before it is published
            old = folder / f"{OLD_PREFIX}{name}"
            if final.exists():  # the same step saved again: move the old one aside, never half-delete it
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)  # the checkpoint exists only once complete
            fsync_dir(folder)
            shutil.rmtree(old, ignore_errors=True)
            # Prune among checkpoints up to this step; newer ones are leftovers a resume found unreadable,
            # replaced when the run reaches their step again.
            done = [p for s, p in list_checkpoints(self.run_dir, complete=False) if s <= self.step]
            for stale in done[:-self.cfg.keep_checkpoints]:
                trash = folder / f"{OLD_PREFIX}{stale.name}"
                try:
                    os.replace(stale, trash)
                except OSError:
                    continue
                shutil.rmtree(trash, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_latest(self) -> None:
        """Restore the newest readable checkpoint: newest first, an unreadable one (missing, truncated or
        corrupt files, or files that differ from its ``state.json`` list) is skipped with a log line.
        Each checkpoint is read and checked whole before anything is applied."""
        if self.acc.is_main_process:  # leftovers of a save or a deletion interrupted by a crash
            for pattern in (f"{TMP_PREFIX}ckpt_*", f"{OLD_PREFIX}ckpt_*"):
                for tmp in (self.run_dir / "checkpoints").glob(pattern):
                    shutil.rmtree(tmp, ignore_errors=True)
        ckpts = list_checkpoints(self.run_dir, complete=False)
        if not ckpts:
            self.log(f"resume: no complete checkpoint in {self.run_dir}; starting at step 0")
            return
        skipped, bad = [], []
        for _, path in reversed(ckpts):
            try:
                ck, reason = self._read_checkpoint(path), ""
            except CheckpointError as e:
                ck, reason = None, str(e)
            if self.world > 1:  # every rank resumes from the same checkpoint
                ok = torch.tensor([0.0 if ck is None else 1.0], device=self.device)
                if float(self.acc.gather(ok).min()) == 0.0 and ck is not None:
                    ck, reason = None, "unreadable on another rank"
            if ck is None:
                self.log(f"resume: skipping checkpoint {path.name}: {reason}")
                skipped.append(f"{path.name}: {reason}")
                bad.append(path)
                continue
            self._apply_checkpoint(ck)
            break
        else:
            raise CheckpointError(f"resume: none of the {len(ckpts)} checkpoints in {self.run_dir / 'checkpoints'} "
                                  "is readable (" + "; ".join(skipped) + ")")
        if self.acc.is_main_process:
            # Unreadable newer checkpoints: kept for inspection but out of the listing, so the run's own
            # checkpoint logic (pruning, "is the last step saved?") never counts them.
            for path in bad:
                aside = path.with_name(f"{BAD_PREFIX}{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                self.log(f"resume: moved unreadable {path.name} aside to {aside.name}")
            # Metrics after the checkpoint belong to the lost interval: drop them, so the curve is one run.
            mfile = self.run_dir / "metrics.jsonl"
            if mfile.is_file():
                keep = [ln for ln in mfile.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
                tmp = mfile.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep))
                os.replace(tmp, mfile)
        self.log(f"resume: {ck['path'].name} (step {self.step})"
                 + (f", skipped {len(skipped)} unreadable" if skipped else ""))
        self.acc.wait_for_everyone()

    def _read_checkpoint(self, path: Path) -> dict:
        """Every file of checkpoint ``path`` this rank needs, read into memory and checked; nothing is applied.

        Raises `CheckpointError` (with the reason) when the checkpoint is unreadable, ValueError when it is
        readable but does not fit this model (a changed config: an older checkpoint would not fit either)."""
        from safetensors.torch import load_file

        try:
            try:
                state = json.loads((path / STATE).read_text())
            except FileNotFoundError:
                raise CheckpointError(f"{STATE} is missing") from None
            if not isinstance(state, dict) or "step" not in state:
                raise CheckpointError(f"{STATE} holds no step")
            if "files" in state:
                verify_files(path, state["files"])
            ck = {"path": path, "step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", 0.0)),
                  "samples_seen": int(state.get("samples_seen", 0)),
                  "skipped_steps": int(state.get("skipped_steps", 0))}
            if checkpoint_name(ck["step"]) != path.name:
                raise CheckpointError(f"{STATE} says step {ck['step']}")
            ck["lora"] = load_file(str(path / "lora.safetensors"))
            ema_file = path / "ema.safetensors"
            ck["ema"] = load_file(str(ema_file)) if self.ema is not None and ema_file.is_file() else None
            ck["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            if self.dmd:
                ck["fake"] = load_file(str(path / "fake.safetensors"))
                ck["fake_optimizer"] = torch.load(path / "fake_optimizer.pt", map_location="cpu", weights_only=True)
            ck["lr_sched"] = torch.load(path / "lr_scheduler.pt", weights_only=True)
            scaler_file = path / "scaler.pt"
            ck["scaler"] = (torch.load(scaler_file, weights_only=True)
                            if self.scaler is not None and scaler_file.is_file() else None)
            rng_file = path / f"rng_rank{self.rank}.pt"  # absent when resumed with more ranks than saved
            ck["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        except CheckpointError:
            raise
        except FileNotFoundError as e:
            raise CheckpointError(f"{Path(e.filename).name if e.filename else e} is missing") from e
        except Exception as e:  # truncated or corrupt: safetensors, torch.load (zip, pickle), json errors
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"unreadable ({type(e).__name__}: {msg})") from e
        self._check_checkpoint(ck)
        return ck

    def _check_checkpoint(self, ck: dict) -> None:
        path, lora = ck["path"], ck["lora"]
        missing = [n for n in self.names if n not in lora]
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model's LoRA ({len(missing)} weights missing, "
                             f"e.g. {missing[0]}); was the config changed?")
        bad = [n for n, p in zip(self.names, self.params) if tuple(lora[n].shape) != tuple(p.shape)]
        if bad:
            raise ValueError(f"checkpoint {path} does not match this model's LoRA ({bad[0]} has shape "
                             f"{tuple(lora[bad[0]].shape)}); was the config changed?")
        if ck["ema"] is not None and any(n not in ck["ema"] or ck["ema"][n].shape != lora[n].shape for n in self.names):
            raise CheckpointError("ema.safetensors does not hold the LoRA's weights")
        if self.dmd:
            fake = ck["fake"]
            if any(n not in fake or tuple(fake[n].shape) != tuple(p.shape) for n, p in zip(self.fake_names, self.fake_params)):
                raise CheckpointError("fake.safetensors does not hold the fake score's LoRA weights")
            fo = ck["fake_optimizer"]
            if not isinstance(fo, dict) or not isinstance(fo.get("state"), dict):
                raise CheckpointError("fake_optimizer.pt does not hold an optimizer state")
        opt, current = ck["optimizer"], self.optimizer.state_dict()
        if (not isinstance(opt, dict) or not isinstance(opt.get("state"), dict)
                or not isinstance(opt.get("param_groups"), list)
                or [len(g.get("params", ())) for g in opt["param_groups"]]
                != [len(g["params"]) for g in current["param_groups"]]):
            raise CheckpointError("optimizer.pt does not hold this optimizer's state")
        if not isinstance(ck["lr_sched"], dict) or "last_epoch" not in ck["lr_sched"]:
            raise CheckpointError("lr_scheduler.pt does not hold a scheduler state")
        if ck["scaler"] is not None and not isinstance(ck["scaler"], dict):
            raise CheckpointError("scaler.pt does not hold a scaler state")
        rng = ck["rng"]
        if rng is not None:
            try:  # dry runs on throwaway generators: the states are well formed
                for key in ("data_gen", "loss_gen", "torch"):
                    torch.Generator().set_state(rng[key])
                random.Random().setstate(rng["python"])
            except Exception as e:
                raise CheckpointError(f"rng_rank{self.rank}.pt holds a bad state ({type(e).__name__}: {e})") from e

    def _apply_checkpoint(self, ck: dict) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(ck["lora"][n].to(p.device, p.dtype))
        if ck["ema"] is not None:
            self.ema = {n: v.to(self.device) for n, v in ck["ema"].items()}
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.dmd:
            with torch.no_grad():
                for n, p in zip(self.fake_names, self.fake_params):
                    p.copy_(ck["fake"][n].to(p.device, p.dtype))
            self.fake_optimizer.load_state_dict(ck["fake_optimizer"])
        self.lr_sched.load_state_dict(ck["lr_sched"])
        if ck["scaler"] is not None:
            self.scaler.load_state_dict(ck["scaler"])
        rng = ck["rng"]
        if rng is not None:
            self.data_gen.set_state(rng["data_gen"])
            self.loss_gen.set_state(rng["loss_gen"])
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = ck["step"]
        self.elapsed_before = ck["elapsed_s"]
        self.samples_seen = ck["samples_seen"]
        self.skipped_steps = ck["skipped_steps"]

    # ---------------------------------------------------------------------------------- previews

    def _preview_inputs(self) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The run's fixed preview captions, their (cond, uncond) embeddings and their fixed initial noise."""
        prompts = list(self.cfg.preview_prompts)
        cond, uncond = self.teacher.encode(prompts)
        x_T = preview_noise(len(prompts), self.teacher.pipe.unet.config.in_channels,
                            self.cfg.resolution // self.teacher.pipe.vae_scale_factor)
        return prompts, cond, uncond, x_T.to(self.device, self.teacher.pipe.unet.dtype)

    def _autocast(self):
        return torch.autocast(self.device.type, self.autocast_dtype) if self.autocast_dtype else torch.no_grad()

    def _write_row(self, images: list, name: str) -> Path:
        path = self.run_dir / "previews" / name
        tmp = path.with_name(f".{path.name}.tmp.png")
        preview_row(images).save(tmp)
        os.replace(tmp, path)
        return path

    @torch.no_grad()
    def preview(self) -> Path | None:
        """The student's row at this step, ``previews/step_<step>.png``: one image per preview caption, from the
        run's fixed noise, with the student's own sampler timesteps."""
        if not self.acc.is_main_process or not self.cfg.preview_prompts:
            return None
        from cdlab.samplers import sample_consistency

        _, cond, _, x_T = self._preview_inputs()
        with self._autocast():
            out = sample_consistency(self.unet, x_T, cond, self.sampler_timesteps, self.teacher.scheduler)
        return self._write_row(self.teacher.decode(out.latents), f"step_{self.step:06d}.png")

    @torch.no_grad()
    def preview_reference(self) -> Path | None:
        """The teacher's reference row, ``previews/reference.png``: DDIM with ``preview_reference_steps`` steps and
        CFG at the run's guidance, LoRA off, from the same noise as the student's rows. Written once per run:
        an existing one (a resumed run) is kept. ``previews/reference.json`` says how it was made."""
        cfg = self.cfg
        if not self.acc.is_main_process or not cfg.preview_prompts or not cfg.preview_reference_steps:
            return None
        path = self.run_dir / "previews" / REFERENCE_NAME
        if path.is_file():
            return path
        from cdlab.loss import adapters_disabled
        from cdlab.samplers import ddim_timesteps, sample_ddim

        t0 = time.perf_counter()
        prompts, cond, uncond, x_T = self._preview_inputs()
        with self._autocast(), adapters_disabled(self.unet):
            out = sample_ddim(self.unet, x_T, cond, uncond, float(cfg.guidance),
                              ddim_timesteps(cfg.preview_reference_steps, cfg.num_train_timesteps),
                              self.teacher.scheduler)
        images = self.teacher.decode(out.latents)
        write_json_atomic(path.with_suffix(".json"), {
            "steps": cfg.preview_reference_steps, "guidance": float(cfg.guidance), "nfe": out.nfe,
            "prompts": prompts, "seconds": round(time.perf_counter() - t0, 3)})
        path = self._write_row(images, REFERENCE_NAME)
        self.log(f"preview reference: teacher-{cfg.preview_reference_steps} (CFG {cfg.guidance:g}) in "
                 f"{time.perf_counter() - t0:.1f} s")
        return path

    # -------------------------------------------------------------------------------------- loop

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t_start)

    def _train_step(self) -> tuple[float, float]:
        from cdlab.loss import consistency_loss

        if self.dmd:
            return self._train_step_dmd()
        cfg, acc = self.cfg, self.acc
        total = 0.0
        kw = self._loss_kwargs()
        for micro in range(cfg.grad_accum):
            idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.data_gen)
            x0, cond = self.data.batch(idx, self.data_gen, self.device)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(self.student) if not sync and self.world > 1 else _null()
            with ctx:
                out = consistency_loss(self.student, x0, cond, self.teacher.scheduler, target_model=self.unet,
                                       target_weights=self.ema, sampler_timesteps=self.sampler_timesteps,
                                       sampler_prob=cfg.sampler_prob, generator=self.loss_gen, **kw)
                loss = out["loss"] / cfg.grad_accum
                if self.own_scaler is not None:
                    self.own_scaler.scale(loss).backward()
                else:
                    acc.backward(loss)  # scales the loss when accelerate holds the scaler
            total += float(out["loss"].detach()) / cfg.grad_accum
        own = self.own_scaler
        if own is not None:
            own.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if own is not None:
            scale = own.get_scale()
            own.step(self.optimizer)  # skips optimizer.step() when a gradient is inf/NaN
            own.update()
            skipped = own.get_scale() < scale
        else:
            self.optimizer.step()
            skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            # The scaler threw the update away (inf/NaN gradients at this scale): the weights did not move,
            # so neither do the LR schedule nor the EMA. The step still counts toward max_steps.
            self.skipped_steps += 1
            return total, grad_norm
        self.lr_sched.step()
        self._update_ema()
        return total, grad_norm

    @torch.no_grad()
    def _update_ema(self) -> None:
        """After an applied optimiser step: the EMA of the student's LoRA weights moves towards them."""
        if self.ema is not None:
            for n, p in zip(self.names, self.params):
                self.ema[n].lerp_(p.detach(), 1.0 - self.cfg.ema_decay)

    def _dmd_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(uncond=self.uncond, guidance=float(cfg.guidance), generator_adapter="default",
                    fake_adapter=FAKE_ADAPTER, gen_timesteps=self.sampler_timesteps,
                    t_range=(cfg.dmd_t_min, cfg.dmd_t_max), latent_shape=self.latent_shape,
                    generator=self.loss_gen, autocast_dtype=self.autocast_dtype)

    def _train_step_dmd(self) -> tuple[float, float]:
        """One generator update (distribution matching, + regression when weighted), then ``dmd_fake_steps``
        fake-score updates on the generator's samples (the first on this step's own, detached)."""
        from cdlab.loss import adapter_active, dmd_fake_loss, dmd_generator_loss, generator_sample

        cfg, acc, sched = self.cfg, self.acc, self.teacher.scheduler
        total, kw = 0.0, self._dmd_kwargs()
        samples = None
        for micro in range(cfg.grad_accum):
            idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.data_gen)
            _, cond = self.data.batch(idx, self.data_gen, self.device)  # DMD needs the captions, not the images
            reg = None
            if self.regression is not None:
                j = torch.randint(0, self.regression[0].shape[0], (cfg.batch_size,), generator=self.data_gen)
                reg = tuple(v[j] for v in self.regression)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(self.student) if not sync and self.world > 1 else _null()
            with ctx:
                out = dmd_generator_loss(self.student, cond, sched, regression=reg,
                                         regression_weight=cfg.dmd_regression_weight, dm_weight=cfg.dmd_weight, **kw)
                acc.backward(out["loss"] / cfg.grad_accum)
            total += float(out["loss"].detach()) / cfg.grad_accum
            samples = (out["x_g"], cond)
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_sched.step()
        self._update_ema()
        fake_total = 0.0
        for k in range(cfg.dmd_fake_steps):
            if k == 0:
                x_g, cond = samples
            else:
                idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.data_gen)
                _, cond = self.data.batch(idx, self.data_gen, self.device)
                z = torch.randn((cfg.batch_size, *self.latent_shape), generator=self.loss_gen).to(self.device)
                with torch.no_grad(), adapter_active(self.student, "default"):
                    x_g = generator_sample(self.student, z, cond, sched, gen_timesteps=self.sampler_timesteps,
                                           generator=self.loss_gen, autocast_dtype=self.autocast_dtype,
                                           grad=False)["x_g"]
            fl = dmd_fake_loss(self.student, x_g, cond, sched, fake_adapter=FAKE_ADAPTER,
                               num_train_timesteps=cfg.num_train_timesteps, generator=self.loss_gen,
                               autocast_dtype=self.autocast_dtype)
            acc.backward(fl["loss"])
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.fake_params, cfg.max_grad_norm)
            self.fake_optimizer.step()
            self.fake_optimizer.zero_grad(set_to_none=True)
            fake_total += float(fl["loss"].detach())
        self.fake_loss = fake_total / cfg.dmd_fake_steps
        return total, grad_norm

    @torch.no_grad()
    def _regression_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DMD's regression pairs: ``dmd_regression_pairs`` fixed noises z, the teacher's DDIM (``dmd_regression_steps``, CFG at
        ``guidance``, every adapter off) image latents y from them, and their captions' embeddings.

        At 50 steps they cost 100 NFE each (2048 pairs: about 15 min on one CPU thread for the tiny teacher), so they are
        cached beside the latents (``dmd-pairs-<key>.safetensors``, written atomically), keyed by the teacher's
        weights (VAE, text encoder and UNet), the data, the count, the seed, the guidance and the steps: a resume or a
        second run with the same recipe reads them back (with ``cache_latents``; without it they are made each time)."""
        from safetensors.torch import load_file, save_file

        from cdlab.loss import adapters_disabled
        from cdlab.samplers import ddim_timesteps, sample_ddim
        from cdlab.train.data import model_fingerprint

        cfg = self.cfg
        n = min(cfg.dmd_regression_pairs, len(self.data))
        h = hashlib.sha256(f"v1|{model_fingerprint(self.teacher.pipe)}|{_base_fingerprint(self.unet)}|"
                           f"{getattr(self.data, 'cache_path', '') or cfg.data}|{cfg.data_seed}|{cfg.data_size}|{n}|"
                           f"{cfg.seed}|{float(cfg.guidance)!r}|{cfg.num_train_timesteps}|"
                           f"{tuple(self.latent_shape)}"
                           # 50 steps keep the key they had before the field existed (caches stay valid)
                           f"{'' if cfg.dmd_regression_steps == 50 else f'|steps{cfg.dmd_regression_steps}'}"
                           .encode()).hexdigest()[:20]
        path = cache_root(cfg) / f"dmd-pairs-{h}.safetensors" if cfg.cache_latents else None
        if path is not None and path.is_file():
            try:
                t = load_file(str(path))
                self.log(f"dmd: {n} regression pairs read from {path}")
                return t["z"].to(self.device), t["y"].to(self.device), t["cond"].to(self.device)
            except Exception as e:  # unreadable: make them again
                self.log(f"dmd: cached pairs {path} unreadable ({e}); making them again")
        g = torch.Generator().manual_seed(cfg.seed * 31 + 7)
        _, cond = self.data.batch(torch.arange(n), g, self.device)
        z = torch.randn((n, *self.latent_shape), generator=g).to(self.device)
        t0 = time.perf_counter()
        ys = []
        with adapters_disabled(self.unet):
            for i in range(0, n, 64):
                self.status("running", f"loading data: DMD regression pairs {i}/{n} "
                                       f"(teacher-{cfg.dmd_regression_steps} with CFG)")
                out = sample_ddim(self.unet, z[i:i + 64], cond[i:i + 64], self.uncond.expand(len(cond[i:i + 64]), -1, -1),
                                  float(cfg.guidance), ddim_timesteps(cfg.dmd_regression_steps, cfg.num_train_timesteps),
                                  self.teacher.scheduler)
                ys.append(out.latents.float())
        y = torch.cat(ys)
        self.log(f"dmd: {n} regression pairs (teacher-{cfg.dmd_regression_steps}, CFG {cfg.guidance:g}) in {time.perf_counter() - t0:.1f} s")
        if path is not None and self.acc.is_main_process:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
                save_file({"z": z.cpu().contiguous(), "y": y.cpu().contiguous(), "cond": cond.float().cpu().contiguous()},
                          str(tmp))
                os.replace(tmp, path)
            except OSError as e:
                self.log(f"dmd: could not cache the pairs in {path}: {e}")
        return z, y, cond

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        if self.world > 1:
            flag = self.acc.gather(flag).max()
        return bool(flag.item() > 0)

    def run(self) -> TrainResult:
        try:
            self.setup()
        except BaseException as e:
            if hasattr(self, "run_dir") and hasattr(self, "cfg"):
                self.status("failed", f"{type(e).__name__}: {e}")
            raise
        cfg, acc = self.cfg, self.acc
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.t_start = time.time()
        state = "finished"
        try:
            self.status("running", f"step {self.step}")
            if cfg.preview_every:
                self.preview_reference()  # once per run: kept across resumes
            if self.step == 0 and cfg.preview_every:
                self.preview()  # "before": the student at step 0, before any update
            losses, norms, step_time, window_steps = [], [], 0.0, 0
            mfile = self.run_dir / "metrics.jsonl"
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss, gnorm = self._train_step()
                step_time += time.perf_counter() - t0
                self.step += 1
                window_steps += 1
                self.samples_seen += cfg.batch_size * cfg.grad_accum * self.world
                losses.append(loss)
                norms.append(gnorm)
                stop = self._stop_agreed()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or stop:
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
                        row["probe_loss"] = self.probe_loss()
                        with mfile.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        probe = "" if row["probe_loss"] is None else f" probe {row['probe_loss']:.5f}"
                        skipped = f" ({self.skipped_steps} skipped by the fp16 scaler)" if self.skipped_steps else ""
                        if self.dmd:
                            probe = f" fake {row['fake_loss']:.5f}"
                        self.log(f"step {self.step}/{cfg.max_steps} loss {row['loss']:.5f}{probe} "
                                 f"lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s{skipped}")
                    self.status("stopping" if stop else "running", f"step {self.step}")
                    self.last_row = row
                    losses, norms, step_time, window_steps = [], [], 0.0, 0
                if stop:
                    self.status("stopping", "signal received: saving a checkpoint")
                    self.save_checkpoint()
                    state = "stopped"
                    break
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.step < cfg.max_steps:
                    self.preview()
            student_dir = None
            if state == "finished":
                if not list_checkpoints(self.run_dir) or list_checkpoints(self.run_dir)[-1][0] != self.step:
                    self.save_checkpoint()
                if cfg.preview_every:
                    self.preview()
                if cfg.save_student and acc.is_main_process:
                    student_dir = self.save_student()
            metrics = dict(getattr(self, "last_row", {}))
            self.status(state, f"saved {student_dir}" if student_dir else ("stopped at a checkpoint" if state == "stopped" else "done"))
            acc.wait_for_everyone()
            return TrainResult(state, self.step, self.run_dir, student_dir, metrics)
        except BaseException as e:
            self.status("failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def save_student(self) -> Path:
        from cdlab.students import StudentCard, save_student

        cfg = self.cfg
        row = getattr(self, "last_row", {})
        card = StudentCard(
            name=cfg.student_name, base_model=self.teacher.base_id, method=card_method(cfg),
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
        with self._generator_weights():
            path = save_student(self.unet, name, card, overwrite=cfg.overwrite)
        self.log(f"student saved to {path}" + (" (the generator's EMA)" if self.dmd and self.ema is not None else ""))
        return path

    @contextlib.contextmanager
    def _generator_weights(self):
        """DMD with ``ema_decay > 0``: the student LoRA holds the generator's EMA inside the block (the saved
        student is the average, as GAN generators are evaluated), the online weights after. Otherwise a no-op:
        a consistency student is saved as trained (its EMA is the target network, not the student)."""
        if not (self.dmd and self.ema is not None):
            yield
            return
        online = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for n, p in zip(self.names, self.params):
                    p.copy_(self.ema[n])
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, online):
                    p.copy_(v)


FAKE_ADAPTER = "fake"  # DMD's fake score, beside the student's "default" adapter on the same UNet


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=None) -> TrainResult:
    """Train a student; returns when finished or stopped by a signal (see the module docstring)."""
    return Trainer(cfg, resume=resume, log=log).run()
