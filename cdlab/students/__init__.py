"""Students: LoRA adapters for the teacher's UNet, their cards, and the external catalogue.

A student lives in ``adapters/<name>/`` (``CDLAB_ADAPTERS_DIR`` overrides the root)::

    adapters/<name>/pytorch_lora_weights.safetensors   # diffusers' LoRA format; plain diffusers loads it
    adapters/<name>/card.json                          # StudentCard: how it was made and how to sample it
    adapters/<name>/README.md                          # a short model card rendered from card.json

The weights load in plain diffusers, without cdlab::

    pipe.load_lora_weights("adapters/<name>", adapter_name="<name>")

Several students live as named peft adapters on ONE UNet: ``load_student`` adds adapter ``<name>``,
``activate_student(pipe, name)`` switches to it, ``activate_student(pipe, None)`` gives back the plain
teacher. External students (LCM-LoRA, TCD, PCM, Hyper-SD) come from the hub through
``load_external_student``; their adapter name is their catalogue key.

The package, by job (everything below is importable from ``cdlab.students``):

=================  ==================================================================================
``card``           `StudentCard` (``card.json``), `StudentError`, `METHODS`, `validate_name`, `render_readme`
``lora``           `attach_lora`, the LoRA file format (`WEIGHT_NAME`, `DEFAULT_TARGET_MODULES`)
``registry``       on disk: `adapters_dir`, `student_dir`, `save_student`, `read_card`, `list_students`,
                   `is_shipped`, `shipped_students` (``adapters/SHIPPED``)
``activation``     on a pipeline: `load_student`, `activate_student`
``external``       `ExternalStudent`, `EXTERNAL_STUDENTS`, `external_card`, `load_external_student`,
                   `make_scheduler`, `sampling_kwargs`
=================  ==================================================================================

Tests that fake the hub patch ``cdlab.students.external._hub_download``.
"""
from __future__ import annotations

from cdlab.students.activation import activate_student, load_student
from cdlab.students.card import METHODS, SD15_ID, TINY_ID, StudentCard, StudentError, render_readme, validate_name
from cdlab.students.external import (EXTERNAL_STUDENTS, ExternalStudent, external_card, load_external_student,
                                     make_scheduler, sampling_kwargs)
from cdlab.students.lora import DEFAULT_TARGET_MODULES, WEIGHT_NAME, attach_lora
from cdlab.paths import adapters_dir
from cdlab.students.registry import (CARD_NAME, SHIPPED_NAME, is_shipped,
                                     list_students, read_card, save_student, shipped_students, student_dir)

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
    "is_shipped",
    "shipped_students",
    "load_student",
    "activate_student",
    "external_card",
    "load_external_student",
    "make_scheduler",
    "sampling_kwargs",
    "render_readme",
]
