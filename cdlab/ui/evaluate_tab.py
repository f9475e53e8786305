"""The Evaluate tab: the newest evaluation (table and plot), earlier ones, and launching a new one.

Evaluations are folders ``evals/<timestamp>/`` with ``results.json``, ``table.md`` and
``quality_vs_nfe.png`` (written by ``cdlab.evaluate``); this module reads them straight from disk, so
evaluations run from the CLI show up too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cdlab.paths import REPO_ROOT


@dataclass
class EvalView:
    """What the tab shows for one evaluation."""

    name: str
    path: Path
    table_md: str
    plot: Path | None
    summary: str


# The evaluation that ships with the repository (docs/evaluation), listed after the local ones.
SHIPPED_EVALUATION = "shipped (docs/evaluation)"


def shipped_evaluation_dir() -> Path:
    return REPO_ROOT / "docs" / "evaluation"


def _is_evaluation(d: Path) -> bool:
    return d.is_dir() and ((d / "results.json").exists() or (d / "table.md").exists())


def evaluation_choices(evals_dir: Path, shipped: Path | None = None) -> list[str]:
    """The Evaluate tab's dropdown: `cdlab.evaluate.list_evaluations` names (newest first), then the shipped
    one (``shipped``, default docs/evaluation) so a fresh clone opens on a real table."""
    from cdlab.evaluate import list_evaluations

    names = [e["name"] for e in list_evaluations(evals_dir) if not e["name"].startswith(".")]
    shipped = shipped_evaluation_dir() if shipped is None else shipped
    if shipped and _is_evaluation(Path(shipped)):
        names.append(SHIPPED_EVALUATION)
    return names


def load_view(evals_dir: Path, name: str | None = None, shipped: Path | None = None) -> EvalView | None:
    """The evaluation ``name`` (default: the newest), or None when there is none."""
    names = evaluation_choices(evals_dir, shipped)
    if not names:
        return None
    if name is None:
        name = names[0]
    if not isinstance(name, str) or name not in names:  # only names the list offers: never a path
        raise ValueError(f"No evaluation named {str(name)[:80]!r} in {evals_dir}.")
    d = (shipped_evaluation_dir() if shipped is None else Path(shipped)) if name == SHIPPED_EVALUATION \
        else Path(evals_dir) / name
    try:
        table = (d / "table.md").read_text()
    except OSError:
        table = ""
    results: Any = None
    try:
        results = json.loads((d / "results.json").read_text())
    except (OSError, ValueError):
        pass
    if not table and results is not None:
        table = results_to_markdown(results)
    plot = d / "quality_vs_nfe.png"
    return EvalView(name, d, table or "_(this evaluation has no table)_", plot if plot.exists() else None,
                    summary(results))


def summary(results: Any) -> str:
    """One line about the evaluation's setup, from the keys results.json usually has."""
    if not isinstance(results, dict):
        return ""
    keys = ("teacher", "model", "num_prompts", "prompts", "seed", "created", "device")
    parts = []
    for k in keys:
        v = results.get(k)
        if v is None:
            continue
        if isinstance(v, list):
            v = len(v)
        parts.append(f"{k}: {v}")
    return " · ".join(parts)


def results_to_markdown(results: Any) -> str:
    """A Markdown table from a results.json that holds a list of row dicts (under ``rows`` or top level)."""
    rows = results.get("rows") if isinstance(results, dict) else results
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def check_prompt_count(value: Any, maximum: int) -> int:
    """The number of prompts of a new evaluation from the page: a whole number in [1, maximum]."""
    import math

    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"Prompts must be a whole number from 1 to {maximum}, got {str(value)[:40]!r}.") from None
    if isinstance(value, bool) or not math.isfinite(f) or not f.is_integer() or not 1 <= f <= maximum:
        raise ValueError(f"Prompts must be a whole number from 1 to {maximum}, got {value!r}.")
    return int(f)


def run_new_evaluation(teacher: Any, progress: Callable[[float, str], None] | None = None, **kwargs: Any) -> Path:
    """Run ``cdlab.evaluate.run_evaluation`` on the loaded teacher; returns the new evaluation's folder."""
    from cdlab import evaluate

    out = evaluate.run_evaluation(teacher, progress=progress, **kwargs)
    return Path(getattr(out, "path", out))
