"""Students on disk: the adapters folder, names, saving, reading and listing.

A student lives in ``adapters/<name>/`` (``CDLAB_ADAPTERS_DIR`` overrides the root)::

    adapters/<name>/pytorch_lora_weights.safetensors   # diffusers' LoRA format; plain diffusers loads it
    adapters/<name>/card.json                          # StudentCard: how it was made and how to sample it
    adapters/<name>/README.md                          # a short model card rendered from card.json

``adapters/SHIPPED`` lists the students that ship with the repository (one name a line, ``#``
comments): `save_student` replaces an existing student only with ``overwrite=True``, and never a
shipped one with ``allow_shipped=False`` (what the app passes).

Publishing is crash-safe: the new folder is written as ``.tmp-<name>-*``, fsynced, and renamed into place; an
overwrite first renames the old one to ``.old-<name>-*/<name>``. The whole save holds a lock on the root folder
(``flock`` on its descriptor, released by the kernel if the process dies), and `tidy` (run by every listing)
restores a stranded ``.old-*`` whose name has no student and removes leftover ``.tmp-*`` folders, whenever no
save holds that lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; `tidy` then leaves leftovers alone
    fcntl = None  # type: ignore[assignment]

from safetensors import safe_open

from cdlab.paths import adapters_dir, shown_path
from cdlab.students.card import StudentCard, StudentError, render_readme, validate_name
from cdlab.students.lora import WEIGHT_NAME, adapter_metadata, lora_state_dict
from cdlab.train.checkpoints import fsync_dir, fsync_tree  # the one fsync helpers (light: no torch)

logger = logging.getLogger(__name__)

CARD_NAME = "card.json"
SHIPPED_NAME = "SHIPPED"  # <root>/SHIPPED: the students that ship with the repository


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else adapters_dir()


def student_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<name>``, after checking the name and that the resolved path stays inside the root."""
    validate_name(name)
    base = _root(root).resolve()
    path = (base / name).resolve()
    if path.parent != base:  # e.g. <root>/<name> is a symlink pointing elsewhere
        raise StudentError(f"student {name!r} resolves to {shown_path(path)}, outside the adapters folder "
                           f"{shown_path(base)}")
    return path


def shipped_students(root: str | os.PathLike | None = None) -> set[str]:
    """The names listed in ``<root>/SHIPPED`` (one a line, ``#`` starts a comment); empty if there is no file."""
    path = _root(root) / SHIPPED_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("cannot read %s: %s", path, e)
        return set()
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


def is_shipped(name: str, root: str | os.PathLike | None = None) -> bool:
    """Whether student ``name`` ships with the repository (is listed in ``<root>/SHIPPED``)."""
    return name in shipped_students(root)


def save_student(
    unet: Any,
    name: str,
    card: StudentCard,
    root: str | os.PathLike | None = None,
    adapter_name: str = "default",
    *,
    overwrite: bool = False,
    allow_shipped: bool = True,
) -> Path:
    """Write ``<root>/<name>/`` (weights, ``card.json``, ``README.md``) atomically and return the folder.

    The folder is built under a temporary name in the same root and renamed into place. An existing
    student of that name is refused unless ``overwrite=True``, and then replaced whole (no stale files
    survive). ``allow_shipped=False`` refuses to replace a student listed in ``<root>/SHIPPED`` even
    with ``overwrite`` (the app passes it; the CLI may retrain a shipped student deliberately).
    ``card.name`` must be ``name`` (or empty); the LoRA fields of the card are filled from the adapter
    actually saved, and ``created`` is stamped if empty.
    """
    from diffusers import StableDiffusionPipeline  # lazy: diffusers takes seconds; listing students never needs it

    dest = student_dir(name, root)
    if not isinstance(card, StudentCard):
        raise StudentError(f"card must be a StudentCard, got {type(card).__name__}")
    if card.name and card.name != name:
        raise StudentError(f"card.name {card.name!r} does not match the student name {name!r}")
    state_dict, config = lora_state_dict(unet, adapter_name)
    card = dataclasses.replace(
        card,
        name=name,
        lora_rank=int(config.r),
        lora_alpha=float(config.lora_alpha),
        target_modules=sorted(config.target_modules),
        created=card.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    card._check()
    _check_destination(dest, name, overwrite, allow_shipped)  # after the input checks: they say more

    base = dest.parent
    base.mkdir(parents=True, exist_ok=True)
    with _publish_lock(base, blocking=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=base))
        try:
            StableDiffusionPipeline.save_lora_weights(
                str(tmp), unet_lora_layers=state_dict, weight_name=WEIGHT_NAME, safe_serialization=True,
                unet_lora_adapter_metadata=adapter_metadata(config))
            (tmp / CARD_NAME).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n")
            (tmp / "README.md").write_text(render_readme(card))
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            fsync_tree(tmp)  # every file and the folder on disk before the folder is published
            _check_destination(dest, name, overwrite, allow_shipped)  # again: it may have appeared meanwhile
            _swap_in(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("saved student %r to %s", name, dest)
    return dest


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is first renamed to ``.old-<name>-*/<name>`` and put back
    if the second rename fails (a kill in between leaves it for `tidy`)."""
    base, name = dest.parent, dest.name
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=base))
        os.replace(dest, old / name)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.replace(old / name, dest)
        raise
    fsync_dir(base)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _publish_lock(root: Path, blocking: bool) -> Iterator[bool]:
    """Hold the lock of folder ``root`` (``flock`` on its descriptor: no lock file; the kernel drops it when the
    process dies). Yields whether it is held: False when ``blocking`` is off and a save holds it, or where there
    are no advisory locks."""
    if fcntl is None:
        yield blocking
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def tidy(root: str | os.PathLike | None = None) -> list[str]:
    """Repair what a save cut short by a kill left behind, when no save is in progress: a ``.old-<name>-*``
    folder whose ``<name>`` has no student is renamed back (the overwrite never happened), other ``.old-*``
    and every ``.tmp-*`` folder is removed. Returns the names of the students restored."""
    base = _root(root)
    if not base.is_dir() or not any(p.name.startswith((".old-", ".tmp-")) for p in base.iterdir()):
        return []
    restored = []
    with _publish_lock(base, blocking=False) as held:
        if not held:
            return []
        for entry in sorted(base.iterdir()):
            if entry.name.startswith(".old-") and entry.is_dir():
                for inner in entry.iterdir():
                    if inner.is_dir() and not (base / inner.name).exists() and _valid_name(inner.name):
                        os.replace(inner, base / inner.name)
                        restored.append(inner.name)
                        logger.warning("restored student %r from %s (an overwrite was cut short)", inner.name,
                                       entry.name)
            if entry.name.startswith((".old-", ".tmp-")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        fsync_dir(base)
    return restored


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except StudentError:
        return False
    return True


def _check_destination(dest: Path, name: str, overwrite: bool, allow_shipped: bool) -> None:
    """Refuse to replace an existing student without ``overwrite``, or a shipped one without ``allow_shipped``."""
    if not (dest.exists() or dest.is_symlink()):
        return
    if not allow_shipped and is_shipped(name, dest.parent):
        raise StudentError(f"student {name!r} ships with the repository (listed in {dest.parent / SHIPPED_NAME}) "
                           "and is never replaced here; pick another name")
    if not overwrite:
        raise StudentError(f"student {name!r} already exists in {dest.parent}; pass overwrite=True "
                           "(CLI: --overwrite) to replace it, or pick another name")


def read_card(name: str, root: str | os.PathLike | None = None) -> StudentCard:
    """Read and validate ``<root>/<name>/card.json`` and check the weights file is there."""
    path = student_dir(name, root)
    if not path.is_dir() and name in tidy(root):
        path = student_dir(name, root)
    if not path.is_dir():
        raise StudentError(f"no student {name!r}: {shown_path(path)} does not exist")
    card_path = path / CARD_NAME
    try:
        data = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise StudentError(f"student {name!r} has no card: {shown_path(card_path)} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudentError(f"student {name!r}: cannot read {shown_path(card_path)}: {e}") from None
    card = StudentCard.from_dict(data)
    if card.name != name:
        raise StudentError(f"student folder {shown_path(path)} holds a card named {card.name!r}")
    _check_weights(path / WEIGHT_NAME, name)
    return card


def _check_weights(path: Path, name: str) -> None:
    """Refuse a missing, non-safetensors or unreadable weights file with a message naming it."""
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f"; found {', '.join(others)}, but cdlab loads safetensors only" if others else "")
        raise StudentError(f"student {name!r} has no weights: {shown_path(path)} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # a pickle, a git-lfs pointer, a truncated download, ...
        raise StudentError(f"student {name!r}: {shown_path(path)} is not a readable safetensors file ({e})") from None
    if not any("lora" in k for k in keys):
        raise StudentError(f"student {name!r}: {shown_path(path)} holds no LoRA weights")


def list_students(root: str | os.PathLike | None = None, base_model: str | None = None,
                  base_fingerprint: str | None = None) -> list[StudentCard]:
    """Valid students under ``root``, sorted by name, optionally only those of ``base_model`` (and, where a
    card records one, of the weights with ``base_fingerprint``: `StudentCard.fits`; a teacher passes its
    ``base_id`` and ``base_fingerprint``).

    Folders that are not valid students (bad name, missing or malformed card, missing or
    non-safetensors weights) are skipped with a warning; temporary ``.``-folders and files (such as
    ``SHIPPED``) silently.
    """
    base = _root(root)
    if not base.is_dir():
        return []
    tidy(base)
    cards = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            card = read_card(entry.name, base)
        except StudentError as e:
            logger.warning("skipping %s: %s", entry, e)
            continue
        if card.fits(base_model, base_fingerprint):
            cards.append(card)
    return cards


def students_of(teacher: Any, root: str | os.PathLike | None = None) -> list[StudentCard]:
    """`list_students` of a teacher (a cdlab ``Teacher`` or ``FlowTeacher``): its ``base_id`` and its
    ``base_fingerprint``, so that no caller lists by the id and forgets the weights."""
    return list_students(root, base_model=teacher.base_id, base_fingerprint=teacher.base_fingerprint)
