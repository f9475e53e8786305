"""Deprecated: this module is now `cdlab.students.switch`; the one public switch is
``with cdlab.students.use_student(pipe, name):``. The old names below keep old callers working until they move.
"""
from __future__ import annotations

from cdlab.students.switch import (SWAP_CACHE_BYTES, activate_student, forget_swapped, fused_student,  # noqa: F401
                                   fused_weights, load_student, prepare_student, swapped_student, use_student)
