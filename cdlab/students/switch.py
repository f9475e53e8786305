"""Students on a pipeline: loading them as named peft adapters on ONE UNet, and running the UNet as one of them.

Two public verbs, and loading::

    load_student(pipe, "tiny-mbcd-4")            # or load_external_student(pipe, "lcm-lora"): idempotent
    prepare_student(pipe, "tiny-mbcd-4")         # optional: compute its fused weights now, outside a timed block
    with use_student(pipe, "tiny-mbcd-4"):       # None: the plain teacher
        ...                                      # the UNet runs as the student
    # here the plain teacher is active again

`use_student` chooses how the student runs. By default each layer that carries it gets its fused weight
``W + ΔW`` swapped in (a pointer swap: a plain UNet's cost; the tensors are computed once per version of the
student's file and kept, up to `SWAP_CACHE_BYTES` in all), and the teacher's own tensors are put back after,
bit for bit. A student that is not vanilla LoRA (DoRA or another variant, a LoRA bias) is fused into the base
weights for the block instead, and the base restored bit for bit from a copy. With ``fuse=False`` peft's
unfused adapter runs (the LoRA branch beside each wrapped layer). All three compute the same model.

Loading reads nothing twice: a student is read again only when its weights file changed on disk (retrained,
or another root). Each adapter's version (for a local file: path, ``st_mtime_ns``, ``st_size``, inode) is
recorded on the UNet when it loads. Adapters are always created as normal tensors, even when the caller
samples under ``torch.inference_mode()`` (the app does): an inference-mode LoRA would make peft's
``requires_grad_`` in ``set_adapters`` fail once outside inference mode.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cdlab.paths import shown_path
from cdlab.students.card import StudentCard, StudentError
from cdlab.students.lora import WEIGHT_NAME, unwrap
from cdlab.students.registry import read_card, student_dir

logger = logging.getLogger(__name__)

SWAP_CACHE_BYTES = 2 * 1024**3  # fused weight sets kept across requests (least recently used dropped)

# On the (unwrapped) UNet: {adapter name: the version of the weights it was loaded from}.
_VERSIONS_ATTR = "_cdlab_adapter_files"
# On the (unwrapped) UNet: {adapter name: (version, [(parameter, fused tensor), ...])}, newest last.
_FUSED_ATTR = "_cdlab_fused_weights"
# On the (unwrapped) UNet: {"key": the loaded adapters, "layers": the pipeline's LoRA layers for that key}.
_LAYERS_ATTR = "_cdlab_lora_layers"


# ----------------------------------------------------------------------------- the pipeline and its adapters

def as_pipeline(pipe: Any, base_model: str | None = None) -> tuple[Any, str | None]:
    """``(pipeline, base model)`` from a diffusers pipeline or a cdlab ``Teacher`` (whose ``base_id`` is then the
    base, unless ``base_model`` is given).

    Raises:
        StudentError: ``pipe`` is neither (no UNet, or no LoRA support).
    """
    if hasattr(pipe, "pipe") and hasattr(pipe.pipe, "unet"):
        return pipe.pipe, base_model if base_model is not None else getattr(pipe, "base_id", None)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "load_lora_weights"):
        raise StudentError(f"expected a diffusers pipeline with LoRA support, got {type(pipe).__name__}")
    return pipe, base_model


def _loaded(pipe: Any) -> set[str]:
    return set(getattr(pipe.unet, "peft_config", None) or {})


def _require_loaded(pipe: Any, name: str) -> None:
    loaded = _loaded(pipe)
    if name not in loaded:
        raise StudentError(
            f"student {name!r} is not loaded on this pipeline (loaded: {sorted(loaded) or 'none'}); "
            "call load_student or load_external_student first")


def _attr_dict(pipe: Any, attr: str) -> dict:
    """A dict kept on the pipeline's (unwrapped) UNet under ``attr``, created empty on first use."""
    unet = unwrap(pipe.unet)
    value = getattr(unet, attr, None)
    if not isinstance(value, dict):
        value = {}
        object.__setattr__(unet, attr, value)
    return value


def _versions(pipe: Any) -> dict[str, Any]:
    """The per-adapter weight versions recorded on the pipeline's UNet."""
    return _attr_dict(pipe, _VERSIONS_ATTR)


def _file_version(path: Path) -> tuple:
    """What identifies one version of a local weights file: where it is, when it was written, its size and inode."""
    st = os.stat(path)
    return ("local", str(Path(path).resolve()), st.st_mtime_ns, st.st_size, st.st_ino)


@contextlib.contextmanager
def _quiet_multi_adapter() -> Iterator[None]:
    """Silence peft's "multiple adapters" warning: several adapters on one UNet is the design here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        yield


def _drop_partial(pipe: Any, name: str) -> None:
    """Remove a half-injected adapter after a failed load, so a retry starts clean."""
    _attr_dict(pipe, _LAYERS_ATTR).clear()
    _versions(pipe).pop(name, None)
    _forget_fused(pipe, name)
    if name in _loaded(pipe):
        try:
            pipe.delete_adapters(name)
        except Exception:  # best effort; the original error is what the user needs
            logger.debug("could not delete partial adapter %r", name, exc_info=True)


def _delete_adapter(pipe: Any, name: str) -> None:
    """Take adapter ``name`` off the UNet (unmerging it first if it is fused), forgetting its version."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    for module in unwrap(pipe.unet).modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "merged_adapters", ()):
            module.unmerge()
    _versions(pipe).pop(name, None)
    _forget_fused(pipe, name)
    pipe.delete_adapters(name)
    _attr_dict(pipe, _LAYERS_ATTR).clear()


def _read_adapter(pipe: Any, name: str, path: Path, state_dict: dict | None, what: str) -> None:
    """``pipe.load_lora_weights`` of one safetensors file (or its ``state_dict``, already in a layout diffusers
    loads) as adapter ``name``, as normal (not inference) tensors."""
    try:
        # Inference tensors cannot get requires_grad outside inference mode, which peft's
        # set_adapters does; so the adapter is built as normal tensors whatever mode the caller is in.
        with torch.inference_mode(False), _quiet_multi_adapter():
            if state_dict is None:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name,
                                       use_safetensors=True)
            else:
                pipe.load_lora_weights(state_dict, adapter_name=name)
    except Exception as e:
        _drop_partial(pipe, name)
        raise StudentError(f"{what} ({shown_path(path)}) does not load into this UNet: {e}") from e


# ----------------------------------------------------------------------------- loading

def load_adapter(
    pipe: Any,
    name: str,
    version: Any,
    read: Callable[[], tuple[Path, dict | None]],
    *,
    what: str,
    weight: float = 1.0,
    activate: bool = True,
) -> None:
    """Put a LoRA on the UNet as peft adapter ``name``, unless it is there already in this ``version``.

    The loading step under `load_student` and ``load_external_student``. An adapter ``name`` from another
    version (or loaded by code other than cdlab) is taken off first: unfused, its kept fused weights dropped.

    Args:
        pipe: a ``StableDiffusionPipeline`` or a cdlab ``Teacher``.
        name (`str`): the adapter name.
        version: what identifies the weights (a local file's path, mtime, size and inode; a hub file's repo
            and file name); compared with ``==`` to the version recorded when the adapter was loaded.
        read: called only when the weights must be read: returns the safetensors file, and ``None`` or a state
            dict of it already in a layout diffusers loads.
        what (`str`): how errors name the weights (``"student 'x'"``, ``"TCD"``).
        weight (`float`): the adapter's scale when ``activate``.
        activate (`bool`): make it the UNet's one active adapter (what loading has always done).

    Raises:
        StudentError: ``read`` fails, or the weights do not fit this UNet.
    """
    pipe, _ = as_pipeline(pipe)
    if name not in _loaded(pipe) or _versions(pipe).get(name) != version:
        path, state_dict = read()
        if name in _loaded(pipe):
            logger.info("%s changed (%s); loading it again", what, path)
            _delete_adapter(pipe, name)
        _read_adapter(pipe, name, Path(path), state_dict, what)
        _attr_dict(pipe, _LAYERS_ATTR).clear()  # new LoRA layers: list them again
        _versions(pipe)[name] = version
    if activate:
        _activate(pipe, name, weight)


def load_student(
    pipe: Any,
    name: str,
    root: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    base_fingerprint: str | None = None,
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
        base_fingerprint (`str`, *optional*): the pipeline's base weights (``Teacher.base_fingerprint``); a card
            that records other weights is refused (`StudentCard.fits`). Defaults to the Teacher's, when one is
            passed.
        activate (`bool`): make it the active adapter (default); False leaves the active set as it is
            (`use_student` does not need it).

    Raises:
        StudentError: bad name, missing folder/card/weights, weights not safetensors, a card for
            another base model or for other weights of it, or weights that do not fit this UNet.
    """
    if base_fingerprint is None:
        base_fingerprint = getattr(pipe, "base_fingerprint", None)
    pipe, base_model = as_pipeline(pipe, base_model)
    card = read_card(name, root)
    if base_model is not None and card.base_model != base_model:
        raise StudentError(
            f"student {name!r} was distilled from {card.base_model!r}, but this pipeline is {base_model!r}")
    if not card.fits(base_model, base_fingerprint):
        raise StudentError(
            f"student {name!r} was distilled from other weights of {card.base_model!r} (fingerprint "
            f"{card.base_fingerprint}; this teacher's is {base_fingerprint}): the teacher was retrained or "
            "replaced since, and a LoRA fits only the weights it was trained on. Distil it again from this teacher.")
    path = student_dir(name, root) / WEIGHT_NAME
    try:
        version = _file_version(path)
    except OSError as e:
        raise StudentError(f"student {name!r}: cannot read {shown_path(path)}: {e}") from None
    load_adapter(pipe, name, version, lambda: (path, None), what=f"student {name!r}", activate=activate)
    return card


def unload_student(pipe: Any, name: str) -> None:
    """Take student (adapter) ``name`` off the UNet and drop its kept fused weights; nothing if it is not loaded.

    A student that was fused into the base weights (``pipe.fuse_lora``) is unfused first.
    """
    pipe, _ = as_pipeline(pipe)
    if name in _loaded(pipe):
        _delete_adapter(pipe, name)
    else:
        _versions(pipe).pop(name, None)
        _forget_fused(pipe, name)


# ----------------------------------------------------------------------------- the active adapter (peft)

def _normal_lora_params(pipe: Any) -> int:
    """Replace LoRA parameters that are inference tensors (an adapter loaded under ``inference_mode`` by
    code other than ours) by normal copies; return how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for mname, module in unwrap(pipe.unet).named_modules():
            if "lora_" not in mname:
                continue
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[key] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    replaced += 1
    return replaced


def _lora_layers(pipe: Any) -> list[Any]:
    """The pipeline's peft LoRA layers (UNet and text encoder), listed once per set of loaded adapters: walking
    every module takes milliseconds, as long as a student's whole 4-step sample on the tiny teacher."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    memo = _attr_dict(pipe, _LAYERS_ATTR)
    key = tuple(sorted(_loaded(pipe)))
    if memo.get("key") != key:
        models = [unwrap(pipe.unet)] + [m for m in [getattr(pipe, "text_encoder", None)] if m is not None]
        memo["layers"] = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
        memo["key"] = key
    return memo["layers"]


def _lora_off(pipe: Any) -> None:
    """``pipe.disable_lora()`` (the plain teacher), skipped when every LoRA layer is off already: it walks every
    module and resets ``requires_grad`` each time, several ms per call, twice per Compare column."""
    if _loaded(pipe) and not all(m.disable_adapters for m in _lora_layers(pipe)):
        pipe.disable_lora()


def _activate(pipe: Any, name: str | None, weight: float = 1.0) -> None:
    """Switch the UNet to adapter ``name`` (alone, at ``weight``); ``None`` disables all LoRA (the teacher).

    Switching does not reload anything: adapters stay on the UNet, only the active set changes. Works
    inside and outside ``torch.inference_mode()``.
    """
    pipe, _ = as_pipeline(pipe)
    if name is None:
        _lora_off(pipe)
        return
    _require_loaded(pipe, name)

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


# ----------------------------------------------------------------------------- fused students

@contextlib.contextmanager
def _fused_in_place(pipe: Any, name: str, lora_scale: float = 1.0) -> Iterator[int]:
    """Fuse student ``name`` into the UNet's base weights for the ``with`` block, and give the base back bit
    for bit afterwards (the fallback of `use_student` for LoRA variants); yields how many layers were fused.

    ``pipe.fuse_lora`` adds the LoRA delta into each wrapped layer's base weight and ``unfuse_lora``
    subtracts it again; in float16/bfloat16, ``(W + dW) - dW`` rounds, so a plain fuse + unfuse drifts the
    teacher that every other column and student shares. Here the base parameters (``weight``, ``bias``)
    of every LoRA layer that carries adapter ``name`` are copied first; on exit, normal or by an
    exception, the adapter is unfused and the copies are written back, so the base is exactly what it
    was whatever the dtype. The copies live on the weights' device: about the size of the wrapped layers.
    Fusing does not change which adapter is active.

    Raises:
        StudentError: ``name`` is not loaded, or some adapter is already fused into the UNet (its base
            weights are then not the teacher's, so there is nothing exact to restore).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    pipe, _ = as_pipeline(pipe)
    _require_loaded(pipe, name)
    layers = [m for m in unwrap(pipe.unet).modules() if isinstance(m, BaseTunerLayer)]
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


def _fused_tensors(pipe: Any, name: str) -> list[tuple[Any, Any]] | None:
    """``[(base weight parameter, W + ΔW of adapter name), ...]`` for every layer carrying ``name``, or None when
    some layer is not vanilla LoRA (DoRA or another variant, a LoRA bias): those go through `_fused_in_place`."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    out = []
    with torch.no_grad(), torch.inference_mode(False):
        for m in unwrap(pipe.unet).modules():
            if not isinstance(m, BaseTunerLayer) or name not in getattr(m, "lora_A", {}):
                continue
            if name in (getattr(m, "lora_variant", None) or {}) or (getattr(m, "lora_bias", None) or {}).get(name):
                return None
            if not hasattr(m, "get_delta_weight"):
                return None
            # W + ΔW in W's memory layout (peft's ΔW of a k×k conv comes out transposed in memory: a weight in that
            # layout would make every convolution of the student reorder it, about 3x slower on a CPU)
            out.append((m.get_base_layer().weight, _fused_weight(m, name)))
    return out


def _fused_weight(layer: Any, name: str) -> torch.Tensor:
    """``W + scaling · B A``: the base weight with vanilla LoRA adapter ``name`` fused in, as a new tensor in
    ``W``'s shape, dtype and (contiguous) memory layout.

    For a linear layer, ``B A`` is the product of the two matrices. For a convolution with groups 1, ``A`` is a
    k×k convolution into r channels and ``B`` a 1×1 one out of them, so
    ``ΔW[o, i, u, v] = Σ_r B[o, r] A[r, i, u, v]``: one matrix product on ``A`` flattened to ``[r, i·k·k]``.
    Both are one ``addmm`` into ``W``, with no ΔW-sized temporaries. peft's ``get_delta_weight`` (a convolution
    of ``A`` with ``B`` for a k×k kernel, then the scaling, then the sum: three passes over SD1.5's weights) stays
    the path for every other layer (grouped convolutions, fan-in-fan-out linears) and is the tests' reference.
    """
    base = layer.get_base_layer()
    w = base.weight.detach()
    plain = (isinstance(base, torch.nn.Linear) and not getattr(layer, "fan_in_fan_out", False)) or (
        isinstance(base, torch.nn.Conv2d) and base.groups == 1)
    A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    if not plain or B.dim() != A.dim() or B.shape[2:] not in ((), (1, 1)):
        return (w + layer.get_delta_weight(name).to(w.dtype)).contiguous()
    work = torch.float32 if w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    fused = torch.addmm(w.to(work).flatten(1), B.to(work).flatten(1), A.to(work).flatten(1),
                        alpha=float(layer.scaling[name]))  # as peft: no half-precision matmul on a CPU
    return fused.view(w.shape).to(w.dtype)


def _fused_weights(pipe: Any, name: str) -> list[tuple[Any, Any]] | None:
    """The fused weights `_swapped` swaps in for loaded adapter ``name``: computed on first use and kept per
    version of its file (up to `SWAP_CACHE_BYTES` in all, least recently used dropped); None when the student is
    not vanilla LoRA."""
    pipe, _ = as_pipeline(pipe)
    cache = _attr_dict(pipe, _FUSED_ATTR)
    version = _versions(pipe).get(name)
    entry = cache.pop(name, None)
    if entry is None or entry[0] != version:
        tensors = _fused_tensors(pipe, name)
        if tensors is None:
            return None
        entry = (version, tensors)
    cache[name] = entry  # newest last
    total = 0
    for key in list(cache)[::-1]:
        total += sum(t.numel() * t.element_size() for _, t in cache[key][1])
        if total > SWAP_CACHE_BYTES and key != name:
            cache.pop(key)
    return entry[1]


def _forget_fused(pipe: Any, name: str | None = None) -> None:
    """Drop the kept fused weights of ``name`` (all students when None), e.g. after deleting the adapter."""
    cache = getattr(unwrap(pipe.unet), _FUSED_ATTR, None)
    if isinstance(cache, dict):
        cache.clear() if name is None else cache.pop(name, None)


@contextlib.contextmanager
def _swapped(pipe: Any, name: str) -> Iterator[int]:
    """Run the UNet as student ``name`` with every LoRA disabled and each layer carrying the student holding its
    fused weight ``W + ΔW`` (`_fused_weights`); on exit the teacher's own weight tensors are put back (the same
    tensors, so bit for bit) and LoRA stays disabled. Students that are not vanilla LoRA fall back to
    `_fused_in_place` with the adapter active. Yields how many layers were swapped (or fused)."""
    pipe, _ = as_pipeline(pipe)
    _require_loaded(pipe, name)
    pairs = _fused_weights(pipe, name)
    if pairs is None:
        _activate(pipe, name)
        with _fused_in_place(pipe, name) as n:
            yield n
        return
    _lora_off(pipe)
    originals = [p.data for p, _ in pairs]
    try:
        for p, fused in pairs:
            p.data = fused
        yield len(pairs)
    finally:
        for (p, _), orig in zip(pairs, originals):
            p.data = orig


# ----------------------------------------------------------------------------- the public switch

@contextlib.contextmanager
def use_student(pipe: Any, name: str | None, *, fuse: bool = True) -> Iterator[None]:
    """Run the UNet as student ``name`` for the ``with`` block (``None``: the plain teacher); on exit the plain
    teacher is active again, normally or by an exception.

    The student must already be loaded (`load_student`, ``load_external_student``). With ``fuse`` (the default)
    its fused weights ``W + ΔW`` are swapped in: a plain UNet's cost, computed once per version of its file and
    kept (`prepare_student` computes them ahead); a student that is not vanilla LoRA is fused into the base
    weights for the block instead and restored bit for bit. With ``fuse=False`` peft's unfused adapter runs
    (the LoRA branch evaluated beside every wrapped layer).

    Args:
        pipe: a ``StableDiffusionPipeline`` or a cdlab ``Teacher``.
        name (`str`, *optional*): a loaded adapter, or None for the plain teacher.
        fuse (`bool`): swap in fused weights (default) rather than run the adapter unfused.

    Raises:
        StudentError: ``name`` is not loaded on this pipeline.
    """
    if name is not None and fuse:
        try:
            with _swapped(pipe, name):
                yield
        finally:
            _activate(pipe, None)
        return
    _activate(pipe, name)
    try:
        yield
    finally:
        _activate(pipe, None)


def prepare_student(pipe: Any, name: str | None) -> bool:
    """Compute and keep the fused weights `use_student` swaps in for loaded student ``name``, ahead of time (so a
    timed block does not pay for them). Returns whether the student has fused weights (False for the teacher,
    ``None``, and for students that are not vanilla LoRA, which `use_student` fuses per block instead).

    Raises:
        StudentError: ``name`` is not loaded on this pipeline.
    """
    if name is None:
        return False
    pipe, _ = as_pipeline(pipe)
    _require_loaded(pipe, name)
    return _fused_weights(pipe, name) is not None


# ----------------------------------------------------------------------------- deprecated switches
# The eight ways to switch a student became `use_student`. These names keep old callers working until they move.

def _deprecated(old: str) -> None:
    warnings.warn(f"cdlab.students.{old} is deprecated; use `with cdlab.students.use_student(pipe, name):`",
                  DeprecationWarning, stacklevel=3)


def activate_student(pipe: Any, name: str | None, weight: float = 1.0) -> None:
    """Deprecated: `use_student` (``fuse=False`` for peft's unfused adapter)."""
    _deprecated("activate_student")
    _activate(pipe, name, weight)


def fused_student(pipe: Any, name: str, lora_scale: float = 1.0) -> contextlib.AbstractContextManager[int]:
    """Deprecated: `use_student` (it falls back to fusing in place by itself)."""
    _deprecated("fused_student")
    return _fused_in_place(pipe, name, lora_scale)


def swapped_student(pipe: Any, name: str) -> contextlib.AbstractContextManager[int]:
    """Deprecated: `use_student`."""
    _deprecated("swapped_student")
    return _swapped(pipe, name)


def fused_weights(pipe: Any, name: str) -> list[tuple[Any, Any]] | None:
    """Deprecated: `prepare_student`."""
    _deprecated("fused_weights")
    return _fused_weights(pipe, name)


def forget_swapped(pipe: Any, name: str | None = None) -> None:
    """Deprecated: `unload_student` takes a student off the UNet with its fused weights."""
    _deprecated("forget_swapped")
    _forget_fused(pipe, name)
