"""Students: LoRA adapters for the teacher's UNet, their cards, and the external catalogue.

A student lives in ``adapters/<name>/`` (``CDLAB_ADAPTERS_DIR`` overrides the root)::

    adapters/<name>/pytorch_lora_weights.safetensors   # diffusers' LoRA format; plain diffusers loads it
    adapters/<name>/card.json                          # StudentCard: how it was made and how to sample it
    adapters/<name>/README.md                          # a short model card rendered from card.json

The weights load in plain diffusers, without cdlab::

    pipe.load_lora_weights("adapters/<name>", adapter_name="<name>")

Several students live as named peft adapters on ONE UNet. ``load_student`` adds adapter ``<name>`` (external
students -- LCM-LoRA, TCD, PCM, Hyper-SD -- come from the hub through ``load_external_student``; their adapter
name is their catalogue key), and one context manager runs the UNet as a student::

    load_student(pipe, "tiny-mbcd-4")
    with use_student(pipe, "tiny-mbcd-4"):   # None: the plain teacher; fused weights swapped in by default
        ...
    # the plain teacher again

The package is a one-way stack, each module importing only those listed before it below (everything listed is
importable from ``cdlab.students``):

=================  ==================================================================================
``card``           `StudentCard` (``card.json``), `StudentError`, `METHODS`, `validate_name`, `sampling_kwargs`,
                   `render_readme`
``lora``           `attach_lora`, the LoRA file format (`WEIGHT_NAME`, `DEFAULT_TARGET_MODULES`)
``registry``       on disk: `adapters_dir`, `student_dir`, `save_student`, `read_card`, `list_students`, `students_of`,
                   `is_shipped`, `shipped_students` (``adapters/SHIPPED``)
``switch``         on a pipeline: `load_student`, `unload_student`, `use_student`, `prepare_student`
``external``       `ExternalStudent`, `EXTERNAL_STUDENTS`, `external_card`, `load_external_student`,
                   `make_scheduler`
=================  ==================================================================================

(``roles``, beside the stack, gives training its adapter roles: teacher, generator, fake score.)
Tests that fake the hub patch ``cdlab.students.external._hub_download``.
"""
from __future__ import annotations

from cdlab.paths import SD15_ID, TINY_ID, adapters_dir
from cdlab.students.card import METHODS, StudentCard, StudentError, render_readme, sampling_kwargs, validate_name
from cdlab.students.external import (EXTERNAL_STUDENTS, ExternalStudent, external_card, load_external_student,
                                     make_scheduler)
from cdlab.students.lora import DEFAULT_TARGET_MODULES, WEIGHT_NAME, attach_lora
from cdlab.students.registry import (CARD_NAME, SHIPPED_NAME, is_shipped, list_students, read_card, save_student,
                                     shipped_students, student_dir, students_of)
from cdlab.students.switch import load_student, prepare_student, unload_student, use_student
# Deprecated switches (not in __all__): `use_student` replaces them; kept until their callers move.
from cdlab.students.switch import activate_student, forget_swapped, fused_student, fused_weights, swapped_student  # noqa: F401

__all__ = [
    "WEIGHT_NAME",
    "CARD_NAME",
    "SHIPPED_NAME",
    "DEFAULT_TARGET_MODULES",
    "METHODS",
    "SD15_ID",
    "TINY_ID",
    "StudentError",
    "StudentCard",
    "ExternalStudent",
    "EXTERNAL_STUDENTS",
    "adapters_dir",
    "validate_name",
    "student_dir",
    "attach_lora",
    "save_student",
    "read_card",
    "list_students",
    "students_of",
    "is_shipped",
    "shipped_students",
    "load_student",
    "use_student",
    "prepare_student",
    "unload_student",
    "external_card",
    "load_external_student",
    "make_scheduler",
    "sampling_kwargs",
    "render_readme",
]
