"""cdlab.train: config, runs, checkpoints, exact resume and the saved student (in-process, tiny steps)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cdlab.train import cli
from cdlab.train.config import PROFILES, TrainConfig, from_dict, load_json, resolve
from cdlab.train.trainer import list_checkpoints, train


def _cfg(model, cache_dir, **kw):
    base = dict(model=model, data_size=48, batch_size=8, max_steps=6, log_every=1, checkpoint_every=3,
                preview_every=0, cache_dir=cache_dir, warmup_steps=2, lr=2e-3, lora_rank=4, probe_size=8,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg):
    pass


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_repeats_an_uninterrupted_run(tiny_pipe_dir, latent_cache_dir, run_dirs):
    full = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="full", student_name="whole"), log=_quiet)
    assert full.state == "finished" and full.step == 6
    half = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="half", student_name="halfway", max_steps=3), log=_quiet)
    assert [s for s, _ in list_checkpoints(half.run_dir)] == [3]
    # as `--resume RUN --max_steps 6` does: the run's own config, one field overridden
    cfg = dataclasses.replace(load_json(half.run_dir / "config.json"), max_steps=6)
    resumed = train(cfg, resume=half.run_dir, log=_quiet)
    assert resumed.step == 6 and resumed.run_dir == half.run_dir
    a = load_file(str(list_checkpoints(full.run_dir)[-1][1] / "lora.safetensors"))
    b = load_file(str(list_checkpoints(half.run_dir)[-1][1] / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    la, lb = _metrics(full.run_dir), _metrics(half.run_dir)
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)


def test_run_directory_student_and_card(tiny_pipe_dir, latent_cache_dir, run_dirs):
    cfg = _cfg(tiny_pipe_dir, latent_cache_dir, run_name="r", student_name="tiny-test", method="cd", num_boundaries=1,
               max_steps=6, checkpoint_every=2, keep_checkpoints=2, preview_every=3, log_every=2,
               preview_prompts=["a small red circle in the center on a blue background"] * 2, ema_decay=0.9)
    res = train(cfg, log=_quiet)
    run = res.run_dir
    assert run == run_dirs.runs / "r"
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"] == "cd" and saved["lora_rank"] == 4 and saved["resolution"] == 32
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert {"step", "loss", "lr", "samples_per_s", "elapsed_s", "peak_mem_mb", "max_steps"} <= r.keys()
        assert r["max_steps"] == 6 and r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0
    assert rows[-1]["lr"] == pytest.approx(2e-3)  # after the 2-step warm-up
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]  # the last K = 2
    assert (list_checkpoints(run)[-1][1] / "ema.safetensors").is_file()
    previews = sorted(p.name for p in (run / "previews").glob("*.png"))
    assert previews == ["reference.png", "step_000000.png", "step_000003.png", "step_000006.png"]
    for name in previews:
        with Image.open(run / "previews" / name) as im:
            assert im.size == (2 * 32 * 4, 32 * 4)  # one row: 2 prompts side by side, 32 px upscaled 4x
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6 and status["student"] == "tiny-test"
    card = json.loads((run_dirs.adapters / "tiny-test" / "card.json").read_text())
    assert card["method"] == "cd" and card["num_boundaries"] == 1 and card["steps"] == 4
    assert card["training_config"]["guidance"] == PROFILES["tiny"]["guidance"]
    assert card["metrics"]["train_steps"] == 6 and card["metrics"]["final_loss"] == rows[-1]["loss"]
    assert (run_dirs.adapters / "tiny-test" / "pytorch_lora_weights.safetensors").is_file()


def test_incomplete_checkpoints_are_ignored_on_resume(tiny_pipe_dir, latent_cache_dir, run_dirs):
    res = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="c", max_steps=3, save_student=False), log=_quiet)
    ck = res.run_dir / "checkpoints"
    (ck / ".tmp-ckpt_000009").mkdir()        # a save cut short by a crash
    (ck / "ckpt_000010").mkdir()             # no state.json: not complete
    assert [s for s, _ in list_checkpoints(res.run_dir)] == [3]
    cfg = dataclasses.replace(load_json(res.run_dir / "config.json"), max_steps=4)
    again = train(cfg, resume=res.run_dir, log=_quiet)
    assert again.step == 4 and not (ck / ".tmp-ckpt_000009").exists()
    assert [r["step"] for r in _metrics(res.run_dir)] == [1, 2, 3, 4]


def test_config_profiles_and_validation():
    tiny = resolve(TrainConfig(model="tiny"), 32)
    assert (tiny.resolution, tiny.batch_size, tiny.lora_rank, tiny.num_boundaries) == (32, 64, 16, 4)
    assert tiny.student_name.startswith("tiny-mbcd-4-") and len(tiny.preview_prompts) == 8  # + a timestamp
    sd = resolve(TrainConfig(model="sd15", method="cd"), 512)
    assert (sd.resolution, sd.lora_rank, sd.num_boundaries, sd.guidance) == (512, 64, 1, 7.5)
    stamp = r"-\d{8}-\d{6}(-\d+)?"  # a default name never collides with an existing student
    assert sd.preview_prompts[0] == "A sad puppy with large eyes." and re.fullmatch("sd15-cd-1" + stamp, sd.student_name)
    ct = resolve(TrainConfig(method="ct"), 32)
    assert re.fullmatch("tiny-ct-4" + stamp, ct.student_name) and ct.run_name == ct.student_name
    cfg = from_dict({"lr": "3e-4", "gradient_checkpointing": "true", "guidance_max": "none", "max_steps": 7})
    assert cfg.lr == 3e-4 and cfg.gradient_checkpointing is True and cfg.guidance_max is None and cfg.max_steps == 7
    with pytest.raises(ValueError, match="unknown field"):
        from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="max_steps expects int"):
        from_dict({"max_steps": "ten"})
    for bad, match in (({"method": "gan"}, "method"), ({"method": "mbcd", "num_boundaries": 1}, "num_boundaries"),
                       ({"step_size": 30}, "step_size"), ({"guidance": 5.0, "guidance_max": 2.0}, "guidance_max"),
                       ({"loss_type": "l1"}, "loss_type"), ({"preview_reference_steps": 1001}, "preview_reference_steps"),
                       ({"preview_reference_steps": -1}, "preview_reference_steps")):
        with pytest.raises(ValueError, match=match):
            resolve(from_dict(bad), 32)


def test_cli_parses_config_file_and_overrides(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "ct", "lr": 1e-3, "preview_prompts": ["a", "b"]}))
    cfg, resume = cli.build_config(["--config", str(f), "--lr", "5e-4", "--num_boundaries", "2"])
    assert (cfg.method, cfg.lr, cfg.num_boundaries, cfg.preview_prompts, resume) == ("ct", 5e-4, 2, ["a", "b"], None)
    assert cli.main(["--max_steps", "-3"]) == 2
    assert "max_steps must be a finite number in [1, " in capsys.readouterr().err
    assert cli.main(["--method", "nope"]) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert cli.main(["--resume", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert cli.main(["--config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_gradient_checkpointing_same_result_and_bf16_accumulation_runs(tiny_pipe_dir, latent_cache_dir, run_dirs):
    kw = dict(max_steps=3, checkpoint_every=3, save_student=False, loss_type="pseudo_huber", guidance=2.0,
              guidance_max=6.0)
    plain = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="plain", **kw), log=_quiet)
    ckpt = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="gc", gradient_checkpointing=True, **kw), log=_quiet)
    a = load_file(str(list_checkpoints(plain.run_dir)[-1][1] / "lora.safetensors"))
    b = load_file(str(list_checkpoints(ckpt.run_dir)[-1][1] / "lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    bf = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="bf16", mixed_precision="bf16", grad_accum=2, **kw), log=_quiet)
    rows = _metrics(bf.run_dir)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["samples_per_s"] > 0
    c = load_file(str(list_checkpoints(bf.run_dir)[-1][1] / "lora.safetensors"))
    assert all(v.dtype == torch.float32 for v in c.values())  # fp32 LoRA under bf16 autocast
    assert not all(torch.equal(c[k], a[k]) for k in a)


def test_preview_reference_once_per_run_and_equal_to_a_solo_teacher_sample(tiny_pipe_dir, latent_cache_dir, run_dirs):
    """previews/reference.png: the teacher, DDIM 50 with CFG at the run's guidance, from the student rows' noise;
    written once (a resume keeps it byte for byte); the composed preview shows it above the student's rows."""
    import numpy as np

    from cdlab.samplers import ddim_timesteps, sample_ddim
    from cdlab.teachers import load_teacher
    from cdlab.train.previews import preview_noise, preview_row
    from cdlab.ui import previews as P

    prompts = ["a small red circle in the center on a blue background",
               "a large green square at the top left on a white background"]
    cfg = _cfg(tiny_pipe_dir, latent_cache_dir, run_name="ref", max_steps=2, checkpoint_every=2, preview_every=2,
               guidance=3.0, guidance_max=3.0, preview_prompts=prompts, save_student=False)
    run = train(cfg, log=_quiet).run_dir
    ref = run / "previews" / "reference.png"
    meta = json.loads((run / "previews" / "reference.json").read_text())
    assert (meta["steps"], meta["guidance"], meta["nfe"], meta["prompts"]) == (50, 3.0, 100, prompts)
    assert meta["seconds"] < 20  # a few seconds on a 2-core CPU
    before = (ref.read_bytes(), ref.stat().st_mtime_ns)
    resumed = train(dataclasses.replace(load_json(run / "config.json"), max_steps=4), resume=run, log=_quiet)
    assert resumed.step == 4 and (ref.read_bytes(), ref.stat().st_mtime_ns) == before  # not recomputed
    assert sorted(p.name for p in (run / "previews").glob("step_*.png")) == [
        "step_000000.png", "step_000002.png", "step_000004.png"]
    # a new run of the same teacher and recipe reads the row from the cache (beside the latents), not the UNet
    lines: list[str] = []
    again = train(dataclasses.replace(cfg, run_name="ref-again"), log=lines.append).run_dir
    assert (again / "previews" / "reference.png").read_bytes() == before[0]
    assert any("preview reference" in line and "read from" in line for line in lines), lines
    assert json.loads((again / "previews" / "reference.json").read_text()) == meta

    teacher = load_teacher(tiny_pipe_dir, device="cpu")  # the plain teacher, no LoRA, on its own
    cond, uncond = teacher.encode(prompts)
    x_T = preview_noise(2, teacher.unet.config.in_channels, 32 // teacher.pipe.vae_scale_factor)
    out = sample_ddim(teacher.unet, x_T, cond, uncond, 3.0, ddim_timesteps(50), teacher.scheduler)
    solo = np.asarray(preview_row(teacher.decode(out.latents)), dtype=np.int16)
    with Image.open(ref) as im:
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert got.shape == solo.shape == (128, 256, 3) and np.abs(got - solo).max() <= 1
    with Image.open(run / "previews" / "step_000000.png") as im:
        student0 = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(student0 - got).mean() > 1  # 4 student steps are not the teacher's 50

    ps = P.read_previews(run)
    assert [r.label for r in ps.rows] == ["teacher-50 (CFG), reference", "student, 4 steps, at step 0",
                                          "student, 4 steps, at step 4"]
    img = P.compose(ps)
    header = img.height - 3 * (128 + P.PAD) - P.PAD
    assert img.width == P.LABEL_WIDTH + 256 + P.PAD and header > 2 * P.CAPTION_FONT
    cells = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert np.array_equal(cells[header:header + 128, P.LABEL_WIDTH:P.LABEL_WIDTH + 256], got)


def test_dmd_run_resume_repeats_and_saves_the_generator_alone(tiny_pipe_dir, latent_cache_dir, run_dirs):
    """method "dmd": the fake score trains beside the generator (its loss logged, its adapter and optimiser
    checkpointed), a stopped-and-resumed run repeats an uninterrupted one exactly, and the student saved is
    the generator's adapter alone, on a card that samples it as the consistency sampler does."""
    # 4 steps, a checkpoint every 2: the resumed half repeats 2 steps of both roles with their restored optimisers
    kw = dict(method="dmd", num_boundaries=4, dmd_fake_steps=2, probe_size=0, max_steps=4, checkpoint_every=2)
    full = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="dmd-full", student_name="dmd-whole", **kw), log=_quiet)
    assert full.state == "finished" and full.step == 4
    ck = list_checkpoints(full.run_dir)[-1][1]
    assert {"fake.safetensors", "fake_optimizer.pt", "lora.safetensors"} <= {p.name for p in ck.iterdir()}
    half = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="dmd-half", student_name="dmd-halfway",
                      **dict(kw, max_steps=2)), log=_quiet)
    cfg = dataclasses.replace(load_json(half.run_dir / "config.json"), max_steps=4)
    resumed = train(cfg, resume=half.run_dir, log=_quiet)
    assert resumed.step == 4
    for name in ("lora.safetensors", "fake.safetensors"):
        a = load_file(str(list_checkpoints(full.run_dir)[-1][1] / name))
        b = load_file(str(list_checkpoints(half.run_dir)[-1][1] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), name  # both roles trained
    ra, rb = _metrics(full.run_dir), _metrics(half.run_dir)
    assert [r["fake_loss"] for r in ra] == pytest.approx([r["fake_loss"] for r in rb], rel=1e-6)
    assert all(r["fake_loss"] > 0 and r["probe_loss"] is None for r in ra)
    card = json.loads((run_dirs.adapters / "dmd-whole" / "card.json").read_text())
    assert (card["method"], card["num_boundaries"], card["steps"], card["scheduler"]) == ("dmd", 4, 4, "consistency")
    saved = load_file(str(run_dirs.adapters / "dmd-whole" / "pytorch_lora_weights.safetensors"))
    assert saved and not any("fake" in k for k in saved)
    # the saved student IS the generator: its weights are the checkpoint's generator LoRA (no fake score in it)
    gen = load_file(str(list_checkpoints(full.run_dir)[-1][1] / "lora.safetensors"))
    assert len(saved) == len(gen)


def _sums(tensors) -> list[float]:
    return sorted(round(float(v.double().sum()), 6) for v in tensors.values())


def test_dmd_with_ema_saves_the_generators_average(tiny_pipe_dir, latent_cache_dir, run_dirs):
    """DMD with ``ema_decay > 0`` saves the generator's EMA as the student (the checkpoint's ``ema.safetensors``),
    not the online weights; without it, the online generator (``lora.safetensors``) is what is saved."""
    kw = dict(method="dmd", dmd_fake_steps=1, probe_size=0, max_steps=4, checkpoint_every=4)
    for name, decay in (("dmd-ema", 0.5), ("dmd-online", 0.0)):
        res = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name=name, student_name=name, ema_decay=decay, **kw),
                    log=_quiet)
        ck = list_checkpoints(res.run_dir)[-1][1]
        saved = _sums(load_file(str(run_dirs.adapters / name / "pytorch_lora_weights.safetensors")))
        online = _sums(load_file(str(ck / "lora.safetensors")))
        if decay:
            ema = _sums(load_file(str(ck / "ema.safetensors")))
            assert saved == pytest.approx(ema, abs=1e-5) and saved != pytest.approx(online, abs=1e-5)
        else:
            assert not (ck / "ema.safetensors").exists() and saved == pytest.approx(online, abs=1e-5)


def test_dmd_regression_pairs_are_made_once_and_read_back(tiny_pipe_dir, latent_cache_dir, run_dirs):
    """DMD's regression pairs (teacher-50 with CFG, 100 NFE each) are cached beside the latents: a second run
    with the same recipe reads the same tensors back instead of sampling them again, and a different
    guidance (other targets) makes new ones."""
    from cdlab.train.config import cache_root

    kw = dict(method="dmd", dmd_fake_steps=1, probe_size=0, max_steps=1, dmd_regression_weight=1.0,
              dmd_regression_pairs=4, save_student=False)
    logs: list[list[str]] = []
    for run, g, steps in (("pairs-a", 3.0, 50), ("pairs-b", 3.0, 50), ("pairs-c", 2.0, 50), ("pairs-d", 3.0, 8)):
        lines: list[str] = []
        train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name=run, guidance=g, dmd_regression_steps=steps, **kw),
              log=lines.append)
        logs.append([ln for ln in lines if "regression pairs" in ln])
    assert "in " in logs[0][0] and "read from" in logs[1][0] and "read from" not in logs[2][0], logs
    assert "teacher-8," in logs[3][0] and "read from" not in logs[3][0], logs  # other steps: other targets
    files = sorted(cache_root(_cfg(tiny_pipe_dir, latent_cache_dir)).glob("dmd-pairs-*.safetensors"))
    assert len(files) == 3
    pairs = [load_file(str(f)) for f in files]
    a = pairs[0]
    assert a["z"].shape[0] == a["y"].shape[0] == a["cond"].shape[0] == 4
    assert all(torch.equal(a["z"], b["z"]) for b in pairs)  # the same noise ...
    assert len({float(b["y"].sum()) for b in pairs}) == 3   # ... three sets of targets


def test_fp16_with_a_scaler_a_skipped_step_moves_neither_lr_nor_ema(tiny_pipe_dir, latent_cache_dir, run_dirs,
                                                                    monkeypatch):
    """fp16 with torch's GradScaler on the CPU. The first step's loss is made infinite (an overflow): the
    scaler skips it and halves its scale, and the LoRA, the EMA and the LR schedule stay where they started;
    the next step is applied (the EMA then moves off both its start and the LoRA)."""
    import cdlab.loss

    real, calls = cdlab.loss.consistency_loss, []

    def overflow_first(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            out = dict(out, loss=out["loss"] * float("inf"))
        return out

    monkeypatch.setattr(cdlab.loss, "consistency_loss", overflow_first)
    r = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="fp16", mixed_precision="fp16", ema_decay=0.9,
                   warmup_steps=10, lr=1e-3, max_steps=2, checkpoint_every=1, probe_size=0, save_student=False),
              log=_quiet)
    rows = _metrics(r.run_dir)
    assert r.state == "finished" and [x["skipped_steps"] for x in rows] == [1, 1] and len(calls) == 2
    ck = dict(list_checkpoints(r.run_dir))
    first = load_file(str(ck[1] / "lora.safetensors"))
    ema1 = load_file(str(ck[1] / "ema.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in first.items() if "lora_B" in k)  # peft's zero init, untouched
    assert first.keys() == ema1.keys() and all(torch.equal(first[k], ema1[k]) for k in first)
    lr_epochs = [torch.load(ck[s] / "lr_scheduler.pt", weights_only=True)["last_epoch"] for s in (1, 2)]
    # warm-up lr * (epoch + 1) / 10: the skipped step leaves epoch 0 (unskipped, the rows would read 2e-4, 3e-4)
    assert lr_epochs == [0, 1] and [x["lr"] for x in rows] == pytest.approx([1e-4, 2e-4])
    scales = [torch.load(ck[s] / "scaler.pt", weights_only=True)["scale"] for s in (1, 2)]
    assert scales == [2.0 ** 15, 2.0 ** 15]  # 2**16 halved once, then no overflow
    last = load_file(str(ck[2] / "lora.safetensors"))
    ema2 = load_file(str(ck[2] / "ema.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in last.items() if "lora_B" in k)  # the applied steps trained
    assert all(v.dtype == torch.float32 for v in last.values())
    assert any(not torch.equal(ema2[k], ema1[k]) for k in ema2) and any(not torch.equal(ema2[k], last[k]) for k in ema2)


@pytest.mark.parametrize("change, match", [
    (dict(dmd_t_min=500, dmd_t_max=400), "dmd_t_max"), (dict(mixed_precision="fp16"), "mixed_precision"),
    (dict(guidance=3.0, guidance_max=5.0), "guidance_max"), (dict(dmd_fake_steps=0), "dmd_fake_steps"),
    (dict(dmd_fake_lr=float("nan")), "dmd_fake_lr"),
])
def test_dmd_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        resolve(TrainConfig(model="tiny", method="dmd", **change), 32)
    assert resolve(TrainConfig(model="tiny", method="dmd"), 32).num_boundaries == 1  # one step by default
    assert resolve(TrainConfig(model="tiny", method="dmd", num_boundaries=4), 32).sample_steps == 4


def test_the_card_records_a_run_inside_the_repository_by_its_relative_path(tmp_path):
    from cdlab.paths import REPO_ROOT
    from cdlab.paths import shown_path

    assert shown_path(REPO_ROOT / "runs" / "r1") == "runs/r1"  # no machine's folders in a shipped card
    assert shown_path(tmp_path / "r1") == str(tmp_path / "r1")  # outside: as given
