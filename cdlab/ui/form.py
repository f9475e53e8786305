"""One field of a Train form and the check of a number typed into it (the distillation form,
`cdlab.ui.train_tab`, and the flow teacher's, `cdlab.ui.flow_train`); `form_inputs` builds their components
(Gradio imported when it is called)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["FormField", "check_number", "check_field", "form_inputs"]


@dataclass
class FormField:
    """One input of a Train form: a `cdlab.train.config.TrainConfig` field, or a flow teacher run's setting."""

    key: str
    label: str
    kind: str  # "choice" | "int" | "float" | "text"
    default: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    info: str = ""


def check_number(f: FormField, v: Any) -> int | float:
    """A form number (from the browser or the API: hostile), checked: finite, whole for int fields, inside the
    field's range. Raises ``ValueError`` whose message names the field."""
    if isinstance(v, bool):
        raise ValueError(f"config: {f.label} must be a number, got a true/false value {v!r}.")
    if v is None or (isinstance(v, str) and not v.strip()):
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


def check_field(f: FormField, v: Any) -> int | float | str:
    """A form value (hostile): for a choice field one of its choices, compared by equality; else `check_number`.
    Raises ``ValueError`` whose message names the field."""
    if f.kind != "choice":
        return check_number(f, v)
    if not isinstance(v, str) or v not in f.choices:
        raise ValueError(f"config: {f.label} must be one of {list(f.choices)}, got {str(v)[:40]!r}.")
    return v


def form_inputs(fields: list[FormField]) -> list:
    """One component per form field: a radio for a choice, a textbox for text, a number otherwise."""
    import gradio as gr

    inputs = []
    for f in fields:
        if f.kind == "choice":
            inputs.append(gr.Radio(list(f.choices), value=f.default, label=f.label, info=f.info or None))
        elif f.kind == "text":
            inputs.append(gr.Textbox(value=f.default or "", label=f.label, info=f.info or None,
                                     placeholder="automatic"))
        else:
            # No minimum/maximum here: Gradio's own range message would not name the
            # field; form_to_config checks the same range and says which field.
            inputs.append(gr.Number(value=f.default, label=f.label, info=f"{f.minimum:g} to {f.maximum:g}",
                                    precision=0 if f.kind == "int" else None))
    return inputs
