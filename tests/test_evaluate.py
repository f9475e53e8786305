"""cdlab.evaluate on the random tiny pipeline: columns, NFE, same-noise agreement, files, listing, CLI,
the SD metrics path with offline stand-ins (FID refused below its minimum), prompt files, and a teacher
left bit-identical by fused students."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdlab import evaluate
from cdlab.evaluate import EvaluationError, list_evaluations, load_evaluation, run_evaluation


@pytest.fixture(scope="module")
def eval_students(random_teacher, tiny_pipe_dir, tmp_path_factory):
    """The random tiny teacher and two random LoRA students of it (N=2 and N=4) in a scratch adapters folder."""
    from cdlab import students
    from cdlab.teachers import load_teacher

    root = tmp_path_factory.mktemp("adapters")
    teacher = random_teacher
    for i, (name, nb) in enumerate((("mb2", 2), ("mb4", 4))):
        donor = load_teacher(tiny_pipe_dir)
        students.attach_lora(donor.unet, rank=4)
        torch.manual_seed(i)
        with torch.no_grad():  # a non-zero LoRA, so a student differs from the teacher
            for pname, p in donor.unet.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        card = students.StudentCard(name=name, base_model=teacher.base_id, method="mbcd", num_boundaries=nb, steps=nb)
        students.save_student(donor.unet, name, card, root=root)
    # A student of another base model: not "fitting", so never evaluated.
    donor = load_teacher(tiny_pipe_dir)
    students.attach_lora(donor.unet, rank=4)
    other = students.StudentCard(name="other", base_model="someone/else", method="cd", num_boundaries=1, steps=1)
    students.save_student(donor.unet, "other", other, root=root)
    return SimpleNamespace(teacher=teacher, root=root)


@pytest.fixture(scope="module")
def world_eval(eval_students, tmp_path_factory):
    teacher, root = eval_students.teacher, eval_students.root
    calls = []
    out = tmp_path_factory.mktemp("evals") / "run1"
    # diversity on 2 of the 6 captions (8 seeds each): the default, every caption up to 16, costs 8 runs of the suite
    res = run_evaluation(teacher, n=6, steps=(1, 4, 50), student_steps=(1, 2, 4), adapters_root=root,
                         out_dir=out, batch_size=4, progress=lambda f, m: calls.append((f, m)), diversity_captions=2)
    return SimpleNamespace(result=res, progress=calls)


def test_columns_nfe_and_metrics(world_eval):
    res = world_eval.result
    assert res["suite"] == "world" and res["n"] == 6
    got = [(r["method"], r["steps"], r["nfe"]) for r in res["rows"]]
    assert got == [(evaluate.TEACHER_METHOD, 1, 2), (evaluate.TEACHER_METHOD, 4, 8), (evaluate.TEACHER_METHOD, 50, 100),
                   ("mb2", 1, 1), ("mb2", 2, 2), ("mb2", 4, 4), ("mb4", 1, 1), ("mb4", 2, 2), ("mb4", 4, 4)]
    for r in res["rows"]:
        assert 0.0 <= r["adherence"] <= 1.0
        assert set(r["adherence_by_attribute"]) == {"size", "color", "shape", "position", "background"}
        assert r["seconds_per_image"] > 0
    ref = res["rows"][2]
    # The reference is the 50-step teacher itself: zero error, speed-up 1.
    assert ref["agreement_error"] == 0.0 and ref["speedup"] == pytest.approx(1.0)
    assert all(r["agreement_error"] > 0 for r in res["rows"] if r is not ref)
    # Fewer network evaluations -> faster (1 NFE vs 100 NFE, with the same decode).
    one = res["rows"][3]
    assert one["speedup"] > 1.0


def test_diversity_is_per_column_and_the_teachers_does_not_depend_on_the_students(eval_students, world_eval):
    """Each column's diversity (mean pixel distance between one caption's samples under 8 seeds) is measured with
    that column's own weights: the teacher's is the same whether students ran before it or not (the last
    student of the main loop must not stay active), and a deterministic sampler from different noise is > 0."""
    res = world_eval.result
    teacher, root = eval_students.teacher, eval_students.root
    alone = run_evaluation(teacher, n=6, steps=(1, 4, 50), students=[], adapters_root=root, batch_size=4,
                           write=False, diversity_captions=2)
    for a, b in zip(res["rows"][:3], alone["rows"]):
        assert (a["method"], a["steps"]) == (b["method"], b["steps"])
        assert a["diversity"] == pytest.approx(b["diversity"], rel=1e-5), a["steps"]
    assert all(r["diversity"] > 0 for r in res["rows"])
    assert "diversity" in evaluate.render_table(res)


def test_columns_match_unbatched_samplers_from_the_same_noise(eval_students, world_eval):
    """Batching must not change anything: image i of a column equals a direct single-prompt run from
    teacher.initial_noise(seed + i)."""
    from cdlab.metrics import agreement_error, to_unit
    from cdlab.samplers import consistency_timesteps, ddim_timesteps, sample_consistency, sample_ddim
    from cdlab.students import activate_student, load_student
    from cdlab.world import sample_captions

    teacher, root = eval_students.teacher, eval_students.root
    res = world_eval.result
    caps = sample_captions(6, seed=evaluate.PROMPT_SEED)
    texts = [c.text for c in caps]

    def decode(lat):
        return to_unit(teacher.vae.decode(lat / teacher.vae.config.scaling_factor).sample)

    imgs = {}
    with torch.no_grad():
        for i in range(6):
            cond, uncond = teacher.encode([texts[i]])
            x = teacher.initial_noise(i, 1)
            activate_student(teacher.pipe, None)
            for k in (4, 50):
                out = sample_ddim(teacher.unet, x, cond, uncond, res["guidance"], ddim_timesteps(k), teacher.scheduler)
                imgs.setdefault(("t", k), []).append(decode(out.latents))
            load_student(teacher.pipe, "mb4", root=root)
            out = sample_consistency(teacher.unet, x, cond, consistency_timesteps(2, 4), teacher.scheduler)
            imgs.setdefault(("mb4", 2), []).append(decode(out.latents))
        activate_student(teacher.pipe, None)
    ref = torch.cat(imgs[("t", 50)])
    rows = {(r["method"], r["steps"]): r for r in res["rows"]}
    err_t4 = float(agreement_error(torch.cat(imgs[("t", 4)]), ref))
    err_s = float(agreement_error(torch.cat(imgs[("mb4", 2)]), ref))
    assert rows[(evaluate.TEACHER_METHOD, 4)]["agreement_error"] == pytest.approx(err_t4, rel=1e-4, abs=1e-6)
    assert rows[("mb4", 2)]["agreement_error"] == pytest.approx(err_s, rel=1e-4, abs=1e-6)


def test_progress_is_monotone_and_finishes(world_eval):
    calls = world_eval.progress
    fracs = [f for f, _ in calls]
    assert fracs[0] == 0.0 and fracs[-1] == 1.0
    assert fracs == sorted(fracs)
    # 2 batches (6 prompts, batch 4) x 9 columns, plus the start and the end.
    assert len(calls) == 2 * 9 + 2


def test_files_and_round_trip(world_eval):
    res = world_eval.result
    out = res.path
    assert {p.name for p in out.iterdir()} == {"results.json", "table.md", "quality_vs_nfe.png"}
    assert (out / "quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_evaluation(out)
    assert loaded["rows"] == json.loads(json.dumps(res["rows"]))
    assert loaded.path == out and loaded["plot"].endswith("quality_vs_nfe.png")
    table = loaded["table_md"]
    assert table.count("\n| ") == 1 + len(res["rows"])  # header + one line per column
    assert "| mb4 | 2 | 2 |" in table
    assert load_evaluation(out / "results.json")["n"] == 6


def test_list_evaluations_newest_first_and_skips_junk(tmp_path):
    for name, created in (("a", "2026-01-01T00:00:00"), ("b", "2026-03-01T00:00:00"), ("c", "2026-02-01T00:00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"created": created, "model": "tiny", "rows": []}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    assert [e["name"] for e in list_evaluations(tmp_path)] == ["b", "c", "a"]
    assert list_evaluations(tmp_path / "missing") == []


def test_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLAB_EVALS_DIR", str(tmp_path))
    assert evaluate.evals_dir() == tmp_path
    assert list_evaluations() == []


def test_load_evaluation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_evaluation(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(EvaluationError, match="results.json: a results file must be a JSON object, not list"):
        load_evaluation(tmp_path)
    (tmp_path / "results.json").write_text('{"rows": [')
    with pytest.raises(EvaluationError, match="results.json: not valid JSON .* at line 1"):
        load_evaluation(tmp_path)
    (tmp_path / "results.json").write_text('{"n": 2}')
    with pytest.raises(EvaluationError, match="not an evaluation"):
        load_evaluation(tmp_path)


def test_bad_arguments_are_clear(eval_students):
    teacher, root = eval_students.teacher, eval_students.root
    with pytest.raises(EvaluationError, match="1..1000"):
        run_evaluation(teacher, n=2, steps=(0, 4), adapters_root=root, write=False)
    with pytest.raises(EvaluationError, match="not found"):
        run_evaluation(teacher, n=2, students=["nobody"], adapters_root=root, write=False)
    with pytest.raises(EvaluationError, match="n must be"):
        run_evaluation(teacher, n=0, adapters_root=root, write=False)
    with pytest.raises(EvaluationError, match="prompts: a caption list is for the SD metrics"):
        run_evaluation(teacher, n=2, prompts=["a cat", "a dog"], adapters_root=root, write=False)


@pytest.fixture(scope="module")
def sd_suite(tiny_pipe_dir):
    """The SD metric models as offline stand-ins at the real models' input sizes (see test_metrics): CLIP at
    224x224 and 77 tokens (the teacher's BPE tokenizer), FID features of 299x299 inputs, 2048 wide (so the
    default minimum is 2048 samples), LPIPS on the images as given."""
    from test_metrics import InceptionSizedFeatures, TinyPyramid, clip_stand_in  # noqa: E402 (tests/ is on sys.path)

    from cdlab import metrics

    seen = []

    def load_clip():
        seen.append(True)
        return clip_stand_in(str(Path(tiny_pipe_dir) / "tokenizer"))

    suite = metrics.SDMetrics(clip_model=load_clip, fid_feature=InceptionSizedFeatures(),
                              lpips_net=metrics.LPIPSNet(TinyPyramid(), (8, 12)), device="cpu")
    assert seen and suite.fid_min_samples == 2048
    return suite


def _sd_eval(eval_students, suite, out, fid_min_samples=None, **kwargs):
    teacher, root = eval_students.teacher, eval_students.root
    suite.fid_min_samples = fid_min_samples or suite.num_features
    try:
        return run_evaluation(teacher, n=4, steps=(2, 50), student_steps=(2,), students=["mb2"], suite="sd",
                              sd_metrics=suite, adapters_root=root, out_dir=out, **kwargs)
    finally:
        suite.fid_min_samples = suite.num_features


def test_sd_suite_with_offline_stand_ins(eval_students, sd_suite, tmp_path):
    """The SD1.5 path (course prompts; CLIP, FID-SD, LPIPS) on the tiny pipeline with stand-in metric models;
    4 samples: the FID is refused (2048 needed), and computed once a test lowers the minimum to 4."""
    from cdlab.prompts import COURSE_PROMPTS

    calls = []
    res = _sd_eval(eval_students, sd_suite, tmp_path / "sd", progress=lambda f, m: calls.append(m))
    assert res["suite"] == "sd" and res["prompt_source"] == "the course's 8 prompts"
    assert [(r["method"], r["steps"]) for r in res["rows"]] == [(evaluate.TEACHER_METHOD, 2),
                                                                 (evaluate.TEACHER_METHOD, 50), ("mb2", 2)]
    # The stand-ins got the generated images at 32 px; FID's resized them to Inception's 299.
    assert sd_suite.fid_feature.seen[-1] == (4, 3, 32, 32) and sd_suite.fid_feature.resized == (4, 3, 299, 299)
    ref = res["rows"][1]
    assert ref["lpips"] == pytest.approx(0.0, abs=1e-7)
    for r in (res["rows"][0], res["rows"][2]):
        assert r["lpips"] > 0 and r["clip_score"] >= 0
    # FID from 4 samples of 2048 features is refused, saying why, in the rows, the table and results.json.
    assert "FID-SD needs 2048" in calls[0]
    note = ("FID-SD needs at least 2048 samples (prompts); this run had 4. "
            "Run with --n 2048 or more (--prompts FILE with a caption list).")
    assert res["fid_min_samples"] == 2048 and res["notes"] == [note]
    for r in res["rows"]:
        assert r["fid_sd"] is None and r["fid_sd_note"] == "n/a (4 < 2048 samples)"
        assert r["fid_sd_samples"] == 4 and r["fid_sd_min_samples"] == 2048
    table = (tmp_path / "sd" / "table.md").read_text()
    assert "| mb2 | 2 | 2 | " in table and "FID-SD" in table
    assert table.count("| n/a (4 < 2048 samples) |") == 3
    assert table.rstrip().endswith(note)
    saved = json.loads((tmp_path / "sd" / "results.json").read_text())
    assert saved["rows"][0]["fid_sd"] is None and saved["rows"][0]["fid_sd_note"] == "n/a (4 < 2048 samples)"
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))  # strict JSON: null, not NaN

    # The minimum lowered to the run's 4 samples: FID-SD is a finite number in every cell.
    low = _sd_eval(eval_students, sd_suite, tmp_path / "sd-low", fid_min_samples=4)
    assert low["notes"] == [] and low["fid_min_samples"] == 4
    lref = low["rows"][1]
    assert lref["fid_sd"] == pytest.approx(0.0, abs=1e-5) and "fid_sd_note" not in lref
    for r in (low["rows"][0], low["rows"][2]):
        assert r["fid_sd"] > 0 and r["fid_sd"] < float("inf")
        assert r["clip_score"] == pytest.approx(next(x for x in res["rows"] if x["method"] == r["method"]
                                                     and x["steps"] == r["steps"])["clip_score"], rel=1e-5)
    ltable = (tmp_path / "sd-low" / "table.md").read_text()
    assert "n/a" not in ltable and "needs at least" not in ltable
    assert f"| {low['rows'][2]['fid_sd']:.2f} |" in ltable
    assert COURSE_PROMPTS[0] == "A sad puppy with large eyes."


def test_cli_writes_an_evaluation(tiny_pipe_dir, eval_students, tmp_path, monkeypatch, capsys):
    root = eval_students.root
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(root))
    monkeypatch.setattr("cdlab.students.ADAPTERS_DIR", root, raising=False)
    monkeypatch.setenv("CDLAB_EVALS_DIR", str(tmp_path))
    from cdlab.__main__ import main

    rc = main(["evaluate", "--model", tiny_pipe_dir, "--n", "3", "--steps", "1,4", "--student-steps", "1",
               "--students", "mb4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| mb4 | 1 | 1 |" in out
    [entry] = list_evaluations()
    assert load_evaluation(entry["path"])["n"] == 3


def test_cli_bad_model_is_one_line_error(tmp_path, capsys):
    rc = evaluate.main(["--model", str(tmp_path / "nope")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "could not load the teacher" in err and "Traceback" not in err


def test_prompts_from_coco_metadata(tmp_path):
    from cdlab.prompts import COURSE_PROMPTS, coco_captions, course_prompts

    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps({"file_name": f"{i}.jpg", "text": f"caption {i}"}) for i in range(10)) + "\n")
    assert coco_captions(tmp_path) == [f"caption {i}" for i in range(10)]
    pick = coco_captions(meta, 4, seed=1)
    assert len(set(pick)) == 4 and pick == coco_captions(meta, 4, seed=1)
    with pytest.raises(ValueError, match="only 10"):
        coco_captions(meta, 11)
    meta.write_text('{"file_name": "x.jpg"}\n')
    with pytest.raises(ValueError, match="no caption field"):
        coco_captions(meta)
    assert len(COURSE_PROMPTS) == 8 and course_prompts(10)[8] == COURSE_PROMPTS[0]


# ----------------------------------------------------------------------------- --prompts FILE

def _write_prompt_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    txt = d / "captions.txt"
    txt.write_bytes("# COCO val captions\r\n\r\nA cat on a sofa.\r\n  A dog in the snow.  \r\n\r\n"
                    "# a comment\r\nA red bus, parked.\r\n".encode("utf-8"))
    js = d / "captions.json"
    js.write_text(json.dumps(["A cat on a sofa.", "A dog in the snow.", "A red bus, parked."]))
    jsonl = d / "metadata.jsonl"
    jsonl.write_text("\n".join(json.dumps({"file_name": f"{i}.jpg", "text": t})
                               for i, t in enumerate(["A cat on a sofa.", "A dog in the snow.", "A red bus, parked."])))
    return {"txt": txt, "json": js, "jsonl": jsonl}


def test_read_prompts_takes_txt_json_and_metadata_jsonl_first_n(tmp_path):
    files = _write_prompt_files(tmp_path)
    expect = ["A cat on a sofa.", "A dog in the snow.", "A red bus, parked."]
    for f in files.values():
        assert evaluate.read_prompts(f) == expect
        assert evaluate.read_prompts(f, 2) == expect[:2]
    assert evaluate.read_prompts(tmp_path) == expect  # a folder holding metadata.jsonl, as --metadata took
    assert evaluate.check_prompts(("  a  ", "b")) == ["a", "b"]


@pytest.mark.parametrize("name, content, n, message", [
    ("missing.txt", None, None, "no such file"),
    ("only_comments.txt", "# nothing\n\n   \n", None, "holds no captions"),
    ("empty.json", "[]", None, "holds no captions"),
    ("dict.json", '{"text": "a cat"}', None, "must hold a JSON list of caption strings, got a dict"),
    ("numbers.json", '["a cat", 5]', None, r"numbers.json\[1\]: a caption must be a string, got int"),
    ("blank.json", '["a cat", "  "]', None, r"blank.json\[1\]: empty caption"),
    ("broken.json", '["a cat",', None, "is not valid JSON"),
    ("tab.txt", "a cat\nA dog\tin the snow\n", None, r"tab.txt:2: caption has a control character \(U\+0009\)"),
    ("bell.json", '["a \\u0007 cat"]', None, r"control character \(U\+0007\)"),
    ("long.txt", "x" * 1001 + "\n", None, "caption of 1001 characters \\(at most 1000\\)"),
    ("few.txt", "a cat\na dog\n", 3, "holds 2 captions, fewer than the 3 asked for"),
    ("captions.csv", "a cat\n", None, "expected a .txt"),
    ("nofield.jsonl", '{"file_name": "x.jpg"}\n', None, "no caption field"),
    ("latin1.txt", b"caf\xe9\n", None, "is not UTF-8 text"),
])
def test_read_prompts_errors_are_one_line_and_name_the_flag(tmp_path, name, content, n, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(EvaluationError, match=message) as e:
        evaluate.read_prompts(path, n, what="--prompts")
    assert str(e.value).startswith("--prompts: ") and "\n" not in str(e.value)


def test_cli_prompts_file_error_is_one_line_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not load for a bad --prompts")

    monkeypatch.setattr("cdlab.teachers.load_teacher", no_teacher)
    (tmp_path / "bad.txt").write_text("a cat\n\x1b[31mred\n")
    for argv, flag in ((["--prompts", str(tmp_path / "nope.txt")], "--prompts"),
                       (["--prompts", str(tmp_path / "bad.txt")], "--prompts"),
                       (["--metadata", str(tmp_path / "nope.jsonl")], "--metadata"),
                       (["--prompts", str(tmp_path / "bad.txt"), "--metadata", "x"], "--prompts and --metadata")):
        assert evaluate.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_prompts_file_runs_the_sd_metrics_on_its_first_n(eval_students, sd_suite, tiny_pipe_dir, tmp_path, monkeypatch,
                                                             capsys):
    """``python -m cdlab evaluate --prompts FILE --n 3`` (and ``--metadata`` as its alias), with the SD suite's
    stand-ins put in place of the real metric models."""
    root = eval_students.root
    files = _write_prompt_files(tmp_path / "prompts")
    real = evaluate.run_evaluation
    got = []

    def sd_run(teacher, **kwargs):
        res = real(teacher, suite="sd", sd_metrics=sd_suite, adapters_root=root, write=False, **kwargs)
        got.append(res)
        return evaluate.EvaluationResult(res, out_dir=str(tmp_path / "unwritten"))

    monkeypatch.setattr(evaluate.cli, "run_evaluation", sd_run)
    monkeypatch.setattr(evaluate.run, "REFERENCE_STEPS", 1)  # the 1-step column is the reference: no 50-step run
    for flag, f in (("--prompts", files["txt"]), ("--metadata", files["jsonl"])):
        rc = evaluate.main(["--model", tiny_pipe_dir, flag, str(f), "--n", "2", "--steps", "1",
                            "--student-steps", "1", "--students", "mb4"])
        assert rc == 0
        res = got[-1]
        assert res["n"] == 2 and res["prompt_source"] == f"captions from {f.name}"
        out = capsys.readouterr().out
        assert "| n/a (2 < 2048 samples) |" in out and "this run had 2. Run with --n 2048 or more" in out
    # Without --n: all of the file's captions.
    assert evaluate.main(["--model", tiny_pipe_dir, "--prompts", str(files["json"]), "--steps", "1",
                          "--student-steps", "1", "--students", "mb4"]) == 0
    assert got[-1]["n"] == 3


# ----------------------------------------------------------------------------- the teacher after fused students

def _base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's non-LoRA tensors under their plain names (peft renames a wrapped ``x.weight`` to
    ``x.base_layer.weight``), copied."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def _changed(before: dict, unet) -> list[str]:
    after = _base_weights(unet)
    assert after.keys() == before.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_an_evaluation_leaves_an_fp16_teacher_bit_identical(tiny_pipe_dir, tmp_path, monkeypatch):
    """Each student runs as its fused weights swapped in while its columns sample (`swapped_student`); the
    teacher's own tensors go back after, so every non-LoRA tensor is equal after, also on an fp16 pipeline
    where a fuse + unfuse would round them (`fused_student`, the fallback for LoRA variants, restores them
    from a copy: checked here too)."""
    from cdlab.students import StudentError, load_student
    from cdlab.students.activation import fused_student
    from cdlab.teachers import load_teacher
    from cdlab.ui.bench import make_random_students

    teacher = load_teacher(tiny_pipe_dir, device="cpu", dtype=torch.float16)
    pipe = teacher.pipe
    names = make_random_students(teacher.base_id, tmp_path / "adapters", n=2)
    before = _base_weights(teacher.unet)
    # The 1-step teacher column is the reference, so no 50-step run in fp16 on the CPU (slow there).
    monkeypatch.setattr(evaluate.run, "REFERENCE_STEPS", 1)
    # One batch: the teacher column, then each student swapped in turn (the switch restores the first).
    res = run_evaluation(teacher, n=2, steps=(1,), student_steps=(1,), adapters_root=tmp_path / "adapters",
                         write=False)
    assert [r["method"] for r in res["rows"]] == [evaluate.TEACHER_METHOD, *names]
    assert all(r["agreement_error"] > 0 for r in res["rows"][1:])  # the students did sample (fused)
    assert set(pipe.unet.peft_config) == set(names)
    assert _changed(before, teacher.unet) == []
    assert not pipe._merged_adapters and not any(m.merged for m in _lora_layers(pipe.unet))

    # A student column that fails mid-evaluation (swapped in at that moment) leaves the teacher as it was too.
    def failing(*args, **kwargs):
        assert _changed(before, teacher.unet) and not pipe._merged_adapters  # swapped in, not merged
        raise RuntimeError("student sampler failed")

    monkeypatch.setattr("cdlab.columns.sample_student", failing)  # the student columns' sampler
    with pytest.raises(RuntimeError, match="student sampler failed"):
        run_evaluation(teacher, n=1, steps=(1,), student_steps=(1,), students=[names[0]],
                       adapters_root=tmp_path / "adapters", write=False)
    assert _changed(before, teacher.unet) == [] and not pipe._merged_adapters

    # An error inside the block: unfused and restored all the same.
    load_student(pipe, names[0], root=tmp_path / "adapters", base_model=teacher.base_id)
    with pytest.raises(RuntimeError, match="mid-column"):
        with torch.inference_mode(), fused_student(pipe, names[0]) as fused:
            assert fused > 0 and _changed(before, teacher.unet)  # fused: the weights do move
            raise RuntimeError("mid-column")
    assert _changed(before, teacher.unet) == [] and not any(m.merged for m in _lora_layers(pipe.unet))
    with pytest.raises(StudentError, match="not loaded"):
        with fused_student(pipe, "nobody"):
            pass
    pipe.fuse_lora(components=["unet"], adapter_names=[names[1]])
    with pytest.raises(StudentError, match=r"already fused into the UNet"):
        with fused_student(pipe, names[0]):
            pass

    # The sanity check that this test can fail: a raw fp16 fuse + unfuse does drift the base weights.
    pipe.unfuse_lora(components=["unet"])
    drifted = _changed(before, teacher.unet)
    assert drifted, "fp16 fuse_lora + unfuse_lora left every base weight bit-identical on this machine"


def _lora_layers(unet) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def test_swapped_students_score_as_their_active_adapters(tiny_pipe_dir, tmp_path, monkeypatch):
    """The fast path (fused weights swapped in) is the same model as the adapter run unfused: on an fp32 teacher
    every student row's numbers agree to float rounding, and the images differ from the teacher's."""
    from cdlab.teachers import load_teacher
    from cdlab.ui.bench import make_random_students

    teacher = load_teacher(tiny_pipe_dir, device="cpu")
    names = make_random_students(teacher.base_id, tmp_path / "adapters", n=2)
    monkeypatch.setattr(evaluate.run, "REFERENCE_STEPS", 2)
    kw = dict(n=3, steps=(2,), student_steps=(1, 2), adapters_root=tmp_path / "adapters", write=False,
              diversity_captions=1, diversity_seeds=2)
    fast, slow = (run_evaluation(teacher, fuse_lora=f, **kw) for f in (True, False))
    assert [r["student"] for r in fast["rows"]] == [r["student"] for r in slow["rows"]] == [None, *[n for n in names for _ in (1, 2)]]
    for a, b in zip(fast["rows"][1:], slow["rows"][1:]):
        assert a["agreement_error"] > 1e-4
        assert a["agreement_error"] == pytest.approx(b["agreement_error"], rel=1e-4, abs=1e-6)
        assert a["diversity"] == pytest.approx(b["diversity"], rel=1e-4, abs=1e-6)


def test_an_evaluation_in_out_is_replaced_only_with_overwrite(tmp_path, monkeypatch, capsys):
    """`--out` holding an evaluation is refused before the teacher loads or anything samples (nothing lost by
    default, no minutes spent on a run that cannot be written); `--overwrite` is the explicit choice."""
    from cdlab.evaluate import edit as edit_eval
    from cdlab import teachers

    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "edit_results.json").write_text("{}")

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded before the destination was checked")

    monkeypatch.setattr(teachers, "load_teacher", no_load)
    assert evaluate.main(["--out", str(out)]) == 1
    assert "--out" in capsys.readouterr().err
    assert evaluate.main(["--edit", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="--out"):  # the API checks first too (no teacher needed to refuse)
        run_evaluation(None, out_dir=out)
    with pytest.raises(FileExistsError, match="--out"):
        edit_eval.run_edit_evaluation(None, out_dir=out)
    with pytest.raises(FileExistsError):
        evaluate.write_evaluation({"rows": []}, out)
    assert (out / "results.json").read_text() == "{}" and (out / "edit_results.json").read_text() == "{}"
    evaluate.check_out_dir(out, "results.json", overwrite=True)  # the explicit choice passes
    evaluate.check_out_dir(tmp_path / "new", "results.json")  # a free folder passes
