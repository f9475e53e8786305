"""Students on a pipeline: loading them as named peft adapters on ONE UNet, and switching between them.

``load_student`` adds adapter ``<name>``, ``activate_student(pipe, name)`` switches to it,
``activate_student(pipe, None)`` gives back the plain teacher, ``with fused_student(pipe, name):``
fuses a student into the UNet for a block, then restores the teacher's base weights bit for bit, and
``with swapped_student(pipe, name):`` runs the student at a plain UNet's cost by swapping in fused
weights computed once (what Compare uses).
Switching reloads nothing; a student is read again only when its weights file changed on disk
(retrained, or another root): each adapter's file fingerprint (path, ``st_mtime_ns``, ``st_size``,
inode) is recorded on the UNet when it loads.

Adapters are always created as normal tensors, even when the caller samples under
``torch.inference_mode()`` (the app does): an inference-mode LoRA would make peft's
``requires_grad_`` in ``set_adapters`` fail once outside inference mode.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from cdlab.students.card import StudentCard, StudentError
from cdlab.students.lora import WEIGHT_NAME, _unwrap
from cdlab.students.registry import read_card, student_dir

logger = logging.getLogger(__name__)

# On the (unwrapped) UNet: {adapter name: fingerprint of the file it was loaded from}.
_FILES_ATTR = "_cdlab_adapter_files"


def _pipe_and_base(pipe: Any, base_model: str | None) -> tuple[Any, str | None]:
    """Accept a pipeline or a cdlab ``Teacher`` (whose ``base_id`` then is the known base)."""
    if hasattr(pipe, "pipe") and hasattr(pipe.pipe, "unet"):
        return pipe.pipe, base_model if base_model is not None else getattr(pipe, "base_id", None)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "load_lora_weights"):
        raise StudentError(f"expected a diffusers pipeline with LoRA support, got {type(pipe).__name__}")
    return pipe, base_model


def _loaded(pipe: Any) -> set[str]:
    return set(getattr(pipe.unet, "peft_config", None) or {})


def _loaded_files(pipe: Any) -> dict[str, tuple]:
    """The per-adapter file fingerprints recorded on the pipeline's UNet (created empty on first use)."""
    unet = _unwrap(pipe.unet)
    files = getattr(unet, _FILES_ATTR, None)
    if not isinstance(files, dict):
        files = {}
        object.__setattr__(unet, _FILES_ATTR, files)
    return files


def _fingerprint(path: Path, origin: str = "local") -> tuple:
    """What identifies one version of a weights file: where it is, when it was written, its size and inode."""
    st = os.stat(path)
    return (origin, str(Path(path).resolve()), st.st_mtime_ns, st.st_size, st.st_ino)


@contextlib.contextmanager
def _quiet_multi_adapter():
    """Silence peft's "multiple adapters" warning: several adapters on one UNet is the design here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        yield


def _drop_partial(pipe: Any, name: str) -> None:
    """Remove a half-injected adapter after a failed load, so a retry starts clean."""
    _loaded_files(pipe).pop(name, None)
    forget_swapped(pipe, name)
    if name in _loaded(pipe):
        try:
            pipe.delete_adapters(name)
        except Exception:  # best effort; the original error is what the user needs
            logger.debug("could not delete partial adapter %r", name, exc_info=True)


def _delete_adapter(pipe: Any, name: str) -> None:
    """Take adapter ``name`` off the UNet (unmerging it first if it is fused), forgetting its file."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in _unwrap(pipe.unet).modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "merged_adapters", ()):
            module.unmerge()
    _loaded_files(pipe).pop(name, None)
    forget_swapped(pipe, name)
    pipe.delete_adapters(name)


def _load_adapter(pipe: Any, path: Path, name: str, fingerprint: tuple, what: str) -> None:
    """``pipe.load_lora_weights`` of one safetensors file as adapter ``name``, as normal (not inference) tensors."""
    import torch

    try:
        # Inference tensors cannot get requires_grad outside inference mode, which peft's
        # set_adapters does; so the adapter is built as normal tensors whatever mode the caller is in.
        with torch.inference_mode(False), _quiet_multi_adapter():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name,
                                   use_safetensors=True)
    except Exception as e:
        _drop_partial(pipe, name)
        raise StudentError(f"{what} ({path}) does not load into this UNet: {e}") from e
    _loaded_files(pipe)[name] = fingerprint


def load_student(
    pipe: Any,
    name: str,
    root: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    activate: bool = True,
) -> StudentCard:
    """Load student ``name`` as the peft adapter ``name`` on ``pipe.unet`` and make it the active one.

    Idempotent: a student already on the UNet is not read again (only re-activated), unless its
    weights file changed on disk since it was loaded (another mtime, size or inode, e.g. the student
    was retrained, or it comes from another root): then the old adapter is deleted and the file
    loaded again. Works inside and outside ``torch.inference_mode()``; the adapter is normal tensors.

    Args:
        pipe: a ``StableDiffusionPipeline`` or a cdlab ``Teacher``.
        name (`str`): the student (folder) name.
        root: the adapters root (default `adapters_dir()`).
        base_model (`str`, *optional*): the pipeline's base; a card for another base is refused.
            Defaults to ``Teacher.base_id`` when a Teacher is passed.
        activate (`bool`): make it the active adapter (default); False leaves the active set as it is
            (`swapped_student` does not need it).

    Raises:
        StudentError: bad name, missing folder/card/weights, weights not safetensors, a card for
            another base model, or weights that do not fit this UNet.
    """
    pipe, base_model = _pipe_and_base(pipe, base_model)
    card = read_card(name, root)
    if base_model is not None and card.base_model != base_model:
        raise StudentError(
            f"student {name!r} was distilled from {card.base_model!r}, but this pipeline is {base_model!r}")
    path = student_dir(name, root) / WEIGHT_NAME
    try:
        fingerprint = _fingerprint(path)
    except OSError as e:
        raise StudentError(f"student {name!r}: cannot read {path}: {e}") from None
    if name in _loaded(pipe) and _loaded_files(pipe).get(name) != fingerprint:
        logger.info("student %r changed on disk (%s); loading it again", name, path)
        _delete_adapter(pipe, name)
    if name not in _loaded(pipe):
        _load_adapter(pipe, path, name, fingerprint, f"student {name!r}")
    if activate:
        activate_student(pipe, name)
    return card


def _normal_lora_params(pipe: Any) -> int:
    """Replace LoRA parameters that are inference tensors (an adapter loaded under ``inference_mode`` by
    code other than ours) by normal copies; return how many were replaced."""
    import torch

    replaced = 0
    with torch.inference_mode(False):
        for mname, module in _unwrap(pipe.unet).named_modules():
            if "lora_" not in mname:
                continue
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[key] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    replaced += 1
    return replaced


def activate_student(pipe: Any, name: str | None, weight: float = 1.0) -> None:
    """Switch the UNet to adapter ``name`` (alone, at ``weight``); ``None`` disables all LoRA (the teacher).

    Switching does not reload anything: adapters stay on the UNet, only the active set changes. Works
    inside and outside ``torch.inference_mode()``.
    """
    import torch

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

    def switch() -> None:
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[float(weight)])

    with torch.inference_mode(False):
        try:
            switch()
        except RuntimeError as e:
            # peft sets requires_grad on the active adapter: impossible on inference tensors.
            if "inference tensor" not in str(e) or not _normal_lora_params(pipe):
                raise
            switch()


@contextlib.contextmanager
def fused_student(pipe: Any, name: str, lora_scale: float = 1.0) -> Iterator[int]:
    """Fuse student ``name`` into the UNet's base weights for the ``with`` block, and give the base back
    bit for bit afterwards.

    ``pipe.fuse_lora`` adds the LoRA delta into each wrapped layer's base weight and ``unfuse_lora``
    subtracts it again; in float16/bfloat16, ``(W + dW) - dW`` rounds, so a plain fuse + unfuse drifts the
    teacher that every other column and student shares. Here the base parameters (``weight``, ``bias``)
    of every LoRA layer that carries adapter ``name`` are copied first; on exit, normal or by an
    exception, the adapter is unfused and the copies are written back, so the base is exactly what it
    was whatever the dtype. The copies live on the weights' device: about the size of the wrapped layers.

    Fusing does not change which adapter is active; call `activate_student` for that (a fused layer
    runs only its base layer, so fusing the active student is the fast path of the same model).

    Args:
        pipe: a ``StableDiffusionPipeline`` or a cdlab ``Teacher``.
        name (`str`): a loaded adapter (`load_student`, `load_external_student`).
        lora_scale (`float`): the scale the delta is fused at (``pipe.fuse_lora``'s ``lora_scale``).

    Yields:
        `int`: how many LoRA layers were fused.

    Raises:
        StudentError: ``name`` is not loaded, or some adapter is already fused into the UNet (its base
            weights are then not the teacher's, so there is nothing exact to restore).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe, _ = _pipe_and_base(pipe, None)
    loaded = _loaded(pipe)
    if name not in loaded:
        raise StudentError(
            f"student {name!r} is not loaded on this pipeline (loaded: {sorted(loaded) or 'none'}); "
            "call load_student or load_external_student first")
    layers = [m for m in _unwrap(pipe.unet).modules() if isinstance(m, BaseTunerLayer)]
    merged = sorted({a for m in layers for a in m.merged_adapters})
    if merged:
        raise StudentError(
            f"cannot fuse student {name!r}: adapter(s) {merged} are already fused into the UNet; "
            "call pipe.unfuse_lora() first")
    carrying = [m for m in layers if any(name in getattr(m, attr, {}) for attr in m.adapter_layer_names)]
    # (the parameter, a view of its current tensor, a copy of its values) for each base parameter.
    saved: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for layer in carrying:
            for p in layer.get_base_layer().parameters(recurse=False):
                saved.append((p, p.detach(), p.detach().clone()))
    try:
        pipe.fuse_lora(components=["unet"], lora_scale=float(lora_scale), adapter_names=[name])
        yield len(carrying)
    finally:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already unmerged")
                pipe.unfuse_lora(components=["unet"])
        finally:
            with torch.no_grad():
                for p, original, copy in saved:
                    original.copy_(copy)
                    if p.data_ptr() != original.data_ptr():  # a merge that swapped the tensor (safe fusing)
                        p.data = original


# On the (unwrapped) UNet: {adapter name: (file fingerprint, [(parameter, fused tensor), ...])}, newest last.
_SWAP_ATTR = "_cdlab_fused_weights"
SWAP_CACHE_BYTES = 2 * 1024**3  # fused weight sets kept across requests (least recently used dropped)


def _fused_tensors(pipe: Any, name: str) -> list[tuple[Any, Any]] | None:
    """``[(base weight parameter, W + ΔW of adapter name), ...]`` for every layer carrying ``name``, or None when
    some layer is not vanilla LoRA (DoRA or another variant, a LoRA bias): those go through `fused_student`."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    with torch.no_grad(), torch.inference_mode(False):
        for m in _unwrap(pipe.unet).modules():
            if not isinstance(m, BaseTunerLayer) or name not in getattr(m, "lora_A", {}):
                continue
            if name in (getattr(m, "lora_variant", None) or {}) or (getattr(m, "lora_bias", None) or {}).get(name):
                return None
            if not hasattr(m, "get_delta_weight"):
                return None
            w = m.get_base_layer().weight
            out.append((w, (w.detach() + m.get_delta_weight(name).to(w.dtype)).detach()))
    return out


@contextlib.contextmanager
def swapped_student(pipe: Any, name: str) -> Iterator[int]:
    """Run the UNet as student ``name`` at a plain UNet's cost: every LoRA is disabled and each layer carrying
    the student gets its fused weight ``W + ΔW`` swapped in (a pointer swap; the tensors are computed once per
    version of the student's file and kept, up to `SWAP_CACHE_BYTES` in all). On exit the teacher's own
    weight tensors are put back (the same tensors, so bit for bit) and LoRA stays disabled.

    The same model as ``activate_student(pipe, name)`` (peft's merge computes the same ``W + ΔW``), without
    a merge and unmerge per use. Students that are not vanilla LoRA fall back to `fused_student`.

    Yields:
        `int`: how many layers were swapped.
    """
    pipe, _ = _pipe_and_base(pipe, None)
    if name not in _loaded(pipe):
        raise StudentError(
            f"student {name!r} is not loaded on this pipeline (loaded: {sorted(_loaded(pipe)) or 'none'}); "
            "call load_student or load_external_student first")
    entry = fused_weights(pipe, name)
    if entry is None:
        activate_student(pipe, name)
        with fused_student(pipe, name) as n:
            yield n
        return
    pairs = entry
    if _loaded(pipe):
        pipe.disable_lora()
    originals = [p.data for p, _ in pairs]
    try:
        for p, fused in pairs:
            p.data = fused
        yield len(pairs)
    finally:
        for (p, _), orig in zip(pairs, originals):
            p.data = orig


def fused_weights(pipe: Any, name: str) -> list[tuple[Any, Any]] | None:
    """The fused weights `swapped_student` swaps in for loaded adapter ``name``: computed on first use and kept
    per version of its file (up to `SWAP_CACHE_BYTES` in all, least recently used dropped); None when the
    student is not vanilla LoRA. Call it ahead of time to keep the computation out of a timed block."""
    pipe, _ = _pipe_and_base(pipe, None)
    unet = _unwrap(pipe.unet)
    cache = getattr(unet, _SWAP_ATTR, None)
    if not isinstance(cache, dict):
        cache = {}
        object.__setattr__(unet, _SWAP_ATTR, cache)
    fp = _loaded_files(pipe).get(name)
    entry = cache.pop(name, None)
    if entry is None or entry[0] != fp:
        tensors = _fused_tensors(pipe, name)
        if tensors is None:
            return None
        entry = (fp, tensors)
    cache[name] = entry  # newest last
    total = 0
    for key in list(cache)[::-1]:
        total += sum(t.numel() * t.element_size() for _, t in cache[key][1])
        if total > SWAP_CACHE_BYTES and key != name:
            cache.pop(key)
    return entry[1]


def forget_swapped(pipe: Any, name: str | None = None) -> None:
    """Drop the kept fused weights of ``name`` (all students when None), e.g. after deleting the adapter."""
    cache = getattr(_unwrap(pipe.unet), _SWAP_ATTR, None)
    if isinstance(cache, dict):
        cache.clear() if name is None else cache.pop(name, None)
