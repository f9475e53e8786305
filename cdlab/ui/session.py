"""Choosing and loading the teacher the app serves, and the header line that says what is live."""
from __future__ import annotations

from typing import Any


def default_model() -> str:
    """``sd15`` on CUDA (it falls back to tiny when it cannot load), ``tiny`` elsewhere."""
    import torch

    return "sd15" if torch.cuda.is_available() else "tiny"


def load(model: str | None = None) -> Any:
    """Load the teacher for the app: ``tiny`` | ``sd15`` | ``sd15-random`` | a local folder; None picks `default_model`.

    SD1.5 (asked for or chosen by default) falls back to the tiny teacher when it cannot load; the
    returned teacher's ``fallback_reason`` says why. Other failures raise ``TeacherLoadError``.
    """
    from cdlab.teachers import load_teacher, load_teacher_with_fallback

    name = model or default_model()
    if name == "sd15":
        return load_teacher_with_fallback(name)
    return load_teacher(name)


def header_line(teacher: Any) -> str:
    """The page's header: which teacher, device and dtype are live, and why SD1.5 fell back if it did."""
    line = f"**Teacher:** {teacher.describe()}"
    if getattr(teacher, "base_id", "") == "cdlab/sd15-random":
        line += (" — SD1.5's exact architecture with random weights: every column runs the real SD1.5 code "
                 "path, and every image is noise (nothing here says anything about image quality)")
    reason = getattr(teacher, "fallback_reason", None)
    if reason:
        line += f" — fell back: {reason}"
    return line


# The page's ready signal, written by the page-load event once the lists are fresh: browser tests and
# scripts wait for ``#cdlab-ready`` (a Gradio page keeps a stream open, so "network idle" may never come).
READY_HTML = '<span id="cdlab-ready" data-ready="1" style="display:none">ready</span>'
