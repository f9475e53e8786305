"""``python -m cdlab doctor``: every part runs and reports on SD1.5's architecture (random weights, 64 px)."""
from __future__ import annotations

import pytest


@pytest.mark.sd15
@pytest.mark.slow
def test_doctor_runs_every_part_offline_on_sd15_random(sd15_teacher, monkeypatch, tmp_path):
    import tempfile

    from cdlab import doctor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temporary student goes, to be removed
    # guidance 1 (no CFG, `--guidance 1`) and the reference teacher at 10 steps (`--teacher-steps 10`): 10 UNet
    # passes, not 50 batched pairs (0.9 s each here). CFG on SD1.5's architecture runs in
    # test_sd15_externals::test_compare_with_every_column; teacher-50 is teacher-4's loop with more steps.
    # A rank-4 student (`--student-rank 4`): fusing the default rank 64 into SD1.5's UNet is 10 s on one thread;
    # fusing rank-64 files is test_sd15_externals' (the published students' own shapes).
    lines: list[str] = []
    parts = doctor.run_doctor(offline=True, teacher=sd15_teacher, train_steps=1, guidance=1.0, teacher_steps=10,
                              student_rank=4, out=lines.append)
    by = {p.name: p for p in parts}
    assert list(by) == ["teacher", "external students", "compare", "train"]
    assert by["compare"].status == "PASS" and by["train"].status == "PASS", "\n".join(lines)
    # offline with an empty hub cache: the externals are skipped with the reason, not failed
    assert by["external students"].status == "SKIP" and "not in the Hugging Face cache" in "\n".join(lines)
    ratio = by["compare"].data["ratio"]
    assert ratio > 1.0  # teacher-10 (10 UNet passes) is slower than a 4-step student (4): a ratio, not a timing target
    assert any(line.strip().startswith("teacher-10 (CFG): ") and "NFE 10" in line for line in lines), lines
    t = by["train"].data
    assert t["samples_per_s"] > 0 and 0 < t["mfu"] < 1 and 4.0 <= t["forwards_per_step"] <= 5.5
    assert any(line.strip().startswith("1 CD steps, rank-4 LoRA, batch 1 at 64²") for line in lines), lines
    assert any("teacher-10 ÷ student-4" in line for line in lines) and lines[-1].startswith("RESULT: all parts passed")
    assert "doctor-student" not in (getattr(sd15_teacher.unet, "peft_config", None) or {})
    assert not list(tmp_path.glob("cdlab-*"))  # its student's folder (257 MB at rank 64) is gone: no files left


def test_doctor_exits_non_zero_when_a_part_fails(monkeypatch, capsys):
    from cdlab import doctor

    def broken(*a, **k):
        raise RuntimeError("no teacher here")

    monkeypatch.setattr(doctor, "check_teacher", broken)
    assert doctor.main(["--offline"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] teacher" in out and "no teacher here" in out and "RESULT: FAIL" in out


@pytest.mark.parametrize("args, message", [(["--teacher-steps", "0"], "--teacher-steps must be 1 to 1000, got 0"),
                                           (["--student-rank", "0"], "--student-rank must be 1 to 256, got 0"),
                                           (["--student-rank", "1000"], "--student-rank must be 1 to 256, got 1000")])
def test_doctor_refuses_out_of_range_numbers(capsys, args, message):
    from cdlab import doctor

    with pytest.raises(SystemExit) as e:
        doctor.main(["--offline", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
