"""Every field from the browser or the API is hostile until validated (issue 10).

Hostile values go through the real ``/train_start``, ``/compare`` and ``/edit`` endpoints of a launched app
(gradio_client, the embedded tiny teacher). For each: a clear error that names the field, nothing
written outside the allowed roots (no run launched, no folder above ``runs/``), and the server still
serving. Also: files under ``runs/`` are never served (checkpoints, optimiser states).
"""
from __future__ import annotations

import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def app(hostile_app):
    """This module's app (``client`` in conftest talks to it): conftest's ``hostile_app``, shared with
    test_app_limits (one launch for both)."""
    return hostile_app


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


TRAIN_CASES = [
    # (id, form changes, expected words in the error)
    ("traversal-run-name", dict(extra_config='{"run_name": "../../cdlab-pwned"}'), "run_name"),
    ("absolute-run-name", dict(extra_config='{"run_name": "/tmp/cdlab-pwned"}'), "run_name"),
    ("cache-dir", dict(extra_config='{"cache_dir": "/tmp/cdlab-pwned"}'), "cache_dir"),
    ("data-absolute", dict(extra_config='{"data": "/etc"}'), "data"),
    ("data-traversal", dict(extra_config='{"data": "../../etc"}'), "data"),
    ("folder-absolute", dict(data_kind="image folder", data_path="/etc"), "outside the allowed folder"),
    ("folder-symlink", dict(data_kind="image folder", data_path="escape"), "outside the allowed folder"),
    ("folder-traversal", dict(data_kind="COCO recipe folder", data_path="../../../etc"), "outside the allowed folder"),
    ("hf-traversal", dict(data_kind="HF datasets name", data_path="../../etc/passwd"), "data"),
    ("lr-nan", dict(extra_config='{"lr": NaN}'), "lr must be a finite number"),
    ("lr-infinity", dict(extra_config='{"lr": Infinity}'), "lr must be a finite number"),
    ("lr-huge", dict(extra_config='{"lr": 1e30}'), "lr"),
    ("form-lr-huge", dict(lr=1e30), "learning rate"),
    ("form-steps-negative", dict(max_steps=-5), "steps"),
    ("form-batch-zero", dict(batch_size=0), "batch size"),
    ("form-rank-huge", dict(lora_rank=10**9), "LoRA rank"),
    ("student-traversal", dict(student_name="../evil"), "student name"),
    ("student-10k", dict(student_name="a" * 10_000), "student name"),
    ("student-control", dict(student_name="ab\x07cd"), "student name"),
    ("student-newline-extra", dict(extra_config='{"student_name": "x\\ny"}'), "control character"),
    ("student-exists", dict(student_name="@existing"), "already exists"),
    ("student-shipped", dict(student_name="@shipped", overwrite=True), "shipped"),
    ("unknown-key", dict(extra_config='{"evil": 1}'), "unknown field"),
    ("not-an-object", dict(extra_config="[1, 2, 3]"), "JSON object"),
    ("extra-10k", dict(extra_config='{"run_name": "' + "a" * 10_000 + '"}'), "limit"),
    ("host-only-model", dict(extra_config='{"model": "sd15"}'), "model"),
    ("host-only-device", dict(extra_config='{"device": "cuda"}'), "device"),
    ("host-only-threads", dict(extra_config='{"threads": 64}'), "threads"),
    ("prompts-many", dict(extra_config='{"preview_prompts": ' + str(["a"] * 100).replace("'", '"') + "}"),
     "preview_prompts"),
    ("steps-as-text", dict(extra_config='{"max_steps": "100"}'), "max_steps must be a number"),
    ("seed-negative", dict(extra_config='{"seed": -1}'), "seed"),
    ("boundaries-huge", dict(extra_config='{"num_boundaries": 1e30}'), "num_boundaries"),
    ("warmup-huge", dict(extra_config='{"warmup_steps": 1e308}'), "warmup_steps"),
    ("guidance-negative", dict(extra_config='{"guidance": -1}'), "guidance"),
    ("resolution-odd", dict(extra_config='{"resolution": 33}'), "resolution"),
    ("empty-run-name-control", dict(extra_config='{"run_name": "\\u0000"}'), "run_name"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_hostile_training_configs_are_refused(client, app, case, train_form):
    from gradio_client.exceptions import AppError

    work, students = app.work, app.students
    name, change, expect = case
    change = {k: ({"@existing": students[1], "@shipped": students[0]}.get(v, v) if isinstance(v, str) else v)
              for k, v in change.items()}
    outside = work.parent
    before = _tree(outside)
    with pytest.raises(AppError) as e:
        client.predict(**train_form(**change), api_name="/train_start")
    assert expect.lower() in str(e.value).lower(), str(e.value)
    assert not [p for p in (work / "runs").iterdir() if not p.name.startswith(".")], "a run was launched"
    assert _tree(outside) == before, "something was written"
    assert not list(Path("/tmp").glob("cdlab-pwned*"))


COMPARE_CASES = [
    ("empty-prompt", dict(prompt=""), "prompt is empty"),
    ("prompt-10k", dict(prompt="x" * 10_000), "characters long"),
    ("prompt-control", dict(prompt="a red\x00 circle"), "control character"),
    ("prompt-escape", dict(prompt="a red \x1b[31m circle"), "control character"),
    ("seed-huge", dict(seed=1e30), "seed"),
    ("seed-negative", dict(seed=-1), "seed"),
    ("guidance-huge", dict(guidance=1e30), "guidance"),
    ("guidance-negative", dict(guidance=-3.0), "guidance"),
    ("steps-unknown", dict(steps="3"), "student steps"),
    ("column-traversal", dict(columns=["../../etc/passwd"]), "columns"),
    ("column-none", dict(columns=[]), "no column"),
    ("columns-many", dict(columns=[f"c{i}" for i in range(100)]), "columns"),
]


@pytest.mark.parametrize("case", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_hostile_compare_requests_are_refused(client, app, case):
    from gradio_client.exceptions import AppError

    name, change, expect = case
    args = dict(prompt=PROMPT, seed=0, guidance=3.0, steps="4", columns=["teacher-4 (naive)"], show_trajectory=False)
    args.update(change)
    with pytest.raises((AppError, ValueError)) as e:
        client.predict(**args, api_name="/compare")
    assert expect.lower() in str(e.value).lower(), str(e.value)


EDIT_CASES = [
    ("technique-unknown", dict(technique="../../etc/passwd"), "technique"),
    ("prompt-10k", dict(prompt="x" * 10_000), "prompt"),
    ("prompt-control", dict(prompt="a red\x00 circle"), "control"),
    ("prompt2-missing", dict(technique="hybrid", image=None, prompt="a red circle", prompt_2=""), "prompt_2"),
    ("strength-huge", dict(strength=1e30), "strength"),
    ("strength-negative", dict(strength=-0.5), "strength"),
    ("seed-huge", dict(seed=1e30), "seed"),
    ("seed-negative", dict(seed=-1), "seed"),
    ("steps-unknown", dict(student_steps="3"), "student steps"),  # Gradio refuses it by the field's label
    ("column-traversal", dict(columns=["../../etc/passwd"]), "columns"),
    ("column-none", dict(columns=[]), "columns"),
    ("columns-many", dict(columns=[f"c{i}" for i in range(100)]), "columns"),
]


@pytest.mark.parametrize("case", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_hostile_edit_requests_are_refused(client, app, case, tmp_path):
    """/edit (the Edit tab's API): each hostile field is refused with a message naming it; no image reaches
    the samplers. (Hostile uploads: tests/test_app_client.py::test_edit_refuses_bad_uploads_by_name_and_keeps_serving.)"""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    src = tmp_path / "white.png"
    Image.new("RGB", (32, 32), "white").save(src)
    args = dict(technique="sdedit", image={"background": handle_file(str(src)), "layers": [], "composite": None,
                                           "id": None},
                prompt=PROMPT, prompt_2="", strength=0.5, seed=0, student_steps="4", columns=["teacher-4 (naive)"])
    name, change, expect = case
    args.update(change)
    with pytest.raises((AppError, ValueError)) as e:
        client.predict(**args, api_name="/edit")
    assert expect.lower() in str(e.value).lower(), str(e.value)


def test_server_still_serves_after_the_hostile_requests(client, app):
    _, gallery, table, *_ = client.predict(PROMPT, 0, 3.0, "4", ["teacher-4 (naive)", app.students[1]], False,
                                        api_name="/compare")
    assert len(gallery) == 2 and [row[2] for row in table["data"]] == [8, 4]
    assert math.isfinite(table["data"][0][1])


def test_run_files_are_never_served(app):
    """Checkpoints, optimiser states and logs under runs/ cannot be fetched, even by exact path."""
    url, work = app.url, app.work
    secret = work / "runs" / "someone" / "checkpoints" / "ckpt_000010"
    secret.mkdir(parents=True)
    (secret / "optimizer.pt").write_bytes(b"secret optimiser state")
    for path in (secret / "optimizer.pt", work / "runs" / "someone" / "checkpoints"):
        for prefix in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(url + prefix + str(path), timeout=10) as r:
                    body = r.read()
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404)
            else:
                assert b"secret optimiser state" not in body
    import shutil

    shutil.rmtree(work / "runs" / "someone")
