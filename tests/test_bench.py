"""cdlab.bench: the benchmark commands run on the random tiny pipeline and print their ratios.
Speed itself is not asserted (benchmarks are not timed tests); the structure and arithmetic are."""
from __future__ import annotations

import json
import re

import pytest
import torch

from cdlab import bench


def test_sampling_quick_prints_ratios(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out_json = tmp_path / "s.json"
    assert bench.main(["sampling", "--model", tiny_pipe_dir, "--quick", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"ratio teacher-50 / student-4:\s+([0-9.]+)x", text)
    assert m and float(m.group(1)) > 0
    for needle in ("text encoder", "UNet step with CFG", "VAE decode", "SDPA attention", "channels_last",
                   "fused LoRA", "torch.compile", "tiny VAE decoder (TAESD)", "RESULT ratio"):
        assert needle in text, needle
    res = json.loads(out_json.read_text())
    assert res["ratio"] == pytest.approx(res["teacher50_s"] / res["student4_s"])
    # Fusing a LoRA must not change the picture (up to float rounding).
    assert res["fast_paths"]["fused LoRA"]["max_abs_diff"] < 1e-3
    assert res["fast_paths"]["tiny VAE"]["skipped"].startswith("skipped: not SD")
    for name in ("SDPA attention", "channels_last", "fused LoRA"):
        entry = res["fast_paths"][name]
        assert entry["student4"]["speedup"] == pytest.approx(entry["student4"]["without_s"] / entry["student4"]["with_s"])
    assert not list((tmp_path / "tmp").glob("cdlab-*"))  # its random student's folder was removed after loading


def test_train_quick_prints_mfu(tiny_pipe_dir, tmp_path, capsys):
    out_json = tmp_path / "t.json"
    assert bench.main(["train", "--model", tiny_pipe_dir, "--quick", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"samples/s: [0-9.]+", text) and re.search(r"RESULT MFU = [0-9.]+%", text)
    res = json.loads(out_json.read_text())
    # counted, not assumed: teacher (2) + target (1) + student forward (1) + backward (~1, frozen base)
    assert 4.0 <= res["forwards_per_step"] <= 5.5, res["forwards_per_step"]
    assert res["mfu_rule_of_6"] == pytest.approx(res["mfu"] * 6 / res["forwards_per_step"])
    assert 0 < res["mfu"] < 1
    assert res["mfu"] == pytest.approx(res["achieved_flops"] / res["peak_flops"])


def test_unet_flops_scale_with_batch(tiny_pipe_dir):
    from cdlab.teachers import load_teacher

    t = load_teacher(tiny_pipe_dir)
    cond, _ = t.encode(["a small red circle in the center on a blue background"] * 2)
    x = t.initial_noise(0, 2)
    tt = torch.full((2,), 500)
    f2 = bench.unet_forward_flops(t.unet, x, tt, cond)
    f1 = bench.unet_forward_flops(t.unet, x[:1], tt[:1], cond[:1])
    assert f1 > 0 and f2 == pytest.approx(2 * f1, rel=0.01)


def test_peak_table_and_cpu_peak():
    assert bench.cuda_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.cuda_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.cuda_peak_flops("Some Future GPU") is None
    assert bench.measure_cpu_peak_flops(n=128, seconds=0.05) > 1e7


def test_sd15_configs_are_sd15():
    """The random-weight GPU pipeline is SD1.5's architecture: ~860M UNet parameters, 4-channel 64² latents."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SD15_UNET_CONFIG)
    n = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n < 865e6
    assert bench.SD15_VAE_CONFIG["scaling_factor"] == 0.18215


def test_bad_model_is_one_line_error(tmp_path, capsys):
    assert bench.main(["sampling", "--model", str(tmp_path / "missing")]) == 1
    assert "could not load" in capsys.readouterr().err
