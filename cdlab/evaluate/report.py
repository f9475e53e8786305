"""What an evaluation shows: the Markdown table, the quality-vs-NFE figure and the notes under the table.

All three read the results dict of :func:`cdlab.evaluate.run_evaluation` (or a ``results.json``), and nothing
else, so an evaluation written by an older version renders the same.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "render_table", "plot_quality", "notes"]

# Per suite: (row key, column heading, format) of each metric, in table order.
METRICS = {
    "world": [("adherence", "adherence ↑", "{:.3f}"), ("agreement_error", "agreement err ↓", "{:.4f}"),
              ("diversity", "diversity (8 seeds) ↑", "{:.4f}")],
    "sd": [("clip_score", "CLIP ↑", "{:.2f}"), ("fid_sd", "FID-SD ↓", "{:.2f}"), ("lpips", "LPIPS ↓", "{:.4f}")],
    # the flow teacher (cdlab.flow.evaluate): FID in the judge's features against the real test set
    "flow": [("fid", "FID ↓", "{:.2f}"), ("fid_ratio", "÷ teacher-50", "{:.3f}"), ("accuracy", "class accuracy ↑",
             "{:.4f}"), ("diversity", "diversity ↑", "{:.4f}")],
}


def _fmt(v: Any, f: str, note: str | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return note or "—"
    return f.format(v)


def render_table(results: dict) -> str:
    """The Markdown table of an evaluation: one line per (method, steps)."""
    metrics = METRICS[results["suite"]]
    head = ["method", "steps", "NFE", *(h for _, h, _ in metrics), "s / image", "speed-up"]
    lines = [
        f"Evaluation of **{results['model']}** ({results.get('describe') or results['device']}), "
        f"{results['n']} {'samples per column' if results['suite'] == 'flow' else 'prompts'} "
        f"({results['prompt_source']}), guidance {results['guidance']:g}, "
        f"compared with the teacher at {results['reference_steps']} steps from the same noise. "
        f"{results['created']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in results["rows"]:
        cells = [r["method"], str(r["steps"]), str(r["nfe"]),
                 *(_fmt(r.get(k), f, r.get(f"{k}_note")) for k, _, f in metrics),
                 f"{r['seconds_per_image'] * 1000:.2f} ms" if r["seconds_per_image"] < 1 else
                 f"{r['seconds_per_image']:.2f} s", _fmt(r.get("speedup"), "{:.1f}×")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("notes"):
        lines += ["", *results["notes"]]
    return "\n".join(lines) + "\n"


def plot_quality(results: dict, path: str | Path) -> Path:
    """The quality-vs-NFE figure: one line per method, NFE on a log axis."""
    import matplotlib  # lazy: a second of import time the table and the app's listing do not need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = METRICS[results["suite"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    for ax, (key, label, _) in zip(axes[0], metrics):
        plotted = False
        for m in methods:
            rows = sorted((r for r in results["rows"] if r["method"] == m), key=lambda r: r["nfe"])
            rows = [r for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            if not rows:
                continue
            plotted = True
            teacher = rows[0]["kind"] == "teacher"
            style = dict(color="black", linestyle="--", marker="s") if teacher else dict(marker="o")
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], label=m, **style)
            for r in rows:
                ax.annotate(str(r["steps"]), (r["nfe"], r[key]), textcoords="offset points", xytext=(3, 4),
                            fontsize=7)
        note = next((r[f"{key}_note"] for r in results["rows"] if r.get(f"{key}_note")), None)
        if not plotted and note:  # e.g. FID-SD refused below its minimum sample count
            ax.text(0.5, 0.5, f"{label}: {note}", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per image (CFG step = 2)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: quality vs NFE ({results['n']} prompts, "
                 f"reference: teacher {results['reference_steps']} steps)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def notes(rows: list[dict], n: int) -> list[str]:
    """Lines under the table: why a metric is missing and what would give it."""
    refused = [r for r in rows if r.get("fid_sd_note")]
    if not refused:
        return []
    need = max(int(r["fid_sd_min_samples"]) for r in refused)
    return [f"FID-SD needs at least {need} samples (prompts); this run had {n}. "
            f"Run with --n {need} or more (--prompts FILE with a caption list)."]
