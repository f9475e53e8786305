"""The trainer's flat, typed config (nanoGPT style: every knob here, with its default and why).

Fields left as ``None`` take the teacher's profile (`PROFILES`): ``"tiny"`` for the embedded teacher
(and any small local pipeline), ``"sd15"`` for Stable Diffusion 1.5 at 512 px. A JSON config file
and ``--key value`` overrides set any field; `resolve` fills in the rest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
METHODS = ("ct", "cd", "mbcd")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    # ---- teacher and method
    model: str = "tiny"                  # "tiny" | "sd15" | a local diffusers pipeline folder
    method: str = "mbcd"                 # "ct" (no teacher) | "cd" (N = 1) | "mbcd" (CD with N > 1)
    num_boundaries: int | None = None    # N; default 4 for ct/mbcd, 1 for cd
    guidance: float | None = None        # teacher CFG w for CD (profile default)
    guidance_max: float | None = None    # set: w ~ U[guidance, guidance_max] per example
    step_size: int = 20                  # k on the course grid: t = k*i - 1 (i = 1..T/k), s = t - k
    num_train_timesteps: int = 1000
    sample_steps: int = 4                # the student's sampler steps (previews); their timesteps are trained
    sampler_prob: float = 0.1            # chance an example takes one of those sampler timesteps
    loss_type: str = "l2"                # "l2" | "pseudo_huber"
    huber_c: float = 0.001               # pseudo-Huber c (LCM's default)
    ema_decay: float = 0.0               # > 0: the target uses an EMA of the LoRA weights; 0: online, no_grad
    # ---- LoRA
    lora_rank: int | None = None         # profile default
    lora_alpha: float | None = None      # None: = rank
    # ---- data
    data: str = "world"                  # "world" | image folder with metadata.jsonl | "hf:NAME" (datasets)
    data_size: int = 4096                # world: images rendered; folder/hf: at most this many (0 = all)
    data_seed: int = 0                   # world captions and jitter
    image_column: str = "image"          # hf datasets columns
    caption_column: str = "text"
    data_split: str = "train"
    resolution: int | None = None        # px; profile default (the teacher's native size)
    cache_latents: bool = True           # encode images and captions once, to disk; a step runs the UNet only
    cache_dir: str = ""                  # "" -> $CDLAB_CACHE_DIR or <repo>/cache
    # ---- optimisation
    max_steps: int = 1000                # optimiser steps
    batch_size: int | None = None        # per process, per micro-batch (profile default)
    grad_accum: int = 1
    lr: float | None = None              # profile default
    lr_schedule: str = "constant"        # "constant" | "cosine" (after warm-up)
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # 0 = no clipping
    use_8bit_adam: bool = True           # bitsandbytes AdamW8bit when importable on CUDA
    mixed_precision: str = "auto"        # "auto" (fp16 on CUDA, none on CPU) | "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"                 # "auto" | "cpu" | "cuda" (single process; accelerate picks under torchrun)
    threads: int = 0                     # torch CPU threads (0 = leave as is)
    # ---- run
    run_name: str = ""                   # "" -> <student_name>-<YYYYmmdd-HHMMSS>
    student_name: str = ""               # "" -> <model>-<method>-<N>; saved to adapters/<student_name>
    save_student: bool = True            # write adapters/<student_name> at the end
    log_every: int = 10                  # metrics.jsonl and status.json cadence (steps)
    probe_size: int = 16                 # fixed batch (fixed t, noise) whose loss is logged: a smooth curve
    preview_every: int = 250             # 0 = previews off (one is still written at the end if > 0)
    preview_prompts: list[str] | None = None  # profile default: tiny captions / the course's 8 prompts
    checkpoint_every: int = 100
    keep_checkpoints: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Per-teacher defaults for the fields left as None.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=32, batch_size=64, lr=1e-3, lora_rank=16, guidance=5.0, mixed_precision="no"),  # w: teachers.TINY_GUIDANCE
    # LCM-LoRA's SD1.5 recipe (rank 64, lr 1e-4) with the course's teacher guidance 7.5.
    "sd15": dict(resolution=512, batch_size=8, lr=1e-4, lora_rank=64, guidance=7.5),
}


def profile_name(model: str, resolution: int | None = None) -> str:
    """``"sd15"`` for SD1.5 or a pipeline of >= 256 px, else ``"tiny"``."""
    if model == "sd15":
        return "sd15"
    if model == "tiny":
        return "tiny"
    return "sd15" if (resolution or 0) >= 256 else "tiny"


def default_preview_prompts(profile: str, n: int = 8) -> list[str]:
    if profile == "sd15":
        from cdlab.prompts import course_prompts

        return course_prompts(n)
    from cdlab.world import sample_captions

    return [c.text for c in sample_captions(n, seed=1234)]


def resolve(cfg: TrainConfig, teacher_resolution: int | None = None) -> TrainConfig:
    """Fill the ``None`` fields from the teacher's profile and check every value; returns a copy."""
    cfg = dataclasses.replace(cfg)
    prof = profile_name(cfg.model, teacher_resolution)
    defaults = dict(PROFILES[prof])
    if prof == "tiny" and teacher_resolution:
        defaults["resolution"] = teacher_resolution
    for key, value in defaults.items():
        if key == "mixed_precision":
            if cfg.mixed_precision == "auto" and prof == "tiny":
                cfg.mixed_precision = value
            continue
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.num_boundaries is None:
        cfg.num_boundaries = 1 if cfg.method == "cd" else 4
    if cfg.lora_alpha is None:
        cfg.lora_alpha = float(cfg.lora_rank)
    if cfg.preview_prompts is None:
        cfg.preview_prompts = default_preview_prompts(prof)
    if not cfg.student_name:
        base = cfg.model if cfg.model in ("tiny", "sd15") else Path(cfg.model.rstrip("/")).name
        cfg.student_name = f"{base}-{card_method(cfg)}-{cfg.num_boundaries}"
    if not cfg.run_name:
        cfg.run_name = f"{cfg.student_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check(cfg)
    return cfg


def card_method(cfg: TrainConfig) -> str:
    """The student card's method: ``ct``, ``cd`` (one boundary) or ``mbcd`` (CD, several)."""
    if cfg.method == "ct":
        return "ct"
    return "mbcd" if (cfg.num_boundaries or 1) > 1 else "cd"


def check(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first bad field."""
    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"config: {name} must be {want}, got {getattr(cfg, name)!r}")

    if cfg.method not in METHODS:
        raise bad("method", f"one of {METHODS}")
    if cfg.method == "mbcd" and cfg.num_boundaries == 1:
        raise bad("num_boundaries", "> 1 for mbcd (use method cd for one boundary)")
    if not (isinstance(cfg.num_boundaries, int) and 1 <= cfg.num_boundaries <= cfg.num_train_timesteps // cfg.step_size):
        raise bad("num_boundaries", f"an integer in [1, {cfg.num_train_timesteps // max(cfg.step_size, 1)}]")
    if cfg.step_size < 1 or cfg.num_train_timesteps % cfg.step_size:
        raise bad("step_size", f"a divisor of num_train_timesteps ({cfg.num_train_timesteps})")
    if cfg.loss_type not in ("l2", "pseudo_huber"):
        raise bad("loss_type", "'l2' or 'pseudo_huber'")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise bad("lr_schedule", "'constant' or 'cosine'")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise bad("mixed_precision", f"one of {MIXED_PRECISION}")
    if cfg.guidance_max is not None and cfg.guidance_max < cfg.guidance:
        raise bad("guidance_max", f">= guidance ({cfg.guidance})")
    if not 0.0 <= cfg.sampler_prob <= 1.0:
        raise bad("sampler_prob", "in [0, 1]")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise bad("ema_decay", "in [0, 1)")
    for name in ("max_steps", "batch_size", "grad_accum", "lora_rank", "resolution", "sample_steps",
                 "log_every", "checkpoint_every", "keep_checkpoints"):
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise bad(name, "a positive integer")
    for name in ("preview_every", "warmup_steps", "data_size", "probe_size"):
        if getattr(cfg, name) < 0:
            raise bad(name, ">= 0")
    if cfg.lr <= 0:
        raise bad("lr", "> 0")
    from cdlab.students import validate_name  # light: no torch at import

    validate_name(cfg.student_name)  # fail now, not when the finished student is saved


# ------------------------------------------------------------------------------------ parsing


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Turn a JSON value or a command-line string into the field's type, with a clear error."""
    origin, args = get_origin(typ), get_args(typ)
    if origin is Union or str(origin) == "types.UnionType" or (args and type(None) in args):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is list:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split("|") if v]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        return value
    raise ValueError(f"config: {name} expects {getattr(typ, '__name__', typ)}, got {value!r}")


def from_dict(d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from a dict (JSON file contents or overrides); unknown keys are an error."""
    types = _field_types()
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ValueError(f"config: unknown field(s) {', '.join(unknown)}; known: {', '.join(types)}")
    values = {k: _coerce(k, v, types[k]) for k, v in d.items()}
    return dataclasses.replace(base or TrainConfig(), **values)


def load_json(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a config must be a JSON object")
    return from_dict(d, base)


def runs_dir() -> Path:
    env = os.environ.get("CDLAB_RUNS_DIR")
    return Path(env) if env else REPO_ROOT / "runs"


def cache_root(cfg: TrainConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("CDLAB_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / "cache"


__all__ = ["TrainConfig", "PROFILES", "resolve", "check", "from_dict", "load_json", "runs_dir",
           "cache_root", "card_method", "profile_name", "default_preview_prompts"]
