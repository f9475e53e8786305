"""cdlab.samplers against diffusers (the pipeline and DDIMScheduler) and against an oracle eps model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from cdlab.math import get_multi_boundary_timesteps, predict_boundary, q_sample
from cdlab.samplers import (
    SampleOutput,
    consistency_timesteps,
    ddim_timesteps,
    sample_consistency,
    sample_ddim,
)


@pytest.fixture(scope="module")
def embeddings(random_teacher):
    cond, uncond = random_teacher.encode(["a red circle above a blue square", "two green triangles"])
    return SimpleNamespace(cond=cond, uncond=uncond)


class CountingUNet:
    """Wraps a UNet, counting calls and the batch sizes it sees."""

    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __call__(self, x, t, encoder_hidden_states):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


class OracleUNet:
    """The exact eps of a single fixed latent x0: eps = (x_t - alpha_t x0) / sigma_t."""

    def __init__(self, x0, scheduler):
        self.x0, self.ac = x0, scheduler.alphas_cumprod.double()

    def __call__(self, x, t, encoder_hidden_states=None):
        abar = self.ac[t.long()].reshape(-1, 1, 1, 1).to(x.dtype)
        return SimpleNamespace(sample=(x - abar.sqrt() * self.x0) / (1 - abar).sqrt())


def test_ddim_timesteps_equal_diffusers_trailing_for_every_step_count():
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in range(1, 1001):
        ref.set_timesteps(n)
        assert ddim_timesteps(n) == ref.timesteps.tolist(), n
    assert ddim_timesteps(4) == [999, 749, 499, 249]
    for bad in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(bad)


@pytest.mark.parametrize("num_boundaries", [1, 2, 4, 8])
def test_consistency_timesteps_with_k_equal_n_are_the_boundaries(num_boundaries):
    ts = consistency_timesteps(num_boundaries, num_boundaries)
    bounds = sorted(set(get_multi_boundary_timesteps(torch.arange(1000), num_boundaries).tolist()))
    assert ts[0] == 999 and len(ts) == num_boundaries
    assert sorted(ts[1:] + [0]) == bounds
    # Each step's target (the next timestep, 0 after the last) is the student's own boundary for t_i.
    nxt = ts[1:] + [0]
    assert get_multi_boundary_timesteps(torch.tensor(ts), num_boundaries).tolist() == nxt


def test_consistency_timesteps_other_k():
    assert consistency_timesteps(4, 4) == [999, 750, 500, 250]
    assert consistency_timesteps(8, 4) == [999, 875, 750, 625, 500, 375, 250, 125]
    assert consistency_timesteps(2, 4) == [999, 500]
    assert consistency_timesteps(3, 4) == [999, 667, 333]
    assert consistency_timesteps(1, 4) == [999]
    with pytest.raises(ValueError, match="num_boundaries"):
        consistency_timesteps(4, 0)
    for k in range(1, 667):  # every allowed k gives strictly decreasing timesteps in [1, 999]
        ts = consistency_timesteps(k, 4)
        assert len(ts) == k and ts[0] == 999 and ts[-1] >= 1 and all(a > b for a, b in zip(ts, ts[1:])), k
    for bad in (0, 667, 1.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            consistency_timesteps(bad, 4)
    import numpy as np

    assert consistency_timesteps(np.int64(4), 4) == [999, 750, 500, 250]
    assert ddim_timesteps(np.int64(4)) == [999, 749, 499, 249]


def test_consistency_timesteps_under_sd3s_shift():
    """``shift`` is SD3's ``u' = s u / (1 + (s - 1) u)`` on u = t / T, every point but the first (999)."""
    assert consistency_timesteps(4, 4, shift=1.0) == consistency_timesteps(4, 4)
    for k, s in [(4, 0.3), (8, 0.5), (2, 0.25), (3, 3.0)]:
        us = [1 - i / k for i in range(k)]
        want = [999] + [round(1000 * s * u / (1 + (s - 1) * u)) for u in us[1:]]
        assert consistency_timesteps(k, k, shift=s) == want, (k, s)
    assert consistency_timesteps(4, 4, shift=0.3) == [999, 474, 231, 91]  # nearer the data than 750/500/250
    assert consistency_timesteps(1, 1, shift=0.3) == [999]  # one step starts at pure noise whatever the shift
    for bad in (0.0, 0.01, 25.0, float("nan"), float("inf"), True, "0.3", None):
        with pytest.raises(ValueError, match="shift"):
            consistency_timesteps(4, 4, shift=bad)
    with pytest.raises(ValueError, match="strictly decreasing"):  # rounding would merge two points
        consistency_timesteps(600, 600, shift=0.05)


@pytest.mark.parametrize("steps,guidance", [(50, 7.5), (4, 3.0), (10, 1.0)])
def test_sample_ddim_equals_the_diffusers_pipeline(random_teacher, embeddings, steps, guidance):
    cond, uncond = embeddings.cond, embeddings.uncond
    x_T = random_teacher.initial_noise(seed=1, batch=2)
    assert random_teacher.scheduler.config.set_alpha_to_one and random_teacher.scheduler.config.timestep_spacing == "trailing"
    ref = random_teacher.pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=guidance, num_inference_steps=steps,
        latents=x_T.clone(), output_type="latent",
    ).images
    out = sample_ddim(random_teacher.unet, x_T, cond, uncond, guidance, ddim_timesteps(steps), random_teacher.scheduler)
    assert out.timesteps == random_teacher.scheduler.timesteps.tolist()
    # fp32 CPU; the latents reach |x| ~ 50 after w = 7.5 (alpha/sigma rounded in float32 by diffusers).
    torch.testing.assert_close(out.latents, ref, rtol=1e-4, atol=2e-4)
    assert out.nfe == steps * (2 if guidance != 1 else 1)


def test_sample_ddim_cfg_is_one_batched_call_and_nfe(random_teacher, embeddings):
    cond, uncond = embeddings.cond, embeddings.uncond
    x_T = random_teacher.initial_noise(seed=2, batch=2)
    unet = CountingUNet(random_teacher.unet)
    seen = []
    out = sample_ddim(unet, x_T, cond, uncond, 5.0, ddim_timesteps(4), random_teacher.scheduler, return_trajectory=True,
                      callback=lambda i, t, x0: seen.append((i, t, x0.shape)))
    assert unet.batches == [4] * 4 and out.nfe == 8
    assert len(out.x0_trajectory) == 4 and out.timesteps == [999, 749, 499, 249]
    assert seen == [(i, t, x_T.shape) for i, t in enumerate(out.timesteps)]
    # The last step jumps to t = 0, so the final latents are the last x0 prediction.
    torch.testing.assert_close(out.x0_trajectory[-1], out.latents)
    for uncond_, w in ((None, 5.0), (uncond, 1.0)):
        unet.batches.clear()
        o = sample_ddim(unet, x_T, cond, uncond_, w, ddim_timesteps(4), random_teacher.scheduler)
        assert unet.batches == [2] * 4 and o.nfe == 4 and o.x0_trajectory == []
    assert not torch.allclose(o.latents, out.latents)


def test_samplers_reject_bad_timesteps(random_teacher, embeddings):
    cond = embeddings.cond
    x = random_teacher.initial_noise(0, 2)
    for bad in ([], [500, 750], [1000, 500], [999, 0]):
        with pytest.raises(ValueError, match="timesteps"):
            sample_consistency(random_teacher.unet, x, cond, bad, random_teacher.scheduler)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 4])
def test_oracle_consistency_recovers_x0(random_teacher, dtype, k):
    sched = random_teacher.scheduler
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    oracle = OracleUNet(x0, sched)
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    out = sample_consistency(oracle, x_T, None, consistency_timesteps(k, 4), sched, return_trajectory=True)
    torch.testing.assert_close(out.latents, x0.expand(3, -1, -1, -1), **tol)
    for x0_pred in out.x0_trajectory:
        torch.testing.assert_close(x0_pred, x0.expand(3, -1, -1, -1), **tol)
    g = torch.Generator().manual_seed(5)
    sto = sample_consistency(oracle, x_T, None, consistency_timesteps(k, 4), sched, stochastic=True, generator=g)
    torch.testing.assert_close(sto.latents, x0.expand(3, -1, -1, -1), **tol)
    ddim = sample_ddim(oracle, x_T, None, None, 1.0, ddim_timesteps(k), sched)
    torch.testing.assert_close(ddim.latents, x0.expand(3, -1, -1, -1), **tol)


def test_consistency_steps_are_jumps_to_the_students_boundaries(random_teacher, embeddings):
    """With timesteps = the boundaries, each step equals predict_boundary(eps, x_t, t, boundary(t))."""
    cond = embeddings.cond
    sched, unet = random_teacher.scheduler, random_teacher.unet
    x_T = random_teacher.initial_noise(seed=3, batch=2)
    out = sample_consistency(unet, x_T, cond, consistency_timesteps(4, 4), sched)
    x = x_T
    with torch.no_grad():
        for t in [999, 750, 500, 250]:
            tv = torch.full((2,), t)
            x = predict_boundary(unet(x, tv, encoder_hidden_states=cond).sample, x, tv,
                                 get_multi_boundary_timesteps(tv, 4), sched)
    torch.testing.assert_close(out.latents, x, rtol=0, atol=0)


def test_stochastic_consistency_is_song_alg1(random_teacher, embeddings):
    cond = embeddings.cond
    sched, unet = random_teacher.scheduler, random_teacher.unet
    x_T = random_teacher.initial_noise(seed=4, batch=2)
    ts = consistency_timesteps(4, 4)
    a = sample_consistency(unet, x_T, cond, ts, sched, stochastic=True, generator=torch.Generator().manual_seed(7))
    b = sample_consistency(unet, x_T, cond, ts, sched, stochastic=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    det = sample_consistency(unet, x_T, cond, ts, sched)
    assert (a.latents - det.latents).norm() > 1e-2 * det.latents.norm()
    # Manual Alg. 1: x0 = f(x, t); x = alpha_s x0 + sigma_s z with fresh z from the same generator.
    g = torch.Generator().manual_seed(7)
    x = x_T
    with torch.no_grad():
        for i, t in enumerate(ts):
            tv = torch.full((2,), t)
            x0 = predict_boundary(unet(x, tv, encoder_hidden_states=cond).sample, x, tv, torch.zeros_like(tv), sched)
            s = ts[i + 1] if i + 1 < len(ts) else 0
            x = q_sample(x0, torch.full((2,), s), sched, noise=torch.randn(x.shape, generator=g)) if s else x0
    torch.testing.assert_close(a.latents, x, rtol=0, atol=0)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_consistency_sampler_agrees_with_plain_diffusers_ddim_trailing(random_teacher, embeddings, k):
    """The same network at k steps: cdlab goes 999 -> 750 -> 500 -> 250 -> 0, diffusers' trailing DDIM goes
    999 -> 749 -> 499 -> 249 -> 0. Stated tolerance: relative L2 error < 1e-2. Why: every intermediate timestep
    is one unit apart, where abar changes by a factor 1/(1 - beta_t) <= 1.012 (SD1.5's beta <= 0.012), so alpha
    and sigma differ by < 0.6% per step and the UNet's time embedding barely moves; measured 2e-4 (k=2), 6e-4
    (k=4), 1.3e-3 (k=8). A different initial noise gives a relative difference ~1.4, so the test can fail."""
    cond = embeddings.cond
    x_T = random_teacher.initial_noise(seed=5, batch=2)
    ref = random_teacher.pipe(prompt_embeds=cond, guidance_scale=1.0, num_inference_steps=k, latents=x_T.clone(),
                       output_type="latent").images
    out = sample_consistency(random_teacher.unet, x_T, cond, consistency_timesteps(k, 4), random_teacher.scheduler)
    rel = ((out.latents - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    other = sample_consistency(random_teacher.unet, random_teacher.initial_noise(seed=6, batch=2), cond,
                               consistency_timesteps(k, 4), random_teacher.scheduler)
    assert ((other.latents - ref).norm() / ref.norm()).item() > 0.5


def test_consistency_nfe_trajectory_and_callback(random_teacher, embeddings):
    cond = embeddings.cond
    x_T = random_teacher.initial_noise(seed=0, batch=2)
    for k in (1, 2, 4, 8):
        unet = CountingUNet(random_teacher.unet)
        calls = []
        out = sample_consistency(unet, x_T, cond, consistency_timesteps(k, 4), random_teacher.scheduler,
                                 return_trajectory=True, callback=lambda i, t, x0: calls.append((i, t)))
        assert isinstance(out, SampleOutput)
        assert out.nfe == k and unet.batches == [2] * k and len(out.x0_trajectory) == k
        assert calls == list(enumerate(consistency_timesteps(k, 4))) and out.timesteps == consistency_timesteps(k, 4)
        torch.testing.assert_close(out.x0_trajectory[-1], out.latents)
        assert sample_consistency(random_teacher.unet, x_T, cond, [999], random_teacher.scheduler).x0_trajectory == []
