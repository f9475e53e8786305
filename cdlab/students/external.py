"""External students: published few-step LoRAs for SD1.5 (LCM-LoRA, TCD, PCM, Hyper-SD), and the
diffusers scheduler a card asks for.

External students come from the hub through ``load_external_student``; their adapter name is their
catalogue key. They sample with their own diffusers scheduler (`make_scheduler`), which
``cdlab.samplers.sample_scheduler`` runs; `sampling_kwargs` (from ``card``) gives the same recipe for
``pipe(...)``.

The top of the students stack: the catalogue is built on the public names of ``card`` and ``switch``.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from cdlab.paths import SD15_ID
from cdlab.students.card import StudentCard, StudentError, sampling_kwargs
from cdlab.students.switch import as_pipeline, load_adapter

__all__ = ["SD15_ARCH_BASES", "ExternalStudent", "EXTERNAL_STUDENTS", "external_card", "load_external_student",
           "make_scheduler", "sampling_kwargs"]

# Bases an SD1.5 LoRA fits: SD1.5 itself and its architecture with random weights (cdlab.sd15_random),
# on which the tests load the published files' layouts offline.
SD15_ARCH_BASES = (SD15_ID, "cdlab/sd15-random")

logger = logging.getLogger(__name__)


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
    """``huggingface_hub.hf_hub_download``, imported at call time.

    `load_external_student` looks this name up in this module when it runs, so tests patch
    ``cdlab.students.external._hub_download`` (or ``huggingface_hub.hf_hub_download``).
    """
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename)


def external_card(key: str) -> StudentCard:
    """The `StudentCard` of catalogue entry ``key`` (``method="external"``, its scheduler and sampling recipe),
    without loading anything."""
    if key not in EXTERNAL_STUDENTS:
        raise StudentError(f"unknown external student {key!r}; choose from {', '.join(EXTERNAL_STUDENTS)}")
    ext = EXTERNAL_STUDENTS[key]
    return StudentCard(
        name=key, base_model=SD15_ID, method="external", num_boundaries=ext.num_boundaries,
        steps=ext.steps, guidance=ext.guidance, scheduler=ext.scheduler,
        scheduler_kwargs=dict(ext.scheduler_kwargs),
        training_config={"repo_id": ext.repo_id, "filename": ext.filename, "title": ext.title,
                         "adapter_weight": ext.adapter_weight, "notes": ext.notes},
    )


def load_external_student(pipe: Any, key: str, *, base_model: str | None = None, activate: bool = True) -> StudentCard:
    """Download (or take from the hub cache) an external student and load it as adapter ``key``.

    Idempotent like `load_student` (no second download once loaded from this hub file; an adapter of
    that name from anywhere else is replaced), and the adapter becomes the active one at its card's
    weight (``activate=False``: loaded only, the active set left as it is; `use_student` needs no more).
    Works inside and outside ``torch.inference_mode()``; the adapter is normal tensors.
    Returns a `StudentCard` with ``method="external"`` and the card's sampling recipe.
    """
    pipe, base_model = as_pipeline(pipe, base_model)
    card = external_card(key)
    ext = EXTERNAL_STUDENTS[key]
    if base_model is not None and base_model not in SD15_ARCH_BASES:
        raise StudentError(f"{ext.title} is a LoRA for {SD15_ID}; this pipeline is {base_model!r}")

    def read() -> tuple[Path, dict | None]:
        try:
            local = _hub_download(ext.repo_id, ext.filename)  # this module's global: patchable
        except Exception as e:
            raise StudentError(
                f"could not get {ext.filename} from the hub repo {ext.repo_id} ({type(e).__name__}: {e}). "
                "Connect to the internet once, or put the file in the Hugging Face cache "
                "(HF_HOME / HF_HUB_CACHE) and set HF_HUB_OFFLINE=1.") from None
        local = Path(local)
        if local.suffix != ".safetensors":
            raise StudentError(f"{ext.title}: {local} is not a .safetensors file; cdlab loads safetensors only")
        if not local.is_file():
            raise StudentError(f"{ext.title}: cannot read {local}: no such file")
        return local, _diffusers_state_dict(local, pipe.unet.config, ext.title)

    # A hub file is one version: the same repo and file name is not downloaded again.
    load_adapter(pipe, key, ("hub", ext.repo_id, ext.filename), read, what=ext.title, weight=ext.adapter_weight,
                 activate=activate)
    return card


# ----------------------------------------------------------------------- kohya files with SGM names

_SGM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                 "lora_unet_time_embed_", "lora_unet_out_2.")
_SGM_RESNET_PARTS = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
                     "skip_connection": "conv_shortcut"}


def _sgm_block_names(unet_config: Any) -> dict[str, str]:
    """SGM/LDM UNet block names -> diffusers ones, underscore-joined as in kohya keys (SD1.x/2.x layout).

    kohya-style SD1.5 LoRAs name modules either by the diffusers UNet (``down_blocks_0_attentions_0_proj_in``,
    what diffusers loads) or by the original LDM UNet (``input_blocks_1_1_proj_in``), which diffusers maps only
    for SDXL pipelines: on an SD1.5 pipeline such a file fails to load at all.
    """
    lpb = int(unet_config.layers_per_block)
    down, up = list(unet_config.down_block_types), list(unet_config.up_block_types)
    names = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
             "time_embed_2": "time_embedding_linear_2", "middle_block_0": "mid_block_resnets_0",
             "middle_block_1": "mid_block_attentions_0", "middle_block_2": "mid_block_resnets_1"}
    for b, kind in enumerate(down):
        for j in range(lpb):
            i = b * (lpb + 1) + j + 1
            names[f"input_blocks_{i}_0"] = f"down_blocks_{b}_resnets_{j}"
            if "CrossAttn" in kind:
                names[f"input_blocks_{i}_1"] = f"down_blocks_{b}_attentions_{j}"
        if b < len(down) - 1:
            names[f"input_blocks_{(b + 1) * (lpb + 1)}_0_op"] = f"down_blocks_{b}_downsamplers_0_conv"
    for b, kind in enumerate(up):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            names[f"output_blocks_{i}_0"] = f"up_blocks_{b}_resnets_{j}"
            if "CrossAttn" in kind:
                names[f"output_blocks_{i}_1"] = f"up_blocks_{b}_attentions_{j}"
        if b < len(up) - 1:
            at = 2 if "CrossAttn" in kind else 1
            names[f"output_blocks_{b * (lpb + 1) + lpb}_{at}_conv"] = f"up_blocks_{b}_upsamplers_0_conv"
    return names


def _sgm_to_diffusers_keys(state_dict: dict, unet_config: Any) -> dict | None:
    """``state_dict`` with SGM-named ``lora_unet_`` keys renamed to diffusers names, or None when it has none.

    Raises `StudentError` for an SGM name this mapping does not know, rather than letting it be dropped.
    """
    if not any(k.startswith(_SGM_PREFIXES) for k in state_dict):
        return None
    blocks = sorted(_sgm_block_names(unet_config).items(), key=lambda kv: -len(kv[0]))
    out, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith(_SGM_PREFIXES):
            out[key] = value
            continue
        module, _, suffix = key[len("lora_unet_"):].partition(".")
        new = None
        for sgm, diffusers_name in blocks:
            if module == sgm or module.startswith(sgm + "_"):
                rest = module[len(sgm) + 1:]
                if "_resnets_" in diffusers_name and rest:
                    rest = _SGM_RESNET_PARTS.get(rest)
                    if rest is None:
                        break
                new = diffusers_name + ("_" + rest if rest else "")
                break
        if new is None:
            unknown.append(key)
        else:
            out[f"lora_unet_{new}.{suffix}"] = value
    if unknown:
        raise StudentError(f"{len(unknown)} LoRA keys name UNet modules this SD1.x UNet does not have, e.g. "
                           f"{sorted(unknown)[:3]}")
    return out


def _diffusers_state_dict(path: Path, unet_config: Any, what: str) -> dict | None:
    """None when diffusers' SD1.5 loader reads the file as it is; else its state dict with SGM/LDM module names
    (kohya files made on the original UNet) renamed to diffusers' (that loader does not, and refuses such a file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            sgm = any(k.startswith(_SGM_PREFIXES) for k in f.keys())
    except Exception:  # unreadable here: let diffusers' loader say why
        sgm = False
    if not sgm:
        return None
    try:
        state_dict = _sgm_to_diffusers_keys(load_file(str(path)), unet_config)
    except StudentError as e:
        raise StudentError(f"{what} ({path}) does not load into this UNet: {e}") from None
    logger.info("%s: renamed SGM/LDM module names to diffusers' before loading", what)
    return state_dict


# ----------------------------------------------------------------------------------- sampling


def _scheduler_init_keys(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def make_scheduler(pipe: Any, card: StudentCard):
    """The diffusers scheduler a card asks for, built from ``pipe.scheduler.config`` plus its kwargs.

    ``"consistency"`` (our own students) gives ``DDIMScheduler`` with trailing spacing and
    ``set_alpha_to_one=True``: cdlab's ``sample_consistency`` reads only its ``alphas_cumprod``, and in
    plain diffusers it is the stock scheduler closest to our sampler (deterministic jumps to the
    clean boundary). The step option ``eta`` is not a constructor option; see `sampling_kwargs`.
    """
    import diffusers  # lazy: diffusers takes seconds; the catalogue and cards never need it

    pipe, _ = as_pipeline(pipe)
    if card.scheduler == "consistency" and getattr(pipe, "schedule_is_fixed", False):
        return pipe.scheduler  # the flow path itself (cdlab.flow.pipeline): read, never stepped
    if card.scheduler == "consistency":
        return diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    cls = getattr(diffusers, card.scheduler, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and card.scheduler.endswith("Scheduler")):
        raise StudentError(f"student {card.name!r}: unknown scheduler {card.scheduler!r}")
    init_keys = _scheduler_init_keys(cls)
    kwargs = {k: v for k, v in card.scheduler_kwargs.items() if k in init_keys}
    return cls.from_config(pipe.scheduler.config, **kwargs)
