"""A run's checkpoint folder: naming, listing, the file manifest and fsync helpers (no torch here).

``<run>/checkpoints/ckpt_XXXXXX/`` is one checkpoint; it is written as ``.tmp-ckpt_XXXXXX``, every file and
the folder fsynced, then renamed (``os.replace``) and the parent fsynced, so a name that matches
``ckpt_XXXXXX`` was complete and on disk when it appeared. Its ``state.json`` lists the other files with
their sizes (``files``); `verify_files` checks a folder against that list. The trainer
(`cdlab.train.trainer`) writes and reads checkpoints; the app (`cdlab.ui.runs`) only looks at the names,
so this module imports nothing heavy.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

CKPT_RE = re.compile(r"^ckpt_(\d{6,})$")
TMP_PREFIX = ".tmp-"   # a save in progress (or cut short by a crash)
OLD_PREFIX = ".old-"   # a checkpoint being deleted (renamed first, so it is never half-deleted under its name)
BAD_PREFIX = ".bad-"   # an unreadable checkpoint that a resume skipped, kept for inspection
STATE = "state.json"


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
        m = CKPT_RE.match(p.name)
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
