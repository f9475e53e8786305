"""The student card (``card.json``): what a student is and how to sample it, its validation, and
the short model card (``README.md``) rendered from it.

A card names its base model, its method (``ct`` | ``cd`` | ``mbcd`` | ``external``), its number of
consistency boundaries N, and the sampling recipe (steps, guidance, ``"consistency"`` or a diffusers
scheduler class with its options; `sampling_kwargs` spells it for ``pipe(...)``). ``save_student`` fills in
the LoRA fields from the adapter it saves.

The bottom of the students stack: this module imports nothing else from ``cdlab.students``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from cdlab.paths import FINGERPRINT_DIGITS, FLOW_ID, TINY_ID
from cdlab.samplers import SHIFT_RANGE, check_shift, student_timesteps

logger = logging.getLogger(__name__)

METHODS = ("ct", "cd", "mbcd", "dmd", "reflow", "external")

# Letters, digits, "_" and "-": a name is both a folder and a peft adapter name, and peft keeps
# adapters in nn.ModuleDicts, whose keys cannot contain ".". No leading "." or "-": hidden / flag-like.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch: "name\n" is refused
_FINGERPRINT_RE = re.compile(f"[0-9a-f]{{{FINGERPRINT_DIGITS}}}")


class StudentError(ValueError):
    """A student cannot be saved, found, read or loaded; the message says which and why."""


def validate_name(name: Any) -> str:
    """Return ``name`` if it is a safe student name, else raise `StudentError`.

    A name is 1-64 characters of letters, digits, ``_`` and ``-``, starting with a letter or digit:
    no path separators, no ``..``, no ``.`` (peft adapter names cannot hold one), and not an
    attribute of ``nn.ModuleDict`` (``"train"``, ``"keys"``, ...), where peft stores the adapter.
    """
    if not isinstance(name, str):
        raise StudentError(f"a student name must be a string, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise StudentError(
            f"invalid student name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (no '/', '..' or '.')")
    if hasattr(torch.nn.ModuleDict(), name):
        raise StudentError(f"invalid student name {name!r}: it clashes with a torch.nn.ModuleDict attribute")
    return name


@dataclass
class StudentCard:
    """What a student is and how to sample it (``card.json``).

    Args:
        name (`str`): folder and peft adapter name.
        base_model (`str`): the teacher it was distilled from (``Teacher.base_id``), e.g.
            ``"cdlab/tiny-teacher"`` or ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.
        base_fingerprint (`str`, *optional*): the teacher's UNet weights file's `cdlab.paths.weights_fingerprint`
            (``Teacher.base_fingerprint``), for the teachers the lab makes and may replace (the tiny and the
            flow teacher): a LoRA is a delta on those exact weights, and a teacher retrained under the same id
            is another base. None: not recorded (a hub model, whose id names its
            weights, or a card older than the field); then the id alone decides (`StudentCard.fits`).
        method (`str`): ``"ct"`` | ``"cd"`` | ``"mbcd"`` (multi-boundary CD) | ``"dmd"`` (distribution matching)
            | ``"reflow"`` (2-rectified flow, a flow teacher's student) | ``"external"``.
        num_boundaries (`int`, *optional*): N, the consistency segments it was trained with
            (4 -> boundaries 0, 250, 500, 750). For external students, informational only.
        steps (`int`): recommended sampling steps k.
        guidance (`float`): CFG scale to sample with; 1.0 means no CFG (one UNet call a step), the
            usual value for distilled students (the training guidance w lives in ``training_config``).
        scheduler (`str`): ``"consistency"`` (cdlab's ``sample_consistency``) or a diffusers scheduler
            class name such as ``"TCDScheduler"``.
        scheduler_kwargs (`dict`): options for that scheduler (constructor options such as
            ``timestep_spacing``; ``eta`` is a step option, see `sampling_kwargs`). ``"consistency"`` takes one,
            ``shift``: its grid's timestep shift (`cdlab.samplers.consistency_timesteps`), 1 when absent.
        lora_rank, lora_alpha, target_modules: the LoRA as trained (``save_student`` fills them in).
        training_config (`dict`): the trainer's flat config. metrics (`dict`): evaluation numbers.
        created (`str`): ISO-8601 UTC time of saving.
    """

    name: str
    base_model: str
    method: str
    base_fingerprint: str | None = None
    num_boundaries: int | None = None
    steps: int = 4
    guidance: float = 1.0
    scheduler: str = "consistency"
    scheduler_kwargs: dict = field(default_factory=dict)
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""

    def fits(self, base_model: str | None, base_fingerprint: str | None = None) -> bool:
        """Whether this student was distilled from that teacher: the same ``base_model`` id (None: any), and
        the same weights where both the card and the teacher record a fingerprint."""
        if base_model is not None and self.base_model != base_model:
            return False
        return base_fingerprint is None or self.base_fingerprint is None or self.base_fingerprint == base_fingerprint

    def to_dict(self) -> dict:
        """A JSON-ready dict (a deep copy)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Any) -> StudentCard:
        """Build and validate a card; any problem raises `StudentError` naming the field."""
        if not isinstance(d, dict):
            raise StudentError(f"a student card must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "base_model", "method") if k not in d]
        if missing:
            raise StudentError(f"student card is missing required field(s): {', '.join(missing)}")
        unknown = sorted(set(d) - known)
        if unknown:  # forward compatibility: a newer cdlab may add fields
            logger.debug("student card %r: ignoring unknown fields %s", d.get("name"), unknown)
        card = cls(**{k: v for k, v in d.items() if k in known})
        card._check()
        return card

    def _check(self) -> None:
        def bad(field_name: str, want: str) -> StudentError:
            return StudentError(
                f"student card {self.name!r}: field {field_name!r} must be {want}, "
                f"got {getattr(self, field_name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not isinstance(self.name, str):
            raise bad("name", "a string")
        validate_name(self.name)
        if not isinstance(self.base_model, str) or not self.base_model:
            raise bad("base_model", "a non-empty string")
        if self.base_fingerprint is not None and not (
                isinstance(self.base_fingerprint, str) and _FINGERPRINT_RE.fullmatch(self.base_fingerprint)):
            raise bad("base_fingerprint", f"{FINGERPRINT_DIGITS} lowercase hex digits or null")
        if self.method not in METHODS:
            raise bad("method", f"one of {', '.join(METHODS)}")
        if self.num_boundaries is not None and not (is_int(self.num_boundaries) and self.num_boundaries >= 1):
            raise bad("num_boundaries", "a positive integer or null")
        if not (is_int(self.steps) and self.steps >= 1):
            raise bad("steps", "a positive integer")
        if not is_num(self.guidance):
            raise bad("guidance", "a number")
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise bad("scheduler", '"consistency" or a diffusers scheduler class name')
        for name in ("scheduler_kwargs", "training_config", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "an object")
        if self.scheduler == "consistency":  # the lab's sampler reads one option: its grid's timestep shift
            lo, hi = SHIFT_RANGE
            try:
                if set(self.scheduler_kwargs) - {"shift"}:
                    raise ValueError("unknown option")
                check_shift(self.scheduler_kwargs.get("shift", 1.0))
            except ValueError:
                raise bad("scheduler_kwargs", f'{{}} or {{"shift": s}} with s in [{lo:g}, {hi:g}] for the '
                          '"consistency" scheduler') from None
        if self.lora_rank is not None and not (is_int(self.lora_rank) and self.lora_rank >= 1):
            raise bad("lora_rank", "a positive integer or null")
        if self.lora_alpha is not None and not is_num(self.lora_alpha):
            raise bad("lora_alpha", "a number or null")
        if not (isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules)):
            raise bad("target_modules", "a list of strings")
        if not isinstance(self.created, str):
            raise bad("created", "a string")


def sampling_kwargs(card: StudentCard) -> dict:
    """``pipe(...)`` keyword arguments for a card: steps, guidance, and ``eta`` if the card has one."""
    kwargs: dict[str, Any] = {"num_inference_steps": card.steps, "guidance_scale": float(card.guidance)}
    if "eta" in card.scheduler_kwargs:
        kwargs["eta"] = float(card.scheduler_kwargs["eta"])
    return kwargs


# ------------------------------------------------------------------------------------- README


def _base_path_hint(base_model: str) -> str:
    # The embedded teacher is a local folder, not a hub id.
    return "cdlab/assets/tiny-teacher" if base_model == TINY_ID else base_model


def render_readme(card: StudentCard) -> str:
    """A short model card (Markdown with Hugging Face front matter) with the plain-diffusers recipe."""
    if card.scheduler == "consistency":
        sched_line = ('pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, '
                      'timestep_spacing="trailing", set_alpha_to_one=True)')
        sched_import = "DDIMScheduler"
    else:
        extra = "".join(f", {k}={v!r}" for k, v in card.scheduler_kwargs.items() if k != "eta")
        sched_line = f"pipe.scheduler = {card.scheduler}.from_config(pipe.scheduler.config{extra})"
        sched_import = card.scheduler
    call = ", ".join(f"{k}={v!r}" for k, v in sampling_kwargs(card).items())
    method = {"ct": "consistency training", "cd": "consistency distillation",
              "mbcd": "multi-boundary consistency distillation", "dmd": "distribution matching distillation (DMD2)",
              "reflow": "2-rectified flow (Liu et al. 2023)" if card.num_boundaries is None
              else f"piecewise rectified flow on {card.num_boundaries} windows (Yan et al. 2024)", "external": "external"}[card.method]
    rows = [
        ("base model", f"`{card.base_model}`"),
        ("base weights", f"sha256 `{card.base_fingerprint}...` of its UNet's weights file" if card.base_fingerprint
         else "-"),
        ("method", f"{card.method} ({method})"),
        ("boundaries N", card.num_boundaries if card.num_boundaries is not None else "-"),
        ("steps", card.steps),
        ("guidance", card.guidance),
        ("scheduler", f"`{card.scheduler}` {json.dumps(card.scheduler_kwargs) if card.scheduler_kwargs else ''}".strip()),
        *([("timesteps", f"{student_timesteps(card, card.steps)}"
            f" at {card.steps} steps (shift {card.scheduler_kwargs['shift']:g})")]
          if card.scheduler == "consistency" and "shift" in card.scheduler_kwargs else []),
        ("LoRA", f"rank {card.lora_rank}, alpha {card.lora_alpha} (alpha/rank folded into the saved "
                 f"weights), {len(card.target_modules)} target module names"),
        ("created", card.created or "-"),
    ]
    rows += [(f"metric: {k}", v) for k, v in card.metrics.items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if card.base_model == FLOW_ID:  # not a diffusers pipeline: cdlab's own
        recipe = f"""## Load it with cdlab

```python
from cdlab.columns import run_columns, student_column
from cdlab.students import load_student
from cdlab.teachers import load_teacher

teacher = load_teacher("fashion-flow")
card = load_student(teacher, "{card.name}")
run = run_columns(teacher, [student_column(card, {card.steps})], ["Sneaker"], seeds=[0])[0]
```

The sampler is the lab's consistency jump on the flow path, which is an Euler step of the student's velocity
(`cdlab.flow.model`)."""
    else:
        recipe = f"""## Load it with plain diffusers

```python
from diffusers import StableDiffusionPipeline, {sched_import}

pipe = StableDiffusionPipeline.from_pretrained("{_base_path_hint(card.base_model)}")
pipe.load_lora_weights("adapters/{card.name}", adapter_name="{card.name}")
{sched_line}
image = pipe("a prompt", {call}).images[0]
```

With cdlab: `cdlab.students.load_student(pipe, "{card.name}")`; the sampler cdlab uses is in `card.json`
(`"consistency"` = `cdlab.samplers.sample_consistency` over the student's boundaries)."""
    return f"""---
base_model: {card.base_model}
library_name: diffusers
tags: [lora, consistency-models, cdlab]
---

# {card.name}

A few-step student of `{card.base_model}`: a LoRA on the UNet, trained by cdlab ({method}).

| | |
|---|---|
{table}

{recipe}
"""
