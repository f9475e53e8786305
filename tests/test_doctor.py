"""``python -m cdlab doctor``: every part runs and reports on SD1.5's architecture (random weights, 64 px)."""
from __future__ import annotations

import pytest


@pytest.mark.sd15
@pytest.mark.slow
def test_doctor_runs_every_part_offline_on_sd15_random(sd15_teacher, monkeypatch):
    from cdlab import doctor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # guidance 1 (no CFG, `--guidance 1`): teacher-50 is 50 UNet passes instead of 50 batched pairs, half the
    # CPU time; CFG on SD1.5's architecture runs in test_sd15_externals::test_compare_with_every_column
    lines: list[str] = []
    parts = doctor.run_doctor(offline=True, teacher=sd15_teacher, train_steps=1, guidance=1.0,
                               out=lines.append)
    by = {p.name: p for p in parts}
    assert list(by) == ["teacher", "external students", "compare", "train"]
    assert by["compare"].status == "PASS" and by["train"].status == "PASS", "\n".join(lines)
    # offline with an empty hub cache: the externals are skipped with the reason, not failed
    assert by["external students"].status == "SKIP" and "not in the Hugging Face cache" in "\n".join(lines)
    ratio = by["compare"].data["ratio"]
    assert ratio > 5  # teacher-50 (50 NFE) against a 4-step student (4 NFE)
    t = by["train"].data
    assert t["samples_per_s"] > 0 and 0 < t["mfu"] < 1 and 4.0 <= t["forwards_per_step"] <= 5.5
    assert any("teacher-50 ÷ student-4" in line for line in lines) and lines[-1].startswith("RESULT: all parts passed")
    assert "doctor-student" not in (getattr(sd15_teacher.unet, "peft_config", None) or {})


def test_doctor_exits_non_zero_when_a_part_fails(monkeypatch, capsys):
    from cdlab import doctor

    def broken(*a, **k):
        raise RuntimeError("no teacher here")

    monkeypatch.setattr(doctor, "check_teacher", broken)
    assert doctor.main(["--offline"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] teacher" in out and "no teacher here" in out and "RESULT: FAIL" in out
