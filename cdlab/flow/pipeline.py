"""The flow teacher as one of the lab's teachers: what Compare, Evaluate and the student switch need of it.

    from cdlab.teachers import load_teacher
    teacher = load_teacher("fashion-flow")           # the shipped teacher, cdlab/assets/fashion-flow
    cond, uncond = teacher.encode(["Sneaker"])        # the "prompt" is a class: one-hot, and zeros for CFG
    runs = run_columns(teacher, teacher_columns(teacher.guidance), ["Sneaker"], seeds=[0])

A flow teacher is a new model class, not a second copy of the lab (issue 24): :class:`FlowTeacher` has the
interface of :class:`cdlab.teachers.Teacher` (``encode``, ``initial_noise``, ``decode``, ``unet``,
``scheduler``, ``pipe``, ``base_id``, ``guidance``), and its ``model_class`` is
:class:`cdlab.flow.model.FlowModel`, so :func:`cdlab.columns.run_columns` samples it with the lab's one loop:
DDIM on :data:`cdlab.flow.model.FLOW_SCHEDULE`, which is Euler on the flow (:mod:`cdlab.flow.model`).
The teacher's reference is therefore Euler with CFG from the lab's first timestep (t = 0.001, not the seed's
t = 0; :mod:`cdlab.flow.model` says why), and its students are Euler steps of their own velocity.

:class:`FlowPipeline` gives the flow UNet the LoRA verbs of a diffusers pipeline (``load_lora_weights``,
``set_adapters``, ``disable_lora``, ``delete_adapters``, ``fuse_lora``), written on peft's layers, so that
:mod:`cdlab.students` (``load_student``, ``use_student``) loads and switches flow students as it does the
tiny teacher's: the same ``adapters/<name>/`` folder, card and file format (``save_student``).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cdlab.flow.data import CLASS_NAMES
from cdlab.flow.model import FLOW_SCHEDULE, FlowModel
from cdlab.paths import FLOW_ID, assets_dir, weights_fingerprint

__all__ = ["FLOW_TEACHER_DIR", "FLOW_GUIDANCE", "FlowPipeline", "FlowTeacher", "is_flow_run", "flow_base_id",
           "load_flow_teacher"]

FLOW_TEACHER_DIR = assets_dir() / "fashion-flow"
# The teacher's CFG scale in the app and for its students: 1.5, not the seed's 5. In the judge's features the
# 10-epoch teacher read FID 60.96 / 24.57 / 31.37 at CFG 1 / 1.5 / 2 (accuracy 0.857 / 0.956 / 0.979), the shipped
# 13-epoch one 22.40 at 1.5 (0.961), and 5 trades diversity for accuracy (docs/flow.md).
FLOW_GUIDANCE = 1.5
_PREFIX = "unet."  # the file's keys, as diffusers' save_lora_weights writes them


def _tuner_layers(unet: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


class FlowPipeline:
    """The flow UNet with the LoRA verbs of a diffusers pipeline (the subset :mod:`cdlab.students` calls).

    Args:
        unet: :class:`cdlab.flow.unet.UNet` (eval mode).

    Adapters are peft LoRA layers injected into the UNet (``inject_adapter_in_model``); their configs are kept
    in ``unet.peft_config`` as diffusers keeps them, which is where the student switch looks.
    """

    schedule_is_fixed = True  # ``scheduler`` is the flow path itself: a consistency student samples on it
    vae_scale_factor = 1  # no VAE: the samples are the pixels (an inpainting mask needs no downsampling)

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.scheduler = FLOW_SCHEDULE
        if not isinstance(getattr(unet, "peft_config", None), dict):
            unet.peft_config = {}

    def load_lora_weights(self, folder: str | Path, weight_name: str | None = None, adapter_name: str = "default",
                          use_safetensors: bool = True) -> None:
        """Inject adapter ``adapter_name`` from ``folder/weight_name`` (a safetensors file with diffusers'
        ``lora_adapter_metadata``: the LoraConfig); every key of the file must land in the UNet."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        if not isinstance(folder, (str, Path)) or not weight_name or not use_safetensors:
            raise ValueError("a flow student loads from a safetensors file: give its folder and weight_name")
        path = Path(folder) / weight_name
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            state = {k[len(_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(_PREFIX)}
        config = {k[len(_PREFIX):]: v for k, v in meta.items() if k.startswith(_PREFIX)}
        if not config or not state:
            raise ValueError(f"{path.name}: no LoRA config or no 'unet.' weights (not a cdlab student file)")
        if adapter_name in self.unet.peft_config:
            raise ValueError(f"adapter {adapter_name!r} is already loaded")
        lora = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
        inject_adapter_in_model(lora, self.unet, adapter_name=adapter_name)
        self.unet.peft_config[adapter_name] = lora
        result = set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            self.delete_adapters(adapter_name)
            raise ValueError(f"{path.name}: {len(result.unexpected_keys)} weights fit no layer of this UNet, "
                             f"e.g. {result.unexpected_keys[0]!r}")
        for layer in _tuner_layers(self.unet):  # loading switches nothing on
            layer.enable_adapters(False)

    def delete_adapters(self, names: str | Sequence[str]) -> None:
        for name in [names] if isinstance(names, str) else list(names):
            for layer in _tuner_layers(self.unet):
                if name in getattr(layer, "lora_A", {}):
                    layer.delete_adapter(name)
            self.unet.peft_config.pop(name, None)

    def disable_lora(self) -> None:
        for layer in _tuner_layers(self.unet):
            layer.enable_adapters(False)

    def enable_lora(self) -> None:
        for layer in _tuner_layers(self.unet):
            layer.enable_adapters(True)

    def set_adapters(self, names: str | Sequence[str], adapter_weights: Sequence[float] | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        weights = list(adapter_weights) if adapter_weights is not None else [1.0] * len(names)
        for layer in _tuner_layers(self.unet):
            layer.set_adapter([n for n in names if n in layer.lora_A])
            for n, w in zip(names, weights):
                if n in layer.lora_A:
                    layer.set_scale(n, float(w))

    def fuse_lora(self, components: Sequence[str] = ("unet",), lora_scale: float = 1.0,
                  adapter_names: Sequence[str] | None = None) -> None:
        if float(lora_scale) != 1.0:
            raise ValueError("a flow student fuses at scale 1 only")
        for layer in _tuner_layers(self.unet):
            names = [n for n in (adapter_names or layer.active_adapters) if n in layer.lora_A]
            if names:
                layer.merge(adapter_names=names)

    def unfuse_lora(self, components: Sequence[str] = ("unet",)) -> None:
        for layer in _tuner_layers(self.unet):
            layer.unmerge()


@dataclass
class FlowTeacher:
    """The class-conditioned flow teacher, with :class:`cdlab.teachers.Teacher`'s interface.

    Args:
        pipe (`FlowPipeline`): the UNet and its schedule.
        name (`str`): what was asked for (``"fashion-flow"`` or a run folder).
        device (`torch.device`), dtype (`torch.dtype`): float32 (BatchNorm, a 0.5M-parameter UNet).
        classes (`tuple[str, ...]`): the names a "prompt" may be, index = class label.
    """

    pipe: FlowPipeline
    name: str
    device: torch.device
    dtype: torch.dtype = torch.float32
    classes: tuple[str, ...] = CLASS_NAMES
    base_id: str = FLOW_ID
    base_fingerprint: str | None = None  # `flow_fingerprint`: which weights its students' cards must name
    fallback_reason: str | None = None
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    model_class = FlowModel  # what the network predicts and on which path: a velocity on the flow
    solver = "Euler"  # DDIM on the flow path is Euler (cdlab.flow.model)
    guidance = FLOW_GUIDANCE
    is_tiny = False
    is_sd15_architecture = False
    resolution = 28
    latent_shape = (1, 28, 28)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def class_index(self, prompt: str) -> int:
        """The label of class name ``prompt`` (exactly one of ``classes``), or ``ValueError`` listing them."""
        if isinstance(prompt, str) and prompt in self.classes:
            return self.classes.index(prompt)
        raise ValueError(f"the flow teacher's prompt is a class, one of {', '.join(self.classes)}; got {prompt!r}")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)``: the classes one-hot ``[B, 10]``, and zeros (the seed's dropped class) for CFG. An
        empty prompt is the unconditional model (zeros), as an empty prompt is for a text teacher."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts must be a non-empty list of class names")
        cond = torch.zeros(len(prompts), len(self.classes))
        for i, p in enumerate(prompts):
            if p != "":
                cond[i, self.class_index(p)] = 1.0
        cond = cond.to(self.device, self.dtype)
        return cond, torch.zeros_like(cond)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """Nothing to warn of: a class name is encoded whole (an unknown one is refused by :meth:`encode`)."""
        return []

    def initial_noise(self, seed: int, batch: int = 1) -> torch.Tensor:
        """Pure noise ``[batch, 1, 28, 28]`` from a CPU generator (the seed's x_0 at t = 0)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((batch, *self.latent_shape), generator=g).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """Samples (pixels in [0, 1], the data end of the flow) -> RGB ``PIL.Image`` s of 28 x 28 (grey)."""
        from PIL import Image

        arr = (latents.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[:, 0]
        return [Image.fromarray(np.repeat(a[:, :, None], 3, axis=2)) for a in arr]

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, 28, 28]`` -> the flow's data ``[B, 1, 28, 28]`` in [0, 1] (grey: the channels'
        mean); the editing loops start from it as a latent teacher's start from ``vae.encode``."""
        return ((images.float().mean(1, keepdim=True) + 1) / 2).clamp(0, 1).to(self.device, self.dtype)

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Samples -> float32 images in [0, 1], ``[B, 3, 28, 28]`` (grey in three channels)."""
        return latents.float().clamp(0, 1).expand(-1, 3, -1, -1).contiguous()

    def describe(self) -> str:
        which = "" if self.base_id == FLOW_ID else f" of the run {self.name!r}"
        return f"Fashion-MNIST flow teacher{which} (class-conditioned, 28 px) · {self.device} · float32"


def is_flow_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a flow teacher as `cdlab.flow.train_teacher` writes one (its ``state.json`` beside
    the weights: the shipped teacher, or a run of the Train tab's), not a diffusers pipeline (``model_index.json``).
    Only the files' presence: `load_flow_teacher` reads and checks them."""
    from cdlab.flow.train_teacher import teacher_weights

    folder = Path(folder)
    return (folder / "state.json").is_file() and teacher_weights(folder).is_file() and \
        not (folder / "model_index.json").exists()


def flow_base_id(folder: str | Path | None = None) -> str:
    """The base id of the flow teacher in ``folder``, what its students' cards name: ``cdlab/fashion-flow`` for the
    shipped one (None), else the folder's resolved path (a LoRA fits only the weights it was trained on)."""
    if folder is None or Path(folder).resolve() == FLOW_TEACHER_DIR.resolve():
        return FLOW_ID
    return str(Path(folder).resolve())


def flow_fingerprint(folder: str | Path | None = None) -> str:
    """The `cdlab.paths.weights_fingerprint` of the flow teacher's weights file in ``folder`` (None: the shipped
    one), what its students' cards record beside `flow_base_id`: a run folder may be trained again in place,
    and the shipped teacher is replaced from time to time, under the same id."""
    from cdlab.flow.train_teacher import teacher_weights

    return weights_fingerprint(teacher_weights(FLOW_TEACHER_DIR if folder is None else folder))


def load_flow_teacher(folder: str | Path | None = None, device: str | torch.device | None = None,
                      name: str = "fashion-flow") -> FlowTeacher:
    """The flow teacher of a run folder (``state.json`` and ``unet.safetensors``; default the shipped one), with
    its `flow_base_id` and the fingerprint of its weights: only its own students load on it (a run folder is
    trained again in place, and the shipped teacher is replaced from time to time)."""
    from cdlab.flow.train_teacher import load_unet

    dev = torch.device(device or "cpu")
    unet = load_unet(FLOW_TEACHER_DIR if folder is None else folder).to(dev).eval().requires_grad_(False)
    return FlowTeacher(pipe=FlowPipeline(unet), name=name, device=dev, base_id=flow_base_id(folder),
                       base_fingerprint=flow_fingerprint(folder))
