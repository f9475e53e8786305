"""The LoRA of a student: attaching a trainable adapter to the UNet, and its on-disk format.

The weights load in plain diffusers, without cdlab::

    pipe.load_lora_weights("adapters/<name>", adapter_name="<name>")

(the LCM-LoRA training script's raw peft output does not, diffusers issue #6392). Ours is what
``UNet2DConditionModel.save_lora_adapter`` writes: ``get_peft_model_state_dict`` keys (``lora_A`` /
``lora_B``, relative to the UNet) behind the ``unet.`` prefix, via ``save_lora_weights``, with the
LoraConfig in the file's ``lora_adapter_metadata``. Not ``convert_state_dict_to_diffusers``: it renames
only the attention keys (``to_q.lora.down``), and diffusers' loader decides the format of the whole
file from its first key, so a LoRA that also covers convs loads with its attention half missing.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from cdlab.students.card import StudentError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name

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


def unwrap(model: Any) -> Any:
    """The bare module behind ``torch.compile`` (``._orig_mod``) and (D)DP (``.module``) wrappers."""
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
    from peft import LoraConfig  # lazy: peft imports transformers (seconds); reading cards never needs it

    model = unwrap(unet)
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
    # The new adapter is the one that trains: active and enabled, even on a UNet whose other adapters were
    # switched off (``use_student(pipe, None)`` disables LoRA layers globally).
    model.enable_adapters()
    model.set_adapter(adapter_name)
    # Same effect as diffusers.training_utils.cast_training_params, but by name, so it does not
    # depend on which parameters happen to require grad.
    marker = f".{adapter_name}."
    for pname, param in model.named_parameters():
        if "lora_" in pname and marker in pname:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
    return unet


def lora_state_dict(unet: Any, adapter_name: str) -> tuple[dict, Any]:
    """The adapter's weights as saved (peft keys, UNet-relative, float32 on the CPU) with alpha/r folded into
    ``lora_B``, and its ``LoraConfig``."""
    from peft.utils import get_peft_model_state_dict

    model = unwrap(unet)
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


def adapter_metadata(config: Any) -> dict:
    """diffusers' ``lora_adapter_metadata``: the LoraConfig kwargs, with alpha = r (already folded)."""
    meta = config.to_dict()
    meta["lora_alpha"] = meta["r"]
    for key, value in list(meta.items()):
        if isinstance(value, set):
            meta[key] = sorted(value)
    # Only what LoraConfig(**meta) can take back and JSON can hold.
    return json.loads(json.dumps({k: v for k, v in meta.items() if k not in ("runtime_config",)}, default=str))
