"""Compare logic on a small random pipeline with real students: columns, noise, NFE, errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from cdlab.ui import compare as C

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    from cdlab.students import StudentCard, attach_lora, save_student
    from cdlab.teachers import load_teacher
    from cdlab.tiny.architecture import build_pipeline

    teacher = load_teacher(tiny_pipe_dir)
    root = tmp_path_factory.mktemp("adapters")
    for i, (method, n) in enumerate([("cd", 1), ("mbcd", 4)]):
        pipe = build_pipeline(seed=0)
        attach_lora(pipe.unet, rank=4)
        torch.manual_seed(i)
        for p in pipe.unet.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        save_student(pipe.unet, f"stu{i}", StudentCard(name=f"stu{i}", base_model=teacher.base_id, method=method,
                                                        num_boundaries=n, steps=4), root=root)
    # a student of another teacher must not be offered
    save_student(pipe.unet, "other", StudentCard(name="other", base_model="cdlab/tiny-teacher", method="cd",
                                                  num_boundaries=1), root=root)
    return teacher, root, C.Comparer(teacher, adapters_root=root)


def test_columns_fit_the_teacher(setup):
    _, _, cmp = setup
    assert cmp.column_choices() == [C.TEACHER_50, C.TEACHER_4, "stu0", "stu1"]


def test_compare_same_noise_nfe_and_speedup(setup):
    teacher, _, cmp = setup
    from cdlab.samplers import ddim_timesteps, sample_ddim

    res = cmp.run(PROMPT, 7, 3.0, 2, cmp.column_choices(), show_trajectory=True)
    assert [c.nfe for c in res.columns] == [100, 8, 2, 2]
    assert all(c.image.size == (teacher.resolution, teacher.resolution) for c in res.columns)
    assert res.columns[0].speedup == pytest.approx(1.0)
    assert all(c.speedup > 1 and not c.speedup_estimated for c in res.columns[1:])
    # trajectories: teacher-50 subsampled to 10 frames ending at step 50; students one frame per step
    assert res.columns[0].trajectory_steps[-1] == 50 and len(res.columns[0].trajectory) == C.MAX_TRAJECTORY_FRAMES
    assert [len(c.trajectory) for c in res.columns[1:]] == [4, 2, 2]
    # the teacher-4 column is exactly the sampler run on seed 7's noise: same noise for every column
    with torch.inference_mode():
        cond, uncond = teacher.encode([PROMPT])
        out = sample_ddim(teacher.unet, teacher.initial_noise(7), cond, uncond, 3.0, ddim_timesteps(4), teacher.scheduler)
    assert list(teacher.decode(out.latents)[0].getdata()) == list(res.columns[1].image.getdata())
    # students really differ from the plain teacher (the adapter is active), and LoRA is off afterwards
    assert list(res.columns[2].image.getdata()) != list(res.columns[3].image.getdata())
    assert set(teacher.unet.peft_config) == {"stu0", "stu1"}  # named adapters on ONE UNet
    table = res.table()
    assert [r[0] for r in table][:2] == [C.TEACHER_50, C.TEACHER_4] and [r[2] for r in table] == [100, 8, 2, 2]
    png = res.compose()
    assert png.width >= 4 * 256 and png.height > 256 + 100  # header, cells, captions, strips


def test_speedup_estimated_without_teacher_50(setup):
    _, _, cmp = setup
    res = cmp.run(PROMPT, 1, 3.0, 1, [C.TEACHER_4, "stu0"])
    assert [c.speedup_estimated for c in res.columns] == [True, True]
    assert res.columns[1].speedup == pytest.approx(100.0)


@pytest.mark.parametrize("args, match", [
    (("", 0, 3.0, 4), "empty"),
    (("   ", 0, 3.0, 4), "empty"),
    (("x" * (C.MAX_PROMPT_CHARS + 1), 0, 3.0, 4), "limit"),
    ((PROMPT, -1, 3.0, 4), "seed"),
    ((PROMPT, 1.5, 3.0, 4), "seed"),
    ((PROMPT, "abc", 3.0, 4), "seed"),
    ((PROMPT, 0, 0.5, 4), "guidance"),
    ((PROMPT, 0, float("nan"), 4), "guidance"),
    ((PROMPT, 0, 3.0, 3), "steps"),
])
def test_bad_inputs(setup, args, match):
    _, _, cmp = setup
    with pytest.raises(C.InputError, match=match):
        cmp.run(*args, [C.TEACHER_4])


def test_no_or_unknown_column(setup):
    _, _, cmp = setup
    with pytest.raises(C.InputError, match="No column"):
        cmp.run(PROMPT, 0, 3.0, 4, [])
    with pytest.raises(C.InputError, match="Unknown column 'other'"):
        cmp.run(PROMPT, 0, 3.0, 4, ["other"])


def test_missing_and_malformed_adapter_then_next_request_works(setup, tmp_path):
    from cdlab.students import StudentError

    teacher, root, _ = setup
    local = tmp_path / "adapters"
    shutil.copytree(root / "stu0", local / "fresh")
    card = (local / "fresh" / "card.json")
    card.write_text(card.read_text().replace('"stu0"', '"fresh"'))
    cmp = C.Comparer(teacher, adapters_root=local)
    assert "fresh" in cmp.column_choices()  # a new student shows up without a restart
    (local / "fresh" / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((StudentError, C.InputError)):
        cmp.run(PROMPT, 0, 3.0, 4, ["fresh"])
    shutil.rmtree(local / "fresh")
    with pytest.raises(C.InputError, match="Unknown column"):
        cmp.run(PROMPT, 0, 3.0, 4, ["fresh"])
    assert len(cmp.run(PROMPT, 0, 3.0, 4, [C.TEACHER_4]).columns) == 1


def test_presets_and_long_prompt_warning(setup):
    teacher, _, cmp = setup
    from cdlab.world import parse_caption

    presets = C.prompt_presets(teacher)
    assert len(presets) == 8 and len(set(presets)) == 8
    assert all(parse_caption(p) for p in presets)
    res = cmp.run("word " * 40, 0, 3.0, 1, [C.TEACHER_4])
    assert res.warnings and "tokens" in res.warnings[0]


def test_validate_request_normalises():
    assert C.validate_request("  hi ", 5.0, "2.5", 8.0) == ("hi", 5, 2.5, 8)


def test_a_column_that_cannot_be_produced_fails_alone(setup, tmp_path):
    """An external student offline (or any column's failure) shows its reason in its place; the others render."""
    teacher, root, _ = setup
    cmp = C.Comparer(teacher, adapters_root=root, allow_external=True)
    res = cmp.run(PROMPT, 0, 3.0, 4, [C.TEACHER_4, "lcm-lora (external)", "stu1"])
    ok4, ext, stu = res.columns
    assert ok4.error is None and stu.error is None and ok4.nfe == 8 and stu.nfe == 4
    assert ext.error and "hub" in ext.error and ext.nfe == 0  # offline: no hub here
    assert ext.image.size == (256, 256) and "failed" in ext.caption()
    rows = res.table()
    assert rows[1][3].startswith("failed") and rows[2][2] == 4
    assert any("lcm-lora" in w for w in res.warnings)
    assert res.compose().width > 0  # the download image still composes
    # when every column fails, the request itself is the error
    with pytest.raises(C.InputError, match="lcm-lora.*hub"):
        cmp.run(PROMPT, 0, 3.0, 4, ["lcm-lora (external)"])


def test_control_characters_and_repeated_columns(setup):
    _, _, cmp = setup
    for bad in ("red\x00circle", "a\x1b[31m", "x\x7f"):
        with pytest.raises(C.InputError, match="control character"):
            cmp.run(bad, 0, 3.0, 4, [C.TEACHER_4])
    res = cmp.run("a red circle\non two lines", 0, 3.0, 4, [C.TEACHER_4] * 50)
    assert len(res.columns) == 1  # a repeated name is one column
    with pytest.raises(C.InputError, match="limit"):
        cmp.run(PROMPT, 0, 3.0, 4, [f"c{i}" for i in range(C.MAX_COLUMNS + 1)])


def test_sampling_holds_the_teacher_lock(setup):
    """Adapter switching and sampling run under the teacher's lock: another thread waits for it."""
    import threading
    import time

    teacher, _, cmp = setup
    finished = []
    with teacher.lock:
        th = threading.Thread(target=lambda: finished.append(cmp.run(PROMPT, 0, 3.0, 4, [C.TEACHER_4])))
        th.start()
        time.sleep(0.5)
        assert not finished  # blocked on the lock
    th.join(30)
    assert finished and len(finished[0].columns) == 1
