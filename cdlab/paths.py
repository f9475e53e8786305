"""Where things live: the repository root, its working folders, and the one JSON reader and atomic writer.

Every folder is read at call time, so an environment override set after import (a test, a Space) applies::

    adapters_dir()   $CDLAB_ADAPTERS_DIR  else <repo>/adapters   students (cdlab.students.registry)
    runs_dir()       $CDLAB_RUNS_DIR      else <repo>/runs       training runs (cdlab.train)
    evals_dir()      $CDLAB_EVALS_DIR     else <repo>/evals      evaluations (cdlab.evaluate)
    cache_dir()      $CDLAB_CACHE_DIR     else <repo>/cache      encoded latents, teacher pairs
    models_dir()     $CDLAB_MODELS_DIR    else <repo>/cache/models   generated stand-in models (sd15-random)
    data_roots()     $CDLAB_DATA_DIRS     else [<repo>/data]     folders the app may read data sets from
    assets_dir()     <repo>/cdlab/assets                         what ships inside the package (the tiny teacher)

and the ids of the two teachers, ``SD15_ID`` (the hub's Stable Diffusion 1.5) and ``TINY_ID`` (the embedded one).

Paths that come from users go through :func:`confine`: resolved, and refused unless inside a given root.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "SD15_ID", "TINY_ID", "adapters_dir", "runs_dir", "evals_dir", "cache_dir", "models_dir", "data_roots",
           "assets_dir", "shown_path", "read_json", "write_json_atomic", "confine"]

REPO_ROOT = Path(__file__).resolve().parent.parent  # the one definition of the repository root

# Where the two teachers come from: the hub repository of Stable Diffusion 1.5, and the base id that the
# embedded tiny teacher (cdlab/assets/tiny-teacher) and its students' cards carry.
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_ID = "cdlab/tiny-teacher"


def _env_or(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else default


def adapters_dir() -> Path:
    """Students: ``$CDLAB_ADAPTERS_DIR``, else ``<repo>/adapters``."""
    return _env_or("CDLAB_ADAPTERS_DIR", REPO_ROOT / "adapters")


def runs_dir() -> Path:
    """Training runs: ``$CDLAB_RUNS_DIR``, else ``<repo>/runs``."""
    return _env_or("CDLAB_RUNS_DIR", REPO_ROOT / "runs")


def evals_dir() -> Path:
    """Evaluations: ``$CDLAB_EVALS_DIR``, else ``<repo>/evals``."""
    return _env_or("CDLAB_EVALS_DIR", REPO_ROOT / "evals")


def cache_dir() -> Path:
    """Encoded latents and teacher pairs: ``$CDLAB_CACHE_DIR``, else ``<repo>/cache``."""
    return _env_or("CDLAB_CACHE_DIR", REPO_ROOT / "cache")


def models_dir() -> Path:
    """Generated stand-in models (``sd15-random``): ``$CDLAB_MODELS_DIR``, else ``<repo>/cache/models``."""
    return _env_or("CDLAB_MODELS_DIR", REPO_ROOT / "cache" / "models")


def data_roots() -> list[Path]:
    """Folders the app may read data sets from: ``$CDLAB_DATA_DIRS`` (``os.pathsep``-separated), else ``<repo>/data``."""
    env = os.environ.get("CDLAB_DATA_DIRS")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return [REPO_ROOT / "data"]


def assets_dir() -> Path:
    """What ships inside the package: ``cdlab/assets`` (the embedded tiny teacher)."""
    return REPO_ROOT / "cdlab" / "assets"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as users should see it: relative to the repository when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when it is missing, half-written or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, fsync it, then rename it over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
