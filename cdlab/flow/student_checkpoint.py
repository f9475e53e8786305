"""A flow student run's checkpoint (:func:`cdlab.flow.distill.distill`'s ``checkpoint`` folder): what it saves,
what it restores, and the recipe a run must share with the checkpoint it continues.

A checkpoint is ``student-<step>.safetensors`` (the LoRA weights of every adapter, the run's averages, the random
generator's state), ``optimizer-<step>.safetensors`` (Adam's moments) and ``checkpoint.json`` (the step and the
recipe), written last and atomically: a run continued from it repeats, bit for bit, the run that never stopped.
``cfg`` below is the run's :class:`cdlab.flow.student_config.StudentConfig`.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cdlab.flow.student_config import StudentConfig
from cdlab.paths import read_json, write_json_atomic
from cdlab.students import StudentError

__all__ = ["save_checkpoint", "load_checkpoint", "recipe_changes", "branches_of", "lora_weights", "set_lora_weights"]

CHECKPOINT_JSON = "checkpoint.json"
SCHEDULE = ("lr_decay_steps", "lr_decay_start")  # the rate schedule: it must agree on the steps taken, not after
AVERAGE = "student_ema"  # the saved student's average never steers the training: a run without one may start one
# what a branch may change: not the networks or Adam's groups
BRANCHABLE = ("lr", "batch_size", "pairs", "guidance", "regression_weight", "regression_loss", "fake_steps",
              "gan_weight", "disc_weight", "disc_lr", "gan_clip", "adam_beta1", "shift", "dmd_t_max")


def _recipe(cfg: StudentConfig, teacher: str | Path, init: str | None) -> dict:
    """What a checkpoint must share with the run that continues it: everything but the step budget."""
    return {"config": {k: v for k, v in asdict(cfg).items() if k != "steps"},
            "teacher": str(Path(teacher).resolve()), "init": init}


def save_checkpoint(folder: Path, unet: nn.Module, opt: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
                    generator: torch.Generator, step: int, *, cfg: StudentConfig, teacher: str | Path,
                    init: str | None, average: dict[str, torch.Tensor] | None = None,
                    head: nn.Module | None = None, branches: list[dict] | None = None) -> None:
    """A student run's state after ``step`` steps: ``student-<step>.safetensors`` (the LoRA, ``ema.``-prefixed
    CD's target EMA, ``average.``-prefixed the student's own average, ``disc.``-prefixed DMD2's discriminator
    head, the generator's state),
    ``optimizer-<step>.safetensors`` (Adam's), then ``checkpoint.json`` naming the step (and ``branches``, the
    run's recipe changes, :func:`branches_of`), written last and atomically, so a run killed while saving keeps its
    previous checkpoint."""
    from cdlab.flow.train_teacher import save_optimizer_state

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**lora_weights(unet), **{f"ema.{n}": v.cpu().contiguous() for n, v in (ema or {}).items()},
               **{f"average.{n}": v.cpu().contiguous() for n, v in (average or {}).items()},
               **{f"disc.{n}": v.detach().cpu().contiguous()
                  for n, v in (head.state_dict() if head is not None else {}).items()},
               "generator": generator.get_state()}
    save_file(tensors, str(folder / f"student-{step:07d}.safetensors"))
    save_optimizer_state(opt, folder / f"optimizer-{step:07d}.safetensors")
    write_json_atomic(folder / CHECKPOINT_JSON, {"step": step, **_recipe(cfg, teacher, init),
                                                 **({"branches": branches} if branches else {})})
    for old in [*folder.glob("student-*.safetensors"), *folder.glob("optimizer-*.safetensors")]:
        if old.stem.split("-")[-1] != f"{step:07d}":
            old.unlink(missing_ok=True)


def _changes(saved: dict, cfg: StudentConfig) -> dict[str, tuple[Any, Any]]:
    """:func:`recipe_changes` on a checkpoint's ``checkpoint.json`` as read (``{}``: none)."""
    ran, defaults = saved.get("config") or {}, asdict(type(cfg)())  # a field newer than the checkpoint: its default
    return {key: (ran.get(key, defaults[key]), value) for key, value in asdict(cfg).items()
            if key != "steps" and ran.get(key, defaults[key]) != value}


def recipe_changes(folder: Path, cfg: StudentConfig) -> dict[str, tuple[Any, Any]]:
    """The fields of ``cfg`` (the steps aside) whose value differs from the recipe of the checkpoint in ``folder``,
    each as ``(checkpoint's, cfg's)``; a field newer than the checkpoint counts as its default there. Empty when
    there is no checkpoint."""
    return _changes(read_json(folder / CHECKPOINT_JSON) or {}, cfg)


def branches_of(folder: Path, cfg: StudentConfig | None = None) -> list[dict]:
    """The recipe changes of the run whose checkpoint is in ``folder``, oldest first: ``{"step": S, "changed":
    {field: [before, after]}}`` for each time it continued under another recipe from step S, so the student's
    card does not read as one recipe from its first step. With ``cfg``, the run about to continue under it adds
    its own change, if any. Empty for a run that kept one recipe."""
    saved = read_json(folder / CHECKPOINT_JSON) or {}
    past = [b for b in saved.get("branches") or [] if isinstance(b, dict)]
    changed = {} if cfg is None or not saved else _changes(saved, cfg)
    return past + ([{"step": saved.get("step"), "changed": {k: list(v) for k, v in changed.items()}}]
                   if changed else [])


def load_checkpoint(folder: Path, unet: nn.Module, opt: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
                    generator: torch.Generator, *, cfg: StudentConfig, teacher: str | Path, init: str | None,
                    average: dict[str, torch.Tensor] | None = None, head: nn.Module | None = None,
                    branch: bool = False) -> int:
    """Restore what :func:`save_checkpoint` wrote into the run's objects; returns its step (0: none there). A
    checkpoint of another recipe is refused with the field that differs. The rate schedule (``SCHEDULE``'s fields)
    may differ where it gives the same rate at every step the checkpoint took: a constant run's checkpoint at step
    S continues into a fall that starts at S (``--lr-decay-start S``), as if that run had been planned so. A run
    without the student's average (``AVERAGE`` 0) may continue with one, which starts at the checkpoint's weights:
    the average of the steps from the branch on.

    ``branch``: the checkpoint also continues under other values of ``BRANCHABLE``'s fields (a rate, a loss's
    weight, the pairs; the GAN term neither added nor removed), asked for by name. Such a run is no longer the
    one planned from the start: it is that run up to the checkpoint's step, then another recipe, with the fake
    score, the discriminator and Adam's moments kept (a student restarted with ``--init`` loses them, and every
    such restart in docs/flow.md first lost ground)."""
    from cdlab.flow.train_teacher import load_optimizer_state

    saved = read_json(folder / CHECKPOINT_JSON)
    if saved is None:
        return 0
    want = _recipe(cfg, teacher, init)
    for key in ("teacher", "init"):
        if saved.get(key) != want[key]:
            raise StudentError(f"{folder} is a run of {key} {saved.get(key)!r}, not {want[key]!r}")
    changes = _changes(saved, cfg)
    ran = {key: changes[key][0] if key in changes else value for key, value in want["config"].items()}
    for key, (got, value) in changes.items():
        if key in SCHEDULE or (key == AVERAGE and got == 0):
            continue
        if branch and key in BRANCHABLE and (key != "gan_weight" or (got > 0) == (value > 0)):
            continue
        raise StudentError(f"{folder} is a run with {key}={got!r}, not {value!r}: choose a new folder or the same "
                           f"recipe" + (f" (a branch may change {', '.join(BRANCHABLE)}; the GAN term stays on or off)"
                                        if branch else ""))
    step = saved.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= cfg.steps:
        raise StudentError(f"{folder / CHECKPOINT_JSON}: step must be in [1, {cfg.steps}], got {step!r}")
    if any(isinstance(ran[key], bool) or not isinstance(ran[key], int) for key in SCHEDULE):
        raise StudentError(f"{folder / CHECKPOINT_JSON}: {', '.join(SCHEDULE)} must be whole numbers")
    before = type(cfg)(**{**asdict(cfg), **{key: ran[key] for key in SCHEDULE}})
    differ = next((k for k in range(step) if before.rate(k) != cfg.rate(k)), None)
    if differ is not None:  # another schedule continues a run only where the two agree on every step it took
        raise StudentError(f"{folder} ran step {differ} at rate factor {before.rate(differ):g}, where this recipe's "
                           f"schedule ({', '.join(f'{k}={getattr(cfg, k)}' for k in SCHEDULE)}) has "
                           f"{cfg.rate(differ):g}: choose a new folder, or a schedule that agrees up to step {step}")
    tensors = load_file(str(folder / f"student-{step:07d}.safetensors"))
    generator.set_state(tensors.pop("generator"))
    started = average is not None and ran[AVERAGE] == 0  # a branch: its average starts at the weights below
    with torch.no_grad():
        for prefix, avg in (("ema", ema), ("average", None if started else average)):
            for n in avg or {}:
                avg[n].copy_(tensors.pop(f"{prefix}.{n}"))
    if head is not None:
        head.load_state_dict({n[len("disc."):]: tensors.pop(n) for n in list(tensors) if n.startswith("disc.")})
    set_lora_weights(unet, tensors)
    if started:
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for n in average:
                average[n].copy_(params[n])
    load_optimizer_state(opt, folder / f"optimizer-{step:07d}.safetensors")
    return step


def lora_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA parameter of ``unet`` (all its adapters), detached on the CPU, by its parameter name."""
    return {n: p.detach().cpu().contiguous() for n, p in unet.named_parameters() if "lora_" in n}


def set_lora_weights(unet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (parameter name -> tensor) into ``unet``'s LoRA; a name it does not have is refused."""
    params = dict(unet.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"student weights name {unknown[0]!r}, which this UNet's LoRA does not have")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
