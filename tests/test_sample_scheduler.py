"""`cdlab.samplers.sample_scheduler` (external students' diffusers schedulers) against diffusers' own
``StableDiffusionPipeline.__call__``: same noise, same generator, same latents; NFE and x_0 trajectory."""
from __future__ import annotations

import pytest
import torch

from cdlab.samplers import sample_scheduler
from cdlab.students import SD15_ID, StudentCard, make_scheduler

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe(tiny_pipe_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _card(scheduler, guidance=1.0, **kwargs):
    return StudentCard(name="ext", base_model=SD15_ID, method="external", steps=4, guidance=guidance,
                       scheduler=scheduler, scheduler_kwargs=kwargs)


def _run_both(pipe, card, steps):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    ours = sample_scheduler(pipe.unet, x_T, cond, uncond, card, steps, make_scheduler(pipe, card),
                            return_trajectory=True, generator=torch.Generator().manual_seed(0))
    old = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler(pipe, card)
        kwargs = {"eta": card.scheduler_kwargs["eta"]} if "eta" in card.scheduler_kwargs else {}
        ref = pipe(PROMPT, latents=x_T.clone(), output_type="latent", num_inference_steps=steps,
                   guidance_scale=card.guidance, generator=torch.Generator().manual_seed(0), **kwargs).images
        timesteps = [int(t) for t in pipe.scheduler.timesteps]
    finally:
        pipe.scheduler = old
    return ours, ref, timesteps


@pytest.mark.parametrize("scheduler, kwargs", [
    ("LCMScheduler", {}),                        # LCM-LoRA: stochastic between steps, x_0 = `denoised`
    ("TCDScheduler", {"eta": 0.3}),              # TCD: gamma 0.3, needs the generator
    ("TCDScheduler", {"eta": 0.0, "timestep_spacing": "trailing"}),  # PCM's recipe
])
@pytest.mark.parametrize("steps", [1, 4])
def test_equals_the_diffusers_pipeline(pipe, scheduler, kwargs, steps):
    ours, ref, timesteps = _run_both(pipe, _card(scheduler, **kwargs), steps)
    assert ours.latents.shape == ref.shape == (1, 4, 8, 8)
    assert (ours.latents - ref).abs().max().item() < 1e-4
    assert ours.nfe == steps and ours.timesteps == timesteps and len(ours.x0_trajectory) == steps
    if scheduler == "LCMScheduler":  # its last step returns its x_0 prediction (`denoised`) itself
        torch.testing.assert_close(ours.x0_trajectory[-1], ours.latents, rtol=0, atol=1e-6)
    else:  # TCD's last step lands at t = 0 (alpha_cumprod[0] < 1), next to its `pred_original_sample`
        assert (ours.x0_trajectory[-1] - ours.latents).abs().max() < 0.2


def test_cfg_counts_two_and_equals_the_pipeline(pipe):
    ours, ref, _ = _run_both(pipe, _card("DDIMScheduler", guidance=3.0, timestep_spacing="trailing"), 4)
    assert (ours.latents - ref).abs().max().item() < 1e-4
    assert ours.nfe == 8


def test_trajectory_without_a_scheduler_x0_uses_the_ddim_identity(pipe):
    """DPM-Solver++ returns only ``prev_sample``: x_0 comes from eps, never x_t; its last step lands on it."""
    ours, ref, _ = _run_both(pipe, _card("DPMSolverMultistepScheduler", final_sigmas_type="zero"), 4)
    assert (ours.latents - ref).abs().max().item() < 1e-4 and ours.nfe == 4
    torch.testing.assert_close(ours.x0_trajectory[-1], ours.latents, rtol=0, atol=1e-4)
    assert (ours.x0_trajectory[0] - ours.latents).abs().max() > 1e-3  # a real prediction, per step


def test_bad_steps_are_refused(pipe):
    card = _card("LCMScheduler")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="num_steps"):
        sample_scheduler(pipe.unet, x, x, None, card, 0, make_scheduler(pipe, card))


def test_sample_student_is_the_cards_recipe():
    """`sample_student` (the one student sampler of Compare, Evaluate, generate) runs a card's own recipe."""
    import dataclasses

    from cdlab.samplers import consistency_timesteps, sample_consistency, sample_scheduler, sample_student
    from cdlab.students import StudentCard, make_scheduler
    from cdlab.teachers import load_teacher

    t = load_teacher("tiny")
    cond, uncond = t.encode(["a small red circle at the top left on a blue background"])
    x_T = t.initial_noise(seed=3)
    card = StudentCard(name="c", base_model=t.base_id, method="cd", num_boundaries=4, steps=4)
    out = sample_student(t.unet, x_T, cond, uncond, card, 2, make_scheduler(t.pipe, card), return_trajectory=True)
    ref = sample_consistency(t.unet, x_T, cond, consistency_timesteps(2, 4), t.scheduler)
    assert out.timesteps == ref.timesteps == [999, 500] and out.nfe == 2 and len(out.x0_trajectory) == 2
    assert torch.equal(out.latents, ref.latents)
    ext = dataclasses.replace(card, scheduler="LCMScheduler", guidance=1.0)
    out = sample_student(t.unet, x_T, cond, uncond, ext, 4, make_scheduler(t.pipe, ext),
                         generator=torch.Generator().manual_seed(0))
    ref = sample_scheduler(t.unet, x_T, cond, uncond, ext, 4, make_scheduler(t.pipe, ext),
                           generator=torch.Generator().manual_seed(0))
    assert out.timesteps == ref.timesteps and out.nfe == 4 and torch.equal(out.latents, ref.latents)
    assert not torch.equal(out.latents, sample_student(t.unet, x_T, cond, uncond, card, 4, make_scheduler(
        t.pipe, card)).latents)  # the two recipes differ
    shifted = dataclasses.replace(card, scheduler_kwargs={"shift": 0.3})  # its grid nearer the data
    out = sample_student(t.unet, x_T, cond, uncond, shifted, 4, make_scheduler(t.pipe, shifted))
    ref = sample_consistency(t.unet, x_T, cond, [999, 474, 231, 91], t.scheduler)
    assert out.timesteps == [999, 474, 231, 91] and torch.equal(out.latents, ref.latents)
