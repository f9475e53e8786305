"""The Evaluate tab: the newest evaluation (table and plot), earlier ones, and launching a new one.

Evaluations are folders ``evals/<timestamp>/`` with ``results.json``, ``table.md`` and
``quality_vs_nfe.png`` (written by ``cdlab.evaluate``); this module reads them straight from disk, so
evaluations run from the CLI show up too. `EvaluateTab` builds the tab (Gradio imported when it is built).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from cdlab.evaluate import list_evaluations, run_evaluation
from cdlab.evaluate.store import mark_app_made, prune_evaluations
from cdlab.paths import REPO_ROOT
from cdlab.teachers import FLOW_TEACHER, class_names
from cdlab.ui import hosting as H
from cdlab.ui.session import named_errors, user_errors
from cdlab.ui.train_tab import read_image


@dataclass
class EvalView:
    """What the tab shows for one evaluation."""

    name: str
    path: Path
    table_md: str
    plot: Path | None
    summary: str


MAX_APP_EVALUATIONS = 20  # evaluations the app keeps in evals/ (its own, oldest removed first; the CLI's never)

# The evaluation that ships with the repository (docs/evaluation; the flow teacher's: docs/flow-evaluation),
# listed after the local ones.
SHIPPED_EVALUATION = "shipped (docs/evaluation)"
SHIPPED_FLOW_EVALUATION = "shipped (docs/flow-evaluation)"
# Samples per column of a flow evaluation started from the app: (default, maximum), on a public host (default,
# default). FID is biased at small n: the docs' figures use 2000.
FLOW_SAMPLES = (200, 2000)


def shipped_evaluation_dir(flow: bool = False) -> Path:
    return REPO_ROOT / "docs" / ("flow-evaluation" if flow else "evaluation")


def _shipped_name(flow: bool) -> str:
    return SHIPPED_FLOW_EVALUATION if flow else SHIPPED_EVALUATION


def _is_evaluation(d: Path) -> bool:
    return d.is_dir() and ((d / "results.json").exists() or (d / "table.md").exists())


def evaluation_choices(evals_dir: Path, shipped: Path | None = None, flow: bool = False) -> list[str]:
    """The Evaluate tab's dropdown: `cdlab.evaluate.list_evaluations` names (newest first), then the shipped
    one (``shipped``, default docs/evaluation) so a fresh clone opens on a real table. ``flow``: the flow
    teacher's evaluations only (``model`` fashion-flow; default docs/flow-evaluation), else all the others."""
    names = [e["name"] for e in list_evaluations(evals_dir)
             if not e["name"].startswith(".") and (e["model"] == FLOW_TEACHER) == flow]
    shipped = shipped_evaluation_dir(flow) if shipped is None else shipped
    if shipped and _is_evaluation(Path(shipped)):
        names.append(_shipped_name(flow))
    return names


def load_view(evals_dir: Path, name: str | None = None, shipped: Path | None = None,
              flow: bool = False) -> EvalView | None:
    """The evaluation ``name`` (default: the newest), or None when there is none."""
    names = evaluation_choices(evals_dir, shipped, flow)
    if not names:
        return None
    if name is None:
        name = names[0]
    if not isinstance(name, str) or name not in names:  # only names the list offers: never a path
        raise ValueError(f"No evaluation named {str(name)[:80]!r} in {evals_dir}.")
    d = (shipped_evaluation_dir(flow) if shipped is None else Path(shipped)) if name == _shipped_name(flow) \
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
    keys = ("teacher", "model", "num_prompts", "prompts", "n", "guidance", "seed", "created", "device")
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


def check_prompt_count(value: Any, maximum: int, minimum: int = 1) -> int:
    """The number of prompts (samples per column, the flow teacher's) of a new evaluation from the page: a whole
    number in [minimum, maximum]."""
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"Prompts must be a whole number from {minimum} to {maximum}, got "
                         f"{str(value)[:40]!r}.") from None
    if isinstance(value, bool) or not math.isfinite(f) or not f.is_integer() or not minimum <= f <= maximum:
        raise ValueError(f"Prompts must be a whole number from {minimum} to {maximum}, got {value!r}.")
    return int(f)


def run_new_evaluation(teacher: Any, progress: Callable[[float, str], None] | None = None, **kwargs: Any) -> Path:
    """Run ``cdlab.evaluate.run_evaluation`` on the loaded teacher (the flow teacher:
    ``cdlab.flow.evaluate.run_flow_evaluation``, ``n`` samples per column); returns the new evaluation's folder."""
    if class_names(teacher):
        from cdlab.flow.evaluate import run_flow_evaluation

        return Path(run_flow_evaluation(teacher, progress=progress, **kwargs)["out_dir"])
    out = run_evaluation(teacher, progress=progress, **kwargs)
    return Path(getattr(out, "path", out))


# ----------------------------------------------------------------------------- the tab (Gradio)

def evaluate_handlers(teacher: Any, evals_dir: Path, eval_max: int, policy: H.Policy | None = None,
                      eval_min: int = 1) -> SimpleNamespace:
    """The tab's event functions: ``/show_evaluation``, the refreshed list and ``/evaluate`` (a new evaluation
    of at most ``eval_max`` prompts on the loaded teacher; in a classroom the instructor's alone). The app keeps
    its newest `MAX_APP_EVALUATIONS` evaluations (`cdlab.evaluate.store.prune_evaluations`)."""
    import gradio as gr

    policy = policy or H.Policy()
    flow = bool(class_names(teacher))

    @user_errors
    def show_eval(name):
        v = load_view(evals_dir, name or None, flow=flow)
        if v is None:
            return "_No evaluation yet: run one below or with `python -m cdlab evaluate`._", None, ""
        return v.table_md, read_image(v.plot), f"`{v.name}` · {v.summary}"

    def refresh_evals():
        names = evaluation_choices(evals_dir, flow=flow)
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    @user_errors
    def do_evaluate(prompts, instructor_token="", progress=gr.Progress()):
        policy.require_instructor(instructor_token, "A new evaluation")
        n = check_prompt_count(prompts, eval_max, eval_min)
        path = run_new_evaluation(teacher, n=n, progress=lambda f, d="": progress(f, desc=d))
        mark_app_made(path)
        prune_evaluations(evals_dir, MAX_APP_EVALUATIONS, keep=path)
        names = evaluation_choices(evals_dir, flow=flow)
        return gr.Dropdown(choices=names, value=path.name if path.name in names else (names[0] if names else None))

    return SimpleNamespace(show=show_eval, refresh=refresh_evals, evaluate=H.gpu(do_evaluate, duration=600))


class EvaluateTab:
    """The Evaluate tab, built inside the page's ``gr.Tabs``: the evaluations (newest first, then the shipped
    one), the chosen one's table and plot, and a new evaluation. Its part of the page load shows the newest
    evaluation's table and plot (no click needed: the dropdown's change may not fire when its value is
    already the newest). On the flow teacher (``prefix`` ``"flow-"``: its elem_ids and API names) it lists the
    flow evaluations and a new one samples ``n`` per column (`cdlab.flow.evaluate`)."""

    def __init__(self, teacher: Any, evals_dir: Path, policy: H.Policy | None = None, prefix: str = ""):
        import gradio as gr

        policy = policy or H.Policy()
        public = policy.public
        self.flow = flow = bool(class_names(teacher))
        eval_default, eval_max = policy.eval_prompt_limits()
        if flow:
            eval_default, eval_max = (FLOW_SAMPLES[0],) * 2 if public else FLOW_SAMPLES
        eval_min = 20 if flow else 1
        api = prefix.replace("-", "_")
        self.evals_dir = evals_dir
        self.fn = fn = evaluate_handlers(teacher, evals_dir, eval_max, policy, eval_min)
        with gr.Tab("Evaluate" + (f" ({prefix.strip('-')})" if prefix else ""), id=prefix + "evaluate"):
            if policy.rules_line():
                gr.Markdown(policy.rules_line(), elem_id=prefix + "eval-rules")
            if flow:
                gr.Markdown("FID in the features of the track's own classifier against the 10,000 real test images, "
                            "class accuracy and diversity, for every column at 1, 2, 4 and 8 steps "
                            "(`python -m cdlab evaluate --model fashion-flow`; the docs' figures use 2000 samples).",
                            elem_id=prefix + "eval-about")
            with gr.Row():
                eval_dd = gr.Dropdown(evaluation_choices(evals_dir, flow=flow), label="Evaluations (newest first)",
                                      scale=4, elem_id=prefix + "evals")
                eval_refresh = gr.Button("↻", size="sm", scale=1)
                eval_n = gr.Number(eval_default, label="Samples per column" if flow else "Prompts", precision=0,
                                   minimum=eval_min, maximum=eval_max, scale=1, elem_id=prefix + "eval-prompts",
                                   info=f"at most {eval_max}" + (" on this public host" if public else ""))
                eval_btn = gr.Button("Run a new evaluation", variant="primary", scale=2, elem_id=prefix + "eval-btn")
            self.instructor = H.instructor_token_box(policy, prefix + "eval-instructor")
            eval_summary = gr.Markdown(elem_id=prefix + "eval-summary", label="summary")
            eval_table = gr.Markdown(elem_id=prefix + "eval-table", label="table")
            eval_plot = gr.Image(label="Quality against NFE", type="pil", elem_id=prefix + "eval-plot")
            eval_dd.change(fn.show, eval_dd, [eval_table, eval_plot, eval_summary], api_name=api + "show_evaluation")
            eval_refresh.click(fn.refresh, None, eval_dd, api_visibility="private")
            named_errors(eval_n, eval_dd)
            eval_btn.click(fn.evaluate, [eval_n, self.instructor], eval_dd, api_name=api + "evaluate",
                           concurrency_id=H.GPU_CONCURRENCY_ID, concurrency_limit=H.GPU_CONCURRENCY_LIMIT)
        self.load_outputs = [eval_dd, eval_table, eval_plot, eval_summary]

    def on_load(self) -> tuple:
        """The list, fresh, with the newest evaluation chosen and shown."""
        import gradio as gr

        names = evaluation_choices(self.evals_dir, flow=self.flow)
        newest = names[0] if names else None
        try:
            shown = self.fn.show(newest)
        except gr.Error:  # an unreadable evaluation: the list still loads; picking one says what is wrong
            shown = (gr.skip(),) * 3
        return (gr.Dropdown(choices=names, value=newest), *shown)
