"""Flow matching from scratch (cdlab.flow, seed 003 part B): the idx reader, the UNet, the loss, CFG and Euler.

Every test is fast: a UNet of D = 8 on a batch of 4 (random weights are enough: the tests pin the formulas,
not a trained model's quality).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import os
import json
import math
import re
import struct

import numpy as np
import pytest
import torch

from cdlab.flow import data, matching, pairs, student_config
from fashion_files import idx_bytes, write_train_set
from cdlab.paths import REPO_ROOT
from cdlab.flow.unet import UNet, recalibrate_batchnorm


SHIPPED_FLOW_STUDENTS = ("fashion-reflow-4", "fashion-reflow-1", "fashion-dmd-1", "fashion-dmd-4", "fashion-mbcd-4")


@pytest.fixture
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(num_hiddens=8).eval()


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_a_crafted_file(tmp_path, suffix):
    values = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5) * 7
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(idx_bytes(values)) if suffix else idx_bytes(values))
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("magic", [b"\x00\x00\x0d\x03", b"\x01\x00\x08\x03", b"\x00\x00\x08\x04", b"PK\x03\x04"])
def test_read_idx_refuses_a_bad_magic_number(tmp_path, magic):
    path = tmp_path / "bad"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 5)), magic=magic))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_refuses_truncated_and_padded_files(tmp_path, suffix):
    whole = idx_bytes(np.ones((4, 28, 28)))
    for blob, message in ((whole[:-1], "truncated"), (whole[:6], "truncated"), (whole + b"\x00", "after")):
        path = tmp_path / f"f{suffix}"
        path.write_bytes(gzip.compress(blob) if suffix else blob)
        with pytest.raises(ValueError, match=message):
            data.read_idx(path)


def test_read_idx_caps_the_size_before_reading(tmp_path):
    # a header announcing 60000 x 28 x 28 bytes over a 1 KB cap: refused from the header (the file is short)
    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28)))
    with pytest.raises(ValueError, match="over the cap"):
        data.read_idx(path, max_bytes=1024)
    raw = tmp_path / "raw"
    raw.write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    with pytest.raises(ValueError, match="on disk"):
        data.read_idx(raw, max_bytes=100)


def test_load_fashion_mnist_reads_a_crafted_folder_and_says_how_to_install(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([9, 0, 3])))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    x, y = data.load_fashion_mnist("test")
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(images.astype(np.float32) / 255.0))
    assert y.tolist() == [9, 0, 3] and y.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([9, 0, 10])))
    with pytest.raises(ValueError, match="label 10"):
        data.load_fashion_mnist("test")


def test_images_of_classes_draws_each_from_its_class():
    images = torch.arange(30, dtype=torch.float32).reshape(30, 1, 1, 1)
    labels = torch.arange(30) % 3
    want = torch.tensor([2, 0, 0, 1, 2, 2])
    got = data.images_of_classes(images, labels, want, torch.Generator().manual_seed(0))
    assert torch.equal(labels[got.reshape(-1).long()], want)
    with pytest.raises(ValueError, match="class 7"):
        data.images_of_classes(images, labels, torch.tensor([7]))


@pytest.mark.skipif(not (data.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_load_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    x, y = data.load_fashion_mnist("test")
    x, y = x[:16], y[:16]
    assert x.shape == (16, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.max()) == 1.0  # uint8 255 -> 1.0: the seed's ToTensor scaling
    assert y.shape == (16,) and 0 <= int(y.min()) and int(y.max()) < len(data.CLASS_NAMES) == 10


# ----------------------------------------------------------------------------- the UNet


def test_unet_shapes_through_the_7x7_bottleneck(tiny_unet):
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    c = matching.one_hot(torch.tensor([0, 3, 7, 9]))
    assert tiny_unet(x, t, c).shape == (4, 1, 28, 28)
    seen = {}
    tiny_unet.flatten.register_forward_hook(lambda m, i, o: seen.update(into=i[0].shape, out=o.shape))
    tiny_unet(x, t)
    assert seen == {"into": (4, 16, 7, 7), "out": (4, 16, 1, 1)}  # 2D channels, 7x7 -> 1x1
    assert UNet(num_hiddens=8, num_classes=0)(x, t).shape == (4, 1, 28, 28)
    assert UNet(num_hiddens=8, num_classes=0, time_conditioned=False)(x).shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="28x28"):
        tiny_unet(torch.randn(4, 1, 32, 32), t)


def test_unet_class_scales_and_time_shifts(tiny_unet):
    # §2.4: u0 = c1 * u0 + t1 -- the dropped class (zeros) and None are the same model; a class changes it
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    assert torch.equal(tiny_unet(x, t, torch.zeros(4, 10)), tiny_unet(x, t))
    assert not torch.allclose(tiny_unet(x, t, matching.one_hot(torch.tensor([1, 1, 1, 1]))), tiny_unet(x, t))
    seen = {}
    tiny_unet.unflatten.register_forward_hook(lambda m, i, o: seen.update(u0=o))
    c = matching.one_hot(torch.tensor([2, 4, 6, 8]))
    tiny_unet.up1.register_forward_pre_hook(lambda m, i: seen.update(u0_in=i[0][:, :16]))
    tiny_unet(x, t, c)
    c1, t1 = tiny_unet.fc1_c(c)[:, :, None, None], tiny_unet.fc1_t(t[:, None])[:, :, None, None]
    assert torch.allclose(seen["u0_in"], c1 * seen["u0"] + t1, atol=1e-6)


def test_recalibrate_batchnorm_matches_the_batch_statistics():
    torch.manual_seed(1)
    unet = UNet(num_hiddens=8, num_classes=0)
    x, t = torch.randn(8, 1, 28, 28) * 3 + 2, torch.rand(8)
    grad_on = []  # its passes only gather statistics: no autograd graph, whatever the caller's mode
    hook = unet.conv_in.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    recalibrate_batchnorm(unet, [(x, t)])
    hook.remove()
    assert grad_on == [False]
    bn = unet.conv_in[0][1]
    h = unet.conv_in[0][0](x)
    assert not unet.training and bn.momentum == 0.1
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)


# ----------------------------------------------------------------------------- the one-step denoiser (§1.2)


def test_denoiser_loss_is_eq_b1_by_hand():
    from cdlab.flow.denoiser import denoiser_loss

    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    eps = torch.tensor([[[[1.0, -2.0], [0.0, 4.0]]]])
    halve = lambda z: z / 2  # a "denoiser" whose output we know
    # sigma = 0.5: z = x + 0.5 eps = [[0.5, 0], [0.5, 2.25]], D(z) = z / 2
    expected = ((torch.tensor([[0.25, 0.0], [0.25, 1.125]]) - x[0, 0]) ** 2).mean()
    assert torch.allclose(denoiser_loss(halve, x, 0.5, noise=eps), expected)
    # sigma None (§1.2.3): z = eps alone
    assert torch.allclose(denoiser_loss(halve, x, None, noise=eps), ((eps / 2 - x) ** 2).mean())


def test_pure_noise_denoiser_learns_the_mean_image():
    """§1.2.3: trained on z = eps, the best constant output is the training set's mean image."""
    from cdlab.flow.denoiser import denoiser_loss

    x = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(1, 1, 2, 2, requires_grad=True)
    opt = torch.optim.SGD([bias], lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        loss = denoiser_loss(lambda z: bias.expand_as(z), x, None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(bias.detach()[0], x.mean(dim=0), atol=1e-4)


# ----------------------------------------------------------------------------- the flow


def test_flow_matching_loss_is_the_seeds_formula_on_a_hand_made_batch():
    x1 = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    x0 = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]], [[[0.5, 0.0], [-2.0, 1.0]]]])
    t = torch.tensor([0.25, 0.5])

    def net(x_t, tt, c):  # a "network" whose output we know: 2 x_t
        assert c is None and torch.equal(tt, t)
        return 2 * x_t

    # by hand: x_t = (1 - t) x_0 + t x_1
    x_t = torch.stack([0.75 * x0[0] + 0.25 * x1[0], 0.5 * x0[1] + 0.5 * x1[1]])
    expected = ((2 * x_t - (x1 - x0)) ** 2).sum() / x1.numel()
    loss = matching.flow_matching_loss(net, x1, None, x0=x0, t=t)
    assert torch.allclose(loss, expected, atol=1e-7)
    # the data-independent check: at t = 0.25, the first pixel is 0.75 * 1 + 0.25 * 0 = 0.75
    assert float(x_t[0, 0, 0, 0]) == 0.75


def test_class_dropout_masks_about_ten_percent():
    c = matching.one_hot(torch.arange(20000) % 10)
    dropped = matching.drop_class(c, 0.1, torch.Generator().manual_seed(0))
    zero_rows = (dropped.sum(dim=1) == 0)
    assert 0.09 < float(zero_rows.float().mean()) < 0.11   # 2000 expected, sd 42
    assert torch.equal(dropped[~zero_rows], c[~zero_rows])
    assert torch.equal(matching.drop_class(c, 0.0), c)


def test_velocity_conversions_are_exact_on_the_linear_path():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    x0, x1 = x0.double(), x1.double()
    x_t, u = matching.interpolate(x0, x1, t), x1 - x0
    assert torch.allclose(matching.velocity_to_data(x_t, t, u), x1, atol=1e-12, rtol=0)
    assert torch.allclose(matching.velocity_to_noise(x_t, t, u), x0, atol=1e-12, rtol=0)


def test_euler_sampler_equals_a_hand_written_loop(tiny_unet):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    c = matching.one_hot(torch.tensor([0, 1, 2, 3]))
    seen = []
    out = matching.sample_euler(matching.guided_velocity(tiny_unet, c, 3.0), x, matching.euler_timesteps(4),
                                callback=lambda i, t, x1: seen.append(t))
    assert seen == [0.0, 0.25, 0.5, 0.75]
    with torch.no_grad():
        y = x.clone()
        for i in range(4):
            t = torch.full((4,), i / 4)
            u_u, u_c = tiny_unet(torch.cat([y, y]), torch.cat([t, t]), torch.cat([torch.zeros_like(c), c])).chunk(2)
            y = y + 0.25 * (u_u + 3.0 * (u_c - u_u))
    assert torch.equal(out, y)


def test_cfg_gamma_one_is_the_conditional_velocity_and_gamma_five_extrapolates(tiny_unet):
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    c = matching.one_hot(torch.tensor([5, 6, 7, 8]))
    calls = []
    tiny_unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        u_c, u_u = tiny_unet(x, t, c), tiny_unet(x, t, None)
        calls.clear()
        assert torch.equal(matching.guided_velocity(tiny_unet, c, 1.0)(x, t), u_c)
        assert calls == [4]                                 # one call of B
        guided = matching.guided_velocity(tiny_unet, c, 5.0)(x, t)
        assert calls == [4, 8]                              # then one batched call of 2B
    assert torch.allclose(guided, u_u + 5.0 * (u_c - u_u), atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        matching.guided_velocity(tiny_unet.train(), c, 5.0)


def test_train_step_lowers_the_loss_and_the_scheduler_decays_tenfold():
    torch.manual_seed(0)
    unet = UNet(num_hiddens=8)
    opt = matching.make_optimizer(unet, lr=1e-2)
    x1 = torch.rand(4, 1, 28, 28)
    c = matching.one_hot(torch.tensor([0, 1, 2, 3]))
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def fixed_loss():  # the same x_0 and t each time; train mode: the batch's BatchNorm statistics
        return float(matching.flow_matching_loss(unet, x1, c, p_uncond=0.0, generator=torch.Generator().manual_seed(1)))

    sched = matching.make_lr_scheduler(opt, num_epochs=10)
    before = fixed_loss()
    losses = [matching.train_step(unet, opt, x1, c, generator=g) for _ in range(4)]
    assert unet.training and all(np.isfinite(losses))
    assert fixed_loss() < before
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- the flow UNet in the eps world


def test_flow_schedule_is_the_flow_path_rescaled():
    from cdlab.flow.model import FLOW_SCHEDULE, flow_time, vp_scale
    from cdlab.math import q_sample

    g = torch.Generator().manual_seed(0)
    data_, noise = torch.rand(4, 1, 28, 28, generator=g).double(), torch.randn(4, 1, 28, 28, generator=g).double()
    k = torch.tensor([1, 250, 500, 999])
    t = flow_time(k)
    flow_point = matching.interpolate(noise, data_, t)  # the seed's x_t: noise at t = 0, data at t = 1
    vp_point = q_sample(data_, k, FLOW_SCHEDULE, noise=noise)  # the lab's: data at k = 0
    assert torch.allclose(vp_point * vp_scale(t)[:, None, None, None], flow_point, atol=1e-12)
    assert float(FLOW_SCHEDULE.alphas_cumprod[0]) == 1.0 and t.tolist()[1] == 0.75


def test_flow_model_ddim_loop_is_euler(tiny_unet):
    """The lab's one sampling loop (DDIM on FLOW_SCHEDULE) through FlowModel equals the seed's Euler from t = 0.25."""
    from cdlab.flow.model import FLOW_SCHEDULE, FlowModel, vp_scale
    from cdlab.samplers import DDIMStep, sample_loop

    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    c = matching.one_hot(torch.tensor([1, 3, 5, 7]))
    euler = matching.sample_euler(matching.guided_velocity(tiny_unet, c, 3.0), x,
                                  torch.tensor([0.25, 0.5, 0.75, 1.0]))
    model = FlowModel(tiny_unet, guidance=3.0)
    start = x / vp_scale(torch.tensor(0.25)).float()
    out = sample_loop(model, start, [750, 500, 250], DDIMStep(FLOW_SCHEDULE), cond=c, uncond=torch.zeros_like(c),
                      return_trajectory=True)
    assert out.nfe == 6  # 3 guided steps, 2 each
    assert torch.allclose(out.latents, euler, atol=1e-5), float((out.latents - euler).abs().max())
    # its data prediction at k = 750 is the seed's x̂_1 = x_t + (1 - t) u
    with torch.no_grad():
        u = matching.guided_velocity(tiny_unet, c, 3.0)(x, torch.full((4,), 0.25))
    assert torch.allclose(out.x0_trajectory[0], matching.velocity_to_data(x, torch.full((4,), 0.25), u), atol=2e-5)


# ----------------------------------------------------------------------------- the teacher's training CLI


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_train_teacher_resumes_exactly_and_never_overwrites(tmp_path, ema_decay):
    from safetensors.torch import load_file

    from cdlab.flow import train_teacher

    folder = write_train_set(tmp_path / "data", 24)
    cfg = train_teacher.TeacherConfig(num_hiddens=4, batch_size=8, epoch_images=16, num_epochs=2, ema_decay=ema_decay)
    quiet = dict(data_root=str(folder), grid_steps=2, log=lambda line: None)
    whole = train_teacher.train(tmp_path / "whole", 5, cfg, max_steps=4, **quiet)
    train_teacher.train(tmp_path / "split", 5, cfg, max_steps=3, **quiet)
    split = train_teacher.train(tmp_path / "split", 5, cfg, max_steps=4, resume=True, **quiet)
    assert whole == {**split, "seconds": whole["seconds"]} == {"step": 4, "epoch": 2, "position": 0,
                                                               "seconds": whole["seconds"]}
    files = ["unet.safetensors"] + (["ema.safetensors", "teacher.safetensors"] if ema_decay else [])
    assert sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors")) == sorted(files + ["optimizer.safetensors"])
    for name in files:  # the weights, and with an EMA its average and the teacher exported from it
        a, b = (load_file(str(tmp_path / run / name)) for run in ("whole", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    curves = [[(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]
              for run in ("whole", "split")]
    assert curves[0] == curves[1] and [s for s, _, _ in curves[0]] == [1, 2, 3, 4]  # one row a step, steps done
    status = json.loads((tmp_path / "split" / "status.json").read_text())
    assert (status["state"], status["step"], status["max_steps"]) == ("finished", 4, 4)  # the run protocol's
    assert sorted(p.name for p in (tmp_path / "whole" / "previews").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert (tmp_path / "whole" / "samples-epoch1.png").is_file()  # the seed's epoch-1 grid
    teacher = train_teacher.load_unet(tmp_path / "whole")
    assert teacher.num_hiddens == 4 and not teacher.training
    # loaded in the lab's layout (cdlab.flow.unet.channels_last): the same function as the default layout's
    convs = [m.weight for m in teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[1] > 1)
    plain = copy.deepcopy(teacher).to(memory_format=torch.contiguous_format)
    x, t, c = torch.randn(3, 1, 28, 28), torch.rand(3), torch.eye(10)[[0, 4, 9]]
    with torch.no_grad():
        assert torch.allclose(teacher(x, t, c), plain(x, t, c), atol=2e-5)
    if ema_decay:  # the teacher is the average (its parameters) with BatchNorm statistics of its own
        ema, raw = (load_file(str(tmp_path / "whole" / n)) for n in ("ema.safetensors", "unet.safetensors"))
        sd = teacher.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ema.items()) and not all(torch.equal(ema[k], raw[k]) for k in ema)
        stats = [k for k in sd if k.endswith("running_mean")]
        assert stats and not any(torch.equal(sd[k], raw[k]) for k in stats)
    with pytest.raises(FileExistsError, match="--resume"):
        train_teacher.train(tmp_path / "whole", 5, cfg, **quiet)
    state = json.loads((tmp_path / "whole" / "state.json").read_text())
    for change, field in (({"config": {**state["config"], "extra": 1}}, "extra"), ({"position": 1.5}, "position"),
                          ({"config": {**state["config"], "num_hiddens": 0}}, "num_hiddens")):
        (tmp_path / "whole" / "state.json").write_text(json.dumps({**state, **change}))
        with pytest.raises(ValueError, match=field):
            train_teacher.train(tmp_path / "whole", 5, cfg, resume=True, **quiet)


# ----------------------------------------------------------------------------- few-step students of the flow teacher


def test_cd_teacher_point_on_the_flow_is_an_euler_step_of_the_guided_velocity(tiny_unet):
    """CD's second point (cdlab.loss, one DDIM step of the guided teacher) on FLOW_SCHEDULE is the seed's Euler step
    ``x_s = x_t + (s - t) u_w`` in flow coordinates, and the student starts as the teacher (LoRA B = 0)."""
    from cdlab.flow import distill
    from cdlab.flow.model import flow_time, vp_scale

    unet = distill.attach_flow_lora(tiny_unet, rank=4).eval()
    x1 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 4, 6])
    out = distill.cd_loss(unet, x1, labels, guidance=3.0, num_boundaries=1,
                          generator=torch.Generator().manual_seed(2))
    t, s = out["t"], out["s"]
    tf, sf = flow_time(t).float(), flow_time(s).float()
    x_t = out["x_t"] * vp_scale(tf).reshape(-1, 1, 1, 1)  # VP state -> the flow's point
    with torch.no_grad():
        u = matching.guided_velocity(unet, matching.one_hot(labels), 3.0)(x_t, tf)
    euler = x_t + (sf - tf).reshape(-1, 1, 1, 1) * u
    assert torch.allclose(out["x_s"] * vp_scale(sf).reshape(-1, 1, 1, 1), euler, atol=2e-5)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    grads = torch.autograd.grad(out["loss"], [p for p in unet.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the LoRA trains
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)  # the teacher does not


def test_dmd_on_the_flow_is_the_flow_native_gradient_and_each_update_trains_its_own_adapter(tiny_unet):
    """DMD on the flow teacher (cdlab.loss's DMD with FlowModel): the generator's gradient is
    ``(x1_fake - x1_real) / mean |x_g - x1_real|`` with each score's data prediction ``x_t + (1 - t) u`` at the
    flow point, the real score guided; the generator's update reaches the student's LoRA only, the fake score's
    update the fake LoRA only, and the teacher's weights never."""
    from cdlab.flow import distill
    from cdlab.flow.model import flow_time, vp_scale
    from cdlab.students.roles import FAKE_SCORE, adapter_role

    torch.manual_seed(4)
    unet = distill.attach_flow_lora(tiny_unet, rank=4)
    distill.attach_flow_lora(unet, rank=4, adapter_name=FAKE_SCORE)
    with torch.no_grad():  # a fake score and a generator that differ from the teacher
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    unet.eval()
    g = torch.Generator().manual_seed(5)
    z, x1 = torch.randn(6, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out = distill.dmd_loss(unet, z, x1, labels, guidance=2.0, regression_weight=0.5, generator=g)
    tf = flow_time(out["t"]).float()
    x_t = out["x_t"] * vp_scale(tf).reshape(-1, 1, 1, 1)  # the VP state as the flow's point
    c, gap = matching.one_hot(labels), (1 - tf).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        with adapter_role(unet, None):
            x1_real = x_t + gap * matching.guided_velocity(unet, c, 2.0)(x_t, tf)
        with adapter_role(unet, FAKE_SCORE):
            x1_fake = x_t + gap * unet(x_t, tf, c)
    norm = (out["x_g"] - x1_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out["grad"], (x1_fake - x1_real) / norm, atol=2e-4)
    assert float((x1_fake - x1_real).abs().max()) > 1e-2  # the two scores differ: the check has something to see
    assert torch.isfinite(out["loss"]) and float(out["loss_reg"]) > 0

    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    opt = torch.optim.Adam(lora, lr=1e-2)
    out["loss"].backward()
    owners = {n.split(".")[-2] for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert owners == {distill.ADAPTER}  # the generator's step: the student's adapter alone
    opt.step()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    loss = distill.dmd_fake_update(unet, opt, lora, out["x_g"], labels, generator=g)
    moved = {n.split(".")[-2] for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {FAKE_SCORE} and loss > 0  # the fake score's step: its own adapter alone


def test_the_fake_score_learns_at_its_own_rate_and_never_at_the_flows_noiseless_timestep(tmp_path, tiny_unet):
    """``fake_lr``: the fake score's LoRA is an Adam group of its own. Adam's first step moves each weight by its
    rate (B starts at zero, so B after one step is that move): the student's by ``lr``, the fake's by
    ``fake_lr``. The fake score's timesteps start at the first one that holds noise: 1 on the flow path (its
    timestep 0 is the data), 0 on a diffusion schedule."""
    from diffusers import DDPMScheduler

    from cdlab.flow import distill
    from cdlab.flow.model import FLOW_SCHEDULE
    from cdlab.loss import first_noisy_timestep

    assert first_noisy_timestep(FLOW_SCHEDULE) == 1 and first_noisy_timestep(DDPMScheduler()) == 0
    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="dmd", sample_steps=1, steps=1, batch_size=4, lr=1e-3, fake_lr=1e-2,
                                lora_rank=2, pairs=4, guidance=2.0, regression_weight=1.0)
    unet, done = distill.distill(teacher_dir, cfg, log=lambda line: None, pair_cache=tmp_path / "cache")
    moved = {}
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            role = n.split(".")[-2]
            moved[role] = max(moved.get(role, 0.0), float(p.abs().max()))
    assert done == 1
    assert moved[distill.ADAPTER] == pytest.approx(1e-3, rel=1e-2)
    assert moved["fake"] == pytest.approx(1e-2, rel=1e-2)


def test_a_dmd_warm_up_trains_the_fake_score_alone_then_both(tmp_path, tiny_unet):
    """``fake_warmup`` k: the first k steps fit the fake score to the generator's samples and leave the student
    as it started (LoRA B zero: the teacher); the steps after move both."""
    from cdlab.flow import distill

    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)

    def moved_after(steps: int, fake_rank: int = 0) -> dict[str, float]:
        cfg = distill.StudentConfig(method="dmd", sample_steps=1, steps=steps, batch_size=4, lr=1e-3, lora_rank=2,
                                    pairs=4, guidance=2.0, regression_weight=1.0, fake_warmup=2, fake_rank=fake_rank)
        unet, done = distill.distill(teacher_dir, cfg, log=lambda line: None, pair_cache=tmp_path / "cache")
        assert done == steps
        ranks = {role: {p.shape[0] for n, p in unet.named_parameters() if "lora_A" in n and n.split(".")[-2] == role}
                 for role in (distill.ADAPTER, "fake")}  # lora_A's rows: the adapter's rank
        assert ranks == {distill.ADAPTER: {2}, "fake": {fake_rank or 2}}
        return {role: max(float(p.abs().max()) for n, p in unet.named_parameters()
                          if "lora_B" in n and n.split(".")[-2] == role) for role in (distill.ADAPTER, "fake")}

    warm = moved_after(2)
    assert warm[distill.ADAPTER] == 0.0 and warm["fake"] > 0
    assert moved_after(3, fake_rank=6)[distill.ADAPTER] > 0  # the fake score may have a rank of its own


def test_a_dmd_student_trains_and_samples_on_its_shifted_grid(tmp_path, tiny_unet, monkeypatch, capsys):
    """``shift``: the generator's K jumps, in its own loss and in the fake score's samples, run on SD3's shifted
    grid (999/231 for K = 2 at 0.3, 999/474/231/91 for K = 4), the grid its card then samples on (``scheduler_kwargs``); a branch may
    change it; the command line keeps it in range and to DMD."""
    from cdlab.flow import distill
    from cdlab.students import StudentCard, StudentError

    seen = []
    for name in ("dmd_generator_loss", "generator_sample"):
        real = getattr(distill, name)
        monkeypatch.setattr(distill, name, lambda *a, _f=real, _n=name, **k: seen.append(
            (_n, list(k["gen_timesteps"]))) or _f(*a, **k))
    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="dmd", sample_steps=2, steps=2, batch_size=4, lr=1e-3, lora_rank=2, pairs=4,
                                guidance=2.0, regression_weight=1.0, shift=0.3, fake_steps=2)  # the 2nd on fresh samples
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    unet, _ = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "run", **kw)
    assert {n for n, _ in seen} == {"dmd_generator_loss", "generator_sample"}
    assert all(ts == [999, 231] for _, ts in seen)  # 500 -> 231
    distill.save_flow_student(unet, "shifted", cfg, tmp_path / "adapters", teacher=teacher_dir)
    card = StudentCard.from_dict(json.loads((tmp_path / "adapters" / "shifted" / "card.json").read_text()))
    assert card.scheduler_kwargs == {"shift": 0.3} and card.steps == card.num_boundaries == 2
    plain = distill.student_card(dataclasses.replace(cfg, shift=1.0), "p", trained_steps=2, teacher=teacher_dir)
    assert plain.scheduler_kwargs == {}  # the uniform grid: no option written
    back = dataclasses.replace(cfg, steps=3, shift=1.0)
    with pytest.raises(StudentError, match="shift=0.3, not 1.0"):
        distill.distill(teacher_dir, back, checkpoint=tmp_path / "run", **kw)
    distill.distill(teacher_dir, back, checkpoint=tmp_path / "run", branch=True, **kw)
    assert distill.branches_of(tmp_path / "run") == [{"step": 2, "changed": {"shift": [0.3, 1.0]}}]
    for bad in (["--method", "dmd", "--shift", "0"], ["--method", "dmd", "--shift", "nan"],
                ["--method", "reflow", "--shift", "0.3"]):
        with pytest.raises(SystemExit):
            distill.main(["--teacher", "nowhere", "--name", "x", *bad])
        assert "--shift" in capsys.readouterr().err


def test_a_student_trial_scores_each_piece_and_resumed_ends_on_the_one_piece_runs_student(tmp_path, monkeypatch,
                                                                                          tiny_unet):
    """``tools/flow_student_trial.py``: one scored row per piece; a trial is continued only with ``--resume``, to a
    larger ``--steps``, and its last student is the one-piece run's, bit for bit."""
    import importlib.util

    from safetensors.torch import load_file

    from cdlab.flow import distill
    from cdlab.students import WEIGHT_NAME

    monkeypatch.setenv("CDLAB_CACHE_DIR", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("flow_student_trial", REPO_ROOT / "tools" / "flow_student_trial.py")
    trial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trial)
    teacher = _teacher_folder(tmp_path / "teacher", tiny_unet)
    recipe = ["--method", "reflow", "--pairs", "4", "--batch-size", "4", "--lora-rank", "2", "--guidance", "1.5",
              "--sample-steps", "1"]
    ours = ["--out", str(tmp_path / "t"), "--teacher", str(teacher), "--every", "1", "--n", "40"]
    assert trial.main([*ours, "--", *recipe, "--steps", "2"]) == 0
    with pytest.raises(SystemExit):  # not continued unless asked
        trial.main([*ours, "--", *recipe, "--steps", "3"])
    assert trial.main([*ours, "--resume", "--", *recipe, "--steps", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "trial.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    unet, done = distill.distill(teacher, trial.recipe([*recipe, "--steps", "3"]), log=lambda line: None,
                                 pair_cache=tmp_path / "cache")
    distill.save_flow_student(unet, "one-piece", trial.recipe([*recipe, "--steps", "3"]), tmp_path / "a",
                              teacher=teacher, trained_steps=done)
    ours3, one = (load_file(str(d / WEIGHT_NAME)) for d in (tmp_path / "t" / "students" / "s3",
                                                             tmp_path / "a" / "one-piece"))
    assert done == 3 and ours3.keys() == one.keys() and all(torch.equal(ours3[k], one[k]) for k in one)

    # --pairs-from: a student's samples in place of the teacher's pairs (the one-piece student, at its 1 step)
    from cdlab.columns import run_columns, student_column
    from cdlab.flow.pairs import cached_teacher_pairs, pair_labels, pair_noise
    from cdlab.flow.pipeline import load_flow_teacher
    from cdlab.students import read_card

    assert torch.equal(pair_noise(600, 3), cached_teacher_pairs(tiny_unet, 600, guidance=1.0, seed=3, num_steps=1,
                                                                log=lambda line: None)[0])  # three chunks
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(tmp_path / "a"))
    kd = ["--out", str(tmp_path / "kd"), "--teacher", str(teacher), "--every", "1", "--n", "40"]
    seeded = [*recipe, "--seed", "1", "--steps", "1"]  # seed 1: chunk 0's generator is seeded 100003, not 1
    assert trial.main([*kd, "--pairs-from", "one-piece", "--", *seeded]) == 0
    first = json.loads((tmp_path / "kd" / "trial.jsonl").read_text().splitlines()[0])
    assert (first["pairs_from"], first["pairs"], first["student_steps"]) == ("one-piece", 4, 1)
    kept = load_file(str(tmp_path / "kd" / "pairs-one-piece-4-s1.safetensors"))
    flow = load_flow_teacher(str(teacher), "cpu")
    z, _ = cached_teacher_pairs(flow.unet, 4, guidance=1.5, seed=1, log=lambda line: None)  # the teacher's pairs'
    mine = run_columns(flow, [student_column(read_card("one-piece"), None)],
                       [flow.classes[int(y)] for y in pair_labels(4)], [0, 1, 2, 3], noise=z, decode=None)[0]
    assert torch.equal(kept["z"], z) and torch.allclose(kept["x1"], mine.latents.float(), atol=1e-5)
    cfg1 = trial.recipe(seeded)
    unet, _ = distill.distill(teacher, cfg1, log=lambda line: None, pairs=(kept["z"], kept["x1"]))
    distill.save_flow_student(unet, "kd-one-piece", cfg1, tmp_path / "b", teacher=teacher, trained_steps=1)
    unet, _ = distill.distill(teacher, cfg1, log=lambda line: None, pair_cache=tmp_path / "cache")
    distill.save_flow_student(unet, "on-teacher-pairs", cfg1, tmp_path / "b", teacher=teacher, trained_steps=1)
    ours1, kd1, teachers1 = (load_file(str(d / WEIGHT_NAME)) for d in (
        tmp_path / "kd" / "students" / "s1", tmp_path / "b" / "kd-one-piece", tmp_path / "b" / "on-teacher-pairs"))
    assert all(torch.equal(ours1[k], kd1[k]) for k in kd1)  # the trial trained on the student's pairs
    assert not all(torch.equal(teachers1[k], kd1[k]) for k in kd1)  # not on the teacher's
    with pytest.raises(ValueError, match="pairs: two tensors of cfg.pairs = 4 rows"):
        distill.distill(teacher, cfg1, log=lambda line: None, pairs=(kept["z"][:3], kept["x1"][:3]))


def test_the_selection_tool_scores_on_its_own_draw_against_training_images_and_refuses_the_evaluations(
        tmp_path, monkeypatch, capsys, tiny_unet):
    """``tools/flow_select.py``: one row per student, its samples from noise seed ``--seed`` scored against the
    first ``--reference`` *training* images' features (the evaluation reads neither); seed 0, the evaluation's
    draw, is refused by name before anything is loaded."""
    import importlib.util

    from cdlab.columns import run_columns, student_column
    from cdlab.flow import distill
    from cdlab.flow.classifier import as_feature, load_classifier
    from cdlab.flow.evaluate import noise, score
    from cdlab.flow.pipeline import load_flow_teacher
    from cdlab.metrics import feature_stats
    from cdlab.students import read_card

    spec = importlib.util.spec_from_file_location("flow_select", REPO_ROOT / "tools" / "flow_select.py")
    select = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(select)
    with pytest.raises(SystemExit):
        select.main(["--seed", "0", "fashion-dmd-1"])
    assert "--seed 0 is the evaluation's draw" in capsys.readouterr().err
    monkeypatch.setenv("CDLAB_FASHION_MNIST", str(write_train_set(tmp_path / "data", 150)))
    monkeypatch.setenv("CDLAB_CACHE_DIR", str(tmp_path / "cache"))
    teacher = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="reflow", sample_steps=1, steps=1, batch_size=4, lr=1e-3, lora_rank=2,
                                pairs=4, guidance=1.5)
    unet, done = distill.distill(teacher, cfg, log=lambda line: None, pair_cache=tmp_path / "cache")
    distill.save_flow_student(unet, "s1", cfg, tmp_path / "a", teacher=teacher, trained_steps=done)
    args = ["--teacher", str(teacher), "--n", "40", "--reference", "120", str(tmp_path / "a" / "s1")]
    assert select.main([*args, "--seed", "1"]) == 0 and select.main([*args, "--seed", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["student"], r["seed"], r["steps"]) for r in rows] == [(str(tmp_path / "a" / "s1"), 1, 1),
                                                                      (str(tmp_path / "a" / "s1"), 2, 1)]
    flow, judge = load_flow_teacher(str(teacher), "cpu"), load_classifier()
    with torch.no_grad():
        reference = feature_stats(as_feature(judge)(data.load_fashion_mnist("train")[0][:120]))
    for row in rows:  # the same figures from the column runner on that draw, against those 120 training images
        z, labels = noise(40, row["seed"])
        run = run_columns(flow, [student_column(read_card("s1", tmp_path / "a"), 1)],
                          [flow.classes[int(y)] for y in labels], list(range(40)), noise=z, decode=None,
                          adapters_root=tmp_path / "a")[0]
        assert {k: row[k] for k in ("fid", "accuracy", "diversity")} == score(run.latents.float(), labels, judge,
                                                                               reference)
    assert rows[0]["fid"] != rows[1]["fid"]  # another draw, another figure
    from cdlab.flow.classifier import Classifier, save_classifier

    torch.manual_seed(3)  # --classifier: a held-out judge's features and labels, in place of the evaluation's
    held_out = save_classifier(Classifier().eval(), tmp_path / "held-out", {})
    assert select.main([*args, "--seed", "1", "--classifier", str(held_out)]) == 0
    row, other = json.loads(capsys.readouterr().out), load_classifier(held_out)
    with torch.no_grad():
        reference = feature_stats(as_feature(other)(data.load_fashion_mnist("train")[0][:120]))
    z, labels = noise(40, 1)
    run = run_columns(flow, [student_column(read_card("s1", tmp_path / "a"), 1)],
                      [flow.classes[int(y)] for y in labels], list(range(40)), noise=z, decode=None,
                      adapters_root=tmp_path / "a")[0]
    assert {k: row[k] for k in ("fid", "accuracy", "diversity")} == score(run.latents.float(), labels, other,
                                                                           reference)
    assert row["fid"] != rows[0]["fid"]


def test_the_background_tool_scores_pixels_below_black_and_logs_each_terms_push_on_a_copy_of_the_run(
        tmp_path, monkeypatch, capsys, tiny_unet):
    """``tools/flow_background.py``: ``score`` gives a one-step student's FID and accuracy on the evaluation's draw
    (as the column runner and ``score`` give them), the fraction of its pixels below 0, and the FID of its samples
    moved by ``--shift`` before the clip; ``pushes`` continues a copy of a DMD run's checkpoint, one row a step,
    and leaves the run's own checkpoint as it was."""
    import importlib.util

    from cdlab.columns import run_columns, student_column
    from cdlab.flow import distill
    from cdlab.flow.classifier import load_classifier, load_reference_stats
    from cdlab.flow.evaluate import noise, score
    from cdlab.flow.pipeline import load_flow_teacher
    from cdlab.students import read_card

    spec = importlib.util.spec_from_file_location("flow_background", REPO_ROOT / "tools" / "flow_background.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setenv("CDLAB_FASHION_MNIST", str(write_train_set(tmp_path / "data", 40)))
    monkeypatch.setenv("CDLAB_CACHE_DIR", str(tmp_path / "cache"))
    teacher = _teacher_folder(tmp_path / "teacher", tiny_unet)
    flags = ["--method", "dmd", "--sample-steps", "1", "--batch-size", "4", "--lr", "1e-3", "--lora-rank", "2",
             "--pairs", "4", "--guidance", "2.0", "--regression-weight", "1", "--gan-weight", "0.5", "--gan-clip"]
    parser = argparse.ArgumentParser()
    distill.add_config_arguments(parser)
    cfg = distill.config_from_args(parser, parser.parse_args([*flags, "--steps", "1"]))
    unet, done = distill.distill(teacher, cfg, checkpoint=tmp_path / "run", log=lambda line: None,
                                 pair_cache=tmp_path / "cache")
    distill.save_flow_student(unet, "s1", cfg, tmp_path / "a", teacher=teacher, trained_steps=done)
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}

    assert tool.main(["--teacher", str(teacher), "score", str(tmp_path / "a" / "s1"), "--n", "40",
                      "--shift", "-0.5"]) == 0
    row = json.loads(capsys.readouterr().out)
    flow, judge, reference = load_flow_teacher(str(teacher), "cpu"), load_classifier(), load_reference_stats()
    z, labels = noise(40, 0)
    x = run_columns(flow, [student_column(read_card("s1", tmp_path / "a"), 1)], [flow.classes[int(y)] for y in labels],
                    list(range(40)), noise=z, decode=None, adapters_root=tmp_path / "a")[0].latents.float()
    assert row["fid"] == score(x, labels, judge, reference)["fid"]
    assert row["fid_shift-0.5"] == score(x - 0.5, labels, judge, reference)["fid"] != row["fid"]
    assert row["below_zero"] == round(float((x < 0).float().mean()), 4)

    import cdlab.loss

    originals = (cdlab.loss.generator_sample, distill.dmd_loss)
    assert tool.main(["--teacher", str(teacher), "pushes", str(tmp_path / "run"), "--steps", "3", "--", *flags]) == 0
    assert (cdlab.loss.generator_sample, distill.dmd_loss) == originals  # its wrappers are gone once it returns
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("background", "push_dm", "push_gan"))
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before  # the run's own: untouched


def test_adams_beta1_is_the_recipes_and_the_command_line_refuses_one_out_of_range(capsys):
    """``adam_beta1`` (DMD2 trains both players at 0) reaches the run's Adam; ``--adam-beta1 1`` is refused by
    name before anything is loaded."""
    from torch import nn

    from cdlab.flow import distill

    named = [("w.lora_A.student.weight", nn.Parameter(torch.zeros(2))),
             ("w.lora_A.fake.weight", nn.Parameter(torch.zeros(2)))]
    cfg = distill.StudentConfig(method="dmd", adam_beta1=0.0, fake_lr=1e-2)
    opt, _, _ = distill._optimizer_and_averages(named, cfg)
    assert [g["betas"] for g in opt.param_groups] == [(0.0, 0.999), (0.0, 0.999)]
    assert distill.StudentConfig().adam_beta1 == 0.9  # torch's default: the shipped students' recipe
    head = distill.DiscriminatorHead(8)  # DMD2's discriminator: a last group at its own rate, else the fake score's
    for disc_lr, want in ((1e-3, 1e-3), (0.0, 1e-2)):
        opt, _, _ = distill._optimizer_and_averages(named, dataclasses.replace(cfg, gan_weight=0.1, disc_lr=disc_lr),
                                                    head)
        assert opt.param_groups[-1]["lr"] == want and opt.param_groups[-1]["params"] == list(head.parameters())
    with pytest.raises(SystemExit):
        distill.main(["--teacher", "nowhere", "--name", "x", "--method", "dmd", "--adam-beta1", "1"])
    assert "--adam-beta1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(["--teacher", "nowhere", "--name", "x", "--method", "reflow", "--fake-warmup", "10"])
    assert "--fake-warmup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill.main(["--teacher", "nowhere", "--name", "x", "--method", "reflow", "--fake-rank", "64"])
    assert "--fake-rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the student's own rank, the fake score's twin check
        distill.main(["--teacher", "nowhere", "--name", "x", "--method", "reflow", "--lora-rank", "0"])
    assert "--lora-rank must be in [1, 512]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the form's twin rule: boundaries belong to cd
        distill.main(["--teacher", "nowhere", "--name", "x", "--method", "dmd", "--num-boundaries", "4"])
    assert "--num-boundaries" in capsys.readouterr().err


def _generator_and_fake_score(tiny_unet: UNet, seed: int) -> UNet:
    """The tiny UNet with DMD's two adapters (the student's and the fake score's), their B drawn away from zero so
    that each differs from the teacher; eval mode."""
    from cdlab.flow import distill
    from cdlab.students.roles import FAKE_SCORE

    torch.manual_seed(seed)
    unet = distill.attach_flow_lora(tiny_unet, rank=4)
    distill.attach_flow_lora(unet, rank=4, adapter_name=FAKE_SCORE)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return unet.eval()


def _moved_by_a_fake_update(unet: UNet, net: torch.nn.Module, gan, x_g: torch.Tensor, labels: torch.Tensor,
                            real: torch.Tensor, g: torch.Generator) -> tuple[set[str], float]:
    """One fake-score update with the GAN term (``net`` the discriminator's trainable network, ``gan`` the form
    the loss takes): the adapters that moved by name, ``"discriminator"`` when ``net`` did, and the loss."""
    from cdlab.flow import distill

    params = [p for n, p in unet.named_parameters() if "lora_" in n] + list(net.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    named = [*unet.named_parameters(), *(("net." + n, p) for n, p in net.named_parameters())]
    before = {n: p.detach().clone() for n, p in named}
    loss = distill.dmd_fake_update(unet, opt, params, x_g, labels, generator=g, gan=gan, real=real, disc_weight=1.0)
    moved = {"discriminator" if n.startswith("net.") else n.split(".")[-2] for n, p in named
             if not torch.equal(p, before[n])}
    return moved, loss


def test_dmd2s_gan_term_moves_the_generator_alone_and_its_discriminator_learns_real_from_fake(tiny_unet):
    """DMD2's GAN term (``gan_weight``): the generator's loss adds ``softplus(-D(x_t(G)))``, D the head on the fake
    score's ``up1`` features at the matching's point, computed here by hand; its backward reaches the student's
    adapter alone (not the fake score, not the head). The fake score's update adds the discriminator's loss on
    real and generated points and moves the fake adapter and the head, never the student; without real images it
    is refused."""
    from cdlab.flow import distill
    from cdlab.flow.model import FLOW_SCHEDULE, flow_time, vp_scale
    from cdlab.flow.unet import DiscriminatorHead
    from cdlab.loss import dmd_fake_loss
    from cdlab.students.roles import FAKE_SCORE, adapter_role

    unet = _generator_and_fake_score(tiny_unet, seed=4)
    head = DiscriminatorHead(unet.num_hiddens)
    gan = (unet.up1, head)
    g = torch.Generator().manual_seed(5)
    z, x1 = torch.randn(6, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out = distill.dmd_loss(unet, z, x1, labels, guidance=2.0, regression_weight=0.5, gan=gan, gan_weight=0.25,
                           generator=g)
    tf = flow_time(out["t"]).float()
    feats = []
    hook = unet.up1.register_forward_hook(lambda _m, _i, o: feats.append(o))
    with torch.no_grad(), adapter_role(unet, FAKE_SCORE):
        unet(out["x_t"] * vp_scale(tf).reshape(-1, 1, 1, 1), tf, matching.one_hot(labels))
    hook.remove()
    by_hand = torch.nn.functional.softplus(-head(feats[0]).reshape(-1)).mean()
    assert float(out["loss_gan"]) == pytest.approx(float(by_hand), rel=1e-4)
    total = out["loss_dm"] + 0.5 * out["loss_reg"] + 0.25 * out["loss_gan"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-6)
    out["loss"].backward()
    owners = {n.split(".")[-2] for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert owners == {distill.ADAPTER} and all(p.grad is None for p in head.parameters())
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)  # restored after the pass

    moved, loss = _moved_by_a_fake_update(unet, head, gan, out["x_g"], labels, x1, g)
    assert moved == {FAKE_SCORE, "discriminator"} and loss > 0
    terms = dmd_fake_loss(unet, out["x_g"], matching.one_hot(labels), FLOW_SCHEDULE, fake_adapter=FAKE_SCORE,
                          generator=g, model_class=distill.FlowModel, gan=gan, real=x1, gan_weight=2.0)
    assert float(terms["loss"]) == pytest.approx(float(terms["loss_denoise"] + 2.0 * terms["loss_disc"]), rel=1e-6)
    assert float(terms["loss_disc"]) > 0
    with pytest.raises(ValueError, match="real images"):
        dmd_fake_loss(unet, out["x_g"], matching.one_hot(labels), FLOW_SCHEDULE, fake_adapter=FAKE_SCORE,
                      model_class=distill.FlowModel, gan=gan, gan_weight=1.0)


def test_gan_clip_shows_dmd2s_head_the_samples_as_shown_and_leaves_the_fake_scores_denoising_as_it_was(
        tiny_unet, monkeypatch):
    """``gan_clip``: DMD2's head judges the generator's sample clipped to [0, 1] (the generator's term and the
    discriminator's update alike), so a pixel below black is no tell and costs the generator nothing there; the
    matching and the fake score's denoising loss stay on the samples as they are. The command line takes it only
    with the GAN term."""
    import cdlab.loss
    from cdlab.flow import distill
    from cdlab.flow.model import FLOW_SCHEDULE
    from cdlab.flow.unet import DiscriminatorHead
    from cdlab.students.roles import FAKE_SCORE

    shown = []
    real_discriminate = cdlab.loss.discriminate
    monkeypatch.setattr(cdlab.loss, "discriminate", lambda u, gan, x, *a, **k: (shown.append(x.detach().clone()),
                                                                              real_discriminate(u, gan, x, *a, **k))[1])
    unet = _generator_and_fake_score(tiny_unet, seed=4)
    gan = (unet.up1, DiscriminatorHead(unet.num_hiddens))
    z, x1 = torch.randn(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    outs = {}
    for clip in (False, True):
        shown.clear()
        outs[clip] = distill.dmd_loss(unet, z, x1, labels, guidance=2.0, regression_weight=0.5, gan=gan,
                                      gan_weight=0.25, generator=torch.Generator().manual_seed(5), gan_clip=clip)
        x_g = outs[clip]["x_g"]
        assert len(shown) == 1 and torch.equal(shown[0], x_g.clamp(0, 1) if clip else x_g)
    assert float((x_g < 0).float().mean()) > 0.05 and torch.equal(x_g, outs[False]["x_g"])  # same draws, some black
    assert float(outs[True]["loss_dm"]) == pytest.approx(float(outs[False]["loss_dm"]), rel=1e-6)  # DMD's: as is

    terms = {}
    for clip in (False, True):
        shown.clear()
        terms[clip] = cdlab.loss.dmd_fake_loss(unet, x_g, matching.one_hot(labels), FLOW_SCHEDULE,
                                               fake_adapter=FAKE_SCORE, generator=torch.Generator().manual_seed(9),
                                               model_class=distill.FlowModel, gan=gan, real=x1, gan_weight=2.0,
                                               gan_range=(0.0, 1.0) if clip else None)
        assert torch.equal(shown[0], x_g.clamp(0, 1) if clip else x_g) and torch.equal(shown[1], x1)
    assert float(terms[True]["loss_denoise"]) == pytest.approx(float(terms[False]["loss_denoise"]), rel=1e-5)

    p = argparse.ArgumentParser()
    distill.add_config_arguments(p)
    assert distill.config_from_args(p, p.parse_args(["--method", "dmd", "--gan-weight", "0.05", "--gan-clip"])).gan_clip
    assert not distill.config_from_args(p, p.parse_args(["--method", "dmd", "--gan-weight", "0.05"])).gan_clip
    with pytest.raises(SystemExit):
        distill.config_from_args(p, p.parse_args(["--method", "dmd", "--gan-clip"]))



def test_dmd_t_max_draws_the_matchings_timesteps_below_it_and_is_a_branchable_dmd_flag(tiny_unet):
    """``--dmd-t-max T``: the generator's matching (and its GAN term) diffuse the sample to ``t ~ U{20..T}``; at
    DMD2's 980 it is the run it was (the same draws, the same loss); the command line takes it in (20, 980], below
    980 only with DMD; a checkpoint continues under another T with ``--branch``."""
    from cdlab.flow import distill
    from cdlab.flow.student_checkpoint import BRANCHABLE
    from cdlab.loss import DMD_T_RANGE

    unet = _generator_and_fake_score(tiny_unet, seed=4)
    z, x1 = torch.randn(64, 1, 28, 28), torch.rand(64, 1, 28, 28)
    labels = torch.arange(64) % 10
    run = lambda **kw: distill.dmd_loss(unet, z, x1, labels, guidance=2.0, regression_weight=0.5,  # noqa: E731
                                        generator=torch.Generator().manual_seed(5), **kw)
    default, full, low = run(), run(t_max=DMD_T_RANGE[1]), run(t_max=60)
    assert torch.equal(default["t"], full["t"]) and float(default["loss"]) == float(full["loss"])
    assert int(low["t"].min()) >= 20 and int(low["t"].max()) <= 60 and int(default["t"].max()) > 60
    assert torch.equal(low["x_g"], default["x_g"])  # the same generator's sample, matched nearer the data

    p = argparse.ArgumentParser()
    distill.add_config_arguments(p)
    assert distill.config_from_args(p, p.parse_args(["--method", "dmd", "--dmd-t-max", "200"])).dmd_t_max == 200
    assert distill.config_from_args(p, p.parse_args([])).dmd_t_max == DMD_T_RANGE[1]
    for bad in (["--method", "dmd", "--dmd-t-max", "20"], ["--method", "dmd", "--dmd-t-max", "981"],
                ["--method", "reflow", "--dmd-t-max", "200"]):
        with pytest.raises(SystemExit):
            distill.config_from_args(p, p.parse_args(bad))
    assert "dmd_t_max" in BRANCHABLE


def test_regression_loss_is_a_checked_branchable_dmd_flag():
    """``--regression-loss l1`` reaches the recipe with ``--method dmd`` only; another distance is refused; a
    checkpoint continues under the other distance with ``--branch``."""
    from cdlab.flow import distill
    from cdlab.flow.student_checkpoint import BRANCHABLE

    p = argparse.ArgumentParser()
    distill.add_config_arguments(p)
    assert distill.config_from_args(p, p.parse_args([])).regression_loss == "l2"
    assert distill.config_from_args(p, p.parse_args(["--method", "dmd", "--regression-loss", "l1"])
                                    ).regression_loss == "l1"
    for bad in (["--method", "dmd", "--regression-loss", "lpips"], ["--method", "reflow", "--regression-loss", "l1"]):
        with pytest.raises(SystemExit):
            distill.config_from_args(p, p.parse_args(bad))
    assert "regression_loss" in BRANCHABLE


def test_widen_lora_gives_a_larger_rank_the_same_student_and_learns_in_its_new_directions():
    """``--init`` a student of a larger ``--lora-rank`` (``widen_lora``): ``B' = [B, 0]``, ``A' = [A; the rest of
    the wide LoRA's own A]``, so the wider LoRA's UNet gives the same velocities; its new columns of B start at 0
    while A's new rows (peft's draw) are not 0, so a step moves them; a source wider than the LoRA it goes into is
    refused, and the same rank passes unchanged."""
    from cdlab.flow import distill

    torch.manual_seed(3)
    narrow = distill.attach_flow_lora(UNet(num_hiddens=8).eval(), rank=4)
    with torch.no_grad():
        for n, p in narrow.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    weights = distill.lora_weights(narrow)
    wide = distill.attach_flow_lora(UNet(num_hiddens=8).eval(), rank=12)
    wide.load_state_dict({k: v for k, v in narrow.state_dict().items() if "lora_" not in k}, strict=False)
    for n, p in wide.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, dict(narrow.named_parameters())[n])
    drawn = distill.lora_weights(wide)
    widened = distill.widen_lora(weights, drawn)
    distill.set_lora_weights(wide, widened)
    x, t, c = torch.randn(5, 1, 28, 28), torch.rand(5), torch.eye(10)[:5]
    with torch.no_grad():
        ref = narrow(x, t, c)
        assert (wide(x, t, c) - ref).abs().max() < 1e-5 * ref.abs().max()
    name_a = "conv_in.0.0.lora_A.student.weight"
    name_b = name_a.replace("lora_A", "lora_B")
    assert widened[name_a].shape[0] == 12 and widened[name_b].shape[1] == 12
    assert torch.equal(widened[name_b][:, 4:], torch.zeros_like(widened[name_b][:, 4:]))
    assert widened[name_a][4:].abs().min() > 0 and torch.equal(widened[name_a][:4], weights[name_a])
    assert torch.equal(widened[name_a][4:], drawn[name_a][4:])
    assert distill.widen_lora(weights, weights) == weights
    narrower = distill.lora_weights(distill.attach_flow_lora(UNet(num_hiddens=8).eval(), rank=2))
    with pytest.raises(ValueError, match="rank 4, above the student's --lora-rank 2"):
        distill.widen_lora(weights, narrower)


def _dmd_loss_with_a_discriminator_of_its_own(tiny_unet: UNet, disc: torch.nn.Module) -> tuple:
    """DMD's generator loss with the GAN term of ``disc`` (a discriminator on the clean images) on a batch of six
    classes: ``(unet, out, labels, x1, g)``, the generator with its fake score, the loss's terms, the batch's
    classes and pairs' images, and the generator that drew them."""
    from cdlab.flow import distill

    unet = _generator_and_fake_score(tiny_unet, seed=6)
    g = torch.Generator().manual_seed(7)
    z, x1 = torch.randn(6, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out = distill.dmd_loss(unet, z, x1, labels, guidance=2.0, regression_weight=0.5, gan=disc, gan_weight=0.25,
                           generator=g)
    return unet, out, labels, x1, g


def _owners_of_the_generators_gradient(unet: UNet, out: dict, disc: torch.nn.Module) -> set[str]:
    """Backpropagate ``out["loss"]``: the adapters of ``unet`` that got a gradient, after checking that no
    parameter of ``disc`` got one (the generator's pass trains no discriminator)."""
    out["loss"].backward()
    assert all(p.grad is None for p in disc.parameters())
    return {n.split(".")[-2] for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_a_discriminator_of_its_own_judges_the_clean_images_and_trains_apart_from_the_student(tiny_unet):
    """``--disc pixel`` (:class:`PixelDiscriminator`): the generator's GAN term is ``softplus(-D(G(z), c))`` on the
    clean sample, computed here by hand, and reaches the student's adapter alone; the fake score's update trains
    the discriminator on the generated and the real images and never moves the student. D sees what the user
    sees (clamped to [0, 1]) and its class term makes the same image score differently in another class."""
    from cdlab.flow import distill
    from cdlab.flow.unet import PixelDiscriminator
    from cdlab.students.roles import FAKE_SCORE

    disc = PixelDiscriminator().eval()  # eval: spectral norm's power iteration holds still, so calls repeat
    unet, out, labels, x1, g = _dmd_loss_with_a_discriminator_of_its_own(tiny_unet, disc)
    with torch.no_grad():
        c = matching.one_hot(labels)
        by_hand = torch.nn.functional.softplus(-disc(out["x_g"], c)).mean()
        assert torch.equal(disc(out["x_g"], c), disc(out["x_g"].clamp(0, 1), c))
        assert not torch.allclose(disc(out["x_g"], c), disc(out["x_g"], c.roll(1, 0)))
    assert float(out["loss_gan"]) == pytest.approx(float(by_hand), rel=1e-5)
    assert _owners_of_the_generators_gradient(unet, out, disc) == {distill.ADAPTER}
    assert all(p.requires_grad for p in disc.parameters())  # restored after the generator's pass

    disc.train()
    moved, loss = _moved_by_a_fake_update(unet, disc, disc, out["x_g"], labels, x1, g)
    assert moved == {FAKE_SCORE, "discriminator"} and loss > 0


def test_a_frozen_classifiers_features_judge_and_only_their_heads_train(tmp_path, tiny_unet):
    """``--disc features`` (:class:`FeatureDiscriminator`, ADD's): the sum of one projection head per stage of a
    frozen classifier, computed here by hand; the generator's GAN term reaches the student's adapter alone, through
    the frozen stages; the fake score's update trains the heads and leaves the classifier's weights and BatchNorm
    statistics as they were. The evaluation's own classifier is refused as its backbone, by name."""
    from cdlab.flow import distill
    from cdlab.flow.classifier import Classifier, classifier_dir, save_classifier
    from cdlab.flow.unet import FeatureDiscriminator
    from cdlab.students.roles import FAKE_SCORE

    torch.manual_seed(1)
    backbone = Classifier().eval()
    disc = FeatureDiscriminator(*backbone.stages()).eval()
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    unet, out, labels, x1, g = _dmd_loss_with_a_discriminator_of_its_own(tiny_unet, disc)
    with torch.no_grad():
        c, h, by_hand = matching.one_hot(labels), out["x_g"].clamp(0, 1), 0
        for k, (stage, head) in enumerate(zip(disc.stages, disc.heads)):
            h = stage(h)
            phi = head(h)
            by_hand = by_hand + disc.linears[k](phi)[:, 0] + (disc.embeds[k](c) * phi).sum(1)
        assert torch.allclose(disc(out["x_g"], c), by_hand, atol=1e-5)
        assert not torch.allclose(disc(out["x_g"], c), disc(out["x_g"], c.roll(1, 0)))
    assert float(out["loss_gan"]) == pytest.approx(float(torch.nn.functional.softplus(-by_hand).mean()), rel=1e-5)
    assert _owners_of_the_generators_gradient(unet, out, disc) == {distill.ADAPTER}
    trainable = [p for p in disc.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < sum(p.numel() for p in disc.parameters())

    disc.train()
    assert not any(m.training for m in disc.stages.modules())  # the classifier's BatchNorms keep their statistics
    heads_before = [p.detach().clone() for p in trainable]
    moved, loss = _moved_by_a_fake_update(unet, disc, disc, out["x_g"], labels, x1, g)
    assert moved == {FAKE_SCORE, "discriminator"} and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, trainable))
    assert all(torch.equal(v, frozen[k]) for k, v in backbone.state_dict().items())

    save_classifier(backbone, tmp_path / "backbone", {})
    cfg = distill.StudentConfig(method="dmd", gan_weight=0.1, disc="features", disc_backbone=str(tmp_path / "backbone"))
    assert isinstance(distill.make_discriminator(unet, cfg), FeatureDiscriminator)
    with pytest.raises(ValueError, match="the evaluation's own classifier"):
        distill.make_discriminator(unet, dataclasses.replace(cfg, disc_backbone=str(classifier_dir())))


@pytest.mark.parametrize("disc", ["head", "pixel", "features"])
def test_a_dmd_run_with_the_gan_term_continues_bit_for_bit_and_the_command_line_keeps_it_to_dmd(
        tmp_path, tiny_unet, monkeypatch, capsys, disc):
    """A DMD run with DMD2's GAN term reads the real training images, and its discriminator (DMD2's head, or one
    of its own with its spectral norms' state) is part of its checkpoint: a run cut off after one step and
    continued ends with the LoRA and the discriminator of the run that never stopped; the probe reads it.
    ``--gan-weight`` is DMD's only, and out-of-range values are refused by name."""
    from safetensors.torch import load_file

    from cdlab.flow import distill

    monkeypatch.setenv("CDLAB_FASHION_MNIST", str(write_train_set(tmp_path / "data", 40)))
    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    backbone = ""
    if disc == "features":  # a classifier of its own, not the judge
        from cdlab.flow.classifier import Classifier, save_classifier

        torch.manual_seed(2)
        backbone = str(save_classifier(Classifier().eval(), tmp_path / "backbone", {}))
    cfg = distill.StudentConfig(method="dmd", sample_steps=2, steps=3, batch_size=4, lr=1e-3, lora_rank=2, pairs=4,
                                guidance=2.0, regression_weight=1.0, gan_weight=0.5, disc_weight=1.0, disc=disc,
                                disc_backbone=backbone)
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    whole, done = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "whole", **kw)
    _, first = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "cut", max_seconds=0.0, **kw)
    again, done2 = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "cut", **kw)
    assert (done, first, done2) == (3, 1, 3)
    w1, w2 = distill.lora_weights(whole), distill.lora_weights(again)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    h1, h2 = (load_file(str(tmp_path / run / "student-0000003.safetensors")) for run in ("whole", "cut"))
    heads = [k for k in h1 if k.startswith("disc.")]
    assert heads and all(torch.equal(h1[k], h2[k]) for k in heads)
    torch.manual_seed(cfg.seed)  # the run's start, drawn as distill draws it: the discriminator must have moved
    start = distill.attach_flow_lora(distill._load_teacher_unet(teacher_dir, torch.device("cpu")), cfg.lora_rank)
    distill.attach_flow_lora(start, cfg.lora_rank, adapter_name=distill.FAKE_SCORE)
    fresh = distill.make_discriminator(start, cfg).state_dict()
    assert sorted(heads) == sorted(f"disc.{k}" for k in fresh)
    assert any(not torch.equal(h1[f"disc.{k}"], fresh[k]) for k in fresh if not k.endswith(("._u", "._v")))
    import importlib.util  # tools/flow_gan_probe.py reads that checkpoint: gradient norms and the head's accuracy

    spec = importlib.util.spec_from_file_location("flow_gan_probe", REPO_ROOT / "tools" / "flow_gan_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.main([str(tmp_path / "whole"), "--teacher", str(teacher_dir), "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    norms = [float(v) for v in re.findall(r"norm(?: at weight 1)? ([0-9.e+-]+)", printed)]
    accs = [float(v) for v in re.findall(r"(?:accuracy|500:|below:) ([0-9.]+)", printed)]
    assert printed.startswith("step 3:") and len(norms) == 2 and all(v > 0 for v in norms)
    assert len(accs) == (3 if disc == "head" else 1) and all(0 <= a <= 1 for a in accs)
    if disc == "features":  # its checkpoint holds the frozen classifier as it was loaded
        frozen = load_file(str(tmp_path / "backbone" / "classifier.safetensors"))
        assert all(torch.equal(h1[f"disc.stages.{k}"], v) for k, v in _stage_keys(frozen).items())
    if disc != "head":
        return
    for flags, named in ((["--method", "reflow", "--gan-weight", "0.1"], "--gan-weight"),
                         (["--method", "dmd", "--gan-weight", "11"], "--gan-weight"),
                         (["--method", "dmd", "--gan-weight", "0.1", "--disc-weight", "-1"], "--gan-weight"),
                         (["--method", "dmd", "--gan-weight", "0.1", "--disc", "stylegan"], "--gan-weight"),
                         (["--method", "dmd", "--gan-weight", "0.1", "--disc", "features"], "--disc-backbone"),
                         (["--method", "dmd", "--gan-weight", "0.1", "--disc-backbone", "b"], "--disc-backbone")):
        with pytest.raises(SystemExit):
            distill.main(["--teacher", "nowhere", "--name", "x", *flags])
        assert named in capsys.readouterr().err


def _stage_keys(classifier_weights: dict) -> dict:
    """A :class:`Classifier`'s ``body.<i>...`` weights under :meth:`Classifier.stages`' names (``<stage>.<i>...``:
    a slice of a ``Sequential`` keeps its layers' indices)."""
    stage_of = {i: s for s, layers in enumerate(((0, 1, 2), (3, 4, 5), (6, 7, 8))) for i in layers}
    return {f"{stage_of[int(k.split('.')[1])]}.{k[len('body.'):]}": v for k, v in classifier_weights.items()
            if k.startswith("body.")}


def test_the_teacher_grid_tool_shifts_the_euler_grid_as_sd3_and_scores_it(capsys):
    """``tools/flow_teacher_grid.py``: shift 1 is the teacher's uniform Euler grid, a shift above 1 puts more of
    the 50 steps near the noise (t = 0) and below 1 near the data; a run prints the shipped evaluation's scores."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flow_teacher_grid", REPO_ROOT / "tools" / "flow_teacher_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    assert torch.allclose(grid.shifted_times(1.0), matching.euler_timesteps(50))
    below_half = {s: int((grid.shifted_times(s) < 0.5).sum()) for s in (0.333, 1.0, 3.0)}
    assert below_half[0.333] < below_half[1.0] == 25 < below_half[3.0]
    assert grid.main(["3", "--n", "20"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("shift 3: {'fid': ") and "'accuracy': " in printed


def test_reflow_loss_at_t_zero_is_the_one_step_distillation_by_hand(tiny_unet):
    """2-rectified flow's loss ``|| u(x_t, t, c) - (x1 - z) ||^2`` at t = 0 is ``|| z + u(z, 0, c) - x1 ||^2``."""
    from cdlab.flow import distill

    g = torch.Generator().manual_seed(3)
    z, x1 = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    labels = torch.tensor([1, 1, 8, 9])
    got = distill.reflow_loss(tiny_unet, z, x1, labels, times="zero")["loss"]
    with torch.no_grad():
        u = tiny_unet(z, torch.zeros(4), matching.one_hot(labels))
    assert torch.allclose(got, ((z + u - x1) ** 2).mean(), atol=1e-6)


def test_piecewise_reflow_pairs_hold_the_teachers_path_at_the_window_edges_and_its_loss_is_the_chord(tiny_unet):
    """PeRFlow's pairs (``windows=4``): the teacher's Euler states at t = 0.25, 0.5, 0.75 and 1, on the 50-step
    grid with the edges added; the last is the 2-rectified-flow pair's x1 up to those two extra steps. Each window's
    target is its chord ``(x_{t_{k+1}} - x_{t_k}) / (t_{k+1} - t_k)``, by hand at each window's start."""
    from cdlab.flow import distill

    assert pairs.window_edges(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    labels = pairs.pair_labels(3)
    z, xs = pairs.teacher_pairs(tiny_unet, labels, 50, 3.0, torch.Generator().manual_seed(1), windows=4)
    z1, x1 = pairs.teacher_pairs(tiny_unet, labels, 50, 3.0, torch.Generator().manual_seed(1))
    assert xs.shape == (3, 4, 1, 28, 28) and torch.equal(z, z1)
    assert (xs[:, -1] - x1).abs().max() < 0.05 * x1.abs().max()
    velocity = matching.guided_velocity(tiny_unet, matching.one_hot(labels), 3.0)
    by_hand = matching.sample_euler(velocity, z, torch.tensor([0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16,
                                                               0.18, 0.2, 0.22, 0.24, 0.25]))
    assert torch.allclose(xs[:, 0], by_hand, atol=1e-5)
    g = torch.Generator().manual_seed(5)
    got = distill.reflow_loss(tiny_unet, z, xs, labels, times="zero", generator=g)["loss"]
    k = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(5))
    states = torch.cat([z[:, None], xs], 1)
    start, end = states[torch.arange(3), k], states[torch.arange(3), k + 1]
    with torch.no_grad():
        u = tiny_unet(start, k / 4, matching.one_hot(labels))
    assert torch.allclose(got, ((u - (end - start) * 4) ** 2).mean(), atol=1e-6)
    card = distill.student_card(distill.StudentConfig(method="reflow", windows=4), "pw", trained_steps=1)
    assert (card.method, card.num_boundaries, card.steps) == ("reflow", 4, 4)


@pytest.mark.parametrize("windows", [1, 2])
def test_teacher_pairs_do_not_depend_on_the_calls_size(tiny_unet, windows):
    """The pairs are drawn in calls of ``matching.ROWS`` UNet rows (25 images with CFG), not all at once: the
    same noise gives the same pairs in calls of 2 images or of all 5, up to float rounding (in eval() mode an
    image does not see the others of its call; `python tools/flow_eval_rows.py --pairs` measures it on the shipped
    teacher), so a cache made at one size is the cache of any other."""
    import inspect

    assert inspect.signature(pairs.teacher_pairs).parameters["batch_size"].default == matching.ROWS // 2
    labels = pairs.pair_labels(5)
    got = [pairs.teacher_pairs(tiny_unet, labels, 5, 1.5, torch.Generator().manual_seed(3), batch_size=bs,
                               windows=windows) for bs in (2, 5)]
    assert torch.equal(got[0][0], got[1][0])
    assert (got[0][1] - got[1][1]).abs().max() < 1e-5 * got[1][1].abs().max()
    assert got[0][1].shape == ((5, 1, 28, 28) if windows == 1 else (5, 2, 1, 28, 28))


def test_compare_runs_each_student_as_trained_by_default():
    """The student-steps choice ``"as trained"`` (Compare's and Edit's default) runs each student at its card's
    steps: the 1-step flow student at 1 NFE beside the 4-step one at 4, not both at 4, where the 1-step student
    falls apart (docs/flow-evaluation: FID 1207 at 4 steps). A number still runs every student at it."""
    from cdlab.teachers import load_teacher
    from cdlab.ui import compare as C

    cmp = C.Comparer(load_teacher("fashion-flow", device="cpu"), adapters_root=REPO_ROOT / "adapters", cache_size=0)
    res = cmp.run("Sneaker", 0, 1.5, C.AS_TRAINED, ["fashion-reflow-1", "fashion-reflow-4", C.TEACHER_4])
    assert [(c.label, c.nfe) for c in res.columns] == [
        ("fashion-reflow-1 (1 step)", 1), ("fashion-reflow-4 (4 steps)", 4), (C.TEACHER_4, 8)]
    assert res.student_steps is None and C.trajectory_grid(None, cmp._resolve_columns(["fashion-reflow-1"], 1.5, None)) == [999]
    assert [c.nfe for c in cmp.run("Sneaker", 0, 1.5, "2", ["fashion-reflow-1", "fashion-reflow-4"]).columns] == [2, 2]
    for bad in ("as trained ", "AS TRAINED", True, "0", 16, None):
        with pytest.raises(C.InputError, match="Student steps must be 'as trained' or one of"):
            C.validate_request("Sneaker", 0, 1.5, bad)


def _teacher_folder(folder, unet):
    from safetensors.torch import save_file

    from cdlab.paths import write_json_atomic

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "unet.safetensors"))
    write_json_atomic(folder / "state.json", {"config": {"num_hiddens": unet.num_hiddens}, "step": 0, "epoch": 0,
                                              "position": 0, "seconds": 0.0, "lr": 0.002})
    return folder


def test_flow_student_is_a_lab_student_load_student_reads_and_the_column_runner_samples(tmp_path, tiny_unet):
    """A flow student is saved as every student is (adapters/<name>/ with its card), ``load_student`` puts it on
    the flow teacher, and the column runner's student column is the student's own consistency sampler on the
    flow path (fused weights against peft's unfused adapter: equal to rounding). A fresh LoRA (B = 0) is the
    teacher, bit for bit."""
    from cdlab.columns import run_columns, student_column
    from cdlab.flow import distill
    from cdlab.flow.model import FLOW_SCHEDULE, FlowModel
    from safetensors.torch import save_file

    from cdlab.flow.pipeline import flow_fingerprint, load_flow_teacher
    from cdlab.paths import FLOW_ID
    from cdlab.samplers import consistency_timesteps, sample_consistency
    from cdlab.students import StudentError, load_student, students_of, unload_student
    from cdlab.teachers import TeacherLoadError, load_teacher

    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    unet = distill.attach_flow_lora(tiny_unet, rank=4)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(n)))
    cfg = distill.StudentConfig(method="cd", num_boundaries=4, sample_steps=4, lora_rank=4)
    root = tmp_path / "adapters"
    distill.save_flow_student(unet.eval(), "fashion-mbcd-4", cfg, root, teacher=teacher_dir)
    with pytest.raises(StudentError, match="exists"):
        distill.save_flow_student(unet, "fashion-mbcd-4", cfg, root, teacher=teacher_dir)  # nothing replaced
    teacher = load_flow_teacher(teacher_dir)
    card = load_student(teacher, "fashion-mbcd-4", root)
    base = str(teacher_dir.resolve())  # a LoRA fits its own teacher's weights: the folder is its base
    assert (card.method, card.num_boundaries, card.base_model, card.scheduler) == ("mbcd", 4, base, "consistency")
    assert teacher.base_id == base and load_flow_teacher().base_id == FLOW_ID
    with pytest.raises(StudentError, match="was distilled from"):  # not on the shipped teacher's weights
        load_student(load_flow_teacher(), "fashion-mbcd-4", root)
    run = run_columns(teacher, [student_column(card, 4)], ["Bag", "Sneaker"], seeds=[3, 4], adapters_root=root,
                      decode=None)[0]
    x_T = torch.cat([teacher.initial_noise(3), teacher.initial_noise(4)])
    cond = torch.nn.functional.one_hot(torch.tensor([8, 7]), 10).float()
    direct = sample_consistency(unet, x_T, cond, consistency_timesteps(4, 4), FLOW_SCHEDULE, model_class=FlowModel)
    assert run.nfe == 4 and torch.allclose(run.latents, direct.latents, atol=1e-5)
    # taken off and loaded again (a retrained student): the same samples; the plain teacher is untouched
    unload_student(teacher, "fashion-mbcd-4")
    assert teacher.unet.peft_config == {} and not any("lora_" in n for n, _ in teacher.unet.named_parameters())
    load_student(teacher, "fashion-mbcd-4", root)
    rerun = run_columns(teacher, [student_column(card, 4)], ["Bag", "Sneaker"], seeds=[3, 4], adapters_root=root,
                        decode=None)[0]
    assert torch.equal(rerun.latents, run.latents)
    with pytest.raises(TeacherLoadError, match="float32"):
        load_teacher("fashion-flow", device="cpu", dtype=torch.float16)
    # the saved LoRA comes back as the training side's parameters
    again = distill.attach_flow_lora(load_flow_teacher(teacher_dir).unet, rank=4)
    distill.set_lora_weights(again, distill.student_lora("fashion-mbcd-4", root, teacher_dir))
    trained = dict(unet.named_parameters())
    assert all(torch.allclose(p, trained[n]) for n, p in again.named_parameters() if "lora_" in n)
    # a fresh LoRA (B = 0) on the teacher samples exactly as the teacher does
    fresh = distill.attach_flow_lora(load_flow_teacher(teacher_dir).unet, rank=4).eval()
    plain = load_flow_teacher(teacher_dir).unet
    ts = consistency_timesteps(2, 2)
    assert torch.equal(sample_consistency(fresh, x_T, cond, ts, FLOW_SCHEDULE, model_class=FlowModel).latents,
                       sample_consistency(plain, x_T, cond, ts, FLOW_SCHEDULE, model_class=FlowModel).latents)
    # the card records the teacher's weights; the folder trained again in place is another teacher, under one id
    assert card.base_fingerprint == teacher.base_fingerprint == flow_fingerprint(teacher_dir)
    retrained = UNet(num_hiddens=8).eval()  # the same shapes: its LoRA would load, and sample wrongly
    save_file(retrained.state_dict(), str(teacher_dir / "unet.safetensors"))
    again = load_flow_teacher(teacher_dir)
    assert again.base_id == base and again.base_fingerprint != card.base_fingerprint
    assert students_of(again, root) == []
    with pytest.raises(StudentError, match="distilled from other weights of"):
        load_student(again, "fashion-mbcd-4", root)
    with pytest.raises(StudentError, match="other weights .* the teacher was trained again since"):
        distill.student_lora("fashion-mbcd-4", root, teacher_dir)


def test_a_falling_rate_follows_one_cosine_over_its_steps_and_a_run_in_pieces_keeps_it(tmp_path, tiny_unet):
    """``lr_decay_steps`` T: every rate is ``rate * (1 + cos(pi min(k, T) / T)) / 2`` at step k, 1 at the start, 0
    from T on, set before each step. A run trained to step 3, then continued to 6 on its checkpoint (as the trial
    tool trains in pieces) ends with the one-piece run's weights bit for bit, because T, not ``--steps``, sets the
    schedule; and the schedule changes the weights (its last steps move them less)."""
    import math

    from cdlab.flow import distill

    assert student_config.rate_factor(0, 6) == 1.0 and student_config.rate_factor(5, 0) == student_config.rate_factor(5, -1) == 1.0
    assert math.isclose(student_config.rate_factor(3, 6), 0.5) and student_config.rate_factor(6, 6) == student_config.rate_factor(9, 6)
    assert math.isclose(student_config.rate_factor(6, 6), 0.0, abs_tol=1e-12)
    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="reflow", steps=6, batch_size=4, lr=1e-2, lora_rank=2, pairs=12, guidance=2.0,
                                lr_decay_steps=6)
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    whole, _ = distill.distill(teacher_dir, cfg, **kw)
    distill.distill(teacher_dir, dataclasses.replace(cfg, steps=3), checkpoint=tmp_path / "pieces", **kw)
    pieces, done = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "pieces", **kw)
    constant, _ = distill.distill(teacher_dir, dataclasses.replace(cfg, lr_decay_steps=0), **kw)
    w, p, c = (distill.lora_weights(u) for u in (whole, pieces, constant))
    assert done == 6 and all(torch.equal(w[k], p[k]) for k in w)
    assert not all(torch.equal(w[k], c[k]) for k in w)
    parser = argparse.ArgumentParser()
    distill.add_config_arguments(parser)
    with pytest.raises(SystemExit):
        distill.config_from_args(parser, parser.parse_args(["--lr-decay-steps", "-1"]))
    assert distill.config_from_args(parser, parser.parse_args(["--lr-decay-steps", "600"])).lr_decay_steps == 600


def test_a_constant_run_continues_into_a_fall_that_starts_at_its_checkpoint(tmp_path, tiny_unet):
    """``lr_decay_start`` S with ``lr_decay_steps`` T (warmup-stable-decay without the warm-up): the rates stay
    constant to step S, then fall along the half cosine to 0 at T. A constant run's checkpoint at step S continues
    into that fall, and ends with the weights of the run planned so from the start, bit for bit; a schedule that
    would have given another rate at a step the checkpoint took is refused, naming the step."""
    import math

    from cdlab.flow import distill
    from cdlab.students import StudentError

    assert [student_config.rate_factor(k, 8, 4) for k in (0, 3, 4)] == [1.0, 1.0, 1.0]
    assert math.isclose(student_config.rate_factor(6, 8, 4), 0.5) and student_config.rate_factor(8, 8, 4) == student_config.rate_factor(
        20, 8, 4)
    assert math.isclose(student_config.rate_factor(8, 8, 4), 0.0, abs_tol=1e-12)
    assert student_config.rate_factor(5, 8, 4) == student_config.rate_factor(1, 4)  # the cosine itself, moved to start at S
    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    planned = distill.StudentConfig(method="reflow", steps=6, batch_size=4, lr=1e-2, lora_rank=2, pairs=12,
                                    guidance=2.0, lr_decay_steps=6, lr_decay_start=3)
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    whole, _ = distill.distill(teacher_dir, planned, **kw)
    constant = dataclasses.replace(planned, steps=3, lr_decay_steps=0, lr_decay_start=0)
    distill.distill(teacher_dir, constant, checkpoint=tmp_path / "trunk", **kw)
    branched, done = distill.distill(teacher_dir, planned, checkpoint=tmp_path / "trunk", **kw)
    w, b = distill.lora_weights(whole), distill.lora_weights(branched)
    assert done == 6 and all(torch.equal(w[k], b[k]) for k in w)
    distill.distill(teacher_dir, constant, checkpoint=tmp_path / "trunk2", **kw)
    with pytest.raises(StudentError, match="ran step 2 at rate factor 1, where .*lr_decay_start=1.* has 0.9045"):
        distill.distill(teacher_dir, dataclasses.replace(planned, lr_decay_start=1), checkpoint=tmp_path / "trunk2",
                        **kw)
    parser = argparse.ArgumentParser()
    distill.add_config_arguments(parser)
    for bad in (["--lr-decay-start", "5"], ["--lr-decay-steps", "6", "--lr-decay-start", "6"],
                ["--lr-decay-steps", "6", "--lr-decay-start", "-1"]):
        with pytest.raises(SystemExit):
            distill.config_from_args(parser, parser.parse_args(bad))
    cfg = distill.config_from_args(parser, parser.parse_args(["--lr-decay-steps", "2400", "--lr-decay-start", "1800"]))
    assert (cfg.lr_decay_steps, cfg.lr_decay_start) == (2400, 1800)


def test_a_run_without_an_average_continues_with_one_that_starts_at_its_checkpoint(tmp_path, tiny_unet):
    """``student_ema`` never steers the training, so a constant run's checkpoint may continue with an average of
    the student's weights: the average starts at the checkpoint's weights and follows every step after it
    (``a <- a + (1 - mu)(w - a)``), the weights themselves are the run without it, bit for bit, and the student
    returned is the average. An average at another rate than the checkpoint's is refused."""
    from safetensors.torch import load_file

    from cdlab.flow import distill
    from cdlab.students import StudentError

    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="reflow", steps=3, batch_size=4, lr=1e-2, lora_rank=2, pairs=12, guidance=2.0)
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    weights = [distill.lora_weights(distill.distill(teacher_dir, dataclasses.replace(cfg, steps=k),
                                                    checkpoint=tmp_path / "plain", **kw)[0]) for k in (3, 4, 5)]
    distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "branch", **kw)
    averaged, done = distill.distill(teacher_dir, dataclasses.replace(cfg, steps=5, student_ema=0.5),
                                     checkpoint=tmp_path / "branch", **kw)
    got = distill.lora_weights(averaged)
    student = [n for n in got if f".{distill.ADAPTER}." in n]
    expected = {n: weights[0][n].lerp(weights[1][n], 0.5).lerp(weights[2][n], 0.5) for n in student}
    assert done == 5 and all(torch.allclose(got[n], expected[n], atol=1e-7) for n in student)
    assert not all(torch.equal(got[n], weights[2][n]) for n in student)
    saved = load_file(str(tmp_path / "branch" / "student-0000005.safetensors"))
    assert all(torch.equal(saved[n], weights[2][n]) for n in student)  # the training itself: as without it
    with pytest.raises(StudentError, match="student_ema=0.5, not 0.9"):
        distill.distill(teacher_dir, dataclasses.replace(cfg, steps=6, student_ema=0.9),
                        checkpoint=tmp_path / "branch", **kw)


def test_a_branch_continues_a_checkpoint_under_another_rate_with_its_state_kept(tmp_path, tiny_unet):
    """``branch``: a checkpoint continues under another rate or loss weight only when asked, and only for
    ``BRANCHABLE``'s fields. Adam's moments and the random stream are the checkpoint's: a branch that changes a
    weight reflow does not use ends bit for bit on the plain continuation, and one at another rate does not. The
    changes are kept with the checkpoint and written on the student's card (``branches``)."""
    from cdlab.flow import distill
    from cdlab.students import StudentError

    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="reflow", steps=3, batch_size=4, lr=1e-2, lora_rank=2, pairs=12, guidance=2.0)
    kw = dict(log=lambda line: None, pair_cache=tmp_path / "cache")
    for name in ("plain", "unused", "rate", "rank"):
        distill.distill(teacher_dir, cfg, checkpoint=tmp_path / name, **kw)
    plain, _ = distill.distill(teacher_dir, dataclasses.replace(cfg, steps=5), checkpoint=tmp_path / "plain", **kw)
    unused = dataclasses.replace(cfg, steps=5, regression_weight=3.0)
    with pytest.raises(StudentError, match="regression_weight=10.0, not 3.0: choose a new folder or the same recipe$"):
        distill.distill(teacher_dir, unused, checkpoint=tmp_path / "unused", **kw)
    same, done = distill.distill(teacher_dir, unused, checkpoint=tmp_path / "unused", branch=True, **kw)
    faster, _ = distill.distill(teacher_dir, dataclasses.replace(cfg, steps=5, lr=5e-2), checkpoint=tmp_path / "rate",
                                branch=True, **kw)
    p, u, f = (distill.lora_weights(x) for x in (plain, same, faster))
    assert done == 5 and all(torch.equal(p[k], u[k]) for k in p) and not all(torch.equal(p[k], f[k]) for k in p)
    # the run's changes are kept with its checkpoint and reach the student's card, which holds the last recipe
    history = [{"step": 3, "changed": {"lr": [1e-2, 5e-2]}}]
    assert distill.branches_of(tmp_path / "rate") == history and distill.branches_of(tmp_path / "plain") == []
    distill.distill(teacher_dir, dataclasses.replace(cfg, steps=6, lr=5e-2), checkpoint=tmp_path / "rate", **kw)
    assert distill.branches_of(tmp_path / "rate") == history  # continued under the new recipe: no new branch
    distill.save_flow_student(faster, "b", dataclasses.replace(cfg, lr=5e-2), tmp_path / "adapters",
                              teacher=teacher_dir, branches=distill.branches_of(tmp_path / "rate"))
    card = json.loads((tmp_path / "adapters" / "b" / "card.json").read_text())
    assert card["training_config"]["branches"] == history and card["training_config"]["lr"] == 5e-2
    with pytest.raises(StudentError, match="lora_rank=2, not 4.*a branch may change lr"):
        distill.distill(teacher_dir, dataclasses.replace(cfg, steps=5, lora_rank=4), checkpoint=tmp_path / "rank",
                        branch=True, **kw)
    with pytest.raises(SystemExit):  # the command line's branch continues a run folder's checkpoint
        distill.main(["--teacher", str(teacher_dir), "--name", "b", "--root", str(tmp_path / "adapters"), "--branch"])
    common = ["--teacher", str(teacher_dir), "--root", str(tmp_path / "adapters"), "--run-dir", str(tmp_path / "r"),
              "--pair-cache", str(tmp_path / "cache"), "--method", "reflow", "--batch-size", "4", "--lora-rank", "2",
              "--pairs", "12", "--guidance", "2.0"]  # the documented two commands: a run, then its branch
    assert distill.main([*common, "--name", "stage1", "--steps", "3", "--lr", "0.01"]) == 0
    assert distill.main([*common, "--name", "stage2", "--steps", "5", "--lr", "0.05", "--resume", "--branch"]) == 0
    card = json.loads((tmp_path / "adapters" / "stage2" / "card.json").read_text())["training_config"]
    assert card["branches"] == [{"step": 3, "changed": {"lr": [0.01, 0.05]}}] and card["trained_steps"] == 5


def test_a_cut_off_student_run_continues_bit_for_bit_and_its_teacher_pairs_are_made_once(tmp_path, tiny_unet,
                                                                                          monkeypatch):
    """Issue 24: a student run cut off (here by ``max_seconds``) and started again on the same checkpoint folder
    ends with the LoRA, EMA-free Adam state and samples of the run that never stopped; reflow's teacher pairs are
    cached by chunk and read back, not made again; another recipe on that checkpoint is refused by name. The
    student it returns is its weights' average (``student_ema``), kept in the checkpoint beside its weights."""
    from safetensors.torch import load_file

    from cdlab.flow import distill
    from cdlab.students import StudentError

    teacher_dir = _teacher_folder(tmp_path / "teacher", tiny_unet)
    cfg = distill.StudentConfig(method="reflow", steps=6, batch_size=4, lr=1e-2, lora_rank=2, pairs=12, guidance=2.0,
                                student_ema=0.5)
    cache, quiet = tmp_path / "cache", (lambda line: None)
    kw = dict(log=quiet, pair_cache=cache, checkpoint_every=2)
    _, done = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "stopped", should_stop=lambda: True, **kw)
    assert done == 0 and not cache.exists()  # a Stop while the pairs are drawn: nothing trained, nothing made
    whole, done = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "whole", **kw)
    chunks = sorted(cache.glob("flow-pairs-*/chunk-*.safetensors"))
    assert done == 6 and len(chunks) == 1  # 12 pairs: one chunk of 12
    made = []
    monkeypatch.setattr(pairs, "teacher_pairs", lambda *a, **k: made.append(1) or (_ for _ in ()).throw(
        AssertionError("pairs made again")))
    _, first = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "cut", max_seconds=0.0, **kw)
    assert first == 1 and not made  # stopped after one step, its checkpoint saved; the pairs came from the cache
    assert [p.name for p in sorted((tmp_path / "cut").iterdir())] == [
        "checkpoint.json", "optimizer-0000001.safetensors", "student-0000001.safetensors"]
    saved = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    del saved["config"]["windows"]  # a checkpoint from before the field: it ran with the default, one window
    (tmp_path / "cut" / "checkpoint.json").write_text(json.dumps(saved))
    again, done = distill.distill(teacher_dir, cfg, checkpoint=tmp_path / "cut", **kw)
    assert done == 6
    w1, w2 = distill.lora_weights(whole), distill.lora_weights(again)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(float(v.abs().max()) > 0 for k, v in w1.items() if "lora_B" in k)  # it trained
    # the student returned is its average (student_ema), which the checkpoint keeps beside the last weights
    saved = load_file(str(tmp_path / "whole" / "student-0000006.safetensors"))
    assert all(torch.equal(w1[k], saved[f"average.{k}"]) for k in w1)
    assert not all(torch.equal(w1[k], saved[k]) for k in w1)
    other = dataclasses.replace(cfg, lr=2e-2)
    with pytest.raises(StudentError, match="lr=0.01"):
        distill.distill(teacher_dir, other, checkpoint=tmp_path / "cut", **kw)


def test_the_shipped_flow_teacher_and_students_run_through_the_column_runner():
    """``load_teacher("fashion-flow")``: its teacher-50 column (DDIM on the flow path = Euler with CFG from
    t = 0.001) is the seed's Euler-50 from t = 0 up to the first step's 0.001, its naive 4 steps cost 8 NFE, and a
    shipped reflow student's 4 steps are Euler on its own velocity; the "prompt" is a class, named or refused."""
    from cdlab.columns import run_columns, student_column, teacher_columns
    from cdlab.flow import distill
    from cdlab.students import read_card
    from cdlab.teachers import load_teacher

    teacher = load_teacher("fashion-flow", device="cpu")
    card = read_card("fashion-reflow-4", REPO_ROOT / "adapters")
    runs = run_columns(teacher, teacher_columns(teacher.guidance) + [student_column(card, 4)], ["Sneaker", "Bag"],
                       seeds=[0, 1], adapters_root=REPO_ROOT / "adapters")
    assert [r.nfe for r in runs] == [100, 8, 4]
    assert runs[0].images[0].size == (28, 28) and runs[0].images[0].mode == "RGB"
    x_T = torch.cat([teacher.initial_noise(0), teacher.initial_noise(1)])
    euler = matching.sample(teacher.unet, torch.tensor([7, 8]), 50, teacher.guidance, x0=x_T)
    assert (runs[0].latents - euler).abs().max() < 0.02, (runs[0].latents - euler).abs().max()
    student = distill.attach_flow_lora(load_teacher("fashion-flow", device="cpu").unet, card.lora_rank)
    distill.set_lora_weights(student, distill.student_lora("fashion-reflow-4", REPO_ROOT / "adapters"))
    own = matching.sample(student.eval(), torch.tensor([7, 8]), 4, None, x0=x_T)
    assert (runs[2].latents - own).abs().max() < 0.02
    with pytest.raises(ValueError, match="one of T-shirt/top, Trouser"):
        teacher.encode(["a red circle"])


def test_fid_of_features_is_the_frechet_distance_of_two_gaussians():
    """Two sets with the same covariance: FID is the squared distance of their means; a set against itself is 0."""
    from cdlab.metrics import fid_of_features

    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert fid_of_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_of_features(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-6)
    with pytest.raises(ValueError, match="features"):
        fid_of_features(a, a[:, :2])


def test_classifier_features_and_flow_scores():
    from cdlab.flow import evaluate
    from cdlab.flow.classifier import NUM_FEATURES, Classifier, accuracy, as_feature

    torch.manual_seed(0)
    net = Classifier().eval()
    x = torch.rand(40, 1, 28, 28)
    labels = torch.arange(40) % 10
    assert as_feature(net)(x).shape == (40, NUM_FEATURES)
    logits = net(x)
    assert accuracy(net, x, logits.argmax(1)) == 1.0
    reference = torch.rand(50, 1, 28, 28)
    got = evaluate.score(torch.cat([x] * 4), torch.cat([labels] * 4), net, as_feature(net)(reference))
    assert set(got) == {"fid", "accuracy", "diversity"} and got["fid"] >= 0 and got["diversity"] > 0


@pytest.mark.skipif(not (data.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file() and os.environ.get("CI") != "true",
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist; .ci/run installs it)")
def test_cd_on_the_shipped_flow_teacher_reduces_the_4_step_error_against_teacher_50():
    """Issue 24: consistency distillation of the shipped flow teacher (an EMA target, as Song et al. 2023's Alg. 2)
    brings its 4-step consistency sample closer to the teacher's Euler-50 with CFG than the student's start (the
    teacher's own 4 jumps without guidance). A short run on a few images: it pins the direction, not the quality."""
    from cdlab.flow import distill, evaluate
    from cdlab.flow.model import FLOW_SCHEDULE, FlowModel
    from cdlab.flow.train_teacher import load_unet
    from cdlab.paths import assets_dir
    from cdlab.samplers import consistency_timesteps, sample_consistency
    from cdlab.students import read_card

    torch.manual_seed(0)
    teacher_dir = assets_dir() / "fashion-flow"
    guidance = float(read_card("fashion-reflow-4", REPO_ROOT / "adapters").training_config["guidance"])
    z, y = evaluate.noise(10, seed=123)
    reference = matching.sample(load_unet(teacher_dir), y, 50, guidance, x0=z)
    cfg = distill.StudentConfig(method="cd", num_boundaries=4, sample_steps=4, guidance=guidance, steps=25,
                                batch_size=16, lr=3e-4, lora_rank=4)

    def error(unet):
        x = sample_consistency(unet, z, matching.one_hot(y), consistency_timesteps(4, 4), FLOW_SCHEDULE,
                               model_class=FlowModel).latents
        return float((x - reference).abs().mean())

    before = error(distill.attach_flow_lora(load_unet(teacher_dir), rank=4).eval())
    student, done = distill.distill(teacher_dir, cfg, log=lambda line: None)
    after = error(student)
    print(f"4-step error against teacher-50: {before:.4f} -> {after:.4f}")
    assert done == 25
    assert after < 0.9 * before, (before, after)


@pytest.mark.skipif(not (data.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file() and os.environ.get("CI") != "true",
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist; .ci/run installs it)")
def test_cdlab_evaluate_fashion_flow_scores_the_shipped_teacher_and_students(tmp_path, capsys):
    """``python -m cdlab evaluate --model fashion-flow``: teacher-50 and naive 1/2/4/8, each shipped student at
    1/2/4/8, with FID (ratio to teacher-50), accuracy, diversity and NFE; an existing evaluation is not replaced;
    ``--seed`` draws other noises. Two runs at the evaluation's floor of 20 samples (teacher-50 is most of a run's
    cost): the whole table, then three of its columns on seed 1."""
    from cdlab.evaluate.cli import main

    out = tmp_path / "flow-eval"
    assert main(["--model", "fashion-flow", "--n", "20", "--out", str(out), "--device", "cpu"]) == 0
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    from cdlab.flow.pipeline import FLOW_GUIDANCE
    from cdlab.students import read_card

    distilled_at = {read_card(n, REPO_ROOT / "adapters").training_config["guidance"]
                    for n in SHIPPED_FLOW_STUDENTS}
    assert saved["n"] == 20 and distilled_at == {saved["guidance"]} == {FLOW_GUIDANCE}  # the teacher's CFG, theirs
    assert (saved["suite"], saved["model"]) == ("flow", "fashion-flow")
    assert saved["prompt_source"] == "classes i mod 10, noise seed 0"
    assert [(r["column"], r["steps"], r["nfe"]) for r in rows[:5]] == [
        ("teacher-50 (CFG)", 50, 100), ("teacher-1 (naive)", 1, 2), ("teacher-2 (naive)", 2, 4),
        ("teacher-4 (naive)", 4, 8), ("teacher-8 (naive)", 8, 16)]
    assert {r["method"] for r in rows[:5]} == {"teacher"}
    students = {r["column"] for r in rows[5:]}
    assert students == set(SHIPPED_FLOW_STUDENTS)
    assert {r["kind"] for r in rows[5:]} == {"reflow", "dmd", "mbcd"}
    assert all(r["nfe"] == r["steps"] for r in rows[5:])
    assert rows[0]["fid_ratio"] == 1.0 and all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["speedup"] == 1.0 and all(r["speedup"] > 1 for r in rows[5:])
    by = {(r["column"], r["steps"]): r for r in rows}
    # the one-step students beat the teacher's own single Euler step by far (docs/flow-evaluation at n = 2000:
    # 2.0x and 6.9x teacher-50's FID against 29.9x; at 20 samples every FID is far higher and the gap narrower,
    # 0.50x and 0.56x of teacher-1's)
    for student in ("fashion-reflow-1", "fashion-dmd-1"):
        assert by[(student, 1)]["fid"] < 0.7 * by[("teacher-1 (naive)", 1)]["fid"]
    table = (out / "table.md").read_text()
    assert "| teacher | 50 | 100 |" in table and "FID ↓" in table and (out / "quality_vs_nfe.png").is_file()
    assert main(["--model", "fashion-flow", "--n", "20", "--out", str(out), "--device", "cpu"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # another draw of the same table: other noises, one student, one step count (docs/flow.md's seed-1 check)
    assert main(["--model", "fashion-flow", "--n", "20", "--out", str(tmp_path / "s1"), "--device", "cpu", "--seed",
                 "1", "--student-steps", "4", "--students", "fashion-dmd-4"]) == 0
    other = json.loads((tmp_path / "s1" / "results.json").read_text())
    assert other["prompt_source"] == "classes i mod 10, noise seed 1"
    columns = [("teacher-50 (CFG)", 50), ("teacher-4 (naive)", 4), ("fashion-dmd-4", 4)]
    assert [(r["column"], r["steps"]) for r in other["rows"]] == columns
    assert [r["fid"] for r in other["rows"]] != [by[c]["fid"] for c in columns]  # the seed reached the noises


def test_fid_of_features_matches_torchmetrics_and_takes_shipped_statistics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from cdlab.metrics import _Features, feature_stats, fid_of_features

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(300, 16, generator=g).double(), (torch.randn(400, 16, generator=g) * 1.3 + 0.2).double()
    m = FrechetInceptionDistance(feature=_Features(16), normalize=True)
    m.update(b, real=True)
    m.update(a, real=False)
    assert fid_of_features(a, b) == pytest.approx(float(m.compute()), rel=1e-6)
    assert fid_of_features(a, feature_stats(b)) == fid_of_features(a, b)


def test_the_editing_loops_run_on_the_flow_teacher_in_pixel_space():
    """``cdlab.edit.edit`` on the flow teacher (no VAE: its samples are the pixels): SDEdit at strength 0.6 runs
    teacher-50's last 30 Euler steps with CFG (60 NFE); inpainting keeps every pixel outside the mask exactly (the
    projection pastes the known image at the last step, t = 0, in pixel space); a student column edits too."""
    from cdlab.edit import edit, student_column, teacher_columns
    from cdlab.students import read_card
    from cdlab.teachers import load_teacher

    teacher = load_teacher("fashion-flow", device="cpu")
    cols = teacher_columns(teacher.guidance) + [student_column(read_card("fashion-reflow-4", REPO_ROOT / "adapters"), 4)]
    image = teacher.decode(teacher.initial_noise(7))[0]  # any 28x28 picture
    out = edit(teacher, "sdedit", ["Ankle boot"], cols, image=image, strength=0.6, adapters_root=REPO_ROOT / "adapters")
    assert [o.nfe for o in out] == [60, 4, 3]
    mask = torch.zeros(28, 28)
    mask[:, 14:] = 1.0  # regenerate the right half
    out = edit(teacher, "inpaint", ["Sneaker"], cols[:1], image=image, mask=mask)
    x_in = teacher.encode_pixels(torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert torch.allclose(out[0].latents[..., :14], x_in[..., :14], atol=1e-5)
    assert not torch.allclose(out[0].latents[..., 14:], x_in[..., 14:], atol=1e-2)


def test_the_flow_edit_presets_sample_their_start_images_on_first_use_not_at_app_start(monkeypatch):
    """The Edit (flow) tab's presets start from the teacher's own Euler-50 samples. Building them samples
    nothing (the app starts without 200 NFE); the first use samples once, the teacher-50 column's image; later
    uses are the same image, not sampled again."""
    from cdlab.columns import run_columns, teacher_columns
    from cdlab.teachers import load_teacher
    from cdlab.ui import edit_tab as ET

    teacher = load_teacher("fashion-flow", device="cpu")
    calls: list[str] = []
    real = ET.run_columns
    monkeypatch.setattr(ET, "run_columns", lambda *a, **k: (calls.append(a[2][0]), real(*a, **k))[1])
    presets = ET.presets(teacher)
    assert calls == [] and [p.technique for p in presets] == ["sdedit", "inpaint", "anagram", "hybrid"]
    first = presets[0].editor_value()
    assert calls == ["Sneaker"]
    want = run_columns(teacher, teacher_columns(teacher.guidance)[:1], ["Sneaker"], seeds=[0])[0].images[0]
    assert np.array_equal(np.asarray(first["background"]), np.asarray(want))
    assert presets[0].editor_value()["background"] is first["background"] and calls == ["Sneaker"]
    inpaint = presets[1].editor_value()
    assert calls == ["Sneaker", "Pullover"] and inpaint["layers"] and inpaint["composite"].size == (28, 28)
    assert presets[2].editor_value() is None  # an anagram starts from noise
