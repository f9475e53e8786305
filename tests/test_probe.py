"""``python -m cdlab.train.probe``: a run's checkpoint scored on the tiny world without saving a student."""
from __future__ import annotations

import json

import pytest
import torch


def _run(tmp_path, scale: float):
    """A run folder by hand: a rank-4 LoRA for the embedded teacher in a checkpoint, ``lora_B = scale * N(0,1)``."""
    from safetensors.torch import save_file

    from cdlab.students import attach_lora
    from cdlab.teachers import load_teacher

    t = load_teacher("tiny", device="cpu")
    torch.manual_seed(0)
    attach_lora(t.unet, rank=4)
    sd = {}
    for n, p in t.unet.named_parameters():
        if "lora_" in n:
            sd[n] = (torch.randn(p.shape) * scale if "lora_B" in n else p.detach().clone()).contiguous()
    run = tmp_path / f"run-{scale}"
    ck = run / "checkpoints" / "ckpt_000007"
    ck.mkdir(parents=True)
    save_file(sd, str(ck / "lora.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": "tiny", "lora_rank": 4, "lora_alpha": None,
                                                 "num_boundaries": 1, "sample_steps": 1}))
    return run


def test_a_zero_lora_scores_as_the_plain_teacher_and_a_random_one_does_not(tmp_path, capsys):
    from cdlab.train.probe import main, probe

    plain = probe(None, steps=1, n=8)
    zero = probe(_run(tmp_path, 0.0), step=7, n=8)
    assert zero["steps"] == 1 and zero["label"].endswith("ckpt_000007")
    assert (zero["adherence"], zero["diversity"]) == (plain["adherence"], plain["diversity"])
    noisy = probe(_run(tmp_path, 0.5), step=7, n=8)
    assert noisy["diversity"] != plain["diversity"]  # the checkpoint's LoRA is what was sampled
    assert main([str(tmp_path / "run-0.0"), "--step", "7", "--n", "8"]) == 0
    assert "adherence" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no complete checkpoint at step 9"):
        probe(tmp_path / "run-0.0", step=9, n=8)
    with pytest.raises(SystemExit):
        main(["--n", "8"])  # neither a run nor --plain
