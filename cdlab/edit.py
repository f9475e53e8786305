"""Image editing with the teacher and its students: SDEdit, inpainting, visual anagrams, hybrid images.

The course (project 5A, sections 1.7-1.9) builds four edits on one denoising loop; here each is a set of hooks
on the samplers' one loop (:func:`cdlab.samplers.sample_loop`), k-diffusion style: a *model*
(:class:`cdlab.models.EpsModel`, ``model(x_t, t, cond, uncond) -> eps``), an initial noise, the conditionings,
a list of timesteps and the schedule. All four share ONE signature::

    technique(model, x_T, conds, timesteps, scheduler, *, x0=None, mask=None, strength=1.0,
              sigma=LATENT_BLUR_SIGMA, return_trajectory=False, step=None) -> SampleOutput

and differ only in where the loop starts, which eps it uses and what it does after each step (``step`` is
the column's step rule: :class:`cdlab.samplers.DDIMStep` by default, an external student's own diffusers
scheduler with :class:`cdlab.samplers.SchedulerStep`):

=============  ===============================================================================================
``sdedit``     §1.7 (SDEdit, Meng et al. 2022). Start from the image noised to ``t_0``:
               ``x_{t_0} = alpha_{t_0} x_0 + sigma_{t_0} eps``, then denoise.  §1.7.1 (a hand-drawn sketch)
               is SDEdit of the sketch; §1.7.3 (text-conditional image-to-image) is SDEdit with a new prompt.
``inpaint``    §1.7.2 (RePaint, Lugmayr et al. 2022): after every step to ``s``,
               ``x_s <- m * x_s + (1 - m) * (alpha_s x_0 + sigma_s eps)``: outside the mask (m = 0) the
               sample is replaced by the original noised to ``s`` with the *known* noise ``eps`` (the x_T
               given), inside (m = 1) it is generated.
``anagram``    §1.8 (visual anagrams, Geng et al. 2024):
               ``eps = (eps(x_t, t, p_up) + flip(eps(flip(x_t), t, p_flipped))) / 2``, a vertical flip.
``hybrid``     §1.9 (factorized diffusion, Geng et al. 2024):
               ``eps = f_lowpass(eps(x_t, t, p_low)) + f_highpass(eps(x_t, t, p_high))``, with a Gaussian
               blur as the low-pass and ``f_highpass = id - f_lowpass`` (so low + high is the identity).
=============  ===============================================================================================

A *model* is an :class:`~cdlab.models.EpsModel`: the teacher with classifier-free guidance
(``eps_u + w (eps_c - eps_u)``, 2 NFE a call) or a student (its conditional eps, guidance distilled in, 1 NFE
a call). Each step of the loop
is the DDIM jump of that eps to the next timestep, which is :func:`cdlab.samplers.sample_ddim` for the
teacher and the deterministic :func:`cdlab.samplers.sample_consistency` for a student (tests/test_edit.py
checks both equalities bit for bit).

**Latent space, not pixel space.** The course runs DeepFloyd IF's stage 1, a *pixel* model at 64 px; the
teachers here are latent models (a VAE: the tiny teacher 32 px -> 4 x 8 x 8, SD1.5 512 px -> 4 x 64 x 64).
So the image is encoded once (``x_0 = vae.encode(img).mean * scaling_factor``), every operation acts on
latents, and the result is decoded:

* the inpainting mask is downsampled to the latent grid by **max-pooling** over each ``f x f`` cell
  (``f = vae_scale_factor``): a latent cell is regenerated when any of its pixels is in the mask, so the
  masked pixels are always inside the regenerated region, and the known region shrinks by up to one cell;
* the anagram's flip and the hybrid's blur are applied to the latent eps, where the seed applies them to the
  pixel eps. A flip commutes with a convolutional VAE only approximately, and a latent blur of ``sigma``
  cells is roughly a pixel blur of ``sigma * f`` pixels; both are what "the same operation" means for a
  latent model, and the evaluation reads them off the *decoded* images.

**External students** (LCM-LoRA, TCD, PCM, Hyper-SD on SD1.5) step with their own diffusers scheduler, on the
timesteps diffusers' ``StableDiffusionImg2ImgPipeline`` runs at that strength (:func:`scheduler_timesteps`),
the combined eps of the technique passed to ``scheduler.step`` (tests/test_edit.py checks SDEdit against
diffusers' img2img pipeline, and that inpainting keeps the outside of the mask exactly).

**Strength and the start timestep.** ``strength`` s in [0, 1] sets the noise level of SDEdit/inpainting.
The teacher columns follow diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: of the N trailing
DDIM timesteps the last ``min(int(N s), N)`` are run and the image is noised to the first of them. A student
starts at the **boundary at or above** ``t_start = s T``: with boundaries B (for N = 4: 999/750/500/250) its
consistency timesteps are restricted to those ``<= min{b in B : b >= t_start}`` (:func:`start_timesteps`),
because its consistency jumps are only trained from its boundaries. ``s = 0`` runs no step (0 NFE) and
returns the image (up to the VAE round trip); ``s = 1`` starts from pure noise, ``x = x_T`` exactly (the
trained schedule's ``alpha_999 = 0.068`` would otherwise keep 7 % of the image, as diffusers'
img2img does at strength 1), so SDEdit at strength 1 IS text-to-image from the same noise.

The user-level entry point is :func:`edit`: PIL images (or tensors in [-1, 1]) in, one :class:`EditResult`
per column out (images, x_0 trajectory, NFE, seconds), every column from the same initial noise, as the
Compare tab's columns are. Inputs are validated with ``ValueError`` messages that name the field.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from cdlab.math import q_sample
from cdlab.models import EpsModel
from cdlab.samplers import DDIMStep, SampleOutput, SchedulerStep, StepRule, sample_loop
# The user-level part: columns (what to sample, how strength sets the start), images in and out, the runner.
from cdlab.columns import (TEACHER_4, TEACHER_50, Column, check_strength, encode_prompts, run_columns,
                           scheduler_timesteps, start_timesteps, student_column, teacher_columns)
from cdlab.images import decode_unit, encode_image, image_to_tensor, mask_to_tensor, to_pil
from cdlab.students import make_scheduler
from cdlab.teachers import teacher_lock

__all__ = [
    "TECHNIQUES", "LATENT_BLUR_SIGMA", "Column", "EditResult", "sdedit", "inpaint", "anagram",
    "hybrid", "flip", "lowpass", "highpass", "gaussian_kernel", "start_timesteps", "mask_to_latent",
    "scheduler_timesteps",
    "teacher_columns", "student_column", "image_to_tensor", "mask_to_tensor", "check_strength", "encode_image",
    "decode_unit", "edit", "EditTechnique", "TEACHER_50", "TEACHER_4",
]

# The hybrid's latent low-pass: a Gaussian of sigma 1 latent cell (4 px on the tiny teacher's 8x8 grid; the
# seed's sigma 2 at 64 px is the same fraction, 1/32, of the image side as 0.25 cells of 8: one cell is the
# smallest blur that still separates a world object's edges from its colour blob on an 8x8 grid).
LATENT_BLUR_SIGMA = 1.0

# One prompt's (cond, uncond) embeddings: ``model(x_t, t, *cond) -> eps``.
Cond = tuple[torch.Tensor, "torch.Tensor | None"]


# ----------------------------------------------------------------------------- latent operations

def flip(x: torch.Tensor) -> torch.Tensor:
    """The anagram's view change: a vertical flip (upside down) of ``[B, C, H, W]``, ``torch.flip(x, [-2])``."""
    return torch.flip(x, dims=[-2])


def gaussian_kernel(sigma: float, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``2 ceil(3 sigma) + 1`` taps (sums to 1)."""
    radius = max(1, int(math.ceil(3.0 * float(sigma))))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (k / k.sum()).to(dtype)


def lowpass(x: torch.Tensor, sigma: float = LATENT_BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of ``[B, C, H, W]`` (separable, per channel, replicate padding): the hybrid's ``f_lowpass``
    (§1.9; the seed blurs with kernel 33, sigma 2 at 64 px). ``sigma == 0`` is the identity."""
    if sigma == 0:
        return x
    k = gaussian_kernel(sigma, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def highpass(x: torch.Tensor, sigma: float = LATENT_BLUR_SIGMA) -> torch.Tensor:
    """``f_highpass = x - f_lowpass(x)``: so ``lowpass(x) + highpass(x) == x`` (to float rounding)."""
    return x - lowpass(x, sigma)


def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask ``[H, W]`` or ``[B, 1, H, W]`` (1 = regenerate) -> the latent mask ``[B, 1, H/f, W/f]`` by
    max-pooling each ``f x f`` cell: a latent cell is regenerated when any of its pixels is masked."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.shape[-1] % factor or m.shape[-2] % factor:
        raise ValueError(f"mask: size {tuple(m.shape[-2:])} is not a multiple of the VAE factor {factor}")
    return F.max_pool2d(m, kernel_size=factor, stride=factor)


# ----------------------------------------------------------------------------- the techniques (hooks on the loop)

def _tvec(t: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)


def _start(x_T: torch.Tensor, x0: torch.Tensor | None, timesteps: list[int], strength: float,
           scheduler: Any) -> torch.Tensor:
    """SDEdit's start: ``q_sample(x0, t_0, x_T)``; pure noise ``x_T`` at strength 1 or without an image."""
    if x0 is None or strength >= 1.0:
        return x_T
    if not timesteps:
        return x0
    return q_sample(x0, _tvec(timesteps[0], x0), scheduler, noise=x_T)


def _check_common(x_T: torch.Tensor, conds: Sequence[Cond], n_conds: int, what: str, x0: Any = None,
                  need_x0: bool = False, step: StepRule | None = None) -> None:
    if len(conds) != n_conds:
        raise ValueError(f"{what}: needs {n_conds} prompt conditioning(s), got {len(conds)}")
    if need_x0 and x0 is None:
        raise ValueError(f"{what}: image: no image given")
    if x0 is not None and tuple(x0.shape) != tuple(x_T.shape):
        raise ValueError(f"{what}: image latents {tuple(x0.shape)} do not match the noise {tuple(x_T.shape)}")
    sched = getattr(step, "scheduler", None)
    if isinstance(step, SchedulerStep) and float(getattr(sched, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(f"{type(sched).__name__}: editing needs a scheduler on the x_t = alpha_t x_0 + "
                         "sigma_t eps parameterisation (init_noise_sigma 1), as LCM, TCD and DDIM are")


def _loop(model: EpsModel, x: torch.Tensor, timesteps: Sequence[int], scheduler: Any, step: StepRule | None,
          return_trajectory: bool, **hooks: Any) -> SampleOutput:
    """:func:`cdlab.samplers.sample_loop` over the technique's timesteps, the DDIM jump unless a ``step`` is given."""
    step = DDIMStep(scheduler) if step is None else step
    return sample_loop(model, x, [int(t) for t in timesteps], step, return_trajectory=return_trajectory, **hooks)


@torch.no_grad()
def sdedit(model: EpsModel, x_T: torch.Tensor, conds: Sequence[Cond], timesteps: Sequence[int], scheduler: Any, *,
           x0: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
           sigma: float = LATENT_BLUR_SIGMA, return_trajectory: bool = False,
           step: StepRule | None = None) -> SampleOutput:
    """SDEdit (§1.7; Meng et al. 2022): ``x_{t_0} = alpha_{t_0} x0 + sigma_{t_0} x_T``, then denoise with
    ``conds[0]`` over ``timesteps`` (from :func:`start_timesteps`). With the source image's prompt it projects
    onto the image manifold (§1.7, §1.7.1 for a sketch); with a new prompt it is text-conditional
    image-to-image (§1.7.3). ``timesteps == []`` returns ``x0``; ``strength == 1`` starts from ``x_T``.
    (``mask`` and ``sigma`` are unused: the techniques share one signature.) Hook: where the loop starts."""
    _check_common(x_T, conds, 1, "sdedit", x0, need_x0=True, step=step)
    c, u = conds[0]
    return _loop(model, _start(x_T, x0, list(timesteps), strength, scheduler), timesteps, scheduler, step,
                 return_trajectory, cond=c, uncond=u)


@torch.no_grad()
def inpaint(model: EpsModel, x_T: torch.Tensor, conds: Sequence[Cond], timesteps: Sequence[int], scheduler: Any, *,
            x0: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
            sigma: float = LATENT_BLUR_SIGMA, return_trajectory: bool = False,
            step: StepRule | None = None) -> SampleOutput:
    """RePaint-style inpainting (§1.7.2; Lugmayr et al. 2022), without RePaint's resampling jumps.

    Start as SDEdit (strength 1 = from the noise ``x_T``); after each step to ``s``
    ``x_s <- m x_s + (1 - m) q_sample(x0, s, x_T)``: outside the latent mask ``m`` (1 = generate, see
    :func:`mask_to_latent`) the sample is the original noised to ``s`` with the known noise ``x_T``, so the
    last step (s = 0) returns ``x0`` exactly there. An all-ones mask is plain sampling. Hooks: where the loop
    starts, what happens after each step, what the trajectory keeps (the known region pasted in).
    """
    _check_common(x_T, conds, 1, "inpaint", x0, need_x0=True, step=step)
    if mask is None:
        raise ValueError("inpaint: mask: no mask given")
    m = mask.to(x_T.dtype)
    if m.ndim != 4 or m.shape[-2:] != x_T.shape[-2:]:
        raise ValueError(f"inpaint: mask: expected a latent mask [B, 1, {x_T.shape[-2]}, {x_T.shape[-1]}], "
                         f"got {tuple(m.shape)} (downsample a pixel mask with mask_to_latent)")
    ts = [int(t) for t in timesteps]

    def project(x: torch.Tensor, s: int) -> torch.Tensor:
        return m * x + (1 - m) * q_sample(x0, _tvec(s, x0), scheduler, noise=x_T)

    x = project(_start(x_T, x0, ts, strength, scheduler), ts[0]) if ts else x0
    c, u = conds[0]
    return _loop(model, x, ts, scheduler, step, return_trajectory, cond=c, uncond=u, after_step=project,
                 keep=lambda p: m * p + (1 - m) * x0)


@torch.no_grad()
def anagram(model: EpsModel, x_T: torch.Tensor, conds: Sequence[Cond], timesteps: Sequence[int], scheduler: Any, *,
            x0: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
            sigma: float = LATENT_BLUR_SIGMA, return_trajectory: bool = False,
            step: StepRule | None = None) -> SampleOutput:
    """Visual anagram (§1.8; Geng et al. 2024): ``conds = (p_up, p_flipped)``,
    ``eps = (eps(x_t, t, p_up) + flip(eps(flip(x_t), t, p_flipped))) / 2`` with a vertical :func:`flip`; the
    result reads as ``p_up`` upright and as ``p_flipped`` upside down. Two model calls a step. Given ``x0``
    and ``strength < 1`` it starts from the noised image, as SDEdit does. Hook: which eps."""
    _check_common(x_T, conds, 2, "anagram", x0, step=step)
    c_up, c_flip = conds

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return 0.5 * (model(x, t, *c_up) + flip(model(flip(x), t, *c_flip)))

    return _loop(model, _start(x_T, x0, list(timesteps), strength, scheduler), timesteps, scheduler, step,
                 return_trajectory, eps=eps)


@torch.no_grad()
def hybrid(model: EpsModel, x_T: torch.Tensor, conds: Sequence[Cond], timesteps: Sequence[int], scheduler: Any, *,
           x0: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
           sigma: float = LATENT_BLUR_SIGMA, return_trajectory: bool = False,
           step: StepRule | None = None) -> SampleOutput:
    """Hybrid image (§1.9; Geng et al. 2024, factorized diffusion): ``conds = (p_low, p_high)``,
    ``eps = lowpass(eps(x_t, t, p_low)) + highpass(eps(x_t, t, p_high))`` with a Gaussian :func:`lowpass` of
    ``sigma`` latent cells and ``highpass = id - lowpass``: from afar (blurred) it reads as ``p_low``, up close
    as ``p_high``. Two model calls a step; ``hybrid(p, p)`` is plain sampling. Hook: which eps."""
    _check_common(x_T, conds, 2, "hybrid", x0, step=step)
    c_low, c_high = conds

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return lowpass(model(x, t, *c_low), sigma) + highpass(model(x, t, *c_high), sigma)

    return _loop(model, _start(x_T, x0, list(timesteps), strength, scheduler), timesteps, scheduler, step,
                 return_trajectory, eps=eps)


TECHNIQUES: dict[str, Callable[..., SampleOutput]] = {
    "sdedit": sdedit, "inpaint": inpaint, "anagram": anagram, "hybrid": hybrid}
# How many prompts each technique takes, and their names in messages.
PROMPT_FIELDS = {"sdedit": ("prompt",), "inpaint": ("prompt",), "anagram": ("prompt_up", "prompt_flipped"),
                 "hybrid": ("prompt_low", "prompt_high")}


# ----------------------------------------------------------------------------- the columns

@dataclass
class EditResult:
    """One column of an edit, like a Compare column.

    Args:
        column (`str`): the column's label.
        technique (`str`): ``sdedit`` | ``inpaint`` | ``anagram`` | ``hybrid``.
        images (`list[PIL.Image.Image]`): the results.
        pixels (`torch.Tensor`): the same in [0, 1], ``[B, 3, H, W]`` (for metrics).
        latents (`torch.Tensor`): the final latents.
        x0_trajectory (`list[PIL.Image.Image]`): the decoded x_0 prediction after every step (of image 0).
        timesteps (`list[int]`): where the network was evaluated.
        nfe (`int`): network evaluations per image (a CFG call counts 2; anagram/hybrid call twice a step).
        seconds (`float`): wall time of the column (encode, steps, decode).
    """

    column: str
    technique: str
    images: list
    pixels: torch.Tensor
    latents: torch.Tensor
    x0_trajectory: list = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    nfe: int = 0
    seconds: float = 0.0


@dataclass
class EditTechnique:
    """What an edit adds to a column's sampling: the ``technique`` hook of :func:`cdlab.columns.run_columns`.

    For each column it builds the column's model (`cdlab.models.EpsModel`: CFG for a teacher or an external
    student, the conditional eps for a consistency student), its step (the DDIM jump, or an external student's
    own fresh diffusers scheduler, `cdlab.samplers.SchedulerStep`, whose noise is the runner's generator) and its
    timesteps at ``strength`` (:func:`start_timesteps`), then runs ``fn`` (a value of :data:`TECHNIQUES`).
    """

    fn: Callable[..., SampleOutput]
    x0: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    strength: float = 1.0
    sigma: float = LATENT_BLUR_SIGMA

    def __call__(self, teacher: Any, column: Column, card: Any, x_T: torch.Tensor, conds: Sequence[Cond], *,
                 generator: torch.Generator | None = None, return_trajectory: bool = False) -> SampleOutput:
        sched, step = teacher.scheduler, None
        if column.kind == "external":  # its own scheduler, fresh (a diffusers scheduler steps)
            sched = make_scheduler(teacher.pipe, card)
            step = SchedulerStep(sched, eta=(card.scheduler_kwargs or {}).get("eta"), generator=generator)
        model_class = getattr(teacher, "model_class", EpsModel)  # the flow teacher's: FlowModel
        model = model_class(teacher.unet, None if column.kind == "student" else column.guidance)
        ts = start_timesteps(column, self.strength, int(teacher.scheduler.config.num_train_timesteps), sched,
                             card if column.kind == "student" else None)
        return self.fn(model, x_T, conds, ts, sched, x0=self.x0, mask=self.mask, strength=self.strength,
                       sigma=self.sigma, return_trajectory=return_trajectory, step=step)


def _check_prompts(technique: str, prompts: Sequence[str]) -> list[str]:
    names = PROMPT_FIELDS[technique]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) != len(names):
        raise ValueError(f"{technique}: expected {len(names)} prompt(s) ({', '.join(names)}), got {len(prompts)}")
    for name, p in zip(names, prompts):
        if not isinstance(p, str):
            raise ValueError(f"{name}: expected a string, got {type(p).__name__}")
    return prompts


def _check_inputs(teacher: Any, technique: str, image: Any, mask: Any, sigma: float, columns: Sequence[Column]):
    """The image ``[B, 3, H, W]`` (or None) and the latent mask ``[B, 1, h, w]`` (or None), checked."""
    if not math.isfinite(float(sigma)) or float(sigma) < 0:
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    if not columns:
        raise ValueError("columns: no column to run")
    size = int(teacher.resolution)
    x_img = None
    if technique in ("sdedit", "inpaint") or image is not None:
        x_img = image_to_tensor(image, size)
    b = 1 if x_img is None else x_img.shape[0]
    m_lat = None
    if technique == "inpaint":
        m = mask_to_tensor(mask, size)
        if m.shape[0] not in (1, b):
            raise ValueError(f"mask: {m.shape[0]} masks for {b} images")
        m_lat = mask_to_latent(m, int(teacher.pipe.vae_scale_factor)).expand(b, -1, -1, -1)
    return x_img, m_lat


@torch.no_grad()
def edit(
    teacher: Any,
    technique: str,
    prompts: Sequence[str] | str,
    columns: Sequence[Column],
    *,
    image: Any = None,
    mask: Any = None,
    strength: float | None = None,
    seed: int = 0,
    sigma: float = LATENT_BLUR_SIGMA,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
    adapters_root: Any = None,
    fuse: bool = True,
) -> list[EditResult]:
    """Run one edit in every column from the same initial noise and text encoding.

    The columns are sampled by :func:`cdlab.columns.run_columns` (the seeding rule, the student switch, the
    timing), with the technique as its hook (:class:`EditTechnique`).

    Args:
        teacher (`cdlab.teachers.Teacher`): the teacher; a student column runs on its UNet with the student's fused
            weights swapped in (the student switch of `cdlab.columns`, computed once and kept, as Compare does;
            ``fuse=False``: peft's unfused LoRA layers) and the plain teacher is active again on return.
        technique (`str`): a key of :data:`TECHNIQUES`.
        prompts: sdedit/inpaint ``[prompt]`` (or a string); anagram ``[prompt_up, prompt_flipped]``; hybrid
            ``[prompt_low, prompt_high]``. An empty prompt is the unconditional projection of §1.7.
        columns: :func:`teacher_columns` and :func:`student_column` entries (an external student's column is
            loaded from the hub cache by its catalogue key, ``load_external_student``).
        image: PIL or tensor in [-1, 1] (a batch ``[B, 3, H, W]`` too); required by sdedit and inpaint.
        mask: inpaint only; 1 = regenerate (see :func:`mask_to_tensor`); downsampled by :func:`mask_to_latent`.
        strength (`float`, *optional*): noise level in [0, 1]; default 0.6 for sdedit, 1 for the others.
        seed (`int`): the initial noise (``teacher.initial_noise(seed + i)`` per image), unless ``noise`` is given;
            also the seed of stochastic external schedulers (LCM, TCD), so every column is reproducible.

    Raises:
        ValueError: a message naming the field (``image``, ``mask``, ``strength``, a prompt, ``technique``).
    """
    if technique not in TECHNIQUES:
        raise ValueError(f"technique: expected one of {sorted(TECHNIQUES)}, got {technique!r}")
    prompts = _check_prompts(technique, prompts)
    strength = check_strength((0.6 if technique == "sdedit" else 1.0) if strength is None else strength)
    x_img, m_lat = _check_inputs(teacher, technique, image, mask, sigma, columns)
    b = 1 if x_img is None else x_img.shape[0]
    if noise is None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seeds = [int(seed) + i for i in range(b)]
    rows = [tuple(prompts)] * b
    with teacher_lock(teacher):
        t0 = time.perf_counter()
        embs = encode_prompts(teacher, rows)
        x0 = encode_image(teacher, x_img) if x_img is not None else None
        shared_s = time.perf_counter() - t0
        m_lat = m_lat.to(teacher.device, teacher.dtype) if m_lat is not None else None
        hook = EditTechnique(TECHNIQUES[technique], x0, m_lat, strength, float(sigma))
        runs = run_columns(teacher, columns, rows, seeds, noise=noise, embeddings=embs, technique=hook,
                           return_trajectory=return_trajectory, decode=lambda z: decode_unit(teacher, z),
                           fuse=fuse, adapters_root=adapters_root)
        return [EditResult(r.column.name, technique, to_pil(r.images), r.images, r.latents,
                           [to_pil(decode_unit(teacher, z[:1]))[0] for z in r.x0_trajectory], r.timesteps, r.nfe,
                           r.seconds + shared_s) for r in runs]


def _null():
    return contextlib.nullcontext()
