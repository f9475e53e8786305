"""cdlab.evaluate on the random tiny pipeline: columns, NFE, same-noise agreement, files, listing, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from cdlab import evaluate
from cdlab.evaluate import EvaluationError, list_evaluations, load_evaluation, run_evaluation


@pytest.fixture(scope="module")
def setup(tiny_pipe_dir, tmp_path_factory):
    """The random tiny teacher and two random LoRA students of it (N=2 and N=4) in a scratch adapters folder."""
    from cdlab import students
    from cdlab.teachers import load_teacher

    root = tmp_path_factory.mktemp("adapters")
    teacher = load_teacher(tiny_pipe_dir)
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
    return teacher, root


@pytest.fixture(scope="module")
def world_eval(setup, tmp_path_factory):
    teacher, root = setup
    calls = []
    out = tmp_path_factory.mktemp("evals") / "run1"
    res = run_evaluation(teacher, n=6, steps=(1, 4, 50), student_steps=(1, 2, 4), adapters_root=root,
                         out_dir=out, batch_size=4, progress=lambda f, m: calls.append((f, m)))
    return res, calls


def test_columns_nfe_and_metrics(world_eval):
    res, _ = world_eval
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


def test_columns_match_unbatched_samplers_from_the_same_noise(setup, world_eval):
    """Batching must not change anything: image i of a column equals a direct single-prompt run from
    teacher.initial_noise(seed + i)."""
    from cdlab.metrics import agreement_error, to_unit
    from cdlab.samplers import consistency_timesteps, ddim_timesteps, sample_consistency, sample_ddim
    from cdlab.students import activate_student, load_student
    from cdlab.world import sample_captions

    teacher, root = setup
    res, _ = world_eval
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
    _, calls = world_eval
    fracs = [f for f, _ in calls]
    assert fracs[0] == 0.0 and fracs[-1] == 1.0
    assert fracs == sorted(fracs)
    # 2 batches (6 prompts, batch 4) x 9 columns, plus the start and the end.
    assert len(calls) == 2 * 9 + 2


def test_files_and_round_trip(world_eval):
    res, _ = world_eval
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
    with pytest.raises(EvaluationError, match="not an evaluation"):
        load_evaluation(tmp_path)


def test_bad_arguments_are_clear(setup):
    teacher, root = setup
    with pytest.raises(EvaluationError, match="1..1000"):
        run_evaluation(teacher, n=2, steps=(0, 4), adapters_root=root, write=False)
    with pytest.raises(EvaluationError, match="not found"):
        run_evaluation(teacher, n=2, students=["nobody"], adapters_root=root, write=False)
    with pytest.raises(EvaluationError, match="n must be"):
        run_evaluation(teacher, n=0, adapters_root=root, write=False)


def test_sd_suite_with_offline_stand_ins(setup, tmp_path):
    """The SD1.5 path (course prompts; CLIP, FID-SD, LPIPS) on the tiny pipeline with stand-in metric models."""
    from test_metrics import TinyFeatures, TinyPyramid  # noqa: E402  (tests/ is on sys.path under pytest)

    from cdlab import metrics
    from cdlab.prompts import COURSE_PROMPTS

    teacher, root = setup
    seen = []

    def fake_clip():
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
        torch.manual_seed(0)
        tok = teacher.tokenizer
        model = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8), projection_dim=16))
        seen.append(True)
        proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}), tokenizer=tok)
        return model, proc

    suite = metrics.SDMetrics(clip_model=fake_clip, fid_feature=TinyFeatures(),
                              lpips_net=metrics.LPIPSNet(TinyPyramid(), (8, 12)), device="cpu")
    res = run_evaluation(teacher, n=4, steps=(2, 50), student_steps=(2,), students=["mb2"], suite="sd",
                         sd_metrics=suite, adapters_root=root, out_dir=tmp_path / "sd")
    assert seen and res["suite"] == "sd" and res["prompt_source"] == "the course's 8 prompts"
    assert [(r["method"], r["steps"]) for r in res["rows"]] == [(evaluate.TEACHER_METHOD, 2),
                                                                 (evaluate.TEACHER_METHOD, 50), ("mb2", 2)]
    ref = res["rows"][1]
    assert ref["lpips"] == pytest.approx(0.0, abs=1e-7) and ref["fid_sd"] == pytest.approx(0.0, abs=1e-5)
    for r in (res["rows"][0], res["rows"][2]):
        assert r["lpips"] > 0 and r["fid_sd"] > 0 and r["clip_score"] >= 0
    assert "FID-SD" in (tmp_path / "sd" / "table.md").read_text()
    assert "mb2" in (tmp_path / "sd" / "table.md").read_text()
    assert COURSE_PROMPTS[0] == "A sad puppy with large eyes."


def test_cli_writes_an_evaluation(tiny_pipe_dir, setup, tmp_path, monkeypatch, capsys):
    _, root = setup
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(root))
    monkeypatch.setattr("cdlab.students.ADAPTERS_DIR", root, raising=False)
    monkeypatch.setenv("CDLAB_EVALS_DIR", str(tmp_path))
    from cdlab.__main__ import main

    rc = main(["evaluate", "--model", tiny_pipe_dir, "--n", "3", "--steps", "1,50", "--student-steps", "1",
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
