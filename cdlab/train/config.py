"""The trainer's flat, typed config (nanoGPT style: every knob here, with its default and why).

Fields left as ``None`` take the teacher's profile (`PROFILES`): ``"tiny"`` for the embedded teacher
(and any small local pipeline), ``"sd15"`` for Stable Diffusion 1.5 at 512 px. A JSON config file
and ``--key value`` overrides set any field; `resolve` fills in the rest.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from cdlab.paths import adapters_dir, cache_dir, confine, data_roots, load_json_object, runs_dir, shown_path

METHODS = ("ct", "cd", "mbcd", "dmd")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    # ---- teacher and method
    model: str = "tiny"                  # "tiny" | "sd15" | "sd15-random" (SD1.5 architecture, random) | a folder
    method: str = "mbcd"                 # "ct" (no teacher) | "cd" (N = 1) | "mbcd" (CD with N > 1) | "dmd" (DMD2)
    num_boundaries: int | None = None    # N; default 4 for ct/mbcd, 1 for cd; dmd: the generator's steps (default 1)
    guidance: float | None = None        # teacher CFG w for CD (default: the teacher's own, Teacher.guidance)
    guidance_max: float | None = None    # set: w ~ U[guidance, guidance_max] per example
    step_size: int = 20                  # k on the course grid: t = k*i - 1 (i = 1..T/k), s = t - k
    num_train_timesteps: int = 1000
    sample_steps: int = 4                # the student's sampler steps (previews); their timesteps are trained
    sampler_prob: float = 0.1            # chance an example takes one of those sampler timesteps
    loss_type: str = "l2"                # "l2" | "pseudo_huber"
    huber_c: float = 0.001               # pseudo-Huber c (LCM's default)
    ema_decay: float = 0.0               # > 0: the target uses an EMA of the LoRA weights; 0: online, no_grad (dmd: the saved student is the generator's EMA)
    # ---- DMD (method "dmd"; cdlab.loss's DMD notes). The real score is the teacher with CFG at `guidance`.
    dmd_fake_steps: int = 5              # fake-score updates per generator update (DMD2's two time-scale rule: 5)
    dmd_fake_lr: float | None = None     # the fake score's learning rate (None: = lr)
    dmd_t_min: int = 20                  # distribution matching at t ~ U[t_min, t_max] (DMD2: 0.02 T .. 0.98 T)
    dmd_t_max: int = 980
    dmd_regression_weight: float = 0.0   # DMD's regression loss on teacher ODE pairs (DMD2: off, 0)
    dmd_regression_pairs: int = 64       # with a weight > 0: pairs (noise, the teacher's DDIM+CFG image), made at start
    dmd_regression_steps: int = 50       # the teacher's DDIM steps (with CFG) for each pair (tiny: 16 reads as well as 50)
    dmd_weight: float = 1.0              # the distribution-matching term's weight (0 + a regression weight: ablation)
    # ---- LoRA
    lora_rank: int | None = None         # profile default
    lora_alpha: float | None = None      # None: = rank
    # ---- data
    data: str = "world"                  # "world" | image folder with metadata.jsonl | "hf:NAME" (datasets)
    data_size: int | None = None         # profile default (4096; sd15-random: 32). world: images rendered; folder/hf: at most this many (0 = all)
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
    mixed_precision: str = "auto"        # "auto" (bf16 on CUDA where supported, else fp16; none on CPU) | "no" | "fp16" | "bf16"
    loss_scale: float = 65536.0          # fp16 only: the gradient scaler's initial scale (torch's default, 2**16)
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"                 # "auto" | "cpu" | "cuda" (single process; accelerate picks under torchrun)
    threads: int = 0                     # torch CPU threads (0 = leave as is)
    # ---- run
    run_name: str = ""                   # "" -> the student name when it is automatic, else <student_name>-<YYYYmmdd-HHMMSS>
    student_name: str = ""               # "" -> <model>-<method>-<N>-<YYYYmmdd-HHMMSS> (never an existing student)
    save_student: bool = True            # write adapters/<student_name> at the end
    overwrite: bool = False              # replace an existing adapters/<student_name> (else refused at start)
    log_every: int = 10                  # metrics.jsonl and status.json cadence (steps)
    probe_size: int | None = None        # profile default (16; sd15-random: 2): fixed batch (fixed t, noise) whose loss is logged
    preview_every: int = 250             # 0 = previews off (one is still written at the end if > 0)
    preview_prompts: list[str] | None = None  # profile default: tiny captions / the course's 8 prompts
    preview_reference_steps: int = 50    # the teacher's DDIM steps (with CFG) for previews/reference.png; 0 = none
    checkpoint_every: int = 100
    keep_checkpoints: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Per-teacher defaults for the fields left as None.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=32, batch_size=64, lr=1e-3, lora_rank=16, guidance=5.0, mixed_precision="no",  # w: teachers.TINY_GUIDANCE
                 data_size=4096, probe_size=16),
    # LCM-LoRA's SD1.5 recipe (rank 64, lr 1e-4) with the course's teacher guidance 7.5.
    "sd15": dict(resolution=512, batch_size=8, lr=1e-4, lora_rank=64, guidance=7.5, data_size=4096, probe_size=16),
}
# sd15-random (SD1.5's architecture, random weights) is a smoke test of the SD1.5 path, usually on a CPU: the
# sd15 profile with a data set and batch that run in a minute (its weights are random: more data teaches nothing).
SD15_RANDOM_OVERRIDES: dict[str, Any] = dict(batch_size=2, data_size=32, probe_size=2)
SD15_RANDOM_PREVIEWS = 2  # preview prompts


def profile_name(model: str, resolution: int | None = None) -> str:
    """``"sd15"`` for SD1.5 or a pipeline of >= 256 px, else ``"tiny"``."""
    if model in ("sd15", "sd15-random"):
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
    if cfg.model == "sd15-random":
        defaults.update(SD15_RANDOM_OVERRIDES)
    if teacher_resolution:  # the teacher's native size (sd15-random: whatever it was built at)
        defaults["resolution"] = teacher_resolution
    for key, value in defaults.items():
        if key == "mixed_precision":
            if cfg.mixed_precision == "auto" and prof == "tiny":
                cfg.mixed_precision = value
            continue
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.num_boundaries is None:
        cfg.num_boundaries = 1 if cfg.method in ("cd", "dmd") else 4
    if cfg.method == "dmd":  # the generator's sampler IS its training steps (backward simulation)
        cfg.sample_steps = cfg.num_boundaries
    if cfg.lora_alpha is None:
        cfg.lora_alpha = float(cfg.lora_rank)
    if cfg.preview_prompts is None:
        cfg.preview_prompts = default_preview_prompts(prof, SD15_RANDOM_PREVIEWS if cfg.model == "sd15-random" else 8)
    if not cfg.student_name:
        cfg.student_name, auto = default_student_name(cfg), True
    else:
        auto = False
    if not cfg.run_name:
        cfg.run_name = cfg.student_name if auto else f"{cfg.student_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check(cfg)
    return cfg


def card_method(cfg: TrainConfig) -> str:
    """The student card's method: ``ct``, ``cd`` (one boundary), ``mbcd`` (CD, several) or ``dmd``."""
    if cfg.method in ("ct", "dmd"):
        return cfg.method
    return "mbcd" if (cfg.num_boundaries or 1) > 1 else "cd"


# Every numeric field's allowed range (inclusive unless noted): one table for the CLI, the app and the API.
# A value outside it, or not finite, is refused with a message naming the field.
BOUNDS: dict[str, tuple[float, float]] = {
    "num_boundaries": (1, 1000), "guidance": (1.0, 30.0), "guidance_max": (1.0, 30.0),
    "step_size": (1, 1000), "num_train_timesteps": (2, 10_000), "sample_steps": (1, 64),
    "sampler_prob": (0.0, 1.0), "huber_c": (1e-8, 1.0), "ema_decay": (0.0, 0.99999),
    "lora_rank": (1, 1024), "lora_alpha": (1e-6, 1e6),
    "data_size": (0, 10_000_000), "data_seed": (0, 2**31 - 1), "resolution": (8, 4096),
    "max_steps": (1, 10_000_000), "batch_size": (1, 4096), "grad_accum": (1, 1024), "lr": (1e-10, 1.0),
    "warmup_steps": (0, 10_000_000), "weight_decay": (0.0, 1.0), "max_grad_norm": (0.0, 1e6),
    "loss_scale": (1.0, 2.0 ** 100),
    "seed": (0, 2**31 - 1), "threads": (0, 1024),
    "log_every": (1, 10_000_000), "probe_size": (0, 4096), "preview_every": (0, 10_000_000),
    "preview_reference_steps": (0, 1000),
    "dmd_fake_steps": (1, 100), "dmd_fake_lr": (1e-10, 1.0), "dmd_t_min": (0, 9999), "dmd_t_max": (0, 9999),
    "dmd_regression_weight": (0.0, 1e6), "dmd_regression_pairs": (1, 100_000), "dmd_regression_steps": (1, 1000),
    "dmd_weight": (0.0, 1e6),
    "checkpoint_every": (1, 10_000_000), "keep_checkpoints": (1, 1000),
}
# What a run started from the app (the Train form, its advanced JSON box, the API) may ask for: one table, tighter
# than BOUNDS (the command line's), sized for a laptop or one GPU shared by a classroom. The form's fields take
# their ranges from it and `check_app_limits` checks every field of the resolved config against it.
APP_LIMITS: dict[str, tuple[float, float]] = {
    "max_steps": (1, 20_000), "batch_size": (1, 256), "grad_accum": (1, 16), "lora_rank": (1, 128),
    "lora_alpha": (1e-3, 1024.0), "data_size": (1, 10_000), "resolution": (8, 512), "num_boundaries": (1, 8),
    "sample_steps": (1, 8), "lr": (1e-7, 1.0), "guidance": (1.0, 20.0), "guidance_max": (1.0, 20.0),
    "warmup_steps": (0, 20_000), "probe_size": (0, 64), "log_every": (1, 20_000), "preview_every": (0, 20_000),
    "preview_reference_steps": (0, 50), "checkpoint_every": (1, 20_000), "keep_checkpoints": (1, 5),
    "dmd_fake_steps": (1, 10), "dmd_regression_pairs": (1, 256), "dmd_regression_steps": (1, 50),
}
# What such a run writes over its max_steps, at most: metrics rows (log_every), previews, checkpoints (before
# all but keep_checkpoints are pruned).
APP_MAX_FILES: dict[str, tuple[str, int]] = {
    "log_every": ("metrics rows", 5_000), "preview_every": ("previews", 200), "checkpoint_every": ("checkpoints", 500),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS, "loss_type": ("l2", "pseudo_huber"), "lr_schedule": ("constant", "cosine"),
    "mixed_precision": MIXED_PRECISION, "device": ("auto", "cpu", "cuda"),
}
# Run names: letters, digits, "_" and "-" (a folder under runs/); student names: `cdlab.students.validate_name`.
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # fullmatch, never match: "x\n" is refused


def check(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first bad field (types, ranges, choices, names)."""
    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"config: {name} must be {want}, got {getattr(cfg, name)!r}")

    types = _field_types()
    for name, (lo, hi) in BOUNDS.items():
        v = getattr(cfg, name)
        if v is None and name in ("guidance_max", "dmd_fake_lr"):
            continue
        want_int = _base_type(types[name]) is int
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (want_int and not isinstance(v, int)):
            raise bad(name, "an integer" if want_int else "a number")
        if not math.isfinite(v) or not lo <= v <= hi:
            raise bad(name, f"a finite number in [{lo:g}, {hi:g}]")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, f"one of {choices}")
    if cfg.method == "mbcd" and cfg.num_boundaries == 1:
        raise bad("num_boundaries", "> 1 for mbcd (use method cd for one boundary)")
    if cfg.method == "dmd":
        if not cfg.dmd_t_min < cfg.dmd_t_max < cfg.num_train_timesteps:
            raise bad("dmd_t_max", f"> dmd_t_min ({cfg.dmd_t_min}) and < num_train_timesteps ({cfg.num_train_timesteps})")
        if cfg.mixed_precision == "fp16":
            raise bad("mixed_precision", "'no' or 'bf16' for dmd (fp16 loss scaling of two optimisers: not done)")
        if cfg.guidance_max is not None and cfg.guidance_max != cfg.guidance:
            raise bad("guidance_max", "unset for dmd (the real score has one CFG scale: guidance)")
    if cfg.num_train_timesteps % cfg.step_size:
        raise bad("step_size", f"a divisor of num_train_timesteps ({cfg.num_train_timesteps})")
    if cfg.num_boundaries > cfg.num_train_timesteps // cfg.step_size:
        raise bad("num_boundaries", f"an integer in [1, {cfg.num_train_timesteps // cfg.step_size}]")
    if cfg.guidance_max is not None and cfg.guidance_max < cfg.guidance:
        raise bad("guidance_max", f">= guidance ({cfg.guidance})")
    if cfg.resolution % 8:
        raise bad("resolution", "a multiple of 8")
    from cdlab.students import StudentError, validate_name  # light: no torch at import

    try:
        validate_name(cfg.student_name)  # fail now, not when the finished student is saved
    except StudentError as e:
        raise ValueError(f"config: student_name: {e}") from None
    if not RUN_NAME_RE.fullmatch(cfg.run_name or ""):
        raise bad("run_name", "1-100 letters, digits, '_' or '-', starting with a letter or digit")


def check_app_limits(cfg: TrainConfig) -> None:
    """Refuse a resolved config from the app that asks for more than `APP_LIMITS` allows, or that would
    write more files than `APP_MAX_FILES`; the ``ValueError`` names the field and its limit."""
    for name, (lo, hi) in APP_LIMITS.items():
        v = getattr(cfg, name)
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"config: {name} is {v!r}; a run from the app takes {lo:g} to {hi:g} "
                             "(the command line allows more)")
    for name, (what, most) in APP_MAX_FILES.items():
        every = getattr(cfg, name)
        if every and cfg.max_steps // every > most:
            raise ValueError(f"config: {name} {every} writes {cfg.max_steps // every} {what} over {cfg.max_steps} "
                             f"steps; a run from the app writes at most {most}: set {name} to at least "
                             f"{math.ceil(cfg.max_steps / most)}")


def app_limits_markdown() -> str:
    """`APP_LIMITS` and `APP_MAX_FILES` as the lines docs/hosting.md shows (a test keeps them the same)."""
    ranges = " · ".join(f"`{k}` {lo:g}–{hi:g}" for k, (lo, hi) in APP_LIMITS.items())
    files = " · ".join(f"{what} ≤ {most} (`{k}`)" for k, (what, most) in APP_MAX_FILES.items())
    return f"{ranges}\n\nover `max_steps`: {files}"


def default_student_name(cfg: TrainConfig, root: str | os.PathLike | None = None) -> str:
    """``<model>-<method>-<N>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... until no student of that name exists.

    A default name never collides with an existing student, so a run with nothing filled in never
    replaces anybody's work.
    """

    base = cfg.model if cfg.model in ("tiny", "sd15", "sd15-random") else Path(str(cfg.model).rstrip("/")).name
    base = re.sub(r"[^A-Za-z0-9_-]", "-", base).strip("-_") or "student"
    name = f"{base[:24]}-{card_method(cfg)}-{cfg.num_boundaries}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(root) if root is not None else adapters_dir()
    candidate, k = name, 2
    while (folder / candidate).exists():
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def check_destination(cfg: TrainConfig, root: str | os.PathLike | None = None, *, allow_shipped: bool = True) -> None:
    """Refuse a run whose student would replace an existing one without ``overwrite``.

    ``allow_shipped=False`` (the app) refuses the students that ship with the repository even with
    ``overwrite``. Raises ``ValueError`` naming the field.
    """
    if not cfg.save_student:
        return
    from cdlab.students import is_shipped

    folder = Path(root) if root is not None else adapters_dir()
    if not (folder / cfg.student_name).exists():
        return
    if not allow_shipped and is_shipped(cfg.student_name, folder):
        raise ValueError(f"config: student_name {cfg.student_name!r} is a student shipped with the repository; "
                         "the app never replaces it. Pick another name.")
    if not cfg.overwrite:
        raise ValueError(f"config: student_name {cfg.student_name!r} already exists in {shown_path(folder)}; pick another "
                         "name, or set overwrite (CLI: --overwrite) to replace it.")


# ----------------------------------------------------------------------- fields from the browser

# Set by whoever runs the app (its --model, its machine), never by a browser or API caller.
HOST_ONLY = ("model", "device", "threads", "cache_dir")
MAX_TEXT = 300            # characters in any text field from the app
MAX_PROMPTS = 16          # preview prompts from the app
_HF_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")  # fullmatch


def _check_text(name: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        raise ValueError(f"config: {name} is {len(value)} characters long; the limit is {MAX_TEXT}")
    bad = next((c for c in value if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"), None)
    if bad is not None:
        raise ValueError(f"config: {name} contains a control character ({bad!r})")
    return value


def check_data(value: Any, roots: list[Path] | None = None) -> str:
    """The ``data`` field from the app: ``world``, ``hf:NAME`` or a folder inside `data_roots`."""

    if not isinstance(value, str) or not value.strip():
        raise ValueError("config: data must be 'world', 'hf:NAME' or a data-set folder")
    value = _check_text("data", value.strip())
    if value == "world":
        return value
    if value.startswith("hf:"):
        if not _HF_NAME_RE.fullmatch(value[3:]) or ".." in value:
            raise ValueError(f"config: data {value!r} is not a Hugging Face datasets name (user/name)")
        return value
    return str(confine(value, data_roots() if roots is None else roots, "data"))


def untrusted_overrides(d: Any) -> dict[str, Any]:
    """Check config fields that come from a browser or the API, before `from_dict` turns them into a config.

    Refuses, with a message naming the field: a non-object, unknown keys, host-only keys (`HOST_ONLY`),
    values of the wrong JSON type, non-finite numbers, text over `MAX_TEXT` characters or with control
    characters, and data folders outside `data_roots`. Ranges are `check`'s job (after `resolve`).
    """
    if not isinstance(d, dict):
        raise ValueError("config: the settings must be a JSON object, e.g. {\"log_every\": 10}")
    types = _field_types()
    for k in d:
        if not isinstance(k, str):
            raise ValueError(f"config: field names must be strings, got {k!r}")
    unknown = sorted(k for k in d if k not in types)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise ValueError(f"config: unknown field(s) {shown}; known: {', '.join(types)}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in HOST_ONLY:
            raise ValueError(f"config: {k} is set by whoever runs the app, not from the browser")
        base = _base_type(types[k])
        if v is None:
            if get_origin(types[k]) is None and base is types[k]:
                raise ValueError(f"config: {k} cannot be null")
        elif base is bool:
            if not isinstance(v, bool):
                raise ValueError(f"config: {k} must be true or false, got {v!r}")
        elif base in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config: {k} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"config: {k} must be a finite number, got {v!r}")
            if base is int and isinstance(v, float) and not v.is_integer():
                raise ValueError(f"config: {k} must be a whole number, got {v!r}")
        elif base is str:
            if not isinstance(v, str):
                raise ValueError(f"config: {k} must be a string, got {v!r}")
            _check_text(k, v)
        elif get_origin(types[k]) is list or get_origin(base) is list:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or not 1 <= len(v) <= MAX_PROMPTS:
                raise ValueError(f"config: {k} must be a list of 1 to {MAX_PROMPTS} strings")
            for x in v:
                _check_text(k, x)
        if k == "data":
            v = check_data(v)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ parsing


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _base_type(typ: Any) -> Any:
    """``int`` for ``int | None``, the type itself otherwise."""
    args = [a for a in get_args(typ) if a is not type(None)]
    return args[0] if args and get_origin(typ) is not list else typ


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
    return from_dict(load_json_object(path, ValueError, what="config file"), base)


def cache_root(cfg: TrainConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return cache_dir()


__all__ = ["TrainConfig", "PROFILES", "BOUNDS", "APP_LIMITS", "APP_MAX_FILES", "CHOICES", "resolve", "check",
           "check_app_limits", "app_limits_markdown", "check_destination",
           "default_student_name", "untrusted_overrides", "check_data", "data_roots", "from_dict", "load_json",
           "runs_dir", "cache_root", "card_method", "profile_name", "default_preview_prompts"]
