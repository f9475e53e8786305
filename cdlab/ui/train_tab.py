"""The Train tab's logic: what one poll of a run shows (status, progress, loss chart data, labelled preview)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdlab.ui import previews as previews_mod
from cdlab.ui import runs as runs_mod
from cdlab.ui.jobs import JobManager


@dataclass
class RunView:
    """Everything the Train tab displays for one run (one poll)."""

    run_name: str
    state: str
    status_md: str
    progress_html: str
    loss: Any  # pandas DataFrame for the LinePlot (`cdlab.ui.runs.loss_frame`): step, loss, series; None before
    #            the first loss point (Gradio 6.31's LinePlot fails to draw later data after an empty frame)
    plot_title: str
    preview: Any  # PIL image: the labelled, composed preview (`cdlab.ui.previews.compose`), or None
    preview_caption: str
    log_tail: str
    active: bool  # keep polling
    step: int = 0
    max_steps: int = 0

    def label(self, updated: float = 0.0) -> str:
        """The runs dropdown's label for this run: the same state and step as the status line."""
        return runs_mod.RunInfo(self.run_name, Path(self.run_name), self.state, self.step, self.max_steps,
                                updated=updated).label()


def empty_view() -> RunView:
    """The view with no run selected."""
    return RunView("", "", "_No run selected. Start one, or pick a run from the list._", "", None, "", None, "", "",
                   False)


def _signature(ps: previews_mod.PreviewSet) -> tuple:
    sig = []
    for r in ps.rows:
        try:
            st = r.path.stat()
            sig.append((r.label, str(r.path), st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((r.label, str(r.path), 0, 0))
    return tuple(ps.prompts), tuple(sig)


_COMPOSED: dict[tuple, Any] = {}  # signature -> composed image: a poll a second re-composes only on change


def composed_preview(run_dir: Path) -> tuple[Any, str]:
    """The run's labelled preview (PIL image or None) and its caption, re-composed only when a file changed."""
    ps = previews_mod.read_previews(run_dir)
    if not ps.rows:
        return None, previews_mod.caption(ps)
    sig = _signature(ps)
    if sig not in _COMPOSED:
        if len(_COMPOSED) > 16:
            _COMPOSED.clear()
        _COMPOSED[sig] = previews_mod.compose(ps)
    return _COMPOSED[sig], previews_mod.caption(ps)


def poll(jobs: JobManager, run_name: str | None) -> RunView:
    """Read a run directory once: its state (with this app's process knowledge), metrics and previews."""
    if not run_name:
        return empty_view()
    run_dir = jobs.runs_dir / run_name
    if not run_dir.is_dir():
        return RunView(run_name, "missing", f"_Run {run_name!r} is gone from {jobs.runs_dir}._", "", None, "", None,
                       "", "", False)
    st = jobs.state(run_name)
    state = str(st.get("state", "queued"))
    rows = runs_mod.read_metrics(run_dir)
    p = runs_mod.progress(rows, st)
    line = runs_mod.progress_markdown(p, state)
    msg = str(st.get("message") or "").strip()
    student = st.get("student")
    head = f"**Run** `{run_name}`" + (f" → student `{student}`" if student else "")
    status_md = head + "  \n" + line + (f"  \n{msg}" if msg else "")
    log = str(st.get("log_tail") or "")
    if state == "failed" and log:
        status_md += "  \nThe trainer failed; the last lines of its log are below."
    image, caption = composed_preview(run_dir)
    title = f"{run_name} (resumed at step {', '.join(map(str, p.resumes))})" if p.resumes else run_name
    loss = runs_mod.loss_frame(rows) if rows else None
    return RunView(run_name, state, status_md, runs_mod.progress_html(p, state), loss, title,
                   image, caption, log, state in runs_mod.ACTIVE_STATES, step=p.step, max_steps=p.max_steps)


def read_image(path: Path | None):
    """A PIL copy of an image file (None if it is gone), so the app returns pixels, not a path under runs/."""
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def run_choices(jobs: JobManager, current: RunView | None = None) -> list[tuple[str, str]]:
    """(label, name) pairs for the runs dropdown: every run directory, the CLI's included, newest first.

    ``current`` (the view a poll just built) relabels its run with the state and step of the status line,
    so the list and the status always agree."""
    out = []
    for r in runs_mod.list_runs(jobs.runs_dir):
        if current is not None and r.name == current.run_name and current.state not in ("", "missing"):
            out.append((current.label(r.updated), r.name))
        else:
            out.append((r.label(), r.name))
    return out


# ------------------------------------------------------------------------------ the form

@dataclass
class FormField:
    """One input of the Train form, derived from a `cdlab.train.config.TrainConfig` field."""

    key: str
    label: str
    kind: str  # "choice" | "int" | "float" | "text"
    default: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    info: str = ""


DATA_KINDS = ("tiny world", "image folder", "HF datasets name", "COCO recipe folder")

# The TrainConfig fields the form shows, with their bounds; every other field keeps the trainer's default.
_FORM = [
    ("method", "mode", "choice", {"choices": ("ct", "cd", "mbcd", "dmd"),
                                  "info": "ct: no teacher · cd: one boundary · mbcd: multi-boundary CD · "
                                          "dmd: distribution matching (N = generator steps)"}),
    ("num_boundaries", "boundaries N", "int", {"minimum": 1, "maximum": 8}),
    ("lora_rank", "LoRA rank", "int", {"minimum": 1, "maximum": 256}),
    ("lr", "learning rate", "float", {"minimum": 1e-7, "maximum": 1.0}),
    ("max_steps", "steps", "int", {"minimum": 1, "maximum": 1_000_000}),
    ("batch_size", "batch size", "int", {"minimum": 1, "maximum": 4096}),
    ("guidance", "guidance w (min)", "float", {"minimum": 1.0, "maximum": 20.0}),
    ("guidance_max", "guidance w (max; = min for a fixed w)", "float", {"minimum": 1.0, "maximum": 20.0}),
    ("preview_every", "preview every (steps)", "int", {"minimum": 0, "maximum": 1_000_000}),
    ("student_name", "student name", "text", {"info": "saved to adapters/<name>; letters, digits, - and _"}),
]


def form_fields(model: str, teacher_resolution: int | None = None) -> list[FormField]:
    """The form, with the trainer's defaults for this teacher (its profile fills the ``None`` fields)."""
    from cdlab.train import config as C

    prof = C.PROFILES[C.profile_name(model, teacher_resolution)]
    base = C.TrainConfig()
    out = []
    for key, label, kind, extra in _FORM:
        default = getattr(base, key)
        if default is None:
            default = prof.get(key)
        if key == "num_boundaries" and default is None:
            default = 1 if base.method == "cd" else 4
        if key == "guidance_max" and default is None:
            default = prof.get("guidance")
        if key == "max_steps":
            default = 300 if C.profile_name(model, teacher_resolution) == "tiny" else default
        if key == "preview_every":
            default = 50 if C.profile_name(model, teacher_resolution) == "tiny" else default
        out.append(FormField(key, label, kind, default, **extra))
    return out


def data_value(kind: str, value: str | None, roots: list[Path] | None = None) -> str:
    """The trainer's ``data`` field from the form's data-set choice; checks what can be checked here.

    Folders must lie inside the data folders the host allows (`cdlab.train.config.data_roots`).
    Raises ``ValueError`` for a folder outside them, one that does not exist or has no readable
    ``metadata.jsonl``, or an HF name without the ``datasets`` package.
    """
    from cdlab.train.config import check_data

    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"config: data set kind must be one of {DATA_KINDS}.")
    if value is not None and not isinstance(value, str):
        raise ValueError("config: data set folder or name must be text.")
    value = (value or "").strip()
    if kind == "tiny world":
        return "world"
    if kind in ("image folder", "COCO recipe folder"):
        if not value:
            raise ValueError("Give the data-set folder (with images and a metadata.jsonl)."
                             + (" Make one with `python -m cdlab coco --images DIR --captions FILE --out DIR`."
                                if kind == "COCO recipe folder" else ""))
        folder = Path(check_data(value, roots))
        meta = folder / "metadata.jsonl"
        if not folder.is_dir():
            raise ValueError(f"The data-set folder {value!r} does not exist.")
        try:
            first = next((ln for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip()), None)
            import json as _json

            if first is None or not isinstance(_json.loads(first), dict):
                raise ValueError
        except (OSError, ValueError, UnicodeDecodeError):
            raise ValueError(f"The data-set folder {value!r} has no readable metadata.jsonl "
                             "(one JSON object a line: file_name and text).") from None
        return str(folder)
    if kind == "HF datasets name":
        if not value:
            raise ValueError("Give a Hugging Face datasets name, e.g. 'user/my-captioned-images'.")
        import importlib.util

        name = check_data(value if value.startswith("hf:") else f"hf:{value}", roots)
        if importlib.util.find_spec("datasets") is None:
            raise ValueError("Training on an HF datasets name needs the `datasets` package (pip install datasets).")
        return name
    raise ValueError(f"config: data set kind must be one of {DATA_KINDS}, got {str(kind)[:40]!r}.")


MAX_EXTRA_JSON = 10_000  # characters in the form's advanced box


def _number(f: FormField, v: Any) -> int | float:
    """A form number, checked: finite, whole for int fields, inside the field's range; the message names it."""
    if isinstance(v, bool) or v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"config: {f.label} is empty.")
    try:
        fv = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"config: {f.label} must be a number, got {str(v)[:40]!r}.") from None
    if not math.isfinite(fv):
        raise ValueError(f"config: {f.label} must be a finite number, got {v!r}.")
    if f.kind == "int" and not fv.is_integer():
        raise ValueError(f"config: {f.label} must be a whole number, got {v!r}.")
    if f.minimum is not None and not f.minimum <= fv <= f.maximum:
        raise ValueError(f"config: {f.label} must be between {f.minimum:g} and {f.maximum:g}, got {v!r}.")
    return int(fv) if f.kind == "int" else fv


def form_to_config(values: dict[str, Any], model: str, data_kind: str, data_path: str | None,
                   teacher_resolution: int | None = None, extra_json: str | None = None, *,
                   overwrite: bool = False, adapters_root: Path | None = None) -> dict[str, Any]:
    """Check the form (from the browser or the API: every field hostile) and return the resolved config dict.

    ``extra_json`` (the form's "advanced" box) sets other `TrainConfig` fields, e.g. ``{"log_every": 1}``;
    it goes through `cdlab.train.config.untrusted_overrides` (unknown and host-only keys, types, finite
    numbers, text, data folders confined). The resolved config is checked by the trainer's own `check`
    (ranges, names) and `check_destination`: an existing student is replaced only with ``overwrite``, and
    the students shipped with the repository never.

    Raises ``ValueError`` whose message names the bad field.
    """
    from cdlab.train import config as C

    unknown = sorted(set(values) - {f.key for f in form_fields(model, teacher_resolution)})
    if unknown:
        raise ValueError(f"config: unknown form field(s) {unknown}.")
    d: dict[str, Any] = {"model": model}
    for f in form_fields(model, teacher_resolution):
        v = values.get(f.key, f.default)
        if f.kind in ("int", "float"):
            v = _number(f, v)
        elif f.kind == "choice":
            if v not in f.choices:
                raise ValueError(f"config: {f.label} must be one of {f.choices}, got {str(v)[:40]!r}.")
        elif f.kind == "text":
            if v is not None and not isinstance(v, str):
                raise ValueError(f"config: {f.label} must be text, got {type(v).__name__}.")
            v = (v or "").strip()
            if len(v) > C.MAX_TEXT:
                raise ValueError(f"config: {f.label} is {len(v)} characters long; the limit is {C.MAX_TEXT}.")
        d[f.key] = v
    if d.get("method") == "cd":
        d["num_boundaries"] = 1
    if not isinstance(overwrite, bool):
        raise ValueError(f"config: overwrite must be true or false, got {overwrite!r}.")
    d["overwrite"] = overwrite
    d["data"] = data_value(data_kind, data_path)
    if extra_json is not None and not isinstance(extra_json, str):
        raise ValueError("config: the advanced settings must be JSON text.")
    if extra_json and extra_json.strip():
        import json as _json

        if len(extra_json) > MAX_EXTRA_JSON:
            raise ValueError(f"config: the advanced settings are {len(extra_json)} characters; the limit is "
                             f"{MAX_EXTRA_JSON}.")
        try:
            extra = _json.loads(extra_json, parse_constant=lambda c: float(c))
        except ValueError as e:
            raise ValueError(f"config: the advanced settings are not valid JSON ({e}).") from None
        d.update(C.untrusted_overrides(extra))
    cfg = C.resolve(C.from_dict(d), teacher_resolution)
    C.check_destination(cfg, adapters_root, allow_shipped=False)
    return cfg.to_dict()
