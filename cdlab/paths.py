"""Paths that come from users: confined to a root folder, symlinks resolved, with a message naming the field."""
from __future__ import annotations

import os
from pathlib import Path


def confine(path: str | os.PathLike, roots: list[Path] | tuple[Path, ...], field: str) -> Path:
    """``path`` resolved (symlinks followed), if it lies inside one of ``roots``; else ``ValueError`` naming ``field``.

    Relative paths are taken relative to the first root. ``..``, absolute paths and symlinks that lead
    outside every root are all refused the same way, after resolution, so no spelling gets around it.
    """
    if not roots:
        raise ValueError(f"config: {field}: no folder is allowed here")
    text = os.fspath(path)
    if not text or "\x00" in text:
        raise ValueError(f"config: {field} must be a non-empty path")
    resolved_roots = [Path(r).resolve() for r in roots]
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = resolved_roots[0] / p
    p = p.resolve()
    for r in resolved_roots:
        if p == r or r in p.parents:
            return p
    raise ValueError(f"config: {field} {text!r} is outside the allowed folder(s): "
                     + ", ".join(str(r) for r in resolved_roots))
