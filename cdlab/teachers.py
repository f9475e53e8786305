"""Teachers: a diffusers ``StableDiffusionPipeline`` behind a thin typed wrapper.

    from cdlab.teachers import load_teacher
    teacher = load_teacher("tiny")                 # or "sd15", "sd15-random", "fashion-flow", or a diffusers folder
    cond, uncond = teacher.encode(["a red circle"])
    x_T = teacher.initial_noise(seed=0)

Every teacher gets ``DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)``:
trailing spacing as in the course notebook (its first timestep is 999, the one the students start from), and
``set_alpha_to_one=True`` so that the plain pipeline's last DDIM step lands on the clean boundary, as ``t = 0``
does in :mod:`cdlab.math`; with SD1.5's own ``False`` the pipeline would stop at abar_0 = 0.99915 and differ
from :func:`cdlab.samplers.sample_ddim` at the last step.

Nothing heavy is imported at module import; diffusers loads inside the functions.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdlab.models import EpsModel
from cdlab.paths import SD15_ID, TINY_ID, assets_dir, weights_fingerprint

__all__ = ["TeacherLoadError", "TINY_TEACHER_DIR", "SD15_ID", "SD15_RANDOM_ID", "FLOW_TEACHER", "Teacher", "load_teacher",
           "load_teacher_with_fallback", "is_tiny", "class_names", "teacher_lock", "serving_rows"]

TINY_TEACHER_DIR = assets_dir() / "tiny-teacher"
SD15_RANDOM_ID = "cdlab/sd15-random"  # cdlab.sd15_random: SD1.5's architecture, random weights
FLOW_TEACHER = "fashion-flow"  # cdlab.flow.pipeline: the flow-matching teacher of Fashion-MNIST (seed 003 part B)
# Names that mean SD1.5 on the hub; "runwayml/..." is the course notebook's (now removed) repository.
_SD15_NAMES = {"sd15", "sd1.5", "sd-1.5", SD15_ID, "runwayml/stable-diffusion-v1-5"}


# Default CFG scales. The tiny teacher's: at w = 5 its 50-step samples keep every attribute as at
# w = 2-3, while naive 4-step DDIM visibly breaks (adherence 0.91 -> 0.75), as SD1.5 does at 7.5.
TINY_GUIDANCE = 5.0
SD15_GUIDANCE = 7.5


class TeacherLoadError(RuntimeError):
    """A teacher could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class Teacher:
    """A loaded teacher.

    Args:
        pipe (`StableDiffusionPipeline`): the pipeline, with a trailing ``DDIMScheduler``.
        name (`str`): what was asked for: ``"tiny"``, ``"sd15"`` or a local path.
        device (`torch.device`), dtype (`torch.dtype`): where the weights live.
        fallback_reason (`str`, *optional*): set by :func:`load_teacher_with_fallback` when this teacher
            replaces one that failed to load (one line).
        base_id (`str`): the id its students' cards name (``card.base_model``).
        base_fingerprint (`str`, *optional*): its UNet weights file's `cdlab.paths.weights_fingerprint`, for the
            embedded tiny teacher, which the lab may rebuild under the same id: only students whose cards
            record these weights (or none) are its own. None for SD1.5 and folders, whose id names the weights
            (hashing SD1.5's 3.4 GB UNet would take seconds at every start).
    """

    pipe: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    fallback_reason: str | None = None
    base_id: str = ""
    base_fingerprint: str | None = None
    # Held while adapters are switched and the UNet samples (Compare, Evaluate): one pipeline, one user
    # at a time, whatever the web queue's concurrency.
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)
    # Held around every tokenizer call. A transformers tokenizer is one Rust tokenizer whose padding and
    # truncation are state set before each call, so two threads tokenizing at once (a request counting its
    # prompt's tokens while the worker encodes a batch) can pad one call with the other's settings.
    tokenizer_lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    model_class = EpsModel  # what the UNet predicts, as an eps model (a flow teacher's: FlowModel)
    solver = "DDIM"  # what its teacher columns are called (a flow teacher's: Euler, the same step on its path)

    @property
    def guidance(self) -> float:
        """The teacher's default CFG scale: ``TINY_GUIDANCE`` for a tiny-world teacher, 7.5 (the course's) otherwise.

        Every entry point (app, train, evaluate, generate, bench) takes its default from here."""
        return TINY_GUIDANCE if self.is_tiny else SD15_GUIDANCE

    @property
    def is_sd15_architecture(self) -> bool:
        """SD1.5's UNet shape (SD1.5 itself, ``sd15-random``, fine-tunes of SD1.5): its LoRAs fit."""
        from cdlab.sd15_random import is_sd15_architecture

        return is_sd15_architecture(self.unet.config)

    @property
    def is_tiny(self) -> bool:
        """A tiny-world teacher (the embedded one, or a pipeline of its architecture): world captions and metrics."""
        return self.base_id == TINY_ID or (not self.is_sd15_architecture and self.resolution <= 64)

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def vae(self) -> Any:
        return self.pipe.vae

    @property
    def text_encoder(self) -> Any:
        return self.pipe.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def resolution(self) -> int:
        """Image side in pixels: the UNet's latent size times the VAE's downsampling factor."""
        return int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings ``(cond, uncond)``, each ``[B, L, D]``, from ONE text-encoder call on the prompts
        and as many empty prompts (diffusers' unconditional input), padded to the tokenizer's max length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        with self.tokenizer_lock:
            tok = self.tokenizer(
                list(prompts) + [""] * len(prompts), padding="max_length",
                max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt",
            )
        emb = self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
        cond, uncond = emb.chunk(2)
        return cond, uncond

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What the user should know about ``prompt`` before it is encoded: a line when the text encoder reads
        only its first ``model_max_length`` tokens (the rest is truncated by :meth:`encode`)."""
        with self.tokenizer_lock:
            n = len(self.tokenizer(prompt).input_ids)
        limit = self.tokenizer.model_max_length
        return [f"The prompt is {n} tokens; the text encoder reads the first {limit}."] if n > limit else []

    def initial_noise(self, seed: int, batch: int = 1) -> torch.Tensor:
        """``x_T ~ N(0, I)`` of shape ``[batch, *latent_shape]`` from a CPU generator, so a seed gives the same
        latents on every device; then moved to the teacher's device and dtype."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((batch, *self.latent_shape), generator=g).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """Scaled latents -> a list of ``PIL.Image.Image`` (``vae.decode(latents / scaling_factor)``)."""
        from PIL import Image

        vae = self.vae
        img = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def describe(self) -> str:
        """One line for logs and the UI, e.g. ``"tiny teacher · cpu · float32"``."""
        label = {"tiny": "tiny teacher", SD15_ID: "SD1.5 teacher",
                 SD15_RANDOM_ID: f"SD1.5 architecture, random weights ({self.resolution} px)"}.get(
            "tiny" if self.base_id == TINY_ID else self.base_id, f"teacher {self.base_id}")
        return f"{label} · {self.device} · {str(self.dtype).replace('torch.', '')}"


def is_tiny(teacher: Any) -> bool:
    """Whether ``teacher`` (a `Teacher`, or a teacher-like object in tests) is a tiny-world teacher."""
    flag = getattr(teacher, "is_tiny", None)
    if isinstance(flag, bool):
        return flag
    return getattr(teacher, "base_id", "") == TINY_ID or int(teacher.resolution) <= 64


SMALL_UNET_PARAMETERS = 20_000_000


def serving_rows(teacher: Any) -> int:
    """The most UNet rows one call gets when the app serves requests together (`cdlab.ui.compare.Comparer`; a CFG
    image counts 2). A small UNet (the tiny teacher's 4.2M parameters, the flow teacher's 0.79M: under
    ``SMALL_UNET_PARAMETERS``) takes 128: its activations are small and a wide call is faster than many narrow
    ones (docs/performance.md, "Served 128 rows a call"). SD1.5's (860M) takes 8 on CUDA and 4 on the CPU: its
    memory grows with every row."""
    unet = getattr(teacher, "unet", None)
    small = is_tiny(teacher) or (isinstance(unet, torch.nn.Module)
                                 and sum(p.numel() for p in unet.parameters()) < SMALL_UNET_PARAMETERS)
    if small:
        return 128
    return 8 if str(getattr(teacher, "device", "cpu")).startswith("cuda") else 4


def class_names(teacher: Any) -> list[str]:
    """The class names a class-conditioned teacher takes as its prompt (the flow teacher's ``classes``), or ``[]``
    for a text teacher. The one test of "is the prompt a class?" that Compare, Edit and Evaluate ask."""
    return list(getattr(teacher, "classes", None) or [])


def teacher_lock(teacher: Any):
    """The teacher's lock (`Teacher.lock`) as a context manager; a no-op for teacher-like objects without one."""
    import contextlib

    lock = getattr(teacher, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TeacherLoadError(f"bad device {device!r}: {e}") from None


def _offline() -> bool:
    """Offline if the environment says so now, or said so when huggingface_hub was imported."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"} or bool(
        constants.HF_HUB_OFFLINE)


def _hub_cache() -> str | None:
    """The cache folder as the environment says now (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    # No safety checker: the lab shows raw samples for teaching. Do not deploy it as a public generator
    # without adding a filter.
    return StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, use_safetensors=True, safety_checker=None, requires_safety_checker=False, **kwargs)


def _finish(pipe: Any, name: str, base_id: str, device: torch.device, dtype: torch.dtype) -> Teacher:
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    pipe = pipe.to(device)
    if device.type == "cpu" and dtype == torch.float16:
        # CPU half-precision convolutions are ~50x slower than float32 (SD1.5's VAE encoder: 25 s against
        # 0.5 s an image at 64 px): on the CPU, fp16 applies to the UNet only. The VAE and the text encoder
        # are frozen and their outputs cast at their boundaries (`Teacher.encode`, ``vae.dtype`` inputs).
        pipe.vae.to(torch.float32)
        pipe.text_encoder.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return Teacher(pipe=pipe, name=name, device=device, dtype=dtype, base_id=base_id)


def _load_local(path: Path, name: str, base_id: str, device: torch.device, dtype: torch.dtype) -> Teacher:
    if not path.is_dir():
        raise TeacherLoadError(
            f"teacher {name!r}: no folder {str(path)!r}. Give 'tiny', 'sd15' or the path of a diffusers "
            "StableDiffusionPipeline folder (one with model_index.json, as written by save_pretrained).")
    if not (path / "model_index.json").is_file():
        raise TeacherLoadError(
            f"teacher {name!r}: {str(path)!r} is not a diffusers pipeline folder (no model_index.json). "
            "Save one with pipe.save_pretrained(folder, safe_serialization=True).")
    try:
        pipe = _from_pretrained(str(path), dtype)
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variously
        raise TeacherLoadError(
            f"teacher {name!r}: could not load the pipeline in {str(path)!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). It must be a StableDiffusionPipeline "
            "saved with safetensors weights.") from None
    return _finish(pipe, name, base_id, device, dtype)


def _load_hub(repo_id: str, name: str, device: torch.device, dtype: torch.dtype) -> Teacher:
    offline = _offline()
    cache = _hub_cache()
    kwargs: dict[str, Any] = {}
    if offline:
        kwargs["local_files_only"] = True
    if cache:
        kwargs["cache_dir"] = cache
    try:
        pipe = _from_pretrained(repo_id, dtype, **kwargs)
    except Exception as e:
        from huggingface_hub import constants

        where = cache or constants.HF_HUB_CACHE
        mode = "offline (HF_HUB_OFFLINE=1), so only the local cache was searched" if offline else \
            "online, but the hub was not reachable or the download failed"
        reason = (str(e).splitlines()[0] if str(e) else "no message").split(". ")[0]
        raise TeacherLoadError(
            f"Could not load teacher {name!r} = hub repo {repo_id!r} (safetensors, {dtype}): tried {mode}; "
            f"cache {where!r}. Cause: {type(e).__name__}: {reason[:300]}\n"
            f"To fix: pass a local folder (load_teacher('/path/to/stable-diffusion-v1-5'), from "
            f"`hf download {repo_id}` on a machine with internet); or point HF_HOME / HF_HUB_CACHE at "
            f"a cache that holds it; or unset HF_HUB_OFFLINE and connect to the hub. "
            f"The embedded teacher needs no download: load_teacher('tiny').") from None
    return _finish(pipe, name, repo_id, device, dtype)


def load_teacher(
    name_or_path: str | os.PathLike = "tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
) -> Teacher:
    """Load a teacher pipeline with a trailing, clean-boundary ``DDIMScheduler``.

    Args:
        name_or_path: ``"tiny"`` (the embedded teacher in ``TINY_TEACHER_DIR``), ``"fashion-flow"`` (the
            flow-matching teacher, `cdlab.flow.pipeline.FlowTeacher`: classes as prompts) or a flow teacher's run
            folder (`cdlab.flow.pipeline.is_flow_run`: the Train tab's ``runs/<name>``), ``"sd15"`` (the hub's
            ``stable-diffusion-v1-5/stable-diffusion-v1-5``), ``"sd15-random"`` (SD1.5's architecture with
            random weights, built once offline: `cdlab.sd15_random`) or a local diffusers pipeline folder.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default float16 on CUDA, float32 on CPU.
        resolution: ``sd15-random`` only: the image side in pixels (default 64: 8x8 latents).

    Weights are loaded as safetensors only. The safety checker is off (``safety_checker=None,
    requires_safety_checker=False``): the lab shows raw samples for teaching; do not deploy it as a public
    image generator without adding a filter.

    Raises:
        TeacherLoadError: one clear message saying what was tried and how to fix it.
    """
    dev = _default_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    name = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if not isinstance(name, str) or not name.strip():
        raise TeacherLoadError(f"teacher name must be 'tiny', 'sd15' or a folder path, got {name_or_path!r}")
    if name == "sd15-random":
        from cdlab import sd15_random

        try:
            res = sd15_random.check_resolution(sd15_random.DEFAULT_RESOLUTION if resolution is None else resolution)
            folder = sd15_random.ensure(res)
        except (ValueError, OSError) as e:
            raise TeacherLoadError(f"teacher 'sd15-random': {e}") from None
        return _load_local(folder, name, SD15_RANDOM_ID, dev, dtype)
    if resolution is not None:
        raise TeacherLoadError(f"teacher {name!r}: resolution is fixed by its weights; only 'sd15-random' takes one")
    if name == "tiny":
        folder = Path(TINY_TEACHER_DIR)
        if not (folder / "model_index.json").is_file():
            raise TeacherLoadError(
                f"The embedded tiny teacher is missing ({str(folder)!r} has no model_index.json). "
                "Build it with `python -m cdlab build-teacher`.")
        teacher = _load_local(folder, name, TINY_ID, dev, dtype)
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        teacher.base_fingerprint = weights_fingerprint(folder / "unet" / SAFETENSORS_WEIGHTS_NAME)
        return teacher
    if name.lower() in _SD15_NAMES:
        return _load_hub(SD15_ID, name, dev, dtype)
    if name == FLOW_TEACHER:
        return _load_flow(None, name, dev, dtype)
    path = Path(name).expanduser()
    if not path.exists():
        raise TeacherLoadError(
            f"unknown teacher {name!r}: expected 'tiny', 'sd15', a flow teacher's run folder or an existing "
            f"diffusers pipeline folder, and no folder {str(path.resolve())!r} exists.")
    from cdlab.flow.pipeline import is_flow_run

    if is_flow_run(path):  # a flow teacher trained by `cdlab.flow.train_teacher` (the Train tab), with its students
        return _load_flow(path, name, dev, dtype)
    return _load_local(path, name, str(path.resolve()), dev, dtype)


def _load_flow(folder: Path | None, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The flow teacher of ``folder`` (None: the shipped one), named ``name``; `TeacherLoadError` on a bad one."""
    from cdlab.flow.pipeline import load_flow_teacher

    if dtype != torch.float32:
        raise TeacherLoadError(f"teacher {name!r} runs in float32 (a 0.5M-parameter UNet with BatchNorm)")
    try:
        return load_flow_teacher(folder, device=device, name=name)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit the state's UNet
        raise TeacherLoadError(f"teacher {name!r}: {e}") from None


def load_teacher_with_fallback(
    name_or_path: str | os.PathLike = "sd15",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """:func:`load_teacher`, falling back to the tiny teacher (with ``fallback_reason`` set to one line) when the
    asked-for teacher cannot be loaded. Raises ``TeacherLoadError`` only if the tiny teacher fails too."""
    try:
        return load_teacher(name_or_path, device, dtype)
    except TeacherLoadError as e:
        if os.fspath(name_or_path) == "tiny":
            raise
        first = str(e).splitlines()[0]
        try:
            teacher = load_teacher("tiny", device, dtype)
        except TeacherLoadError as tiny_error:
            raise TeacherLoadError(f"{e}\nThe fallback failed too: {tiny_error}") from None
        teacher.fallback_reason = f"{os.fspath(name_or_path)!r} unavailable, using the tiny teacher: {first}"
        return teacher
