"""cdlab.math: the course's diffusion math, checked by identities, against diffusers' own
DDIMScheduler, and against an independently computed boundary table."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from cdlab.math import (
    alpha_sigma,
    cfg_eps,
    ddim_solver_step,
    get_multi_boundary_timesteps,
    get_xs_from_xt_naive,
    get_xs_from_xt_teacher,
    get_zero_boundary_timesteps,
    predict_boundary,
    predict_x0,
    q_sample,
)

# SD1.5's training schedule (its scheduler_config.json), trailing spacing as in the course notebook.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
)


@pytest.fixture(scope="module")
def scheduler() -> DDIMScheduler:
    # set_alpha_to_one=True: diffusers' last step lands on the clean boundary, as t = 0 does in cdlab.math.
    return DDIMScheduler(**SD15_SCHEDULE, set_alpha_to_one=True)


def _batch(b=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    return x0, noise


def test_alpha_sigma_reads_the_schedule_and_t0_is_clean(scheduler):
    like = torch.zeros(3, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 999])
    alpha, sigma = alpha_sigma(t, scheduler, like)
    assert alpha.shape == (3, 1, 1, 1)
    ac = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(alpha.flatten(), torch.stack([torch.tensor(1.0, dtype=torch.float64), ac[1].sqrt(), ac[999].sqrt()]))
    torch.testing.assert_close(sigma.flatten(), torch.stack([torch.tensor(0.0, dtype=torch.float64), (1 - ac[1]).sqrt(), (1 - ac[999]).sqrt()]))
    # VP: alpha^2 + sigma^2 = 1 everywhere, and alpha_999 is SD1.5's known ~0.068.
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert abs(alpha[2].item() - 0.0683) < 1e-3


@pytest.mark.parametrize("t_val", [1, 20, 250, 749, 999])
def test_ddim_step_from_t_to_t_is_identity(scheduler, t_val):
    x_t, eps = _batch(dtype=torch.float64)
    t = torch.full((6,), t_val)
    out = ddim_solver_step(eps, x_t, t, t, scheduler)
    torch.testing.assert_close(out, x_t, rtol=0, atol=1e-12)


def test_ddim_step_with_true_noise_lands_on_q_sample(scheduler):
    x0, noise = _batch(dtype=torch.float64)
    t = torch.tensor([999, 750, 500, 251, 20, 1])
    s = torch.tensor([750, 500, 0, 250, 19, 0])
    x_t = q_sample(x0, t, scheduler, noise=noise)
    x_s = ddim_solver_step(noise, x_t, t, s, scheduler)
    torch.testing.assert_close(x_s, q_sample(x0, s, scheduler, noise=noise), rtol=0, atol=1e-12)
    # s = 0 rows are x0 itself, and predict_x0 recovers x0 from every row.
    torch.testing.assert_close(x_s[s == 0], x0[s == 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(predict_x0(noise, x_t, t, scheduler), x0, rtol=0, atol=1e-12)


def test_q_sample_matches_diffusers_add_noise_and_draws_noise_when_not_given(scheduler):
    x0, noise = _batch(dtype=torch.float32)
    t = torch.tensor([1, 100, 400, 600, 900, 999])
    ours = q_sample(x0, t, scheduler, noise=noise)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    drawn = q_sample(x0, t, scheduler)
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, q_sample(x0, t, scheduler, noise=torch.randn_like(x0)))
    assert not torch.allclose(drawn, ours)


def test_ct_point_equals_q_sample_with_and_without_noise(scheduler):
    x0, noise = _batch(dtype=torch.float64)
    t = torch.tensor([999, 750, 500, 260, 40, 20])
    s = torch.tensor([979, 730, 480, 240, 20, 0])
    x_t = q_sample(x0, t, scheduler, noise=noise)
    expected = q_sample(x0, s, scheduler, noise=noise)
    with_noise = get_xs_from_xt_naive(x0, x_t, t, s, scheduler, noise=noise, prompt_embeds=None)
    without_noise = get_xs_from_xt_naive(x0, x_t, t, s, scheduler)
    torch.testing.assert_close(with_noise, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(without_noise, expected, rtol=0, atol=1e-10)
    # The notebook's closed form: x_s = (alpha_s - sigma_s alpha_t / sigma_t) x0 + (sigma_s / sigma_t) x_t.
    a_t, s_t = alpha_sigma(t, scheduler, x0)
    a_s, s_s = alpha_sigma(s, scheduler, x0)
    torch.testing.assert_close(without_noise, (a_s - s_s * a_t / s_t) * x0 + (s_s / s_t) * x_t, rtol=0, atol=1e-10)


def test_ct_point_without_noise_at_t0_is_a_clear_error(scheduler):
    x0, _ = _batch(b=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise"):
        get_xs_from_xt_naive(x0, x0, torch.tensor([0, 5]), torch.tensor([0, 0]), scheduler)


def _model(x, t):
    """A deterministic stand-in for eps_theta(x_t, t) that depends on both arguments."""
    return torch.tanh(0.7 * x) + 0.3 * torch.cos(x * (t / 1000.0 + 0.5))


@pytest.mark.parametrize("num_steps", [50, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chained_ddim_matches_diffusers_ddim_step(scheduler, num_steps, dtype):
    """The peer reference: a full trailing schedule, step by step, against DDIMScheduler.step(eta=0)."""
    ref = DDIMScheduler.from_config(scheduler.config)
    ref.set_timesteps(num_steps)
    timesteps = ref.timesteps.tolist()
    assert timesteps[0] == 999 and len(timesteps) == num_steps
    x_ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_ref = x_ours.clone()
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        tt, ss = torch.full((2,), t), torch.full((2,), s)
        x_ours = ddim_solver_step(_model(x_ours, t), x_ours, tt, ss, scheduler)
        x_ref = ref.step(_model(x_ref, t), t, x_ref, eta=0.0).prev_sample
    # diffusers rounds alpha/sigma in float32 (its alphas_cumprod dtype); cdlab in float64 then casts.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ours, x_ref, **tol)
    assert x_ours.dtype == dtype


def _boundary_table(num_boundaries: int, num_timesteps: int = 1000) -> list[int]:
    """Independent reference: the largest boundary strictly below t (0 for t = 0)."""
    step = num_timesteps // num_boundaries
    bounds = [i * step for i in range(num_boundaries)]
    return [max([b for b in bounds if b < t], default=0) for t in range(num_timesteps)]


@pytest.mark.parametrize("num_boundaries", [1, 2, 4, 8])
def test_multi_boundary_full_table(num_boundaries):
    t = torch.arange(1000)
    got = get_multi_boundary_timesteps(t, num_boundaries=num_boundaries, num_timesteps=1000)
    assert got.tolist() == _boundary_table(num_boundaries)
    assert bool((got <= t).all()) and bool((got[1:] < t[1:]).all())  # always goes down in noise


def test_multi_boundary_course_facts():
    t = torch.tensor([0, 1, 249, 250, 251, 499, 500, 501, 749, 750, 751, 999])
    got = get_multi_boundary_timesteps(t, num_boundaries=4)
    assert got.tolist() == [0, 0, 0, 0, 250, 250, 250, 500, 500, 500, 750, 750]
    assert sorted(set(get_multi_boundary_timesteps(torch.arange(1000)).tolist())) == [0, 250, 500, 750]
    assert get_zero_boundary_timesteps(t).tolist() == [0] * len(t)


@pytest.mark.parametrize("int_dtype", [torch.int32, torch.int64])
def test_integer_timestep_dtypes(scheduler, int_dtype):
    x0, noise = _batch(dtype=torch.float32)
    t64 = torch.tensor([999, 750, 500, 251, 20, 1])
    s64 = get_multi_boundary_timesteps(t64)
    t, s = t64.to(int_dtype), s64.to(int_dtype)
    boundary = get_multi_boundary_timesteps(t)
    assert boundary.dtype == int_dtype and boundary.tolist() == s64.tolist()
    torch.testing.assert_close(q_sample(x0, t, scheduler, noise), q_sample(x0, t64, scheduler, noise))
    torch.testing.assert_close(
        ddim_solver_step(noise, x0, t, s, scheduler), ddim_solver_step(noise, x0, t64, s64, scheduler))
    # A scalar timestep broadcasts to the batch.
    torch.testing.assert_close(
        q_sample(x0, torch.tensor(500, dtype=int_dtype), scheduler, noise),
        q_sample(x0, torch.full((6,), 500), scheduler, noise))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_sample_dtypes_are_kept_and_match_float32(scheduler, dtype):
    x0, noise = _batch(dtype=torch.float32)
    t = torch.tensor([999, 750, 500, 251, 20, 1])
    s = get_multi_boundary_timesteps(t)
    ref = ddim_solver_step(noise, q_sample(x0, t, scheduler, noise), t, s, scheduler)
    x_t = q_sample(x0.to(dtype), t, scheduler, noise.to(dtype))
    out = ddim_solver_step(noise.to(dtype), x_t, t, s, scheduler)
    assert x_t.dtype == dtype and out.dtype == dtype
    # fp16 keeps ~3 significant digits; the t=999 row divides by alpha_999 ~ 0.068.
    tol = dict(rtol=1e-2, atol=3e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_scheduler_is_never_mutated():
    sched = DDIMScheduler(**SD15_SCHEDULE, set_alpha_to_one=True)
    sched.set_timesteps(4)
    ac_before, ts_before = sched.alphas_cumprod.clone(), sched.timesteps.clone()
    ac_id = id(sched.alphas_cumprod)
    x0, noise = _batch(dtype=torch.float16)
    t = torch.tensor([999, 750, 500, 251, 20, 0], dtype=torch.int32)
    s = get_multi_boundary_timesteps(t)
    x_t = q_sample(x0, t, sched, noise)
    ddim_solver_step(noise, x_t, t, s, sched)
    get_xs_from_xt_naive(x0, x_t, t, s, sched, noise=noise)
    get_xs_from_xt_teacher(noise, noise * 0.5, x_t, t, s, 7.5, sched)
    predict_boundary(noise, x_t, t, s, sched)
    assert id(sched.alphas_cumprod) == ac_id
    assert sched.alphas_cumprod.dtype == torch.float32 and sched.alphas_cumprod.device.type == "cpu"
    assert torch.equal(sched.alphas_cumprod, ac_before) and torch.equal(sched.timesteps, ts_before)
    assert sched.alphas_cumprod[0].item() != 1.0  # the clean boundary is applied on the fly, not written


def test_cfg_eps_scalar_and_per_example():
    g = torch.Generator().manual_seed(0)
    eu, ec = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(cfg_eps(eu, ec, 1.0), ec)
    torch.testing.assert_close(cfg_eps(eu, ec, 0.0), eu)
    torch.testing.assert_close(cfg_eps(eu, ec, 7.5), eu + 7.5 * (ec - eu))
    w = torch.tensor([1.0, 3.0, 8.0])
    got = cfg_eps(eu, ec, w)
    for i in range(3):
        torch.testing.assert_close(got[i], eu[i] + w[i] * (ec[i] - eu[i]))
    assert cfg_eps(eu.half(), ec.half(), w).dtype == torch.float16


def test_teacher_point_is_a_manual_cfg_ddim_step(scheduler):
    x0, noise = _batch(dtype=torch.float64)
    eu = torch.sin(noise)
    t = torch.tensor([999, 750, 500, 251, 40, 20])
    s = t - 20
    x_t = q_sample(x0, t, scheduler, noise)
    w = torch.tensor([1.0, 2.0, 4.0, 7.5, 8.0, 3.0], dtype=torch.float64)
    got = get_xs_from_xt_teacher(eu, noise, x_t, t, s, w, scheduler)
    # Manual: eps = eps_u + w (eps_c - eps_u); x0 = (x_t - sigma_t eps)/alpha_t; x_s = alpha_s x0 + sigma_s eps.
    ac = scheduler.alphas_cumprod.double()
    for i in range(6):
        eps = eu[i] + w[i] * (noise[i] - eu[i])
        a_t, s_t = ac[t[i]].sqrt(), (1 - ac[t[i]]).sqrt()
        abar_s = ac[s[i]] if s[i] > 0 else torch.tensor(1.0, dtype=torch.float64)  # s = 0: clean
        a_s, s_s = abar_s.sqrt(), (1 - abar_s).sqrt()
        x0_hat = (x_t[i] - s_t * eps) / a_t
        torch.testing.assert_close(got[i], a_s * x0_hat + s_s * eps, rtol=0, atol=1e-10)
    # guidance 1 with the true noise as eps_c is the CT point.
    torch.testing.assert_close(
        get_xs_from_xt_teacher(eu, noise, x_t, t, s, 1.0, scheduler),
        get_xs_from_xt_naive(x0, x_t, t, s, scheduler, noise=noise), rtol=0, atol=1e-10)


def test_predict_boundary_is_the_ddim_jump_to_the_segment_boundary(scheduler):
    x0, noise = _batch(dtype=torch.float64)
    t = torch.tensor([999, 751, 750, 500, 251, 1])
    b = get_multi_boundary_timesteps(t)
    x_t = q_sample(x0, t, scheduler, noise)
    torch.testing.assert_close(predict_boundary(noise, x_t, t, b, scheduler), q_sample(x0, b, scheduler, noise),
                               rtol=0, atol=1e-12)
    out0 = predict_boundary(noise, x_t, t, torch.zeros_like(t), scheduler)
    torch.testing.assert_close(out0, x0, rtol=0, atol=1e-12)


def test_bad_num_boundaries_is_a_clear_error():
    with pytest.raises(ValueError, match="num_boundaries"):
        get_multi_boundary_timesteps(torch.arange(10), num_boundaries=0)
    with pytest.raises(ValueError, match="num_boundaries"):
        get_multi_boundary_timesteps(torch.arange(10), num_boundaries=2000, num_timesteps=1000)
