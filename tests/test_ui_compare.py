"""Compare logic on a small random pipeline with real students: columns, noise, NFE, errors."""
from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from cdlab.ui import compare as C

PROMPT = "a small red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def compare_students(random_teacher, tmp_path_factory):
    """The random tiny teacher, two random students of it (cd N=1, mbcd N=4) and one of another teacher in a
    scratch adapters folder, and a Comparer on them."""
    from cdlab.students import StudentCard, attach_lora, save_student
    from cdlab.tiny.architecture import build_pipeline

    teacher = random_teacher
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
    return SimpleNamespace(teacher=teacher, root=root, comparer=C.Comparer(teacher, adapters_root=root))


def test_columns_fit_the_teacher(compare_students):
    cmp = compare_students.comparer
    assert cmp.column_choices() == [C.TEACHER_50, C.TEACHER_4, "stu0", "stu1"]


def test_compare_same_noise_nfe_and_speedup(compare_students):
    teacher, cmp = compare_students.teacher, compare_students.comparer
    from cdlab.samplers import ddim_timesteps, sample_ddim

    res = cmp.run(PROMPT, 7, 3.0, 2, cmp.column_choices(), show_trajectory=True)
    assert [c.nfe for c in res.columns] == [100, 8, 2, 2]
    assert all(c.image.size == (teacher.resolution, teacher.resolution) for c in res.columns)
    assert res.columns[0].speedup == pytest.approx(1.0)
    assert all(c.speedup > 1 and not c.speedup_estimated for c in res.columns[1:])
    # trajectories on one grid: the naive teacher's 4 steps set it (999, 750, 500, 250); teacher-50 shows its
    # step nearest each; the 2-step students fill the cells of their own timesteps (999, 500) only
    assert res.grid == [999, 750, 500, 250]
    assert res.columns[0].trajectory_timesteps == [999, 759, 499, 259]
    assert res.columns[1].trajectory_timesteps == [999, 749, 499, 249]
    assert [c.trajectory_timesteps for c in res.columns[2:]] == [[999, None, 500, None]] * 2
    assert all(len(c.trajectory) == len(c.trajectory_xt) == 4 for c in res.columns)
    assert res.columns[2].trajectory[1] is None and res.columns[2].trajectory[0].size == res.columns[2].image.size
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
    from cdlab.ui.compare_view import columns_html, trajectory_html

    row, grid = columns_html(res), trajectory_html(res)
    assert row.count("<figure") == 4 and "NFE 100" in row and "vs teacher-50" in row
    assert grid.count("<tr>") == 1 + 4 and "t = 750" in grid and grid.count("no step here") == 4


def test_speedup_estimated_without_teacher_50(compare_students):
    cmp = compare_students.comparer
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
def test_bad_inputs(compare_students, args, match):
    cmp = compare_students.comparer
    with pytest.raises(C.InputError, match=match):
        cmp.run(*args, [C.TEACHER_4])


def test_no_or_unknown_column(compare_students):
    cmp = compare_students.comparer
    with pytest.raises(C.InputError, match="No column"):
        cmp.run(PROMPT, 0, 3.0, 4, [])
    with pytest.raises(C.InputError, match="Unknown column 'other'"):
        cmp.run(PROMPT, 0, 3.0, 4, ["other"])


def test_missing_and_malformed_adapter_then_next_request_works(compare_students, tmp_path):
    from cdlab.students import StudentError

    teacher, root = compare_students.teacher, compare_students.root
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


def test_presets_and_long_prompt_warning(compare_students):
    teacher, cmp = compare_students.teacher, compare_students.comparer
    from cdlab.world import parse_caption

    presets = C.prompt_presets(teacher)
    assert len(presets) == 8 and len(set(presets)) == 8
    assert all(parse_caption(p) for p in presets)
    res = cmp.run("word " * 40, 0, 3.0, 1, [C.TEACHER_4])
    assert res.warnings and "tokens" in res.warnings[0]


def test_validate_request_normalises():
    assert C.validate_request("  hi ", 5.0, "2.5", 8.0) == ("hi", 5, 2.5, 8)


def test_a_column_that_cannot_be_produced_fails_alone(compare_students, tmp_path):
    """An external student offline (or any column's failure) shows its reason in its place; the others render."""
    teacher, root = compare_students.teacher, compare_students.root
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


def test_control_characters_and_repeated_columns(compare_students):
    cmp = compare_students.comparer
    for bad in ("red\x00circle", "a\x1b[31m", "x\x7f"):
        with pytest.raises(C.InputError, match="control character"):
            cmp.run(bad, 0, 3.0, 4, [C.TEACHER_4])
    res = cmp.run("a red circle\non two lines", 0, 3.0, 4, [C.TEACHER_4] * 50)
    assert len(res.columns) == 1  # a repeated name is one column
    with pytest.raises(C.InputError, match="limit"):
        cmp.run(PROMPT, 0, 3.0, 4, [f"c{i}" for i in range(C.MAX_COLUMNS + 1)])


def test_sampling_holds_the_teacher_lock(compare_students):
    """Adapter switching and sampling run under the teacher's lock: another thread waits for it."""
    import threading
    import time

    teacher, cmp = compare_students.teacher, compare_students.comparer
    finished = []
    with teacher.lock:
        th = threading.Thread(target=lambda: finished.append(cmp.run(PROMPT, 0, 3.0, 4, [C.TEACHER_4])))
        th.start()
        time.sleep(0.5)
        assert not finished  # blocked on the lock
    th.join(30)
    assert finished and len(finished[0].columns) == 1


def test_align_to_grid():
    assert C.align_to_grid([999, 749, 499, 249], [999, 750, 500, 250]) == [0, 1, 2, 3]
    assert C.align_to_grid([999, 500], [999, 750, 500, 250]) == [0, None, 1, None]
    from cdlab.samplers import ddim_timesteps

    t50 = ddim_timesteps(50)
    assert [t50[j] for j in C.align_to_grid(t50, [999, 750, 500, 250])] == [999, 759, 499, 259]
    assert C.align_to_grid([], [999]) == [None]


def test_a_student_on_a_shifted_grid_has_a_cell_for_each_of_its_steps():
    """fashion-dmd-4 samples at 999/474/231/91 (its card's shift 0.3): the grid gains 91, the one step no uniform
    point is near, so each of its steps has its own cell; the other columns keep theirs, and a grid without a
    shifted student is the uniform one."""
    from cdlab.students import StudentCard

    card = StudentCard(name="s", base_model="m", method="dmd", num_boundaries=4, steps=4, scheduler_kwargs={"shift": 0.3})
    shifted = C.Column("s", "student", 4, 1.0, student="s", card=card)
    plain = C.Column("p", "student", 4, 1.0, student="p", card=StudentCard(name="p", base_model="m", method="cd",
                                                                           num_boundaries=4, steps=4))
    teacher4 = C.Column(C.TEACHER_4, "teacher", 4, 5.0)
    assert C.trajectory_grid(None, [teacher4, plain]) == [999, 750, 500, 250]
    grid = C.trajectory_grid(None, [teacher4, plain, shifted])
    assert grid == [999, 750, 500, 250, 91]
    assert C.align_to_grid([999, 474, 231, 91], grid) == [0, None, 1, 2, 3]  # every step in a cell, none twice
    assert C.align_to_grid([999, 749, 499, 249], grid) == [0, 1, 2, 3, None]


def test_concurrent_requests_are_batched_and_equal_their_solo_runs(compare_students):
    """Requests that arrive while one samples are served together: one batched UNet call per column, and
    each request's images are its solo run's (its own noise, prompt, seed and guidance)."""
    import threading

    import numpy as np

    teacher, root = compare_students.teacher, compare_students.root
    solo = C.Comparer(teacher, adapters_root=root, batching=False, cache_size=0)
    cmp = C.Comparer(teacher, adapters_root=root, cache_size=0)
    cols = solo.column_choices()
    reqs = [(PROMPT, 3, 3.0), ("a large green cross in the center on a black background", 11, 5.0),
            ("a small blue square at the top left on a yellow background", 12, 1.0), (PROMPT, 4, 3.0)]
    want = [solo.run(p, s, g, 2, cols) for p, s, g in reqs]
    results: dict[int, C.CompareResult] = {}
    with teacher.lock:  # hold the worker until every request is queued: they form one batch
        threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, cmp.run(*r, 2, cols)))
                   for i, r in enumerate(reqs)]
        for th in threads:
            th.start()
        deadline = time.time() + 20
        while cmp.batcher.pending() < len(reqs) and time.time() < deadline:
            time.sleep(0.05)  # the worker takes what is queued at once (one or more) and waits for the lock
        assert cmp.batcher.pending() == len(reqs)
    for th in threads:
        th.join(60)
    assert sorted(results) == [0, 1, 2, 3]
    # the first round took what was queued when the worker woke, the second all the rest: 4 requests in
    # at most 2 rounds (solo, they would be 4), and each result says the batch it was served in
    assert cmp.batcher.rounds <= 2 and sum(cmp.batcher.sizes) == len(reqs)
    assert sorted(r.batch for r in results.values()) == sorted(n for n in cmp.batcher.sizes for _ in range(n))
    assert max(r.batch for r in results.values()) >= 2
    for i, w in enumerate(want):
        got = results[i]
        assert [c.label for c in got.columns] == [c.label for c in w.columns]
        assert [c.nfe for c in got.columns] == [c.nfe for c in w.columns]  # guidance 1: no CFG, 50 NFE
        for a, b in zip(got.columns, w.columns):
            diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (i, a.label, diff.max())
    assert want[2].columns[0].nfe == 50 and want[0].columns[0].nfe == 100


def test_teacher_columns_are_cached_per_prompt_seed_and_guidance(compare_students):
    teacher, root = compare_students.teacher, compare_students.root
    cmp = C.Comparer(teacher, adapters_root=root, batching=False)
    cols = cmp.column_choices()
    first = cmp.run(PROMPT, 21, 3.0, 4, cols)
    again = cmp.run(PROMPT, 21, 3.0, 2, cols)  # only the student steps changed
    assert [c.cached for c in first.columns] == [False] * 4
    assert [c.cached for c in again.columns] == [True, True, False, False]
    assert list(again.columns[0].image.getdata()) == list(first.columns[0].image.getdata())
    assert again.columns[0].seconds == first.columns[0].seconds  # the time it was measured with
    assert "cached" in again.columns[0].caption()
    other = cmp.run(PROMPT, 21, 4.0, 4, cols[:1])  # another guidance: sampled again
    assert not other.columns[0].cached
    traj = cmp.run(PROMPT, 21, 3.0, 4, cols[:1], show_trajectory=True)  # a cached entry without a trajectory
    assert not traj.columns[0].cached and traj.columns[0].trajectory


def test_students_run_fused_and_leave_the_teacher_untouched(compare_students):
    """A student column runs with its LoRA fused (a plain UNet's cost); its image is the unfused student's up to
    float rounding, and the teacher's base weights are bit for bit what they were."""
    import numpy as np

    teacher, root = compare_students.teacher, compare_students.root
    base = {k: v.clone() for k, v in teacher.unet.state_dict().items() if "lora" not in k}
    fused = C.Comparer(teacher, adapters_root=root, batching=False).run(PROMPT, 5, 3.0, 4, ["stu1", C.TEACHER_4])
    plain = C.Comparer(teacher, adapters_root=root, batching=False, fuse=False, cache_size=0).run(
        PROMPT, 5, 3.0, 4, ["stu1", C.TEACHER_4])
    d = np.abs(np.asarray(fused.columns[0].image, dtype=int) - np.asarray(plain.columns[0].image, dtype=int))
    assert d.max() <= 1
    assert list(fused.columns[1].image.getdata()) == list(plain.columns[1].image.getdata())
    after = {k: v for k, v in teacher.unet.state_dict().items() if "lora" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_prompt_notice_names_unknown_words_and_offers_the_nearest_caption(compare_students):
    cmp = compare_students.comparer
    text, nearest = cmp.prompt_notice("a photo of a cat")
    assert "“photo”" in text and "“cat”" in text and nearest == "a large red circle in the center on a white background"
    text, nearest = cmp.prompt_notice("a yellow cros at the top right on a blue backgrond")
    assert nearest == "a large yellow cross at the top right on a blue background" and "caption order" in text
    assert cmp.prompt_notice(PROMPT) == ("", None)
    assert cmp.prompt_notice("") == ("", None)
    from cdlab.world import parse_caption

    for t in ("big red box on grey", "green", "☃ 🐈 \u200b", "x" * 500):
        _, n = cmp.prompt_notice(t)
        assert parse_caption(n)  # always a caption of the grammar


@pytest.mark.slow
def test_the_default_preset_shows_naive_sampling_fail():
    """The page opens on presets[0] at seed 0: the checker reads teacher-50 and every shipped student right and
    the naive 4-step teacher wrong (what the lab exists to show, at a glance)."""
    from cdlab.teachers import load_teacher
    from cdlab.world import check

    teacher = load_teacher("tiny")
    cmp = C.Comparer(teacher, batching=False)
    prompt = C.prompt_presets(teacher)[0]
    res = cmp.run(prompt, 0, teacher.guidance, 4, cmp.column_choices())
    ok = {c.label: all(check(c.image, prompt).values()) for c in res.columns}
    assert len(ok) >= 5 and not ok.pop(C.TEACHER_4) and all(ok.values()), ok


def test_serving_rows_follow_the_unets_size(compare_students):
    """A small UNet (the tiny teacher, the flow teacher) is served 128 rows a call; an SD1.5-sized one 4 on the
    CPU and 8 on CUDA (`cdlab.teachers.serving_rows`), and the Comparer takes that unless told otherwise."""
    from cdlab.flow.pipeline import load_flow_teacher
    from cdlab.teachers import SMALL_UNET_PARAMETERS, serving_rows

    flow = load_flow_teacher()
    assert not flow.is_tiny and serving_rows(flow) == 128 and C.Comparer(flow, batching=False).max_rows == 128
    assert serving_rows(compare_students.teacher) == 128 == compare_students.comparer.max_rows
    side = int(SMALL_UNET_PARAMETERS ** 0.5) + 1  # one layer just over the limit, on the meta device (no memory)
    big = SimpleNamespace(is_tiny=False, unet=torch.nn.Linear(side, side, device="meta"), device="cpu")
    assert serving_rows(big) == 4 and C.Comparer(big, batching=False).max_rows == 4
    assert serving_rows(SimpleNamespace(**{**vars(big), "device": "cuda:0"})) == 8
    assert C.Comparer(big, batching=False, max_rows=16).max_rows == 16
    small = SimpleNamespace(is_tiny=False, unet=torch.nn.Linear(side - 2, side - 2, device="meta"), device="cpu")
    assert serving_rows(small) == 128
