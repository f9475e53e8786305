"""cdlab.loss: the consistency loss (CT / CD / multi-boundary CD) on a small random UNet."""
from __future__ import annotations

import pytest
import torch

from cdlab.loss import consistency_loss, sample_timesteps
from cdlab.students.roles import adapter_role, swapped_weights
from cdlab.math import cfg_eps, ddim_solver_step, get_multi_boundary_timesteps, q_sample


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDIMScheduler

    from cdlab.tiny.architecture import SCHEDULER_CONFIG

    return DDIMScheduler(**SCHEDULER_CONFIG)


def _unet(lora: bool):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from cdlab.tiny.architecture import UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.requires_grad_(False)
    if lora:
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with torch.no_grad():  # peft starts B at 0 (the base model); make the student differ from it
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    return unet


@pytest.fixture(scope="module")
def unet():
    return _unet(lora=True)


def _batch(bsz=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 4, 8, 8, generator=g), torch.randn(bsz, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)


def _eps(net, x, t, c):
    return net(x, t, encoder_hidden_states=c).sample


def test_sample_timesteps_grid_includes_999_and_sampler_steps():
    g = torch.Generator().manual_seed(0)
    t, s = sample_timesteps(20000, step_size=20, generator=g)
    assert set(t.tolist()) == {20 * i - 1 for i in range(1, 51)}  # 19 ... 979 and 999
    assert torch.equal(s, (t - 20).clamp(min=0))
    t, s = sample_timesteps(4000, sampler_timesteps=[999, 750, 500, 250], sampler_prob=0.5, generator=g)
    visited = t[(t % 20) != 19]
    assert set(visited.tolist()) == {750, 500, 250}
    assert 0.3 < (t % 20 != 19).float().mean().item() < 0.45  # 3/4 of half of the draws
    assert torch.equal(s, (t - 20).clamp(min=0))
    with pytest.raises(ValueError, match="divide"):
        sample_timesteps(2, step_size=30)


@pytest.mark.parametrize("num_boundaries", [1, 4])
@pytest.mark.parametrize("cd", [False, True])
def test_target_is_x_s_when_s_is_the_boundary(unet, scheduler, num_boundaries, cd):
    x0, c, u = _batch()
    out = consistency_loss(unet, x0, c, scheduler, teacher=unet if cd else None, uncond=u, guidance=3.0,
                           num_boundaries=num_boundaries, timesteps=(torch.tensor(19), torch.tensor(0)))
    assert out["boundary"].tolist() == [0, 0, 0]
    assert torch.equal(out["target"], out["x_s"])  # exactly: alpha_0 = 1, sigma_0 = 0
    assert not torch.equal(out["pred"], out["x_s"])


def test_ct_point_and_multi_boundary_jumps(unet, scheduler):
    x0, c, _ = _batch()
    noise = torch.randn_like(x0)
    t, s = torch.tensor([999, 779, 259]), torch.tensor([979, 759, 239])
    out = consistency_loss(unet, x0, c, scheduler, num_boundaries=4, timesteps=(t, s), noise=noise)
    assert out["boundary"].tolist() == [750, 750, 0]
    assert torch.equal(out["boundary"], get_multi_boundary_timesteps(s, 4))
    assert torch.allclose(out["x_t"], q_sample(x0, t, scheduler, noise))
    assert torch.allclose(out["x_s"], q_sample(x0, s, scheduler, noise), atol=1e-5)
    b = out["boundary"]
    with torch.no_grad():
        pred = ddim_solver_step(_eps(unet, out["x_t"], t, c), out["x_t"], t, b, scheduler)
        target = ddim_solver_step(_eps(unet, out["x_s"], s, c), out["x_s"], s, b, scheduler)
    assert torch.allclose(out["pred"], pred, atol=1e-5)
    assert torch.allclose(out["target"], target, atol=1e-5)
    assert torch.allclose(out["loss"], (pred - target).pow(2).mean(), rtol=1e-4)


def test_cd_teacher_is_the_base_model_in_one_batched_call(unet, scheduler):
    x0, c, u = _batch()
    base = _unet(lora=False)
    t, s = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 19])
    calls = []
    hook = unet.register_forward_hook(lambda m, args, kw, out: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = consistency_loss(unet, x0, c, scheduler, teacher=unet, uncond=u, guidance=(2.0, 8.0),
                               num_boundaries=4, timesteps=(t, s), generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert calls == [6, 3, 3]  # teacher (cond + uncond batched), target, student
    w = out["guidance"]
    assert bool(((w >= 2) & (w <= 8)).all()) and len(set(w.tolist())) == 3
    with torch.no_grad():
        x_t = out["x_t"]
        eps = cfg_eps(_eps(base, x_t, t, u.expand(3, -1, -1)), _eps(base, x_t, t, c), w)
        x_s = ddim_solver_step(eps, x_t, t, s, scheduler)
        student = _eps(unet, x_t, t, c)
    assert torch.allclose(out["x_s"], x_s, atol=1e-5)
    # the adapters are back on and trainable after the teacher pass
    assert not torch.allclose(student, _eps(base, x_t, t, c), atol=1e-3)
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    unet.zero_grad(set_to_none=True)


def test_teacher_role_restores_state(unet):
    x = torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 6, 64)
    t = torch.tensor([500])
    with torch.no_grad():
        on = _eps(unet, x, t, c)
        with adapter_role(unet, None):
            off = _eps(unet, x, t, c)
            assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
        again = _eps(unet, x, t, c)
    assert torch.allclose(off, _eps(_unet(lora=False), x, t, c), atol=1e-5)
    assert torch.equal(on, again) and not torch.allclose(on, off, atol=1e-3)


def test_ema_target_weights_are_swapped_in_for_the_target_only(unet, scheduler):
    x0, c, _ = _batch()
    t, s = torch.tensor([599, 399, 199]), torch.tensor([579, 379, 179])
    zero = {n: torch.zeros_like(p) for n, p in unet.named_parameters() if "lora_B" in n}
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_B" in n}
    out = consistency_loss(unet, x0, c, scheduler, timesteps=(t, s), target_weights=zero)
    base = _unet(lora=False)
    with torch.no_grad():
        target = ddim_solver_step(_eps(base, out["x_s"], s, c), out["x_s"], s, out["boundary"], scheduler)
    assert torch.allclose(out["target"], target, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters() if n in before)
    with pytest.raises(KeyError):
        with swapped_weights(unet, {"nope": torch.zeros(1)}):
            pass


def test_pseudo_huber_and_l2_share_pred_and_target(unet, scheduler):
    x0, c, _ = _batch()
    kw = dict(num_boundaries=4, timesteps=(torch.tensor([999, 499, 99]), torch.tensor([979, 479, 79])),
              noise=torch.randn_like(x0))
    l2 = consistency_loss(unet, x0, c, scheduler, loss_type="l2", **kw)
    for cc in (1e-3, 1.0):
        ph = consistency_loss(unet, x0, c, scheduler, loss_type="pseudo_huber", huber_c=cc, **kw)
        assert torch.allclose(ph["pred"], l2["pred"]) and torch.allclose(ph["target"], l2["target"])
        d = l2["pred"] - l2["target"]
        assert torch.allclose(ph["loss"], (torch.sqrt(d ** 2 + cc ** 2) - cc).mean(), rtol=1e-5)
    # pseudo-Huber is ~ |d| for small c and ~ d^2 / (2c) for large c
    small = consistency_loss(unet, x0, c, scheduler, loss_type="pseudo_huber", huber_c=1e-6, **kw)["loss"]
    large = consistency_loss(unet, x0, c, scheduler, loss_type="pseudo_huber", huber_c=10.0, **kw)["loss"]
    assert torch.allclose(small, d.abs().mean(), rtol=1e-3)
    assert torch.allclose(large, l2["loss"] / 20.0, rtol=1e-2)


def test_autocast_keeps_the_loss_in_fp32(unet, scheduler):
    x0, c, u = _batch()
    out = consistency_loss(unet, x0, c, scheduler, teacher=unet, uncond=u, guidance=4.0, num_boundaries=4,
                           autocast_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and out["pred"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    ref = consistency_loss(unet, x0, c, scheduler, teacher=unet, uncond=u, guidance=4.0, num_boundaries=4,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["loss"], ref["loss"], rtol=0.2)  # bf16 passes, same math


def test_clear_errors(unet, scheduler):
    x0, c, _ = _batch()
    with pytest.raises(ValueError, match="uncond"):
        consistency_loss(unet, x0, c, scheduler, teacher=unet)
    with pytest.raises(ValueError, match="loss_type"):
        consistency_loss(unet, x0, c, scheduler, loss_type="l1")
    with pytest.raises(ValueError, match="same B"):
        consistency_loss(unet, x0, c[:2], scheduler)
