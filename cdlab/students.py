"""Students on disk: LoRA adapters for the teacher's UNet, their cards, and the external catalogue.

A student lives in ``adapters/<name>/`` (``CDLAB_ADAPTERS_DIR`` overrides the root)::

    adapters/<name>/pytorch_lora_weights.safetensors   # diffusers' LoRA format; plain diffusers loads it
    adapters/<name>/card.json                          # StudentCard: how it was made and how to sample it
    adapters/<name>/README.md                          # a short model card rendered from card.json

The weights load in plain diffusers, without cdlab::

    pipe.load_lora_weights("adapters/<name>", adapter_name="<name>")

(the LCM-LoRA training script's raw peft output does not, diffusers issue #6392). Ours is what
``UNet2DConditionModel.save_lora_adapter`` writes: ``get_peft_model_state_dict`` keys (``lora_A`` /
``lora_B``, relative to the UNet) behind the ``unet.`` prefix, via ``save_lora_weights``, with the
LoraConfig in the file's ``lora_adapter_metadata``. Not ``convert_state_dict_to_diffusers``: it renames
only the attention keys (``to_q.lora.down``), and diffusers' loader decides the format of the whole
file from its first key, so a LoRA that also covers convs loads with its attention half missing.

Several students live as named peft adapters on ONE UNet: ``load_student`` adds adapter ``<name>``,
``activate_student(pipe, name)`` switches to it, ``activate_student(pipe, None)`` gives back the plain
teacher. External students (LCM-LoRA, TCD, PCM, Hyper-SD) come from the hub through
``load_external_student``; their adapter name is their catalogue key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTERS_DIR",
    "WEIGHT_NAME",
    "CARD_NAME",
    "DEFAULT_TARGET_MODULES",
    "METHODS",
    "StudentError",
    "StudentCard",
    "ExternalStudent",
    "EXTERNAL_STUDENTS",
    "adapters_dir",
    "validate_name",
    "student_dir",
    "attach_lora",
    "save_student",
    "read_card",
    "list_students",
    "load_student",
    "activate_student",
    "load_external_student",
    "make_scheduler",
    "sampling_kwargs",
    "render_readme",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
ADAPTERS_DIR = Path(os.environ.get("CDLAB_ADAPTERS_DIR", REPO_ROOT / "adapters"))
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
CARD_NAME = "card.json"
METHODS = ("ct", "cd", "mbcd", "external")
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_ID = "cdlab/tiny-teacher"

# The LoRA targets of diffusers' LCM-LoRA distillation script (train_lcm_distill_lora_sd_wds.py):
# attention, feed-forward, transformer in/out projections, resnet convs, resampler convs, time embedding.
DEFAULT_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0",
    "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut",
    "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
]

# Letters, digits, "_" and "-": a name is both a folder and a peft adapter name, and peft keeps
# adapters in nn.ModuleDicts, whose keys cannot contain ".". No leading "." or "-": hidden / flag-like.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class StudentError(ValueError):
    """A student cannot be saved, found, read or loaded; the message says which and why."""


def adapters_dir() -> Path:
    """The adapters root: ``$CDLAB_ADAPTERS_DIR`` if set (read at call time), else ``<repo>/adapters``."""
    env = os.environ.get("CDLAB_ADAPTERS_DIR")
    return Path(env) if env else ADAPTERS_DIR


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else adapters_dir()


# --------------------------------------------------------------------------------------------- card


@dataclass
class StudentCard:
    """What a student is and how to sample it (``card.json``).

    Args:
        name (`str`): folder and peft adapter name.
        base_model (`str`): the teacher it was distilled from (``Teacher.base_id``), e.g.
            ``"cdlab/tiny-teacher"`` or ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.
        method (`str`): ``"ct"`` | ``"cd"`` | ``"mbcd"`` (multi-boundary CD) | ``"external"``.
        num_boundaries (`int`, *optional*): N, the consistency segments it was trained with
            (4 -> boundaries 0, 250, 500, 750). For external students, informational only.
        steps (`int`): recommended sampling steps k.
        guidance (`float`): CFG scale to sample with; 1.0 means no CFG (one UNet call a step), the
            usual value for distilled students (the training guidance w lives in ``training_config``).
        scheduler (`str`): ``"consistency"`` (cdlab's ``sample_consistency``) or a diffusers scheduler
            class name such as ``"TCDScheduler"``.
        scheduler_kwargs (`dict`): options for that scheduler (constructor options such as
            ``timestep_spacing``; ``eta`` is a step option, see `sampling_kwargs`).
        lora_rank, lora_alpha, target_modules: the LoRA as trained (``save_student`` fills them in).
        training_config (`dict`): the trainer's flat config. metrics (`dict`): evaluation numbers.
        created (`str`): ISO-8601 UTC time of saving.
    """

    name: str
    base_model: str
    method: str
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
        if self.lora_rank is not None and not (is_int(self.lora_rank) and self.lora_rank >= 1):
            raise bad("lora_rank", "a positive integer or null")
        if self.lora_alpha is not None and not is_num(self.lora_alpha):
            raise bad("lora_alpha", "a number or null")
        if not (isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules)):
            raise bad("target_modules", "a list of strings")
        if not isinstance(self.created, str):
            raise bad("created", "a string")


# ---------------------------------------------------------------------------------------- names


def validate_name(name: Any) -> str:
    """Return ``name`` if it is a safe student name, else raise `StudentError`.

    A name is 1-64 characters of letters, digits, ``_`` and ``-``, starting with a letter or digit:
    no path separators, no ``..``, no ``.`` (peft adapter names cannot hold one), and not an
    attribute of ``nn.ModuleDict`` (``"train"``, ``"keys"``, ...), where peft stores the adapter.
    """
    if not isinstance(name, str):
        raise StudentError(f"a student name must be a string, got {type(name).__name__}")
    if not _NAME_RE.match(name):
        raise StudentError(
            f"invalid student name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (no '/', '..' or '.')")
    import torch

    if hasattr(torch.nn.ModuleDict(), name):
        raise StudentError(f"invalid student name {name!r}: it clashes with a torch.nn.ModuleDict attribute")
    return name


def student_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<name>``, after checking the name and that the resolved path stays inside the root."""
    validate_name(name)
    base = _root(root).resolve()
    path = (base / name).resolve()
    if path.parent != base:  # e.g. <root>/<name> is a symlink pointing elsewhere
        raise StudentError(f"student {name!r} resolves to {path}, outside the adapters folder {base}")
    return path


# ------------------------------------------------------------------------------------------- LoRA


def _unwrap(model: Any) -> Any:
    """The bare module behind ``torch.compile`` (``._orig_mod``) and (D)DP (``.module``) wrappers."""
    import torch

    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


def attach_lora(
    unet: Any,
    rank: int = 64,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
    dropout: float = 0.0,
):
    """Add a trainable LoRA adapter to a diffusers UNet (peft ``LoraConfig`` + ``unet.add_adapter``).

    Args:
        unet (`UNet2DConditionModel`): the UNet; its own weights are frozen by peft.
        rank (`int`): LoRA rank r (64 in diffusers' LCM-LoRA script).
        alpha (`float`, *optional*): LoRA alpha; the update is scaled by alpha / r. Defaults to r.
        target_modules (`list[str]`, *optional*): module name suffixes; defaults to
            `DEFAULT_TARGET_MODULES`. Names that match nothing in this UNet are dropped.
        adapter_name (`str`): the peft adapter name; it becomes the active adapter.
        dropout (`float`): LoRA dropout.

    Returns:
        The same ``unet``. LoRA parameters are float32 even on a float16/bfloat16 UNet (peft casts
        the input to the LoRA dtype and the result back), so the optimiser updates fp32 weights.
    """
    import torch
    from peft import LoraConfig

    model = _unwrap(unet)
    if not (isinstance(rank, int) and rank >= 1):
        raise StudentError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    wanted = list(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    names = [n for n, _ in model.named_modules()]
    present = [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise StudentError(f"none of the LoRA target modules {wanted} exist in this UNet")
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise StudentError(f"the UNet already has a LoRA adapter named {adapter_name!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=present, lora_dropout=dropout,
                        init_lora_weights=True)
    model.add_adapter(config, adapter_name=adapter_name)
    # Same effect as diffusers.training_utils.cast_training_params, but by name, so it does not
    # depend on which parameters happen to require grad.
    marker = f".{adapter_name}."
    for pname, param in model.named_parameters():
        if "lora_" in pname and marker in pname:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
    return unet


def _lora_state_dict(unet: Any, adapter_name: str) -> tuple[dict, Any]:
    """The adapter's weights (peft keys, UNet-relative) with alpha/r folded into ``lora_B``, and its config."""
    import torch
    from peft.utils import get_peft_model_state_dict

    model = _unwrap(unet)
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise StudentError(
            f"the UNet has no LoRA adapter named {adapter_name!r} (it has: {sorted(configs) or 'none'}); "
            "call attach_lora first")
    config = configs[adapter_name]
    if getattr(config, "use_rslora", False) or getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise StudentError("save_student supports plain LoRA (no rslora, rank_pattern or alpha_pattern)")
    scale = float(config.lora_alpha) / float(config.r)
    peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # Folding alpha/r into lora_B makes the file mean the same thing to every loader, including
    # ones that ignore diffusers' adapter metadata and assume alpha == r.
    folded = {}
    for key, value in peft_sd.items():
        value = value.detach().to("cpu", torch.float32)
        if ".lora_B." in key and scale != 1.0:
            value = value * scale
        folded[key] = value.contiguous()
    if not folded:
        raise StudentError(f"LoRA adapter {adapter_name!r} has no weights to save")
    return folded, config


def _adapter_metadata(config: Any) -> dict:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig kwargs, with alpha = r (already folded)."""
    meta = config.to_dict()
    meta["lora_alpha"] = meta["r"]
    for key, value in list(meta.items()):
        if isinstance(value, set):
            meta[key] = sorted(value)
    # Only what LoraConfig(**meta) can take back and JSON can hold.
    return json.loads(json.dumps({k: v for k, v in meta.items() if k not in ("runtime_config",)}, default=str))


# -------------------------------------------------------------------------------------- on disk


def save_student(
    unet: Any,
    name: str,
    card: StudentCard,
    root: str | os.PathLike | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``<root>/<name>/`` (weights, ``card.json``, ``README.md``) atomically and return the folder.

    The folder is built under a temporary name in the same root and renamed into place; an existing
    student of that name is replaced whole (no stale files survive). ``card.name`` must be ``name``
    (or empty); the LoRA fields of the card are filled from the adapter actually saved, and
    ``created`` is stamped if empty.
    """
    from diffusers import StableDiffusionPipeline

    dest = student_dir(name, root)
    if not isinstance(card, StudentCard):
        raise StudentError(f"card must be a StudentCard, got {type(card).__name__}")
    if card.name and card.name != name:
        raise StudentError(f"card.name {card.name!r} does not match the student name {name!r}")
    state_dict, config = _lora_state_dict(unet, adapter_name)
    card = dataclasses.replace(
        card,
        name=name,
        lora_rank=int(config.r),
        lora_alpha=float(config.lora_alpha),
        target_modules=sorted(config.target_modules),
        created=card.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    card._check()

    base = dest.parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=base))
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp), unet_lora_layers=state_dict, weight_name=WEIGHT_NAME, safe_serialization=True,
            unet_lora_adapter_metadata=_adapter_metadata(config))
        (tmp / CARD_NAME).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
        (tmp / "README.md").write_text(render_readme(card))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=base))
            os.replace(dest, old / name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved student %r to %s", name, dest)
    return dest


def read_card(name: str, root: str | os.PathLike | None = None) -> StudentCard:
    """Read and validate ``<root>/<name>/card.json`` and check the weights file is there."""
    path = student_dir(name, root)
    if not path.is_dir():
        raise StudentError(f"no student {name!r}: {path} does not exist")
    card_path = path / CARD_NAME
    try:
        data = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise StudentError(f"student {name!r} has no card: {card_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudentError(f"student {name!r}: cannot read {card_path}: {e}") from None
    card = StudentCard.from_dict(data)
    if card.name != name:
        raise StudentError(f"student folder {path} holds a card named {card.name!r}")
    _check_weights(path / WEIGHT_NAME, name)
    return card


def _check_weights(path: Path, name: str) -> None:
    """Refuse a missing, non-safetensors or unreadable weights file with a message naming it."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f"; found {', '.join(others)}, but cdlab loads safetensors only" if others else "")
        raise StudentError(f"student {name!r} has no weights: {path} is missing{hint}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # a pickle, a git-lfs pointer, a truncated download, ...
        raise StudentError(f"student {name!r}: {path} is not a readable safetensors file ({e})") from None
    if not any("lora" in k for k in keys):
        raise StudentError(f"student {name!r}: {path} holds no LoRA weights")


def list_students(root: str | os.PathLike | None = None, base_model: str | None = None) -> list[StudentCard]:
    """Valid students under ``root``, sorted by name, optionally only those of ``base_model``.

    Folders that are not valid students (bad name, missing or malformed card, missing or
    non-safetensors weights) are skipped with a warning; temporary ``.``-folders silently.
    """
    base = _root(root)
    if not base.is_dir():
        return []
    cards = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            card = read_card(entry.name, base)
        except StudentError as e:
            logger.warning("skipping %s: %s", entry, e)
            continue
        if base_model is None or card.base_model == base_model:
            cards.append(card)
    return cards


# ----------------------------------------------------------------------------- on a pipeline


def _pipe_and_base(pipe: Any, base_model: str | None) -> tuple[Any, str | None]:
    """Accept a pipeline or a cdlab ``Teacher`` (whose ``base_id`` then is the known base)."""
    if hasattr(pipe, "pipe") and hasattr(pipe.pipe, "unet"):
        return pipe.pipe, base_model if base_model is not None else getattr(pipe, "base_id", None)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "load_lora_weights"):
        raise StudentError(f"expected a diffusers pipeline with LoRA support, got {type(pipe).__name__}")
    return pipe, base_model


def _loaded(pipe: Any) -> set[str]:
    return set(getattr(pipe.unet, "peft_config", None) or {})


def load_student(
    pipe: Any,
    name: str,
    root: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
) -> StudentCard:
    """Load student ``name`` as the peft adapter ``name`` on ``pipe.unet`` and make it the active one.

    Idempotent: a student already on the UNet is not read again (only re-activated).

    Args:
        pipe: a ``StableDiffusionPipeline`` or a cdlab ``Teacher``.
        name (`str`): the student (folder) name.
        root: the adapters root (default `adapters_dir()`).
        base_model (`str`, *optional*): the pipeline's base; a card for another base is refused.
            Defaults to ``Teacher.base_id`` when a Teacher is passed.

    Raises:
        StudentError: bad name, missing folder/card/weights, weights not safetensors, a card for
            another base model, or weights that do not fit this UNet.
    """
    pipe, base_model = _pipe_and_base(pipe, base_model)
    card = read_card(name, root)
    if base_model is not None and card.base_model != base_model:
        raise StudentError(
            f"student {name!r} was distilled from {card.base_model!r}, but this pipeline is {base_model!r}")
    if name not in _loaded(pipe):
        path = student_dir(name, root)
        try:
            with _quiet_multi_adapter():
                pipe.load_lora_weights(str(path), weight_name=WEIGHT_NAME, adapter_name=name, use_safetensors=True)
        except Exception as e:
            _drop_partial(pipe, name)
            raise StudentError(f"student {name!r} ({path / WEIGHT_NAME}) does not load into this UNet: {e}") from e
    activate_student(pipe, name)
    return card


@contextlib.contextmanager
def _quiet_multi_adapter():
    """Silence peft's "multiple adapters" warning: several adapters on one UNet is the design here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        yield


def _drop_partial(pipe: Any, name: str) -> None:
    """Remove a half-injected adapter after a failed load, so a retry starts clean."""
    if name in _loaded(pipe):
        try:
            pipe.delete_adapters(name)
        except Exception:  # best effort; the original error is what the user needs
            logger.debug("could not delete partial adapter %r", name, exc_info=True)


def activate_student(pipe: Any, name: str | None, weight: float = 1.0) -> None:
    """Switch the UNet to adapter ``name`` (alone, at ``weight``); ``None`` disables all LoRA (the teacher).

    Switching does not reload anything: adapters stay on the UNet, only the active set changes.
    """
    pipe, _ = _pipe_and_base(pipe, None)
    if name is None:
        if _loaded(pipe):
            pipe.disable_lora()
        return
    loaded = _loaded(pipe)
    if name not in loaded:
        raise StudentError(
            f"student {name!r} is not loaded on this pipeline (loaded: {sorted(loaded) or 'none'}); "
            "call load_student or load_external_student first")
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[float(weight)])


# ------------------------------------------------------------------------------------ externals


@dataclass(frozen=True)
class ExternalStudent:
    """A published few-step LoRA for SD1.5, with the sampling recipe from its model card.

    ``filename`` is the path inside the hub repo. ``scheduler_kwargs`` mixes constructor options
    and the step option ``eta``, as in `StudentCard`. ``adapter_weight`` is the LoRA scale its card
    uses (1.0 for all four SD1.5 files here).
    """

    key: str
    title: str
    repo_id: str
    filename: str
    scheduler: str
    scheduler_kwargs: dict
    steps: int
    guidance: float
    num_boundaries: int | None
    adapter_weight: float = 1.0
    notes: str = ""


# guidance: every card runs these without CFG (guidance_scale 0 in their snippets). diffusers
# applies CFG only for guidance_scale > 1, so 1.0 is the same computation (one UNet call a step)
# and is how cdlab's samplers and NFE counts spell "no CFG".
EXTERNAL_STUDENTS: dict[str, ExternalStudent] = {
    s.key: s for s in (
        ExternalStudent(
            key="lcm-lora", title="LCM-LoRA", repo_id="latent-consistency/lcm-lora-sdv1-5",
            filename="pytorch_lora_weights.safetensors", scheduler="LCMScheduler", scheduler_kwargs={},
            steps=4, guidance=1.0, num_boundaries=1,
            notes="Card: LCMScheduler, 2-8 steps, guidance 0 or 1-2. 1.0 = no CFG, the cheapest "
                  "setting inside the card's range; above 1 CFG doubles the cost and over-saturates."),
        ExternalStudent(
            key="tcd", title="TCD", repo_id="h1t/TCD-SD15-LoRA",
            filename="pytorch_lora_weights.safetensors", scheduler="TCDScheduler",
            scheduler_kwargs={"eta": 0.3}, steps=4, guidance=1.0, num_boundaries=1,
            notes="Card: TCDScheduler, 4 steps, guidance 0, eta (gamma) 0.3; higher eta for more steps."),
        ExternalStudent(
            key="pcm", title="PCM (4-phase, small CFG)", repo_id="wangfuyun/PCM_Weights",
            filename="sd15/pcm_sd15_smallcfg_4step_converted.safetensors", scheduler="TCDScheduler",
            scheduler_kwargs={"timestep_spacing": "trailing", "eta": 0.0}, steps=4, guidance=1.0,
            num_boundaries=4,
            notes="PCM's own demos: TCDScheduler with trailing spacing, deterministic (eta 0: PCM "
                  "samples its phases without fresh noise), 4 steps for the 4-phase file, guidance "
                  "0-2 for the smallcfg files."),
        ExternalStudent(
            key="hyper-sd", title="Hyper-SD (4-step)", repo_id="ByteDance/Hyper-SD",
            filename="Hyper-SD15-4steps-lora.safetensors", scheduler="DDIMScheduler",
            scheduler_kwargs={"timestep_spacing": "trailing"}, steps=4, guidance=1.0, num_boundaries=4,
            adapter_weight=1.0,
            notes="Card: DDIMScheduler(timestep_spacing='trailing'), guidance 0, fuse_lora() at the "
                  "default scale 1.0 (the 0.125 scale on the card is for Hyper-FLUX, not SD1.5)."),
    )
}


def _hub_download(repo_id: str, filename: str) -> str:
    """``huggingface_hub.hf_hub_download``, looked up at call time (tests patch it)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename)


def load_external_student(pipe: Any, key: str, *, base_model: str | None = None) -> StudentCard:
    """Download (or take from the hub cache) an external student and load it as adapter ``key``.

    Idempotent like `load_student`, and the adapter becomes the active one at its card's weight.
    Returns a `StudentCard` with ``method="external"`` and the card's sampling recipe.
    """
    pipe, base_model = _pipe_and_base(pipe, base_model)
    if key not in EXTERNAL_STUDENTS:
        raise StudentError(f"unknown external student {key!r}; choose from {', '.join(EXTERNAL_STUDENTS)}")
    ext = EXTERNAL_STUDENTS[key]
    if base_model is not None and base_model != SD15_ID:
        raise StudentError(f"{ext.title} is a LoRA for {SD15_ID}; this pipeline is {base_model!r}")
    card = StudentCard(
        name=key, base_model=SD15_ID, method="external", num_boundaries=ext.num_boundaries,
        steps=ext.steps, guidance=ext.guidance, scheduler=ext.scheduler,
        scheduler_kwargs=dict(ext.scheduler_kwargs),
        training_config={"repo_id": ext.repo_id, "filename": ext.filename, "title": ext.title,
                         "adapter_weight": ext.adapter_weight, "notes": ext.notes},
    )
    if key not in _loaded(pipe):
        try:
            local = _hub_download(ext.repo_id, ext.filename)
        except Exception as e:
            raise StudentError(
                f"could not get {ext.filename} from the hub repo {ext.repo_id} ({type(e).__name__}: {e}). "
                "Connect to the internet once, or put the file in the Hugging Face cache "
                "(HF_HOME / HF_HUB_CACHE) and set HF_HUB_OFFLINE=1.") from None
        local = Path(local)
        if local.suffix != ".safetensors":
            raise StudentError(f"{ext.title}: {local} is not a .safetensors file; cdlab loads safetensors only")
        try:
            with _quiet_multi_adapter():
                pipe.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name=key,
                                       use_safetensors=True)
        except Exception as e:
            _drop_partial(pipe, key)
            raise StudentError(f"{ext.title} ({local}) does not load into this UNet: {e}") from e
    activate_student(pipe, key, weight=ext.adapter_weight)
    return card


# ----------------------------------------------------------------------------------- sampling


def _scheduler_init_keys(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def make_scheduler(pipe: Any, card: StudentCard):
    """The diffusers scheduler a card asks for, built from ``pipe.scheduler.config`` plus its kwargs.

    ``"consistency"`` (our own students) gives ``DDIMScheduler`` with trailing spacing and
    ``set_alpha_to_one=True``: cdlab's ``sample_consistency`` reads only its ``alphas_cumprod``, and in
    plain diffusers it is the stock scheduler closest to our sampler (deterministic jumps to the
    clean boundary). The step option ``eta`` is not a constructor option; see `sampling_kwargs`.
    """
    import diffusers

    pipe, _ = _pipe_and_base(pipe, None)
    if card.scheduler == "consistency":
        return diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    cls = getattr(diffusers, card.scheduler, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and card.scheduler.endswith("Scheduler")):
        raise StudentError(f"student {card.name!r}: unknown scheduler {card.scheduler!r}")
    init_keys = _scheduler_init_keys(cls)
    kwargs = {k: v for k, v in card.scheduler_kwargs.items() if k in init_keys}
    return cls.from_config(pipe.scheduler.config, **kwargs)


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
              "mbcd": "multi-boundary consistency distillation", "external": "external"}[card.method]
    rows = [
        ("base model", f"`{card.base_model}`"),
        ("method", f"{card.method} ({method})"),
        ("boundaries N", card.num_boundaries if card.num_boundaries is not None else "-"),
        ("steps", card.steps),
        ("guidance", card.guidance),
        ("scheduler", f"`{card.scheduler}` {json.dumps(card.scheduler_kwargs) if card.scheduler_kwargs else ''}".strip()),
        ("LoRA", f"rank {card.lora_rank}, alpha {card.lora_alpha} (alpha/rank folded into the saved "
                 f"weights), {len(card.target_modules)} target module names"),
        ("created", card.created or "-"),
    ]
    rows += [(f"metric: {k}", v) for k, v in card.metrics.items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
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

## Load it with plain diffusers

```python
from diffusers import StableDiffusionPipeline, {sched_import}

pipe = StableDiffusionPipeline.from_pretrained("{_base_path_hint(card.base_model)}")
pipe.load_lora_weights("adapters/{card.name}", adapter_name="{card.name}")
{sched_line}
image = pipe("a prompt", {call}).images[0]
```

With cdlab: `cdlab.students.load_student(pipe, "{card.name}")`; the sampler cdlab uses is in `card.json`
(`"consistency"` = `cdlab.samplers.sample_consistency` over the student's boundaries).
"""
