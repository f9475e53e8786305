"""The tiny teacher's build script (``python -m cdlab build-teacher``) end to end, a few steps per stage."""
from __future__ import annotations

import json

import torch

from cdlab.tiny import train_teacher

FEW = ["--vae_steps", "3", "--vae_batch", "8", "--pool_size", "32", "--unet_steps", "3", "--unet_batch", "8",
       "--warmup", "1", "--decoder_steps", "2", "--log_every", "1", "--threads", "1", "--report_images", "32"]


def test_every_stage_runs_and_saves_a_loadable_teacher(tmp_path, capsys):
    from cdlab.teachers import load_teacher

    out = tmp_path / "teacher"
    assert train_teacher.main([*FEW, "--out", str(out)]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["unet_step"] == 3 and {"vae", "decoder"} <= set(info)
    for stage in ("vae", "unet", "decoder"):
        assert info["config"][f"{stage}_steps"] in (2, 3)
    t = load_teacher(str(out))  # through from_pretrained, as load_teacher("tiny") loads the shipped one
    cond, uncond = t.encode(["a small red circle at the top left on a blue background"])
    with torch.no_grad():
        eps = t.unet(t.initial_noise(0), 999, encoder_hidden_states=cond).sample
    assert eps.shape == (1, *t.latent_shape) and torch.isfinite(eps).all()
    assert t.decode(t.initial_noise(0))[0].size == (32, 32)

    # nothing lost by default: an existing --out (the shipped teacher's folder is the default) is refused
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train_teacher.main([*FEW, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert train_teacher.main([*FEW, "--out", str(out), "--stages", "decoder", "--overwrite"]) == 0


def test_the_default_out_is_the_shipped_teacher_and_is_refused(capsys):
    assert train_teacher.DEFAULT_OUT.is_dir()
    assert train_teacher.main(["--vae_steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().out
