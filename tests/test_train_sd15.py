"""The trainer on SD1.5's architecture (random weights, 64 px, CPU): the precisions a GPU user runs.

Multi-boundary CD (N=4), 2 steps each, in fp32 and under bf16 autocast, and DMD, one step; the finished student loads
into the same architecture with plain ``pipe.load_lora_weights(dir)``. fp16 with the gradient scaler (a skipped
step moves neither the LR schedule nor the EMA) and stop and resume are the trainer's whatever the architecture:
tests/test_train.py checks them on the tiny one (their SD1.5 copies cost 45 s of the suite for no branch of
their own).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cdlab.train.config import TrainConfig
from cdlab.train.trainer import list_checkpoints, train

pytestmark = [pytest.mark.sd15, pytest.mark.slow]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sd15-train")


def _cfg(work, **kw) -> TrainConfig:
    base = dict(model="sd15-random", resolution=64, method="mbcd", num_boundaries=4, data="world", data_size=4,
                batch_size=1, max_steps=2, log_every=1, checkpoint_every=1, keep_checkpoints=5, preview_every=0,
                probe_size=0, lora_rank=4, warmup_steps=0, lr=1e-3, cache_dir=str(work / "cache"),
                save_student=False)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg):
    pass


def _rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _last(run_dir, name):
    return list_checkpoints(run_dir)[-1][1] / name


def _lr_epoch(run_dir) -> int:
    return torch.load(_last(run_dir, "lr_scheduler.pt"), weights_only=True)["last_epoch"]


@pytest.fixture(scope="module")
def fp32_run(work, module_run_dirs):
    """The reference run: fp32, 2 steps, saving its student (the other runs do not)."""
    with module_run_dirs("sd15-fp32"):
        return train(_cfg(work, run_name="fp32", student_name="sd15r-student", save_student=True,
                          mixed_precision="no"), log=_quiet)


def test_fp32_steps_and_the_student_loads_in_plain_diffusers(fp32_run, work):
    from diffusers import StableDiffusionPipeline

    from cdlab import sd15_random

    r = fp32_run
    assert r.state == "finished" and r.step == 2
    rows = _rows(r.run_dir)
    assert [x["step"] for x in rows] == [1, 2] and all(x["loss"] > 0 for x in rows)
    assert rows[-1]["skipped_steps"] == 0 and _lr_epoch(r.run_dir) == 2
    lora = load_file(str(_last(r.run_dir, "lora.safetensors")))
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # it trained

    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_random.folder(64)), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        plain = pipe.unet(x, 999, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(str(r.student_dir))  # the student folder, nothing else
        student = pipe.unet(x, 999, encoder_hidden_states=emb).sample
    n_layers = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
    assert n_layers > 0 and 2 * n_layers == len([k for k in load_file(
        str(r.student_dir / "pytorch_lora_weights.safetensors"))])
    assert not torch.equal(plain, student)


def test_bf16_steps(run_dirs, work):
    r = train(_cfg(work, run_name="mp-bf16", mixed_precision="bf16", ema_decay=0.9), log=_quiet)
    rows = _rows(r.run_dir)
    assert r.state == "finished" and [x["step"] for x in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in rows) and rows[-1]["skipped_steps"] == 0
    lora = load_file(str(_last(r.run_dir, "lora.safetensors")))
    assert all(v.dtype == torch.float32 for v in lora.values())  # fp32 LoRA under autocast
    assert _lr_epoch(r.run_dir) == 2 and not (_last(r.run_dir, "scaler.pt")).exists()  # bf16: no loss scaling


def test_dmd_one_step(run_dirs, work):
    """DMD on SD1.5's architecture: the real score (CFG, every adapter off), the fake score and the generator
    on one UNet at 64 px, one step with its fake update (a run of several steps, and its resume, is
    tests/test_train.py's on the tiny architecture: the roles' switch is the same code)."""
    r = train(_cfg(work, run_name="dmd", method="dmd", num_boundaries=1, dmd_fake_steps=1, mixed_precision="no",
                   max_steps=1), log=_quiet)
    rows = _rows(r.run_dir)
    assert r.state == "finished" and [x["step"] for x in rows] == [1]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["fake_loss"]) for x in rows)
    fake = load_file(str(_last(r.run_dir, "fake.safetensors")))
    assert any(float(v.abs().max()) > 0 for k, v in fake.items() if "lora_B" in k)
