"""`python -m cdlab generate`: teacher and student images, printed NFE, clear errors on bad input."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from cdlab.generate import main


def _nfe(text: str) -> int:
    return int(re.search(r"NFE (\d+)", text).group(1))


def test_teacher_image_and_nfe(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "teacher.png"
    rc = main(["--model", tiny_pipe_dir, "--prompt", "a red circle", "--seed", "3", "--steps", "4",
               "--guidance", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and _nfe(text) == 8 and re.search(r"in \d+\.\d+ s", text)
    img = Image.open(out)
    assert img.size == (32, 32)
    # Deterministic by seed: the same command gives the same pixels, another seed does not.
    again = tmp_path / "again.png"
    main(["--model", tiny_pipe_dir, "--prompt", "a red circle", "--seed", "3", "--steps", "4", "--guidance", "5",
          "--out", str(again)])
    other = tmp_path / "other.png"
    main(["--model", tiny_pipe_dir, "--prompt", "a red circle", "--seed", "4", "--steps", "4", "--guidance", "5",
          "--out", str(other)])
    capsys.readouterr()
    assert list(img.getdata()) == list(Image.open(again).getdata())
    assert list(img.getdata()) != list(Image.open(other).getdata())
    assert main(["--model", tiny_pipe_dir, "--prompt", "x", "--steps", "3", "--guidance", "1",
                 "--out", str(tmp_path / "g1.png")]) == 0
    assert _nfe(capsys.readouterr().out) == 3


def test_consistency_student(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    students = pytest.importorskip("cdlab.students")
    from cdlab.teachers import load_teacher

    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(tmp_path / "adapters"))
    teacher = load_teacher(tiny_pipe_dir)
    students.attach_lora(teacher.unet, rank=4)
    with torch.no_grad():  # a non-zero LoRA, so the student differs from the teacher
        for n, p in teacher.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    card = students.StudentCard(name="s4", base_model=teacher.base_id, method="mbcd", num_boundaries=4, steps=4)
    students.save_student(teacher.unet, "s4", card)
    out = tmp_path / "student.png"
    rc = main(["--model", tiny_pipe_dir, "--student", "s4", "--prompt", "a red circle", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and _nfe(text) == 4 and "[999, 750, 500, 250]" in text
    assert Image.open(out).size == (32, 32)
    rc = main(["--model", tiny_pipe_dir, "--student", "s4", "--steps", "2", "--prompt", "a", "--out", str(out)])
    assert rc == 0 and _nfe(capsys.readouterr().out) == 2
    assert main(["--model", tiny_pipe_dir, "--student", "nope", "--prompt", "a", "--out", str(out)]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "  "], "--prompt must not be empty"),
    (["--prompt", "a", "--seed", "-1"], "--seed must be >= 0"),
    (["--prompt", "a", "--steps", "0"], "--steps"),
    (["--prompt", "a", "--guidance", "-2"], "--guidance"),
    (["--prompt", "a", "--out", "x.txt"], "--out"),
])
def test_bad_input_is_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_missing_model_is_a_clear_message(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "a", "--out", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert "no folder" in err and "Traceback" not in err
    assert not (tmp_path / "a.png").exists()


def test_external_student_through_a_fake_hub(tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    """An external student samples with its card's diffusers scheduler: NFE, CFG, seed-determinism, and the
    same image as diffusers' own pipeline with that scheduler (Hyper-SD: DDIM trailing, deterministic)."""
    import dataclasses

    from cdlab import teachers
    from cdlab.students import SD15_ID, load_external_student, make_scheduler
    from cdlab.ui.bench import make_random_students

    [name] = make_random_students(SD15_ID, tmp_path / "adapters", n=1)
    weights = tmp_path / "adapters" / name / "pytorch_lora_weights.safetensors"
    monkeypatch.setattr("cdlab.students.external._hub_download", lambda repo_id, filename: str(weights))
    plain_load = teachers.load_teacher
    monkeypatch.setattr(teachers, "load_teacher",  # the random tiny pipeline, dressed as SD1.5
                        lambda *a, **kw: dataclasses.replace(plain_load(*a, **kw), base_id=SD15_ID))

    outs = []
    for key, extra, nfe in (("lcm-lora", [], 4), ("lcm-lora", [], 4), ("tcd", ["--steps", "2"], 2),
                            ("hyper-sd", ["--guidance", "3"], 8), ("hyper-sd", [], 4)):
        out = tmp_path / f"{key}-{len(outs)}.png"
        rc = main(["--model", tiny_pipe_dir, "--student", key, "--prompt", "a red circle", "--seed", "2",
                   "--out", str(out), *extra])
        text = capsys.readouterr().out
        assert rc == 0 and _nfe(text) == nfe and f"student {key}" in text
        outs.append(list(Image.open(out).getdata()))
    assert outs[0] == outs[1]  # LCM re-noises between steps: from a generator seeded by --seed

    teacher = teachers.load_teacher(tiny_pipe_dir)
    card = load_external_student(teacher, "hyper-sd")
    teacher.pipe.scheduler = make_scheduler(teacher.pipe, card)
    with torch.no_grad():
        latents = teacher.pipe("a red circle", latents=teacher.initial_noise(2), output_type="latent",
                               num_inference_steps=4, guidance_scale=1.0).images
    assert list(teacher.decode(latents)[0].getdata()) == outs[-1]
