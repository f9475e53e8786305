"""The page as a whole: choosing and loading the teacher, the header line, the ready signal, and the wiring
every tab shares (the logic's errors shown as messages, refused fields named, the page-load chain).

Gradio is imported where a page is built, never at import time (``python app.py --help`` stays fast).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import torch

from cdlab.paths import shown_text
from cdlab.ui.jobs import JobError

log = logging.getLogger("cdlab.app")
USER_ERRORS = (ValueError, JobError, FileNotFoundError, KeyError)  # InputError, StudentError: ValueErrors


def default_model() -> str:
    """``sd15`` on CUDA (it falls back to tiny when it cannot load), ``tiny`` elsewhere."""
    return "sd15" if torch.cuda.is_available() else "tiny"


def load(model: str | None = None) -> Any:
    """Load the teacher for the app: ``tiny`` | ``sd15`` | ``sd15-random`` | ``fashion-flow`` | a local folder (a
    diffusers pipeline, or a flow teacher's run folder); None picks `default_model`.

    SD1.5 (asked for or chosen by default) falls back to the tiny teacher when it cannot load; the
    returned teacher's ``fallback_reason`` says why. Other failures raise ``TeacherLoadError``.
    """
    from cdlab.teachers import load_teacher, load_teacher_with_fallback  # diffusers: only when a page is served

    name = model or default_model()
    if name == "sd15":
        return load_teacher_with_fallback(name)
    return load_teacher(name)


def load_flow(teacher: Any) -> Any:
    """The shipped flow teacher for the page's flow-matching section, beside the main ``teacher``; None when the
    main teacher is a flow teacher already (``--model fashion-flow``, or a flow teacher's run folder)."""
    from cdlab.teachers import FLOW_TEACHER, class_names, load_teacher

    return None if class_names(teacher) else load_teacher(FLOW_TEACHER, device="cpu")


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


def flow_line(teacher: Any) -> str:
    """The flow-matching section's header: its teacher, what the prompt is, and where the method is told."""
    return (f"**Teacher:** {teacher.describe()} — flow matching from scratch (seed 003, part B): the prompt is a "
            "class; the teacher samples by Euler with CFG, its students (2-rectified flow, multi-boundary CD and DMD) "
            "in 1 to 8 steps without CFG. Method and figures: `docs/flow.md`.")


# The page's ready signal, written by the page-load event once the lists are fresh: browser tests and
# scripts wait for ``#cdlab-ready`` (a Gradio page keeps a stream open, so "network idle" may never come).
READY_HTML = '<span id="cdlab-ready" data-ready="1" style="display:none">ready</span>'


# ----------------------------------------------------------------------------- errors on the page

def internal_error_message(error_id: str) -> str:
    """What the page says for an unexpected failure: no exception text (it may name the server's folders or
    code), only an id the server log records with the full traceback."""
    return (f"Something went wrong on the server (error {error_id}); the server keeps serving. If it happens "
            "again, tell whoever runs the app this id.")


@contextlib.contextmanager
def _as_user_error(name: str) -> Iterator[None]:
    """Raise the logic's errors in the ``with`` block as a gr.Error for the page (see `user_errors`)."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as e:
        raise gr.Error(shown_text(str(e))) from None
    except Exception:  # a bug or a backend failure: still a message, not a dead server
        error_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        log.exception("request failed: error %s in %s", error_id, name)
        raise gr.Error(internal_error_message(error_id)) from None


def user_errors(fn: Callable) -> Callable:
    """Turn the logic's errors into a gr.Error for the page; the server carries on. A user error
    (`USER_ERRORS`: a refused field, a missing student) keeps its message, with the server's folders written
    as `cdlab.paths.shown_text` writes them; anything else is logged in full (``log.exception``, with an id
    and the time) and the page gets `internal_error_message` with that id. A generator function (an event
    that streams its outputs) stays a generator function, so Gradio still streams it."""
    name = getattr(fn, "__name__", str(fn))
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            with _as_user_error(name):
                yield from fn(*args, **kwargs)
        return streamed

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _as_user_error(name):
            return fn(*args, **kwargs)
    return wrapper


_NAMED_CLASSES: dict[tuple, type] = {}


MAX_ECHO = 300  # characters of Gradio's own refusal a field's message keeps (it quotes the value sent)


def _cut(message: str) -> str:
    """``message`` as it is, or its start and its end around an ellipsis when over `MAX_ECHO` characters."""
    return message if len(message) <= MAX_ECHO else f"{message[:MAX_ECHO - 80]} … {message[-70:]}"


def _named_class(cls: type, check: Callable | None = None, methods: tuple = ()) -> type:
    """A subclass of component class ``cls``, with the same name (the page picks a component's code by its
    class name), whose ``preprocess`` prefixes Gradio's own input errors with the component's label. With
    ``check``, ``check(component, payload)`` runs first, on the raw payload, before ``cls`` decodes anything;
    its ``ValueError`` names the field already. ``methods``: (name, function) pairs the subclass overrides."""
    import gradio as gr

    key = (cls, check, methods)
    if key not in _NAMED_CLASSES:
        def preprocess(self, payload):
            if check is not None:
                try:
                    check(self, payload)
                except ValueError as e:
                    raise gr.Error(str(e)) from None
            try:
                return cls.preprocess(self, payload)
            except gr.Error as e:  # Gradio's message quotes the value sent: a hostile one is cut, not echoed whole
                raise gr.Error(f"{self.label}: {_cut(e.message)}") from None
            except Exception as e:  # e.g. an upload that is not an image: refused by name, the server goes on
                raise gr.Error(f"{self.label}: could not read the value ({type(e).__name__})") from None

        attrs = {"preprocess": preprocess, "__module__": cls.__module__, **dict(methods)}
        _NAMED_CLASSES[key] = type(cls.__name__, (cls,), attrs)
    return _NAMED_CLASSES[key]


def named_errors(*components, check: Callable | None = None, methods: dict[str, Callable] | None = None):
    """Prefix Gradio's own input checks (a value out of a slider's range, not among a radio's choices) with
    the component's label, so every refused field is named; our own checks name theirs already. Done on the
    class (a same-named subclass), so it holds for the per-session copies Gradio builds when an update
    changes a component (new choices in a dropdown).

    ``check(component, payload)``: run on the raw payload before the component decodes it (an upload's size
    and pixels; `_named_class`). ``methods``: methods the subclass overrides (a server function's guard)."""
    for comp in components:
        comp.__class__ = _named_class(type(comp), check, tuple(sorted((methods or {}).items())))
    return components


# ----------------------------------------------------------------------------- the page load

def wire_page_load(demo: Any, ready: Any, tabs: Sequence[Any], compare: Any | Sequence[Any]) -> None:
    """Fresh lists on every page load (a student or run that appeared since start shows up; each tab's
    ``load_outputs`` and ``on_load()``, in the order of ``tabs``), then each Compare tab's opening result
    (``compare.then_opening``, in order: the main teacher's first), then the page's ready signal: tests and
    scripts wait for #cdlab-ready, never for network idle."""
    def on_load():
        return tuple(v for tab in tabs for v in tab.on_load())

    outputs = [c for tab in tabs for c in tab.load_outputs]
    event = demo.load(on_load, None, outputs, api_visibility="private")
    for tab in [compare] if not isinstance(compare, (list, tuple)) else compare:
        event = tab.then_opening(event)
    event.then(lambda: READY_HTML, None, ready, api_visibility="private")
