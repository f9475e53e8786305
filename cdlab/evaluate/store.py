"""Where evaluations live: writing, loading and listing their folders under ``cdlab.paths.evals_dir()``.

An evaluation is a folder holding ``results.json`` (the results dict), ``table.md`` (:func:`render_table`) and
``quality_vs_nfe.png`` (:func:`plot_quality`); an edit evaluation's folder holds ``edit_results.json`` and
``edit_table.md`` instead (`cdlab.evaluate.edit`), so the list here does not pick it up. A folder that holds an
evaluation is somebody's work: it is replaced only when asked (:func:`check_out_dir`, ``--overwrite``). The app
marks the evaluations it makes (:func:`mark_app_made`) and keeps only its newest few (:func:`prune_evaluations`);
those from the CLI, and the shipped ``docs/evaluation``, are never removed.
"""
from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from cdlab.evaluate.prompts import EvaluationError
from cdlab.evaluate.report import plot_quality, render_table
from cdlab.paths import evals_dir, load_json_object, read_json, write_json_atomic

__all__ = ["EvaluationResult", "check_out_dir", "new_out_dir", "write_evaluation", "load_evaluation",
           "list_evaluations", "mark_app_made", "prune_evaluations"]

APP_MARKER = ".made-by-app"  # in an evaluation folder: the app made it, so the app may prune it


class EvaluationResult(dict):
    """The results dict, plus ``.path``: the folder it was written to (None when not written)."""

    @property
    def path(self) -> Path | None:
        return Path(self["out_dir"]) if self.get("out_dir") else None


def check_out_dir(out_dir: str | Path | None, marker: str, overwrite: bool = False) -> None:
    """Refuse an ``out_dir`` that already holds an evaluation (its ``marker`` file) unless ``overwrite``: an
    evaluation is somebody's work, and replacing it is an explicit choice (``--overwrite``). Called before any
    sampling, so a refused run costs nothing."""
    if out_dir is not None and not overwrite and (Path(out_dir) / marker).exists():
        raise FileExistsError(f"--out: {out_dir} already holds an evaluation ({marker}); choose another folder "
                              "or pass --overwrite to replace it")


def new_out_dir(prefix: str = "") -> Path:
    """A folder name not taken yet: ``evals_dir() / <prefix><timestamp>`` (``-1``, ``-2``, ... appended on a clash)."""
    stamp = prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = evals_dir() / stamp, 1
    while out.exists():
        out, k = evals_dir() / f"{stamp}-{k}", k + 1
    return out


def write_evaluation(results: dict, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write results.json, table.md and quality_vs_nfe.png; return the folder (default :func:`new_out_dir`).
    A given ``out_dir`` that holds an evaluation is refused unless ``overwrite`` (:func:`check_out_dir`)."""
    out = new_out_dir() if out_dir is None else Path(out_dir)
    check_out_dir(out, "results.json", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {k: v for k, v in results.items() if k != "out_dir"})
    (out / "table.md").write_text(render_table(results))
    plot_quality(results, out / "quality_vs_nfe.png")
    return out


def load_evaluation(path: str | Path) -> EvaluationResult:
    """An evaluation folder (or its results.json) -> its results, with ``out_dir``, ``table_md`` and
    ``plot`` (the PNG path, or None)."""
    p = Path(path)
    folder = p.parent if p.name == "results.json" else p
    f = folder / "results.json"
    if not f.is_file():
        raise FileNotFoundError(f"no evaluation at {folder} (results.json missing)")
    results = load_json_object(f, EvaluationError, what="results file")
    if "rows" not in results:
        raise EvaluationError(f"{f} is not an evaluation (no 'rows')")
    results = EvaluationResult(results, out_dir=str(folder))
    table = folder / "table.md"
    results["table_md"] = table.read_text() if table.is_file() else render_table(results)
    plot = folder / "quality_vs_nfe.png"
    results["plot"] = str(plot) if plot.is_file() else None
    return results


def list_evaluations(root: str | Path | None = None) -> list[dict]:
    """Evaluations under ``root`` (default ``evals_dir()``), newest first: each
    ``{"path", "name", "created", "model", "n", "suite", "rows", "plot"}``. Unreadable folders are skipped."""
    root = evals_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        f = d / "results.json"
        if not f.is_file():
            continue
        r = read_json(f)  # None: unreadable, half-written or not an object
        if r is None:
            continue
        plot = d / "quality_vs_nfe.png"
        found.append({
            "path": str(d), "name": d.name, "created": r.get("created", ""), "model": r.get("model", "?"),
            "n": r.get("n"), "suite": r.get("suite"), "rows": len(r.get("rows", [])),
            "plot": str(plot) if plot.is_file() else None, "_mtime": f.stat().st_mtime,
        })
    found.sort(key=lambda e: (e["created"], e["_mtime"], e["name"]), reverse=True)
    for e in found:
        del e["_mtime"]
    return found


def mark_app_made(folder: str | Path) -> None:
    """Mark ``folder`` as an evaluation the app made (:func:`prune_evaluations` may remove it later)."""
    (Path(folder) / APP_MARKER).write_text("")


def prune_evaluations(root: str | Path, cap: int, keep: str | Path | None = None) -> list[Path]:
    """Remove the oldest app-made evaluations under ``root`` until at most ``cap`` remain (``keep``, the one just
    made, never). Folders without :data:`APP_MARKER` (the CLI's) are not counted and never removed. Returns
    the removed folders."""
    root = Path(root).resolve()
    kept = Path(keep).resolve() if keep is not None else None
    made = [e for e in list_evaluations(root) if (Path(e["path"]) / APP_MARKER).is_file()]  # newest first
    removed = []
    for e in made[cap:]:
        folder = Path(e["path"]).resolve()
        if folder == kept or folder.parent != root:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
