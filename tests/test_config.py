"""The trainer's config as a boundary (issue 10): one check for every field, names that never collide,
students replaced only on request, paths confined, and the CLI that keeps the shipped students intact."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdlab.train import config as C

REPO = Path(__file__).resolve().parent.parent


def _resolved(**kw):
    return C.resolve(C.from_dict({"model": "tiny", **kw}), 32)


@pytest.mark.parametrize("field, value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 1e30), ("lr", -1.0),
    ("max_steps", 0), ("max_steps", 10**12), ("batch_size", -3), ("guidance", 1e308),
    ("warmup_steps", -1), ("seed", -5), ("sampler_prob", 1.5), ("ema_decay", 1.0),
    ("resolution", 30), ("threads", 10**6), ("keep_checkpoints", 0), ("method", "gan"),
    ("loss_type", "l1"), ("device", "tpu"), ("run_name", "../../x"), ("run_name", "/abs"),
    ("run_name", "a b"), ("student_name", "x/y"), ("student_name", ".hidden"),
])
def test_check_refuses_out_of_range_and_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _resolved(**{field: value})


def test_every_numeric_field_has_bounds():
    import dataclasses

    numeric = {f.name for f in dataclasses.fields(C.TrainConfig)
               if C._base_type(C._field_types()[f.name]) in (int, float)}
    assert numeric - {"num_train_timesteps"} <= set(C.BOUNDS)
    assert not set(C.BOUNDS) - numeric


def test_default_student_name_never_collides(tmp_path, monkeypatch):
    monkeypatch.setattr(C.time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg = C.TrainConfig(model="tiny", method="mbcd", num_boundaries=4)
    first = C.default_student_name(cfg, tmp_path)
    assert first == "tiny-mbcd-4-20260101-000000"
    (tmp_path / first).mkdir()
    (tmp_path / f"{first}-2").mkdir()
    assert C.default_student_name(cfg, tmp_path) == f"{first}-3"
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(tmp_path))
    cfg = _resolved()
    assert cfg.student_name == f"{first}-3" and cfg.run_name == cfg.student_name


def test_check_destination_needs_overwrite_and_never_replaces_shipped(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "shipped-one").mkdir()
    (tmp_path / "SHIPPED").write_text("# ships with the repository\nshipped-one\n")
    C.check_destination(_resolved(student_name="fresh"), tmp_path)  # a free name
    with pytest.raises(ValueError, match="student_name 'mine' already exists.*overwrite"):
        C.check_destination(_resolved(student_name="mine"), tmp_path)
    C.check_destination(_resolved(student_name="mine", overwrite=True), tmp_path)
    C.check_destination(_resolved(student_name="mine", save_student=False), tmp_path)
    with pytest.raises(ValueError, match="shipped"):
        C.check_destination(_resolved(student_name="shipped-one", overwrite=True), tmp_path, allow_shipped=False)
    C.check_destination(_resolved(student_name="shipped-one", overwrite=True), tmp_path)  # the CLI may


def test_repository_ships_its_students_in_the_list():
    from cdlab.students import list_students, shipped_students

    shipped = shipped_students(REPO / "adapters")
    assert {"tiny-ct-4", "tiny-cd-4", "tiny-mbcd-4", "tiny-dmd-1", "tiny-dmd-4"} <= shipped
    assert shipped <= {c.name for c in list_students(REPO / "adapters")}


@pytest.mark.parametrize("overrides, match", [
    ({"data": "/etc"}, "data"), ({"data": "../../etc"}, "data"), ({"cache_dir": "/tmp"}, "cache_dir"),
    ({"model": "sd15"}, "model"), ({"nope": 1}, "unknown field"), ({"lr": "1e-3"}, "lr must be a number"),
    ({"lr": float("nan")}, "finite"), ({"save_student": "yes"}, "true or false"),
    ({"student_name": "a\x00b"}, "control character"), ({"run_name": "x" * 301}, "limit"),
    ({"preview_prompts": []}, "preview_prompts"), ({"preview_prompts": "abc"}, "preview_prompts"),
    ({"max_steps": 2.5}, "whole number"), ({"data": "hf:../../x"}, "data"),
])
def test_untrusted_overrides(overrides, match, tmp_path, monkeypatch):
    monkeypatch.setenv("CDLAB_DATA_DIRS", str(tmp_path))
    with pytest.raises(ValueError, match=match):
        C.untrusted_overrides(overrides)


def test_data_folders_are_confined_after_symlinks(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "set").mkdir(parents=True)
    os.symlink(tmp_path, root / "up")
    monkeypatch.setenv("CDLAB_DATA_DIRS", str(root))
    assert C.check_data("set") == str((root / "set").resolve())
    assert C.check_data(str(root / "set")) == str((root / "set").resolve())
    for bad in ("up", "up/data/set/../..", str(tmp_path), "set/../../"):
        with pytest.raises(ValueError, match="outside the allowed folder"):
            C.check_data(bad)
    assert C.untrusted_overrides({"data": "world", "log_every": 5}) == {"data": "world", "log_every": 5}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_default_cli_run_leaves_every_student_byte_identical(tmp_path, monkeypatch, capsys):
    """`python -m cdlab train --model tiny --max_steps 1` (the README's first command, shortened) adds a new
    student and changes no file of the shipped ones; a taken name is refused without --overwrite. The first
    run is the command itself (a subprocess); the next two call its ``main`` in this process, with the same
    environment (a process start costs seconds of the suite)."""
    from cdlab.__main__ import main
    adapters = tmp_path / "adapters"
    shutil.copytree(REPO / "adapters", adapters)
    before = _hashes(adapters)
    env = {**os.environ, "CDLAB_ADAPTERS_DIR": str(adapters), "CDLAB_RUNS_DIR": str(tmp_path / "runs"),
           "CDLAB_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    small = ["--data_size", "16", "--batch_size", "4", "--preview_every", "0", "--probe_size", "2"]
    cmd = [sys.executable, "-m", "cdlab", "train", "--model", "tiny", "--max_steps", "1", *small]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _hashes(adapters)
    assert {k: v for k, v in after.items() if k in before} == before
    new = {k.split("/")[0] for k in after if k not in before}
    assert len(new) == 1 and next(iter(new)).startswith("tiny-mbcd-4-")
    for k in ("CDLAB_ADAPTERS_DIR", "CDLAB_RUNS_DIR", "CDLAB_CACHE_DIR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.chdir(REPO)
    argv = cmd[3:]  # after "python -m cdlab"
    # the shipped name again: refused before any training, exit 2, files untouched
    try:
        code = main(argv + ["--student_name", "tiny-mbcd-4"])
    except SystemExit as e:  # argparse's exit, as the command's process exits
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert {k: v for k, v in _hashes(adapters).items() if k in before} == before
    # with --overwrite (a bare flag) the CLI may replace it deliberately
    assert main(argv + ["--student_name", "tiny-mbcd-4", "--overwrite"]) == 0
    card = json.loads((adapters / "tiny-mbcd-4" / "card.json").read_text())
    assert card["metrics"]["train_steps"] == 1


def test_default_guidance_comes_from_the_teacher(tmp_path, capsys):
    """Every entry point's default CFG scale is the teacher's (`Teacher.guidance`): 5 for tiny, 7.5 for SD1.5."""
    from cdlab.generate import main as generate
    from cdlab.teachers import SD15_GUIDANCE, TINY_GUIDANCE

    assert C.PROFILES["tiny"]["guidance"] == TINY_GUIDANCE and C.PROFILES["sd15"]["guidance"] == SD15_GUIDANCE
    assert generate(["--model", "tiny", "--prompt", "a small red circle at the center on a white background",
                     "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert f"guidance {TINY_GUIDANCE:g}" in out and "guidance 7.5" not in out
