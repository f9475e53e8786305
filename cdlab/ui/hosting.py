"""Hosting policy: public hosts, the training gate, who may stop what, what is served, ``spaces.GPU``.

A host is *public* on Hugging Face Spaces (``SPACE_ID`` is set) and behind a ``--share`` link. There:

- training is off unless ``CDLAB_ALLOW_TRAINING=1`` (or ``python app.py --allow-training``);
- a new evaluation is capped at `PUBLIC_EVAL_MAX_PROMPTS` prompts, so it cannot hold the GPU queue
  for minutes while others wait.

Everywhere, a run started from the app can be stopped or resumed only from the browser session that
started it (the local CLI aside: ``kill -TERM`` or ``python -m cdlab train --resume``), and the app
serves previews, metrics, plots and cards, never files from ``runs/`` or the latent cache (no
checkpoints, no optimiser states): `blocked_paths`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# One queue for everything that touches the GPU, so Compare, Evaluate and previews never overlap.
GPU_CONCURRENCY_ID = "gpu"
GPU_CONCURRENCY_LIMIT = 1
QUEUE_MAX_SIZE = 64
# Compare requests all enter the function at once and wait in cdlab's micro-batcher, which serves
# the ones waiting together (one batched UNet call per column); the teacher's lock keeps them and
# Evaluate apart.
COMPARE_CONCURRENCY_ID = "compare"
COMPARE_CONCURRENCY_LIMIT = 48
DEFAULT_CONCURRENCY_LIMIT = 2
MAX_FILE_SIZE = "20mb"
TRAINING_ENV = "CDLAB_ALLOW_TRAINING"

TRAINING_OFF_MESSAGE = (
    "Training is disabled on this public host (a Space or a --share link). Training needs dedicated GPU "
    "hardware for its whole run (ZeroGPU calls are capped at minutes) and is a powerful action; set "
    f"{TRAINING_ENV}=1 (or start the app with --allow-training) to enable it, or run `python app.py` locally."
)


PUBLIC_EVAL_MAX_PROMPTS = 32     # a new evaluation on a public host: at most this many prompts
LOCAL_EVAL_MAX_PROMPTS = 1024
LOCAL_EVAL_DEFAULT_PROMPTS = 128  # `cdlab.evaluate`'s own default on the tiny world


def is_public_host(share: bool = False) -> bool:
    """True on Hugging Face Spaces (the ``SPACE_ID`` variable is set there) or behind a ``--share`` link."""
    return bool(os.environ.get("SPACE_ID")) or bool(share)


def training_allowed(share: bool = False) -> bool:
    """Training is on locally; on a public host (a Space, a ``--share`` link) only when ``CDLAB_ALLOW_TRAINING=1``."""
    if not is_public_host(share):
        return True
    return os.environ.get(TRAINING_ENV, "").strip().lower() in ("1", "true", "yes")


def eval_prompt_limits(share: bool = False) -> tuple[int, int]:
    """``(default, maximum)`` prompts of a new evaluation started from the app on this host."""
    if is_public_host(share):
        return PUBLIC_EVAL_MAX_PROMPTS, PUBLIC_EVAL_MAX_PROMPTS
    return LOCAL_EVAL_DEFAULT_PROMPTS, LOCAL_EVAL_MAX_PROMPTS


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


def batching_allowed() -> bool:
    """Whether Compare may batch concurrent requests on a worker thread: not under ZeroGPU (``spaces``
    importable), where the GPU exists only inside each decorated call."""
    try:
        import spaces  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return True
    return False


def blocked_paths(runs_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """Folders the app never serves, even a file an event returned: run folders (checkpoints, optimiser
    states, logs) and the latent cache. Previews leave ``runs/`` as images the app returns, copied by
    Gradio into its own cache, so only what the app chose to show is ever served."""
    paths = [Path(runs_dir)]
    if cache_dir is not None:
        paths.append(Path(cache_dir))
    return [str(p.resolve()) for p in paths]




# Gradio's cache (the result images, the Compare PNG, uploads) is emptied of files older than `age` seconds
# every `frequency` seconds: ``gr.Blocks(delete_cache=delete_cache())``. Tests shorten it by the variable.
DELETE_CACHE = (300, 900)
DELETE_CACHE_ENV = "CDLAB_DELETE_CACHE"


def delete_cache() -> tuple[int, int]:
    """``(frequency, age)`` in seconds for Gradio's ``delete_cache``: `DELETE_CACHE`, or ``$CDLAB_DELETE_CACHE``
    (two whole numbers >= 1, ``"frequency,age"``)."""
    raw = os.environ.get(DELETE_CACHE_ENV, "").strip()
    if not raw:
        return DELETE_CACHE
    parts = raw.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{DELETE_CACHE_ENV} must be two whole numbers >= 1, 'frequency,age' in seconds; got {raw!r}")
    return int(parts[0]), int(parts[1])


class _SnapshotSet(set):
    """A set whose iteration walks a copy (taken atomically): Gradio's ``delete_cache`` walks each component's files
    on a worker thread while requests add new ones, and a live set then raises "Set changed size during iteration",
    which ends its schedule for good (gradio 6.31): under load nothing was deleted any more."""

    def __iter__(self):
        return iter(set.copy(self))


def safe_delete_cache(demo: Any) -> Any:
    """Make ``demo``'s ``delete_cache`` survive concurrent requests: every file set it walks (each component's, the
    uploads') becomes a `_SnapshotSet`. Call it once the page is built; returns ``demo``."""
    for block in demo.blocks.values():
        if isinstance(getattr(block, "temp_files", None), set):
            block.temp_files = _SnapshotSet(block.temp_files)
    demo.upload_file_set = _SnapshotSet(demo.upload_file_set)
    demo.temp_file_sets = [demo.upload_file_set] + [b.temp_files for b in demo.blocks.values()
                                                    if isinstance(getattr(b, "temp_files", None), _SnapshotSet)]
    return demo
