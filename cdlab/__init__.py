"""cdlab: a consistency-distillation lab.

The course's graded functions are importable from here under their course names::

    from cdlab import ddim_solver_step, q_sample, get_xs_from_xt_naive, get_multi_boundary_timesteps

Heavy modules (diffusers, the teacher, the trainer) load lazily, on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

from cdlab.math import (  # light: torch only
    cfg_eps,
    ddim_solver_step,
    get_multi_boundary_timesteps,
    get_xs_from_xt_naive,
    get_xs_from_xt_teacher,
    predict_boundary,
    q_sample,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `import cdlab` stays cheap.
_LAZY = {
    "load_teacher": "cdlab.teachers",
    "Teacher": "cdlab.teachers",
    "sample_ddim": "cdlab.samplers",
    "sample_consistency": "cdlab.samplers",
    "ddim_timesteps": "cdlab.samplers",
    "consistency_timesteps": "cdlab.samplers",
    "attach_lora": "cdlab.students",
    "save_student": "cdlab.students",
    "list_students": "cdlab.students",
    "load_student": "cdlab.students",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdlab' has no attribute {name!r}")


__all__ = [
    "cfg_eps", "ddim_solver_step", "get_multi_boundary_timesteps", "get_xs_from_xt_naive",
    "get_xs_from_xt_teacher", "predict_boundary", "q_sample", *_LAZY,
]
