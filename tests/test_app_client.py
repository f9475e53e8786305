"""The launched app (``python app.py``) driven through gradio_client: Compare, errors, refresh, training errors."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from cdlab.paths import REPO_ROOT
from cdlab.ui.bench import make_random_students

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def app(tiny_pipe_dir, tmp_path_factory, start_app):
    """This module's app (``client`` in conftest talks to it): the random tiny pipeline and two random students."""
    work = tmp_path_factory.mktemp("app")
    base = str(Path(tiny_pipe_dir).resolve())
    students = make_random_students(base, work / "adapters", n=2)
    for flow_student in ("fashion-reflow-4", "fashion-reflow-1"):  # the flow section's shipped students
        shutil.copytree(REPO_ROOT / "adapters" / flow_student, work / "adapters" / flow_student)
    with start_app(tiny_pipe_dir, work, students, base) as served:
        yield served


def test_page_loads_fast_with_header(app):
    url = app.url
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    assert time.perf_counter() - t0 <= 5.0
    with urllib.request.urlopen(url + "config", timeout=10) as r:
        config = r.read().decode()
    assert "Teacher:" in config and "cpu" in config and "float32" in config


def test_compare_returns_every_column_with_timings(client, app):
    students = app.students
    cols = ["teacher-50 (CFG)", "teacher-4 (naive)", *students]
    row, gallery, table, traj, png, info = client.predict(
        prompt=PROMPT, seed=3, guidance=3.0, steps="2", columns=cols, show_trajectory=True, api_name="/compare")
    assert len(gallery) == 4 and all(Path(g["image"]).is_file() for g in gallery)
    assert [row[2] for row in table["data"]] == [100, 8, 2, 2]
    assert all(row[1] > 0 for row in table["data"])
    assert "NFE 100" in gallery[0]["caption"] and "speed-up" in gallery[2]["caption"]
    assert row.count("<figure") == 4 and 'id="trajectory-grid"' in traj and "4 columns in" in info
    assert Path(png).is_file() and Path(png).suffix == ".png"
    from PIL import Image

    assert Image.open(png).width >= 4 * 256


@pytest.mark.parametrize("args", [
    ("", 0, 3.0, "4"), ("x" * 2000, 0, 3.0, "4"), (PROMPT, -5, 3.0, "4"), (PROMPT, 0, 500.0, "4"), (PROMPT, 0, 3.0, "3"),
])
def test_bad_compare_inputs_give_errors_and_server_stays_up(client, args):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError):
        client.predict(*args, ["teacher-4 (naive)"], False, api_name="/compare")
    _, gallery, *_ = client.predict(PROMPT, 0, 3.0, "4", ["teacher-4 (naive)"], False, api_name="/compare")
    assert len(gallery) == 1


def test_new_student_appears_without_restart_and_broken_one_errors(client, app):
    from gradio_client.exceptions import AppError

    work, base = app.work, app.base
    root = work / "adapters"
    tmp = work / "staging"
    (name,) = make_random_students(base, tmp, n=1)
    (tmp / name).rename(root / "late-student")
    card = root / "late-student" / "card.json"
    card.write_text(card.read_text().replace(f'"{name}"', '"late-student"'))
    update = client.predict(api_name="/refresh_columns")
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in update["choices"]]
    assert "late-student" in choices
    _, gallery, *_ = client.predict(PROMPT, 0, 3.0, "1", ["late-student"], False, api_name="/compare")
    assert len(gallery) == 1
    # now break it: the weights are not safetensors any more (it is already loaded on the UNet, so remove
    # it from disk entirely and ask again: a clear error, then the next request works)
    import shutil

    shutil.rmtree(root / "late-student")
    with pytest.raises(AppError, match="late-student"):
        client.predict(PROMPT, 0, 3.0, "1", ["late-student"], False, api_name="/compare")
    _, gallery, *_ = client.predict(PROMPT, 0, 3.0, "1", ["teacher-4 (naive)"], False, api_name="/compare")
    assert len(gallery) == 1


# What each endpoint takes and returns, by name, as view_api documents it (issue 11: a clean API).
ENDPOINTS = {
    "/random_seed": ([], ["seed"]),
    "/refresh_columns": ([], ["columns"]),
    "/compare": (["prompt", "seed", "guidance", "steps", "columns", "show_trajectory"],
                 ["columns_html", "images", "timings", "trajectory_html", "download_comparison_png", "summary"]),
    "/train_start": (["method", "num_boundaries", "lora_rank", "lr", "max_steps", "batch_size", "guidance",
                      "guidance_max", "preview_every", "student_name", "data_kind", "data_path", "extra_config",
                      "overwrite", "owner", "instructor_token"], ["runs_app_and_cli", "owner"]),
    "/train_stop": (["run_name", "owner", "instructor_token"], ["status"]),
    "/train_resume": (["run_name", "owner", "instructor_token"], ["status"]),
    "/train_status": (["run_name"], ["runs_app_and_cli", "status", "progress", "loss", "previews",
                                     "preview_caption", "last_lines_of_the_trainers_log"]),
    "/refresh_runs": (["current"], ["runs_app_and_cli"]),
    "/show_evaluation": (["name"], ["table", "quality_against_nfe", "summary"]),
    "/edit": (["technique", "image", "prompt", "prompt_2", "strength", "seed", "student_steps", "columns"],
              ["columns_html", "images", "timings", "summary"]),
    "/evaluate": (["prompts", "instructor_token"], ["evaluations_newest_first"]),
    # the flow-matching section's Compare (the flow teacher beside the main one): its prompt is a class name
    "/flow_random_seed": ([], ["seed"]),
    "/flow_refresh_columns": ([], ["columns"]),
    "/flow_compare": (["prompt", "seed", "guidance", "steps", "columns", "show_trajectory"],
                      ["columns_html", "images", "timings", "trajectory_html", "download_comparison_png", "summary"]),
    "/flow_edit": (["technique", "image", "prompt", "prompt_2", "strength", "seed", "student_steps", "columns"],
                   ["columns_html", "images", "timings", "summary"]),
    "/flow_show_evaluation": (["name"], ["table", "quality_against_nfe", "summary"]),
    "/flow_train_start": (["minutes", "num_epochs", "epoch_images", "batch_size", "lr", "num_hiddens", "owner",
                           "instructor_token"], ["runs_app_and_cli", "owner"]),
    "/flow_train_flow_student": (["teacher_run", "method", "init", "sample_steps", "steps", "batch_size", "lr", "pairs",
                                  "guidance", "lora_rank", "windows", "num_boundaries", "gan_weight", "disc_lr",
                                  "lr_decay_steps", "shift", "regression_weight", "adam_beta1", "gan_clip", "owner",
                                  "instructor_token"],
                                 ["runs_app_and_cli", "owner"]),
    "/flow_train_stop": (["run_name", "owner", "instructor_token"], ["status"]),
    "/flow_train_resume": (["run_name", "owner", "instructor_token"], ["status"]),
    "/flow_train_status": (["run_name"], ["runs_app_and_cli", "status", "progress", "loss", "previews",
                                          "preview_caption", "last_lines_of_the_trainers_log"]),
    "/flow_refresh_runs": (["current"], ["runs_app_and_cli"]),
    "/flow_evaluate": (["prompts", "instructor_token"], ["evaluations_newest_first"]),
}


def test_every_endpoint_is_documented_with_named_parameters_and_returns(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert sorted(api) == sorted(ENDPOINTS)
    for name, (params, returns) in ENDPOINTS.items():
        assert [p["parameter_name"] for p in api[name]["parameters"]] == params, name
        assert [r["label"].lower().replace(" ", "_").replace("(", "").replace(")", "").replace("'", "")
                for r in api[name]["returns"]] == returns, name
        # every parameter with a default is optional, and only the owner token is required of training calls
        required = [p["parameter_name"] for p in api[name]["parameters"] if not p["parameter_has_default"]]
        # image: /edit's picture; teacher_run: a flow student's teacher (no default before a teacher run exists)
        assert set(required) <= {"owner", "run_name", "image", "teacher_run"}, (name, required)


def test_each_endpoint_called_as_documented(client, app):
    """Every endpoint, called with its documented parameter names and the documented types of value
    (``steps`` as the string ``"4"``, columns as names): each answers, none with an error."""
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    steps_type = api["/compare"]["parameters"][3]["python_type"]["type"]
    assert "'4'" in steps_type  # documented as a string literal ...
    row, gallery, table, traj, png, summary = client.predict(  # ... and accepted as one
        prompt=PROMPT, seed=1, guidance=5.0, steps="4", columns=["teacher-4 (naive)"], show_trajectory=False,
        api_name="/compare")
    assert len(gallery) == 1 and traj == "" and row.count("<figure") == 1 and "1 columns in" in summary
    assert isinstance(client.predict(api_name="/random_seed"), (int, float))
    assert client.predict(current=None, api_name="/refresh_runs")["choices"] == []
    status = client.predict(run_name=None, api_name="/train_status")
    assert "No run selected" in status[1]
    table_md, plot, summ = client.predict(name=None, api_name="/show_evaluation")
    assert "No evaluation" in table_md or "Evaluation" in table_md
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Runs .app and CLI.: .*not in the list"):  # the field is named
        client.predict(run_name="nothing-here", owner="", api_name="/train_stop")
    with pytest.raises(AppError, match="No training job"):
        client.predict(run_name=None, owner="", api_name="/train_stop")
    with pytest.raises(AppError, match="Pick a run"):
        client.predict(run_name=None, owner="", api_name="/train_resume")


def test_flow_compare_takes_a_class_and_refuses_anything_else_by_name(client):
    """The flow section: teacher-50 (Euler + CFG, 100 NFE), naive Euler-4 (8 NFE) and the shipped reflow students
    (1 NFE a step) on one class; a prompt that is not one of the 10 classes is refused, naming the field."""
    from gradio_client.exceptions import AppError

    cols = client.predict(api_name="/flow_refresh_columns")["choices"]
    names = [c[0] if isinstance(c, (list, tuple)) else c for c in cols]
    assert names[:2] == ["teacher-50 (CFG)", "teacher-4 (naive)"] and {"fashion-reflow-4", "fashion-reflow-1"} <= set(names)
    row, gallery, table, traj, png, info = client.predict(
        prompt="Bag", seed=5, guidance=2.0, steps="4", columns=names, show_trajectory=False,
        api_name="/flow_compare")
    assert [r[2] for r in table["data"]][:2] == [100, 8] and sorted(r[2] for r in table["data"][2:]) == [4, 4]
    assert 'id="flow-compare-columns"' in row and "Euler 50 steps" in row and "columns in" in info
    with pytest.raises(AppError, match="Class"):
        client.predict(prompt="a red circle", seed=0, guidance=2.0, steps="4", columns=names[:1],
                       show_trajectory=False, api_name="/flow_compare")


def test_flow_edit_runs_a_technique_on_classes_and_names_a_bad_one(client):
    """The flow section's Edit: an anagram of two classes in every column (teacher-50: 50 steps, two guided
    prompts a step, 200 NFE); a prompt that is no class is refused, naming the field."""
    from gradio_client.exceptions import AppError

    cols = ["teacher-50 (CFG)", "teacher-4 (naive)", "fashion-reflow-4"]
    row, gallery, table, summary = client.predict(
        technique="anagram", image=None, prompt="Trouser", prompt_2="Bag", strength=1.0, seed=0, student_steps="4",
        columns=cols, api_name="/flow_edit")
    assert [r[2] for r in table["data"]] == [200, 16, 8] and 'id="flow-edit-columns"' in row
    with pytest.raises(AppError, match="prompt_2: the flow teacher's prompt is a class"):
        client.predict(technique="hybrid", image=None, prompt="Trouser", prompt_2="a cat", strength=1.0, seed=0,
                       student_steps="4", columns=cols[:1], api_name="/flow_edit")


def _form(**change):
    values = dict(method="mbcd", num_boundaries=4, lora_rank=4, lr=1e-3, max_steps=10, batch_size=8,
                  guidance=3.0, guidance_max=3.0, preview_every=5, student_name="", data_kind="tiny world",
                  data_path="", extra_config="", overwrite=False, owner="")
    values.update(change)
    return values


@pytest.mark.parametrize("change, match", [
    (dict(lr=0.0), "learning rate|minimum"),
    (dict(guidance=5.0, guidance_max=2.0), "guidance_max"),
    (dict(student_name="no spaces allowed"), "student name"),
    (dict(extra_config="{broken"), "JSON"),
    (dict(data_kind="image folder", data_path="/definitely/not/here"), "outside the allowed folder"),
])
def test_training_config_errors(client, app, change, match):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=match):
        client.predict(**_form(**change), api_name="/train_start")
    assert not [p for p in (app.work / "runs").iterdir() if not p.name.startswith(".")]  # nothing was launched


def test_unreadable_dataset_folder_errors(client, app):
    from gradio_client.exceptions import AppError

    folder = app.work / "data" / "broken-set"  # inside the data folder the host allows
    folder.mkdir()
    (folder / "metadata.jsonl").write_bytes(b"\x00\xff\xfe")
    with pytest.raises(AppError, match="metadata.jsonl"):
        client.predict(**_form(data_kind="image folder", data_path=str(folder)), api_name="/train_start")
    status = client.predict(run_name=None, api_name="/train_status")  # (runs list, status line, bar, loss chart, ...)
    assert "No run selected" in status[1] and status[3]["value"] is None and status[4] is None


def _editor(tmp_path, background=None, layers=()):
    """An ImageEditor value as gradio_client sends it: files for the background and the paint layers."""
    from gradio_client import handle_file

    return {"background": handle_file(str(background)) if background else None,
            "layers": [handle_file(str(p)) for p in layers], "composite": None, "id": None}


def test_edit_runs_each_technique_as_documented(client, app, tmp_path):
    """/edit with named parameters, as view_api documents them: SDEdit and inpainting from an uploaded world
    image (the paint layer is the mask), anagrams and hybrids from two prompts and no image."""
    import numpy as np
    from PIL import Image

    from cdlab.world import Caption, render

    students = app.students
    src = tmp_path / "src.png"
    render(Caption("large", "red", "circle", "center", "white"), 1, 32).save(src)
    paint = np.zeros((32, 32, 4), dtype=np.uint8)
    paint[8:24, 8:24] = (255, 0, 255, 150)
    layer = tmp_path / "paint.png"
    Image.fromarray(paint, "RGBA").save(layer)
    # teacher-50 in the SDEdit call only (its 30 steps); the others run the naive teacher and a student
    cases = [("sdedit", _editor(tmp_path, src), "a large blue circle in the center on a white background", "", 0.6),
             ("inpaint", _editor(tmp_path, src, [layer]), "a large red cross in the center on a white background", "", 1.0),
             ("anagram", None, "a large red square at the top left on a white background",
              "a large red square at the bottom left on a white background", 1.0),
             ("hybrid", None, "a large blue circle in the center on a white background",
              "a large blue cross in the center on a white background", 1.0)]
    for technique, image, p1, p2, strength in cases:
        cols = (["teacher-50 (CFG)"] if technique == "sdedit" else []) + ["teacher-4 (naive)", students[0]]
        row, gallery, table, info = client.predict(technique=technique, image=image, prompt=p1, prompt_2=p2,
                                                   strength=strength, seed=2, student_steps="2", columns=cols,
                                                   api_name="/edit")
        n_input = 1 if image else 0
        assert row.count("<figure") == n_input + len(cols) and f'data-technique="{technique}"' in row, technique
        assert [r[0] for r in table["data"]] == cols and all(r[1] > 0 for r in table["data"])
        nfe = {r[0]: r[2] for r in table["data"]}
        per_step = 2 if technique in ("anagram", "hybrid") else 1
        if technique == "sdedit":
            assert nfe["teacher-50 (CFG)"] == 2 * 30  # 30 of its 50 steps at strength 0.6, CFG
        assert nfe["teacher-4 (naive)"] == 2 * per_step * (2 if technique == "sdedit" else 4), technique
        assert nfe[students[0]] <= 2 * per_step
        assert all(Path(g["image"]).is_file() for g in gallery) and f"{len(cols)} columns in" in info


def test_edit_refuses_bad_uploads_by_name_and_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError
    from PIL import Image

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 40), "red").save(wide)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32), "white").save(plain)
    full = tmp_path / "full.png"
    Image.new("RGBA", (32, 32), (255, 0, 255, 255)).save(full)
    bad = [("sdedit", None, "no image"), ("sdedit", _editor(tmp_path, text), "Image"),
           ("sdedit", _editor(tmp_path, wide), "not square"), ("inpaint", _editor(tmp_path, plain), "mask: empty"),
           ("inpaint", _editor(tmp_path, plain, [full]), "covers the whole image")]
    for technique, image, match in bad:
        with pytest.raises(AppError, match=match):
            client.predict(technique=technique, image=image, prompt="", prompt_2="", strength=0.5, seed=0,
                           student_steps="4", columns=["teacher-4 (naive)"], api_name="/edit")
    with pytest.raises(AppError, match="prompt_2"):
        client.predict(technique="hybrid", image=None, prompt="a", prompt_2="", strength=1.0, seed=0,
                       student_steps="4", columns=["teacher-4 (naive)"], api_name="/edit")
    row, *_ = client.predict(technique="sdedit", image=_editor(tmp_path, plain), prompt="", prompt_2="", strength=0.5,
                             seed=0, student_steps="4", columns=["teacher-4 (naive)"], api_name="/edit")
    assert row.count("<figure") == 2
