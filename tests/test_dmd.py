"""DMD/DMD2 in cdlab.loss: the distribution-matching gradient's sign and scale where the answer is analytic
(Gaussian data), the surrogate loss driving a generator to the data, the three roles on one UNet never leaking
into each other (real = every adapter off, fake and generator each alone, gradients to one adapter only), the
backward simulation equal to the consistency sampler, and the fake score's denoising loss falling."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cdlab.loss import dmd_fake_loss, dmd_generator_loss, dmd_gradient, generator_sample
from cdlab.math import alpha_sigma
from cdlab.students.roles import adapter_role


class _Sched:
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.config = type("C", (), {"num_train_timesteps": 1000})()


def _posterior_mean(x_t, t, mu, s2, sched):
    """E[x0 | x_t] for x0 ~ N(mu, s2 I): mu + alpha s2 / (alpha^2 s2 + sigma^2) (x_t - alpha mu)."""
    a, sg = alpha_sigma(t, sched, x_t)
    return mu + a * s2 / (a * a * s2 + sg * sg) * (x_t - a * mu)


def test_dmd_gradient_sign_and_scale_on_gaussians():
    """Data N(mu_r, s^2), generator N(mu_f, s^2): x0_fake - x0_real = (mu_f - mu_r) sigma^2 / (alpha^2 s^2 + sigma^2)
    exactly, so the gradient points from the data to the generator (descending it moves x_g to the data)."""
    sched, g = _Sched(), torch.Generator().manual_seed(0)
    s2, mu_r, mu_f = 0.25, torch.tensor(1.0), torch.tensor(-0.5)
    x_g = mu_f + s2 ** 0.5 * torch.randn(64, 4, 2, 2, generator=g)
    for tv in (50, 500, 950):
        t = torch.full((64,), tv)
        x_t = alpha_sigma(t, sched, x_g)[0] * x_g + alpha_sigma(t, sched, x_g)[1] * torch.randn(x_g.shape, generator=g)
        real, fake = _posterior_mean(x_t, t, mu_r, s2, sched), _posterior_mean(x_t, t, mu_f, s2, sched)
        out = dmd_gradient(x_g, real, fake)
        a, sg = alpha_sigma(t, sched, x_g)
        want = (mu_f - mu_r) * sg ** 2 / (a * a * s2 + sg ** 2)
        torch.testing.assert_close(out["grad"] * out["normalizer"], want.expand_as(x_g), rtol=1e-5, atol=1e-6)
        assert bool((out["grad"] * (mu_f - mu_r) > 0).all())  # sign: towards the generator, away from the data
        assert torch.allclose(out["normalizer"], (x_g - real).abs().mean((1, 2, 3), keepdim=True))
        same = dmd_gradient(x_g, real, real)["grad"]
        assert float(same.abs().max()) == 0.0  # the generator's distribution is the data's: no gradient


def test_the_surrogate_loss_moves_a_generator_to_the_data():
    """A generator x_g = z * s + b trained by DMD's surrogate, its fake score exact for its current b: b goes to
    the data's mean (the surrogate's gradient with respect to x_g is grad / numel)."""
    sched, g = _Sched(), torch.Generator().manual_seed(1)
    s2, mu_r = 0.25, 2.0
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([b], lr=0.05)  # the normalised gradient is O(1): the step is about lr
    for _ in range(300):
        z = torch.randn(32, 1, 2, 2, generator=g)
        x_g = z * s2 ** 0.5 + b
        t = torch.randint(20, 981, (32,), generator=g)
        a, sg = alpha_sigma(t, sched, x_g)
        x_t = a * x_g.detach() + sg * torch.randn(x_g.shape, generator=g)
        grad = dmd_gradient(x_g.detach(), _posterior_mean(x_t, t, torch.tensor(mu_r), s2, sched),
                            _posterior_mean(x_t, t, b.detach(), s2, sched))["grad"]
        loss = 0.5 * (x_g - (x_g.detach() - grad)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.testing.assert_close(b.grad, grad.mean(), rtol=1e-5, atol=1e-7)
        opt.step()
    assert abs(b.item() - mu_r) < 0.1, b.item()


# ------------------------------------------------------------------------------------ on the tiny teacher's UNet

@pytest.fixture(scope="module")
def roles(tiny_teacher):
    """The embedded tiny teacher with two random LoRA roles ("default": the generator, "fake"), a plain copy
    that never gets an adapter, and one caption's embeddings."""
    from cdlab.students import attach_lora
    from cdlab.teachers import load_teacher

    t = load_teacher("tiny", device="cpu")
    plain = tiny_teacher  # a second copy: never gets an adapter
    torch.manual_seed(0)
    for name in ("default", "fake"):
        attach_lora(t.unet, rank=4, adapter_name=name)
        with torch.no_grad():  # nonzero B: each role's output differs from the others'
            for n, p in t.unet.named_parameters():
                if f"lora_B.{name}." in n:
                    p.normal_(0, 0.05)
    for n, p in t.unet.named_parameters():  # both roles trainable, each by its own optimiser (as the trainer)
        p.requires_grad_(".default." in n or ".fake." in n)
    t.unet.set_adapter("default")
    cond, uncond = t.encode(["a large red circle in the center on a white background"] * 4)
    return SimpleNamespace(teacher=t, plain=plain, cond=cond, uncond=uncond)


def _grads(unet, name):
    return [p.grad for n, p in unet.named_parameters() if f".{name}." in n]


def test_roles_never_leak(roles):
    t, plain, cond, uncond = roles.teacher, roles.plain, roles.cond, roles.uncond
    unet, sched = t.unet, t.scheduler
    shape = (4, 4, 8, 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    unet.zero_grad(set_to_none=True)
    out = dmd_generator_loss(unet, cond, sched, uncond=uncond, guidance=5.0, noise=z, timesteps=torch.tensor(600),
                             generator=torch.Generator().manual_seed(4))
    # the real score is the plain teacher (every adapter off), with CFG
    with torch.no_grad():
        x_t, tt = out["x_t"], out["t"]
        eu, ec = plain.unet(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                            encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample.chunk(2)
        a, sg = alpha_sigma(tt, sched, x_t)
        want_real = (x_t - sg * (eu + 5.0 * (ec - eu))) / a
        unet.set_adapter("fake")  # diffusers' own switch, not ours
        want_fake = (x_t - sg * unet(x_t, tt, encoder_hidden_states=cond).sample) / a
        unet.set_adapter("default")
        gen_only = (x_t - sg * unet(x_t, tt, encoder_hidden_states=cond).sample) / a
    for n, p in unet.named_parameters():  # diffusers' switch made only the active adapter trainable: undo
        p.requires_grad_(".default." in n or ".fake." in n)
    torch.testing.assert_close(out["x0_real"], want_real, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["x0_fake"], want_fake, rtol=1e-4, atol=1e-4)
    assert float((out["x0_fake"] - gen_only).abs().max()) > 1e-3  # the fake pass is not the generator's
    # the generator's loss reaches the generator's adapter only
    out["loss"].backward()
    assert all(gr is None or float(gr.abs().max()) == 0 for gr in _grads(unet, "fake"))
    assert sum(float(gr.abs().sum()) for gr in _grads(unet, "default") if gr is not None) > 0
    # ... and the fake score's loss the fake adapter only
    unet.zero_grad(set_to_none=True)
    dmd_fake_loss(unet, out["x_g"], cond, sched, generator=torch.Generator().manual_seed(5))["loss"].backward()
    assert all(gr is None or float(gr.abs().max()) == 0 for gr in _grads(unet, "default"))
    assert sum(float(gr.abs().sum()) for gr in _grads(unet, "fake") if gr is not None) > 0
    unet.zero_grad(set_to_none=True)
    assert unet.active_adapters() == ["default"]  # what was active before is active again
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        with adapter_role(unet, "nope"):
            pass


def test_backward_simulation_is_the_consistency_sampler(roles):
    """At its last step the generator's sample IS what sample_consistency draws from the same noise (the
    shipped samplers show a DMD student unchanged); at step 0 it is one x0-prediction from the noise."""
    from cdlab.samplers import consistency_timesteps, sample_consistency

    t, cond = roles.teacher, roles.cond
    taus = consistency_timesteps(4, 4)
    z = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), adapter_role(t.unet, "default"):
        last = generator_sample(t.unet, z, cond, t.scheduler, gen_timesteps=taus, steps=torch.full((4,), 3), grad=False)
        ref = sample_consistency(t.unet, z, cond, taus, t.scheduler)
        first = generator_sample(t.unet, z, cond, t.scheduler, gen_timesteps=taus, steps=torch.zeros(4, dtype=torch.long),
                                 grad=False)
    torch.testing.assert_close(last["x_g"], ref.latents.float(), rtol=1e-4, atol=1e-4)
    assert last["t_start"].tolist() == [250] * 4 and first["t_start"].tolist() == [999] * 4
    torch.testing.assert_close(first["x_start"], z)


def test_the_fake_scores_denoising_loss_falls(roles):
    t, cond = roles.teacher, roles.cond
    unet = t.unet
    with torch.no_grad(), adapter_role(unet, "default"):
        x_g = generator_sample(unet, torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(7)), cond,
                               t.scheduler, gen_timesteps=[999], grad=False)["x_g"]
    params = [p for n, p in unet.named_parameters() if ".fake." in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(8)
    ts, noise = torch.randint(0, 1000, (16,), generator=g), torch.randn((16, 4, 8, 8), generator=g)
    x = x_g.repeat(4, 1, 1, 1)
    c = cond.repeat(4, 1, 1)

    def fixed():  # the same t and noise every time: a probe of the fit
        with torch.no_grad():
            return float(dmd_fake_loss(unet, x, c, t.scheduler, timesteps=ts, noise=noise)["loss"])

    before = fixed()
    for _ in range(40):
        loss = dmd_fake_loss(unet, x, c, t.scheduler, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed()
    assert after < 0.9 * before, (before, after)


def test_the_regression_distance_is_the_squared_or_the_absolute_error_of_the_generators_sample(roles):
    """``regression_distance``: ``"l2"`` is ``mean (G(z) - y)^2``, ``"l1"`` is ``mean |G(z) - y|``, G(z) the one-step
    generator's sample of the same noise (the matching's ``x_g`` when it draws from that noise); another name is
    refused by name."""
    t, cond, uncond = roles.teacher, roles.cond, roles.uncond
    z = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    y = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * 0.5

    def run(distance):
        return dmd_generator_loss(t.unet, cond, t.scheduler, uncond=uncond, guidance=5.0, noise=z,
                                  timesteps=torch.tensor(600), generator=torch.Generator().manual_seed(4),
                                  regression=(z, y, cond), regression_weight=2.0, regression_distance=distance)

    l2, l1 = run("l2"), run("l1")
    error = l2["x_g"].float() - y
    assert float(l2["loss_reg"]) == pytest.approx(float(error.pow(2).mean()), rel=1e-5)
    assert float(l1["loss_reg"]) == pytest.approx(float(error.abs().mean()), rel=1e-5)
    assert float(l1["loss"] - l2["loss"]) == pytest.approx(2.0 * float(l1["loss_reg"] - l2["loss_reg"]), rel=1e-4)
    with pytest.raises(ValueError, match="regression distance must be one of l2, l1, got 'lpips'"):
        run("lpips")


def test_the_loss_weighs_its_terms_and_dm_weight_zero_is_regression_alone(roles):
    """``loss = dm_weight * loss_dm + regression_weight * loss_reg`` for the same draws; with ``dm_weight=0``
    (the regression-only ablation) the generator's gradient is the regression term's alone."""
    t, cond, uncond = roles.teacher, roles.cond, roles.uncond
    unet, sched = t.unet, t.scheduler
    z = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    reg = (torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(6)),
           torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * 0.5, cond)

    def run(dm_weight, regression_weight):
        unet.zero_grad(set_to_none=True)
        out = dmd_generator_loss(unet, cond, sched, uncond=uncond, guidance=5.0, noise=z, timesteps=torch.tensor(600),
                                 generator=torch.Generator().manual_seed(4), regression=reg,
                                 regression_weight=regression_weight, dm_weight=dm_weight)
        out["loss"].backward()
        grads = [g.clone() for g in _grads(unet, "default") if g is not None]
        unet.zero_grad(set_to_none=True)
        return out, grads

    both, g_both = run(0.5, 3.0)
    assert float(both["loss_dm"]) > 0 and float(both["loss_reg"]) > 0
    assert float(both["loss"]) == pytest.approx(0.5 * float(both["loss_dm"]) + 3.0 * float(both["loss_reg"]), rel=1e-5)
    reg_only, g_reg = run(0.0, 3.0)
    dm_only, g_dm = run(0.5, 0.0)
    assert float(reg_only["loss"]) == pytest.approx(3.0 * float(reg_only["loss_reg"]), rel=1e-6)
    for a, b, c in zip(g_both, g_reg, g_dm):  # the gradients add: each term reaches the generator
        torch.testing.assert_close(a, b + c, rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in g_dm) > 0 and sum(float(g.abs().sum()) for g in g_reg) > 0
