"""A run's checkpoints: the folder (naming, listing, the file manifest, fsync) and the trainer's save and resume.

    python -m cdlab train --model tiny --checkpoint_every 100 --keep_checkpoints 2   # writes checkpoints/ckpt_*
    python -m cdlab train --resume runs/<run_name>                                   # continues from the newest

``<run>/checkpoints/ckpt_XXXXXX/`` is one checkpoint; it is written as ``.tmp-ckpt_XXXXXX``, every file and
the folder fsynced, then renamed (``os.replace``) and the parent fsynced, so a name that matches
``ckpt_XXXXXX`` was complete and on disk when it appeared. Its ``state.json`` lists the other files with
their sizes (``files``); `verify_files` checks a folder against that list. It holds the student's LoRA
(``lora.safetensors``), its EMA, the optimiser, LR schedule, fp16 scaler and every rank's RNG states (DMD adds
the fake score's LoRA and optimiser): `save_checkpoint` writes them, `load_latest` restores the newest readable
one, so a resumed run repeats an uninterrupted one.

The folder helpers import nothing heavy: the app (`cdlab.ui.runs`) lists checkpoints without torch. Saving and
resuming import torch and safetensors when they are called.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

CKPT_RE = re.compile(r"ckpt_(\d{6,})")  # fullmatch
TMP_PREFIX = ".tmp-"   # a save in progress (or cut short by a crash)
OLD_PREFIX = ".old-"   # a checkpoint being deleted (renamed first, so it is never half-deleted under its name)
BAD_PREFIX = ".bad-"   # an unreadable checkpoint that a resume skipped, kept for inspection
STATE = "state.json"


def evenly_spaced(items: list, limit: int) -> list:
    """At most ``limit`` (>= 2) of ``items``, evenly spread, the first and the last kept (the loss chart's points,
    a run's previews)."""
    if len(items) <= limit:
        return list(items)
    k = (len(items) - 1) / (limit - 1)
    return [items[i] for i in sorted({round(i * k) for i in range(limit)})]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated or unreadable files), or none that can."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{int(step):06d}"


def list_checkpoints(run_dir: str | os.PathLike, *, complete: bool = True) -> list[tuple[int, Path]]:
    """Checkpoints ``(step, path)`` of a run, oldest first.

    Temporary and being-deleted folders never match. With ``complete`` (the default) a folder counts only
    when it holds ``state.json``; with ``complete=False`` every published ``ckpt_XXXXXX`` folder is listed
    (whether its files are readable is for the trainer to find out when it resumes).
    """
    folder = Path(run_dir) / "checkpoints"
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        m = CKPT_RE.fullmatch(p.name)
        if m and p.is_dir() and (not complete or (p / STATE).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike, *, complete: bool = False) -> Path | None:
    """The newest published checkpoint folder of a run, or None (see `list_checkpoints` for ``complete``)."""
    ckpts = list_checkpoints(run_dir, complete=complete)
    return ckpts[-1][1] if ckpts else None


# ------------------------------------------------------------------------------------------- manifest

def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """``{name: size}`` of the regular files in a checkpoint folder, except ``state.json`` and hidden files."""
    folder = Path(folder)
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and p.name != STATE and not p.name.startswith(".")}


def verify_files(folder: str | os.PathLike, files: dict[str, int]) -> None:
    """Raise `CheckpointError` unless every file listed in ``files`` is in ``folder`` with its recorded size.

    Files that are not listed are ignored.
    """
    folder = Path(folder)
    if not isinstance(files, dict):
        raise CheckpointError(f"{STATE}: 'files' is not a mapping")
    for name, size in files.items():
        p = folder / name
        try:
            actual = p.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{name} is missing") from None
        if actual != int(size):
            raise CheckpointError(f"{name} has {actual} bytes, {STATE} says {int(size)}")


# ---------------------------------------------------------------------------------------------- fsync

def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (creations, renames) to disk. A no-op where directories cannot be opened
    (Windows) or the filesystem does not sync them (EINVAL)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then each directory deepest first, ``folder`` itself last."""
    folder = Path(folder)
    dirs = []
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            p = Path(root) / n
            if not p.is_symlink():
                fsync_file(p)
        dirs.append(Path(root))
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


# ---------------------------------------------------------------------------------------- save / resume
# ``tr`` is the running `cdlab.train.trainer.Trainer`: its accelerator, rank, step, counters, the student's LoRA
# (``names``/``params``), EMA, optimisers, LR schedule, scaler and generators are what a checkpoint holds.

def save_checkpoint(tr: Any) -> Path:
    """Write ``checkpoints/ckpt_<step>`` under a temporary name, fsync every file and the folder, then
    rename it into place and fsync ``checkpoints/``: a published checkpoint is complete and on disk.
    ``state.json`` lists the other files with their sizes. The last ``keep_checkpoints`` are kept."""
    import torch  # lazy, as below: the folder helpers above stay light for the app
    from safetensors.torch import save_file

    from cdlab.paths import write_json_atomic  # (cdlab imports torch)

    acc = tr.acc
    folder = tr.run_dir / "checkpoints"
    name = checkpoint_name(tr.step)
    tmp = folder / f"{TMP_PREFIX}{name}"
    final = folder / name
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"data_gen": tr.data_gen.get_state(), "loss_gen": tr.loss_gen.get_state(),
           "torch": torch.get_rng_state(), "python": random.getstate(),
           # per-rank fingerprint of the LoRA weights: data-parallel ranks must hold identical ones
           "lora_sums": torch.stack([p.detach().double().sum().cpu() for p in tr.params])}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_rank{tr.rank}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_file({n: p.detach().float().cpu().contiguous() for n, p in zip(tr.names, tr.params)},
                  str(tmp / "lora.safetensors"))
        if tr.ema is not None:
            save_file({n: v.float().cpu().contiguous() for n, v in tr.ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(tr.optimizer.state_dict(), tmp / "optimizer.pt")
        if tr.dmd:
            save_file({n: p.detach().float().cpu().contiguous() for n, p in zip(tr.fake_names, tr.fake_params)},
                      str(tmp / "fake.safetensors"))
            torch.save(tr.fake_optimizer.state_dict(), tmp / "fake_optimizer.pt")
        torch.save(tr.lr_sched.state_dict(), tmp / "lr_scheduler.pt")
        if tr.scaler is not None:
            torch.save(tr.scaler.state_dict(), tmp / "scaler.pt")
        write_json_atomic(tmp / STATE, {
            "step": tr.step, "elapsed_s": tr.elapsed(), "samples_seen": tr.samples_seen,
            "skipped_steps": tr.skipped_steps,
            "world_size": tr.world, "saved": time.time(),
            "files": file_sizes(tmp)})  # every rank's rng file is there (the barrier above)
        fsync_tree(tmp)  # every file, then the folder itself: durable before it is published
        _publish(tr, tmp, final)
    acc.wait_for_everyone()
    return final


def _publish(tr: Any, tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` checkpoint to ``final`` (a same-step one moved aside first), then prune."""
    folder = final.parent
    old = folder / f"{OLD_PREFIX}{final.name}"
    if final.exists():  # the same step saved again: move the old one aside, never half-delete it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)  # the checkpoint exists only once complete
    fsync_dir(folder)
    shutil.rmtree(old, ignore_errors=True)
    # Prune among checkpoints up to this step; newer ones are leftovers a resume found unreadable,
    # replaced when the run reaches their step again.
    done = [p for s, p in list_checkpoints(tr.run_dir, complete=False) if s <= tr.step]
    for stale in done[:-tr.cfg.keep_checkpoints]:
        trash = folder / f"{OLD_PREFIX}{stale.name}"
        try:
            os.replace(stale, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def load_latest(tr: Any) -> None:
    """Restore the newest readable checkpoint: newest first, an unreadable one (missing, truncated or
    corrupt files, or files that differ from its ``state.json`` list) is skipped with a log line.
    Each checkpoint is read and checked whole before anything is applied."""
    import torch

    if tr.acc.is_main_process:  # leftovers of a save or a deletion interrupted by a crash
        for pattern in (f"{TMP_PREFIX}ckpt_*", f"{OLD_PREFIX}ckpt_*"):
            for tmp in (tr.run_dir / "checkpoints").glob(pattern):
                shutil.rmtree(tmp, ignore_errors=True)
    ckpts = list_checkpoints(tr.run_dir, complete=False)
    if not ckpts:
        tr.log(f"resume: no complete checkpoint in {tr.run_dir}; starting at step 0")
        return
    skipped, bad = [], []
    for _, path in reversed(ckpts):
        try:
            ck, reason = _read_checkpoint(tr, path), ""
        except CheckpointError as e:
            ck, reason = None, str(e)
        if tr.world > 1:  # every rank resumes from the same checkpoint
            ok = torch.tensor([0.0 if ck is None else 1.0], device=tr.device)
            if float(tr.acc.gather(ok).min()) == 0.0 and ck is not None:
                ck, reason = None, "unreadable on another rank"
        if ck is None:
            tr.log(f"resume: skipping checkpoint {path.name}: {reason}")
            skipped.append(f"{path.name}: {reason}")
            bad.append(path)
            continue
        _apply_checkpoint(tr, ck)
        break
    else:
        raise CheckpointError(f"resume: none of the {len(ckpts)} checkpoints in {tr.run_dir / 'checkpoints'} "
                              "is readable (" + "; ".join(skipped) + ")")
    if tr.acc.is_main_process:
        _set_aside(tr, bad)
    tr.log(f"resume: {ck['path'].name} (step {tr.step})"
           + (f", skipped {len(skipped)} unreadable" if skipped else ""))
    tr.acc.wait_for_everyone()


def _set_aside(tr: Any, bad: list[Path]) -> None:
    """After a resume: unreadable newer checkpoints out of the listing, metrics after the step dropped."""
    # Unreadable newer checkpoints: kept for inspection but out of the listing, so the run's own
    # checkpoint logic (pruning, "is the last step saved?") never counts them.
    for path in bad:
        aside = path.with_name(f"{BAD_PREFIX}{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        tr.log(f"resume: moved unreadable {path.name} aside to {aside.name}")
    # Metrics after the checkpoint belong to the lost interval: drop them, so the curve is one run.
    mfile = tr.run_dir / "metrics.jsonl"
    if mfile.is_file():
        keep = [ln for ln in mfile.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= tr.step]
        tmp = mfile.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, mfile)


def _read_checkpoint(tr: Any, path: Path) -> dict:
    """Every file of checkpoint ``path`` this rank needs, read into memory and checked; nothing is applied.

    Raises `CheckpointError` (with the reason) when the checkpoint is unreadable, ValueError when it is
    readable but does not fit this model (a changed config: an older checkpoint would not fit either)."""
    import torch
    from safetensors.torch import load_file

    try:
        try:
            state = json.loads((path / STATE).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{STATE} is missing") from None
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(f"{STATE} holds no step")
        if "files" in state:
            verify_files(path, state["files"])
        ck = {"path": path, "step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", 0.0)),
              "samples_seen": int(state.get("samples_seen", 0)),
              "skipped_steps": int(state.get("skipped_steps", 0))}
        if checkpoint_name(ck["step"]) != path.name:
            raise CheckpointError(f"{STATE} says step {ck['step']}")
        ck["lora"] = load_file(str(path / "lora.safetensors"))
        ema_file = path / "ema.safetensors"
        ck["ema"] = load_file(str(ema_file)) if tr.ema is not None and ema_file.is_file() else None
        ck["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if tr.dmd:
            ck["fake"] = load_file(str(path / "fake.safetensors"))
            ck["fake_optimizer"] = torch.load(path / "fake_optimizer.pt", map_location="cpu", weights_only=True)
        ck["lr_sched"] = torch.load(path / "lr_scheduler.pt", weights_only=True)
        scaler_file = path / "scaler.pt"
        ck["scaler"] = (torch.load(scaler_file, weights_only=True)
                        if tr.scaler is not None and scaler_file.is_file() else None)
        rng_file = path / f"rng_rank{tr.rank}.pt"  # absent when resumed with more ranks than saved
        ck["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{Path(e.filename).name if e.filename else e} is missing") from e
    except Exception as e:  # truncated or corrupt: safetensors, torch.load (zip, pickle), json errors
        msg = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"unreadable ({type(e).__name__}: {msg})") from e
    _check_checkpoint(tr, ck)
    return ck


def _check_checkpoint(tr: Any, ck: dict) -> None:
    """Raise ValueError (a changed config) or `CheckpointError` (bad contents) unless ``ck`` fits this run."""
    import torch

    path, lora = ck["path"], ck["lora"]
    missing = [n for n in tr.names if n not in lora]
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model's LoRA ({len(missing)} weights missing, "
                         f"e.g. {missing[0]}); was the config changed?")
    bad = [n for n, p in zip(tr.names, tr.params) if tuple(lora[n].shape) != tuple(p.shape)]
    if bad:
        raise ValueError(f"checkpoint {path} does not match this model's LoRA ({bad[0]} has shape "
                         f"{tuple(lora[bad[0]].shape)}); was the config changed?")
    if ck["ema"] is not None and any(n not in ck["ema"] or ck["ema"][n].shape != lora[n].shape for n in tr.names):
        raise CheckpointError("ema.safetensors does not hold the LoRA's weights")
    if tr.dmd:
        fake = ck["fake"]
        if any(n not in fake or tuple(fake[n].shape) != tuple(p.shape) for n, p in zip(tr.fake_names, tr.fake_params)):
            raise CheckpointError("fake.safetensors does not hold the fake score's LoRA weights")
        fo = ck["fake_optimizer"]
        if not isinstance(fo, dict) or not isinstance(fo.get("state"), dict):
            raise CheckpointError("fake_optimizer.pt does not hold an optimizer state")
    opt, current = ck["optimizer"], tr.optimizer.state_dict()
    if (not isinstance(opt, dict) or not isinstance(opt.get("state"), dict)
            or not isinstance(opt.get("param_groups"), list)
            or [len(g.get("params", ())) for g in opt["param_groups"]]
            != [len(g["params"]) for g in current["param_groups"]]):
        raise CheckpointError("optimizer.pt does not hold this optimizer's state")
    if not isinstance(ck["lr_sched"], dict) or "last_epoch" not in ck["lr_sched"]:
        raise CheckpointError("lr_scheduler.pt does not hold a scheduler state")
    if ck["scaler"] is not None and not isinstance(ck["scaler"], dict):
        raise CheckpointError("scaler.pt does not hold a scaler state")
    rng = ck["rng"]
    if rng is not None:
        try:  # dry runs on throwaway generators: the states are well formed
            for key in ("data_gen", "loss_gen", "torch"):
                torch.Generator().set_state(rng[key])
            random.Random().setstate(rng["python"])
        except Exception as e:
            raise CheckpointError(f"rng_rank{tr.rank}.pt holds a bad state ({type(e).__name__}: {e})") from e


def _apply_checkpoint(tr: Any, ck: dict) -> None:
    """Copy a read and checked checkpoint into the run: weights, optimisers, schedule, scaler, RNGs, counters."""
    import torch

    with torch.no_grad():
        for n, p in zip(tr.names, tr.params):
            p.copy_(ck["lora"][n].to(p.device, p.dtype))
    if ck["ema"] is not None:
        tr.ema = {n: v.to(tr.device) for n, v in ck["ema"].items()}
    tr.optimizer.load_state_dict(ck["optimizer"])
    if tr.dmd:
        with torch.no_grad():
            for n, p in zip(tr.fake_names, tr.fake_params):
                p.copy_(ck["fake"][n].to(p.device, p.dtype))
        tr.fake_optimizer.load_state_dict(ck["fake_optimizer"])
    tr.lr_sched.load_state_dict(ck["lr_sched"])
    if ck["scaler"] is not None:
        tr.scaler.load_state_dict(ck["scaler"])
    rng = ck["rng"]
    if rng is not None:
        tr.data_gen.set_state(rng["data_gen"])
        tr.loss_gen.set_state(rng["loss_gen"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    tr.step = ck["step"]
    tr.elapsed_before = ck["elapsed_s"]
    tr.samples_seen = ck["samples_seen"]
    tr.skipped_steps = ck["skipped_steps"]
