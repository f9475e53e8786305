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

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "SD15_ID", "TINY_ID", "FLOW_ID", "adapters_dir", "runs_dir", "evals_dir", "cache_dir",
           "models_dir", "data_roots", "assets_dir", "shown_path", "shown_text", "read_json", "write_json_atomic",
           "write_safetensors_atomic", "confine", "PREVIEW_REFERENCE", "preview_file", "preview_step", "preview_rows"]

REPO_ROOT = Path(__file__).resolve().parent.parent  # the one definition of the repository root

# Where the two teachers come from: the hub repository of Stable Diffusion 1.5, and the base id that the
# embedded tiny teacher (cdlab/assets/tiny-teacher) and its students' cards carry.
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_ID = "cdlab/tiny-teacher"
FLOW_ID = "cdlab/fashion-flow"  # the flow-matching teacher (cdlab.flow), Fashion-MNIST


# A run's previews/ folder: the teacher's reference row and one student row per preview step.
PREVIEW_REFERENCE = "reference.png"
_PREVIEW_RE = re.compile(r"step_(\d+)\.png")


def preview_file(step: int) -> str:
    """The file name of the student's preview row at ``step``: ``step_000120.png``."""
    return f"step_{int(step):06d}.png"


def preview_step(name: str) -> int | None:
    """The step of a preview row's file name (:func:`preview_file`), or None for any other name."""
    m = _PREVIEW_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def preview_rows(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every student preview row in a previews folder as ``(step, path)``, oldest first; other files are not rows."""
    found = ((preview_step(p.name), p) for p in Path(folder).glob("step_*.png"))
    return sorted((step, p) for step, p in found if step is not None)


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


def _shown_roots() -> list[tuple[Path, str, str]]:
    """(folder resolved, folder as configured, the name a page shows for it): the working folders, wherever
    the environment put them, then the repository; the deepest first (``cache/models`` before ``cache``)."""
    roots = [(adapters_dir(), "adapters"), (runs_dir(), "runs"), (evals_dir(), "evals"), (models_dir(), "cache/models"),
             (cache_dir(), "cache")] + [(d, f"data/{d.name}" if i else "data") for i, d in enumerate(data_roots())]
    out = [(Path(d).resolve(), str(d), name) for d, name in roots] + [(REPO_ROOT, str(REPO_ROOT), "")]
    return sorted(out, key=lambda r: -len(r[0].parts))


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as users should see it: relative to the repository, or to the working folder it lies in
    (``adapters/x`` even when ``$CDLAB_ADAPTERS_DIR`` is elsewhere); anything else as given."""
    p = Path(path).resolve()
    for root, _, name in _shown_roots():
        if p == root or root in p.parents:
            rel = p.relative_to(root).as_posix()
            return "/".join(x for x in (name, "" if rel == "." else rel) if x) or "."
    return str(path)


def shown_text(text: str) -> str:
    """``text`` with every working folder and the repository written as `shown_path` writes them, so a
    message, an error or a log line on the page names no machine's folders."""
    for root, configured, name in _shown_roots():
        for form in sorted({str(root), configured}, key=len, reverse=True):
            text = text.replace(form + os.sep, f"{name}/" if name else "").replace(form, name or ".")
    return text


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when it is missing, half-written or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_json_object(path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "file") -> dict[str, Any]:
    """The JSON object in ``path``, for a reader that must say what is wrong (`read_json` answers ``None``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        error: it is not valid JSON, or not a JSON object (the message names the file, the line and ``what``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {shown_path(p)}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{shown_path(p)}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{shown_path(p)}: a {what} must be a JSON object, not {type(data).__name__}")
    return data


FINGERPRINT_DIGITS = 16  # of a weights file's sha256, as a student's card and a Teacher keep it


def weights_fingerprint(path: str | os.PathLike) -> str:
    """The first `FINGERPRINT_DIGITS` hex digits of the sha256 of a weights file: which weights a teacher is,
    whatever device or dtype it is loaded on. A student's card records its teacher's
    (`cdlab.students.card.StudentCard.base_fingerprint`): a LoRA is a delta on those exact weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:FINGERPRINT_DIGITS]


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


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict) -> None:
    """Save ``tensors`` (name -> tensor) as safetensors to a temporary file beside ``path``, then rename it over
    ``path``, as `write_json_atomic` does: a cache file is whole or absent, even when the run is killed."""
    from safetensors.torch import save_file  # lazy: this module is imported before torch is needed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
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
