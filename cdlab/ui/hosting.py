"""Hosting helpers: Hugging Face Spaces detection, the training gate, ``spaces.GPU`` and launch settings."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# One queue for everything that touches the GPU, so Compare, Evaluate and previews never overlap.
GPU_CONCURRENCY_ID = "gpu"
GPU_CONCURRENCY_LIMIT = 1
QUEUE_MAX_SIZE = 32
DEFAULT_CONCURRENCY_LIMIT = 2
MAX_FILE_SIZE = "20mb"
TRAINING_ENV = "CDLAB_ALLOW_TRAINING"

TRAINING_OFF_MESSAGE = (
    "Training is disabled on this public host. Training needs dedicated GPU hardware for its whole run "
    "(ZeroGPU calls are capped at minutes); duplicate the Space on a dedicated GPU and set "
    f"{TRAINING_ENV}=1 to enable it, or run `python app.py` locally."
)


def is_public_host() -> bool:
    """True on Hugging Face Spaces (the ``SPACE_ID`` variable is set there)."""
    return bool(os.environ.get("SPACE_ID"))


def training_allowed() -> bool:
    """Training is on locally; on a public host only when ``CDLAB_ALLOW_TRAINING=1``."""
    if not is_public_host():
        return True
    return os.environ.get(TRAINING_ENV, "").strip().lower() in ("1", "true", "yes")


def gpu(fn: Callable | None = None, *, duration: int = 60) -> Any:
    """Wrap ``fn`` with ``spaces.GPU(duration=...)`` when the ``spaces`` package is importable.

    Usable bare (``@gpu``) or with arguments (``@gpu(duration=120)``); without ``spaces`` it
    returns ``fn`` unchanged.
    """
    def wrap(f: Callable) -> Callable:
        try:
            import spaces  # type: ignore[import-not-found]
        except ImportError:
            return f
        return spaces.GPU(duration=duration)(f)

    return wrap(fn) if fn is not None else wrap


def allowed_paths(runs_dir: Path, adapters_dir: Path) -> list[str]:
    """The only folders the app may serve files from: training runs and adapters."""
    return [str(Path(runs_dir).resolve()), str(Path(adapters_dir).resolve())]


def runs_dir() -> Path:
    """``runs/`` under the repository root, or ``$CDLAB_RUNS_DIR``."""
    env = os.environ.get("CDLAB_RUNS_DIR")
    return Path(env) if env else repo_root() / "runs"


def adapters_dir() -> Path:
    """``adapters/`` under the repository root, or ``$CDLAB_ADAPTERS_DIR``."""
    env = os.environ.get("CDLAB_ADAPTERS_DIR")
    return Path(env) if env else repo_root() / "adapters"


def evals_dir() -> Path:
    """``evals/`` under the repository root, or ``$CDLAB_EVALS_DIR``."""
    env = os.environ.get("CDLAB_EVALS_DIR")
    return Path(env) if env else repo_root() / "evals"


def repo_root() -> Path:
    import cdlab

    return Path(cdlab.__file__).resolve().parent.parent
