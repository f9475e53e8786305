"""Adapter roles on one UNet, for training: the teacher, the generator and the fake score share one set of
base weights and differ only in which LoRA adapter is on.

    role            adapter on                        who uses it
    TEACHER (None)  none: the frozen base model       CD's teacher step, DMD's real score, the reference previews
    GENERATOR       ``"default"``: the student LoRA   the student being trained (CD) / DMD's generator
    FAKE_SCORE      ``"fake"``: a second LoRA         DMD's fake score, fitted to the generator's samples

    with adapter_role(unet, None):          # the teacher
        eps_teacher = unet(x_t, t, encoder_hidden_states=c).sample
    with adapter_role(unet, FAKE_SCORE):    # the fake score
        eps_fake = unet(x_t, t, encoder_hidden_states=c).sample
    with swapped_weights(unet, ema):        # the EMA of the LoRA weights copied in, the live ones back after
        target = unet(x_s, s, encoder_hidden_states=c).sample

peft's own switches (``enable_adapters``, ``set_adapter``) also flip ``requires_grad`` (only the active adapter
trainable); `adapter_role` puts every flag back, so each role's optimiser keeps owning its adapter. Inference
(Compare, Evaluate, Edit) switches students with `cdlab.students.use_student` instead.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["TEACHER", "GENERATOR", "FAKE_SCORE", "adapter_role", "swapped_weights", "tuner_layers"]

TEACHER = None          # every adapter off: the base UNet
GENERATOR = "default"   # peft's default adapter name: the student's LoRA (attach_lora's default)
FAKE_SCORE = "fake"     # DMD's fake score, a second LoRA beside the generator's


def tuner_layers(module: torch.nn.Module) -> list[Any]:
    """The peft tuner (LoRA) layers inside ``module``; ``[]`` without peft or adapters."""
    try:  # lazy: peft imports transformers (seconds), and a module without adapters never needs it
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no adapters
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_role(module: torch.nn.Module, role: str | None) -> Iterator[torch.nn.Module]:
    """Run ``module`` (a UNet carrying peft LoRA adapters) in one role inside the block.

    Args:
        module: the UNet.
        role: ``None`` (`TEACHER`): every adapter disabled, the base model; a module without adapters is left
            untouched. An adapter name (`GENERATOR`, `FAKE_SCORE`): that adapter the only active one (peft's
            per-layer ``set_adapter``); ValueError when the module has no adapters or none of that name.

    On exit each layer's enabled state and active adapters are as before, and every parameter's
    ``requires_grad`` is as it was.
    """
    if role is None:
        with _adapters_disabled(module):
            yield module
    else:
        with _adapter_active(module, role):
            yield module


@contextlib.contextmanager
def _adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The teacher: every adapter disabled; enabled states and ``requires_grad`` restored afterwards."""
    layers = tuner_layers(module)
    if not layers:
        yield
        return
    was_disabled = [layer.disable_adapters for layer in layers]
    grad_flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, off in zip(layers, was_disabled):
            layer.enable_adapters(not off)
        for p, flag in grad_flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _adapter_active(module: torch.nn.Module, name: str) -> Iterator[None]:
    """Adapter ``name`` alone active; the previously active one(s) active again afterwards. ``requires_grad`` is
    kept as it was (peft's switch would make only the active adapter trainable): a pass reaches only the adapter
    active in it, so the roles of one UNet's adapters never mix."""
    layers = tuner_layers(module)
    if not layers:
        raise ValueError(f"adapter_role: the module has no LoRA adapters (wanted {name!r})")
    if name not in getattr(layers[0], "lora_A", {}):
        raise ValueError(f"adapter_role: no adapter {name!r} on the module")
    before = [list(layer.active_adapters) for layer in layers]
    grad_flags = [(p, p.requires_grad) for p in module.parameters()]

    def restore_flags():
        for p, flag in grad_flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    try:
        for layer in layers:
            layer.set_adapter(name)
        restore_flags()
        yield
    finally:
        for layer, names in zip(layers, before):
            layer.set_adapter(names if len(names) != 1 else names[0])
        restore_flags()


@contextlib.contextmanager
def swapped_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Iterator[torch.nn.Module]:
    """Temporarily copy ``weights`` (parameter name -> tensor, e.g. an EMA of the LoRA weights) into
    ``module``, restoring the live values afterwards. ``None`` (or empty) is a no-op; KeyError for a name
    that is not a parameter of ``module``."""
    if not weights:
        yield module
        return
    params = dict(module.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise KeyError(f"swapped_weights: {len(missing)} names are not parameters of the model, e.g. {missing[0]!r}")
    saved = {}
    with torch.no_grad():
        for k, v in weights.items():
            saved[k] = params[k].detach().clone()
            params[k].copy_(v)
    try:
        yield module
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
