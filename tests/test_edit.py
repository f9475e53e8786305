"""cdlab.edit on the embedded tiny teacher (and, marked sd15, on SD1.5's architecture with random weights):
the techniques' limits (strength 0 and 1, all-ones mask, identical prompts), equality with the samplers,
the student start rule, NFE, input validation, and the edit evaluation end to end on a few cases."""
from __future__ import annotations

import json

import pytest
import torch

from cdlab import edit as E
from cdlab.models import EpsModel
from cdlab.samplers import SchedulerStep, consistency_timesteps, ddim_timesteps, sample_consistency, sample_ddim
from cdlab.world import Caption, render

SRC = Caption("large", "red", "circle", "center", "white")
TGT = Caption("large", "blue", "circle", "center", "white")
# VAE round trip of a world image, measured: mean |decode(encode(x)) - x| is ~0.005 in [0, 1] pixels.
VAE_TOL = 0.02


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    """The embedded tiny teacher with its shipped student tiny-mbcd-4 loaded."""
    from cdlab.students import load_student

    load_student(tiny_teacher.pipe, "tiny-mbcd-4", base_model=tiny_teacher.base_id)
    return tiny_teacher


def _setup(teacher, prompt=TGT.text, seed=3):
    cond = teacher.encode([prompt])
    x_T = teacher.initial_noise(seed)
    x0 = E.encode_image(teacher, E.image_to_tensor(render(SRC, 0), teacher.resolution))
    return cond, x_T, x0


def _teacher(teacher, steps=8):
    return EpsModel(teacher.unet, teacher.guidance), E.Column(f"teacher-{steps}", "teacher", steps, teacher.guidance)


def test_sdedit_strength_one_is_plain_sampling_teacher_and_student(teacher):
    from cdlab.students import activate_student, read_card

    cond, x_T, x0 = _setup(teacher)
    model, col = _teacher(teacher)
    ts = E.start_timesteps(col, 1.0)
    assert ts == ddim_timesteps(8)
    out = E.sdedit(model, x_T, [cond], ts, teacher.scheduler, x0=x0, strength=1.0)
    ref = sample_ddim(teacher.unet, x_T, cond[0], cond[1], teacher.guidance, ddim_timesteps(8), teacher.scheduler)
    assert torch.equal(out.latents, ref.latents) and out.nfe == ref.nfe == 16
    activate_student(teacher.pipe, "tiny-mbcd-4")
    try:
        scol = E.student_column(read_card("tiny-mbcd-4"))
        out = E.sdedit(EpsModel(teacher.unet), x_T, [cond], E.start_timesteps(scol, 1.0), teacher.scheduler,
                       x0=x0, strength=1.0)
        ref = sample_consistency(teacher.unet, x_T, cond[0], consistency_timesteps(4, 4), teacher.scheduler)
        assert torch.equal(out.latents, ref.latents) and out.nfe == 4
        # at strength 0.5 the student starts from the image noised to its boundary 500, not from noise
        half = E.sdedit(EpsModel(teacher.unet), x_T, [cond], E.start_timesteps(scol, 0.5), teacher.scheduler,
                        x0=x0, strength=0.5)
        assert half.timesteps == [500, 250] and half.nfe == 2
        assert (half.latents - ref.latents).abs().mean() > 1e-2
    finally:
        activate_student(teacher.pipe, None)


def test_sdedit_strength_zero_returns_the_input(teacher):
    img = render(SRC, 0)
    res = E.edit(teacher, "sdedit", [TGT.text], [E.teacher_columns(teacher.guidance)[1]], image=img, strength=0.0)
    r = res[0]
    assert r.nfe == 0 and r.timesteps == []
    x = E.image_to_tensor(img, teacher.resolution)
    roundtrip = E.decode_unit(teacher, E.encode_image(teacher, x))
    assert torch.equal(r.pixels, roundtrip)
    err = (r.pixels - (x + 1) / 2).abs().mean().item()
    assert err < VAE_TOL, err


def test_inpaint_keeps_the_outside_and_full_mask_is_plain_sampling(teacher):
    cond, x_T, x0 = _setup(teacher)
    model, col = _teacher(teacher)
    ts = E.start_timesteps(col, 1.0)
    pix_mask = torch.zeros(1, 1, 32, 32)
    pix_mask[..., 4:28, 4:28] = 1
    m = E.mask_to_latent(pix_mask, 4)
    assert m.shape == (1, 1, 8, 8) and m.sum() == 36
    out = E.inpaint(model, x_T, [cond], ts, teacher.scheduler, x0=x0, mask=m)
    assert torch.equal(out.latents * (1 - m), x0 * (1 - m))  # the last projection puts x0 back exactly
    px = E.decode_unit(teacher, out.latents)
    orig = (E.image_to_tensor(render(SRC, 0), 32) + 1) / 2
    keep = 1 - pix_mask
    outside = ((px - orig).abs() * keep).sum() / (keep.sum() * 3)
    inside = ((px - orig).abs() * pix_mask).sum() / (pix_mask.sum() * 3)
    assert outside < 0.05 and inside > 2 * outside, (outside, inside)   # blue replaced red inside
    full = E.inpaint(model, x_T, [cond], ts, teacher.scheduler, x0=x0, mask=torch.ones_like(m))
    ref = sample_ddim(teacher.unet, x_T, cond[0], cond[1], teacher.guidance, ts, teacher.scheduler)
    assert torch.equal(full.latents, ref.latents)


def test_anagram_of_one_prompt_keeps_a_flip_symmetric_noise_symmetric(teacher):
    cond = teacher.encode([SRC.text])
    model, col = _teacher(teacher, 4)
    ts = E.start_timesteps(col, 1.0)
    z = teacher.initial_noise(5)
    sym = torch.cat([z[..., :4, :], E.flip(z[..., :4, :])], dim=-2)
    assert torch.equal(sym, E.flip(sym))
    out = E.anagram(model, sym, [cond, cond], ts, teacher.scheduler)
    assert (out.latents - E.flip(out.latents)).abs().max() < 1e-5
    assert out.nfe == 16   # two CFG calls (2 NFE each) per step, 4 steps
    # the property is not automatic: plain sampling from the same noise is not symmetric
    plain = sample_ddim(teacher.unet, sym, cond[0], cond[1], teacher.guidance, ts, teacher.scheduler)
    assert (plain.latents - E.flip(plain.latents)).abs().max() > 1e-2


def test_hybrid_filters_sum_to_identity_and_hybrid_of_one_prompt_is_plain_sampling(teacher):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    k = E.gaussian_kernel(E.LATENT_BLUR_SIGMA)
    assert abs(k.sum().item() - 1) < 1e-6 and k.numel() == 7
    low, high = E.lowpass(x), E.highpass(x)
    assert (low + high - x).abs().max() < 1e-6
    assert (low - x).abs().mean() > 0.3                    # it does blur
    assert (E.lowpass(torch.ones_like(x)) - 1).abs().max() < 1e-6  # a constant passes unchanged
    cond, x_T, _ = _setup(teacher)
    model, col = _teacher(teacher, 4)
    ts = E.start_timesteps(col, 1.0)
    out = E.hybrid(model, x_T, [cond, cond], ts, teacher.scheduler)
    ref = sample_ddim(teacher.unet, x_T, cond[0], cond[1], teacher.guidance, ts, teacher.scheduler)
    assert (out.latents - ref.latents).abs().max() < 1e-5 and out.nfe == 16


@pytest.mark.parametrize("scheduler, kwargs", [("LCMScheduler", {}), ("TCDScheduler", {"eta": 0.3}),
                                               ("DDIMScheduler", {"timestep_spacing": "trailing"})])
def test_external_scheduler_column_equals_diffusers_img2img(teacher, scheduler, kwargs):
    """An external student's column (its own scheduler: LCM-LoRA's, TCD's and PCM's, Hyper-SD's) steps exactly as
    diffusers' StableDiffusionImg2ImgPipeline does with that scheduler: the same timesteps at each strength,
    the same noised start, the same scheduler steps (LCM and TCD re-noise with the same generator). On the tiny
    teacher's UNet itself, with a card that asks for that scheduler (the published LoRAs are SD1.5's)."""
    import diffusers

    from cdlab.students import StudentCard, make_scheduler

    card = StudentCard(name="ext", base_model=teacher.base_id, method="external", num_boundaries=1, steps=4,
                       guidance=1.0, scheduler=scheduler, scheduler_kwargs=kwargs)
    col = E.student_column(card)
    assert col.kind == "external" and col.card is card
    cond, _, x0 = _setup(teacher)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**teacher.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    for strength, want_ts in ((0.6, 2), (0.8, 3)):
        sched = make_scheduler(teacher.pipe, card)
        ts = E.start_timesteps(col, strength, 1000, sched)
        assert len(ts) == want_ts and ts[0] <= strength * 1000
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(x0.shape, generator=g)  # as the pipeline draws it; its steps then use g on
        out = E.sdedit(EpsModel(teacher.unet), noise, [cond], ts, sched, x0=x0, strength=strength,
                       step=SchedulerStep(sched, eta=kwargs.get("eta"), generator=g), return_trajectory=True)
        assert out.nfe == want_ts and len(out.x0_trajectory) == want_ts
        pipe.scheduler = make_scheduler(teacher.pipe, card)
        ref = pipe(prompt_embeds=cond[0], image=x0, strength=strength, num_inference_steps=4, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(5), output_type="latent",
                   **({"eta": kwargs["eta"]} if "eta" in kwargs else {})).images
        assert torch.allclose(out.latents, ref, atol=1e-5), (scheduler, strength, (out.latents - ref).abs().max())
    # without its scheduler an external column has no timesteps
    with pytest.raises(ValueError, match="scheduler"):
        E.start_timesteps(col, 0.5)


def test_external_columns_inpaint_keep_the_outside(teacher):
    """RePaint with an external scheduler (LCM: stochastic steps): outside the mask the result is the
    original's latents exactly (diffusers' inpainting pipeline pastes them back after the last step too)."""
    from cdlab.students import StudentCard, make_scheduler

    card = StudentCard(name="ext", base_model=teacher.base_id, method="external", num_boundaries=1, steps=4,
                       guidance=1.0, scheduler="LCMScheduler", scheduler_kwargs={})
    cond, x_T, x0 = _setup(teacher)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1
    sched = make_scheduler(teacher.pipe, card)
    ts = E.start_timesteps(E.student_column(card), 1.0, 1000, sched)
    out = E.inpaint(EpsModel(teacher.unet), x_T, [cond], ts, sched, x0=x0, mask=m,
                    step=SchedulerStep(sched, generator=torch.Generator().manual_seed(0)))
    assert ts == [999, 759, 499, 259] and out.nfe == 4
    assert torch.equal(out.latents * (1 - m), x0 * (1 - m))
    assert (out.latents - x0).abs().mul(m).sum() > 0


def test_start_rule():
    t50 = E.Column("t", "teacher", 50, 5.0)
    assert E.start_timesteps(t50, 0.5) == ddim_timesteps(50)[25:] and E.start_timesteps(t50, 0.5)[0] == 499
    assert E.start_timesteps(E.Column("t", "teacher", 4, 5.0), 0.6) == [499, 249]   # int(4 * 0.6) = 2
    assert E.start_timesteps(t50, 0.0) == [] and E.start_timesteps(t50, 0.01) == []
    s4 = E.Column("s", "student", 4, num_boundaries=4)
    assert E.start_timesteps(s4, 1.0) == [999, 750, 500, 250]
    assert E.start_timesteps(s4, 0.5) == [500, 250]          # t_start 500 is a boundary
    assert E.start_timesteps(s4, 0.6) == [750, 500, 250]     # 600 -> the boundary above, 750
    assert E.start_timesteps(s4, 0.76) == [999, 750, 500, 250]
    assert E.start_timesteps(s4, 0.1) == [250]
    assert E.start_timesteps(E.Column("s", "student", 4, num_boundaries=1), 0.3) == [999, 750, 500, 250]
    assert E.start_timesteps(E.Column("s", "student", 8, num_boundaries=4), 0.6) == [750, 625, 500, 375, 250, 125]
    # a student trained on a shifted grid (its card's shift): its boundaries 999/474/231/91 and its steps move together
    from cdlab.students import StudentCard

    card = StudentCard(name="s", base_model="m", method="dmd", num_boundaries=4, steps=4, scheduler_kwargs={"shift": 0.3})
    assert E.start_timesteps(s4, 1.0, card=card) == [999, 474, 231, 91]
    assert E.start_timesteps(s4, 0.4, card=card) == [474, 231, 91]   # 400 -> the boundary above, 474
    assert E.start_timesteps(E.Column("s", "student", 4, num_boundaries=4, card=card), 0.2) == [231, 91]


def test_nfe_of_every_column_kind(teacher):
    from cdlab.students import read_card

    cols = E.teacher_columns(teacher.guidance) + [E.student_column(read_card("tiny-mbcd-4"))]
    img = render(SRC, 0)
    sd = {r.column: r.nfe for r in E.edit(teacher, "sdedit", TGT.text, cols, image=img, strength=0.6)}
    assert sd == {E.TEACHER_50: 60, E.TEACHER_4: 4, "tiny-mbcd-4": 3}
    ana = {r.column: (r.nfe, len(r.images), len(r.x0_trajectory))
           for r in E.edit(teacher, "anagram", [SRC.text, SRC.text], cols[1:], return_trajectory=True)}
    assert ana == {E.TEACHER_4: (16, 1, 4), "tiny-mbcd-4": (8, 1, 4)}


def test_edit_restores_the_teacher(teacher):
    from cdlab.students import read_card

    cond, x_T, _ = _setup(teacher)
    before = sample_ddim(teacher.unet, x_T, cond[0], cond[1], 5.0, [999, 499], teacher.scheduler).latents
    E.edit(teacher, "hybrid", [SRC.text, TGT.text], [E.student_column(read_card("tiny-mbcd-4"))])
    after = sample_ddim(teacher.unet, x_T, cond[0], cond[1], 5.0, [999, 499], teacher.scheduler).latents
    assert torch.equal(before, after)


def test_input_validation_names_the_field(teacher):
    cols = [E.teacher_columns(teacher.guidance)[1]]
    img = render(SRC, 0)
    with pytest.raises(ValueError, match=r"^image: no image given"):
        E.edit(teacher, "sdedit", TGT.text, cols)
    with pytest.raises(ValueError, match=r"^image: 16x16 px, expected 32x32"):
        E.edit(teacher, "sdedit", TGT.text, cols, image=torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"^image: tensor values must be finite and in \[-1, 1\]"):
        E.edit(teacher, "sdedit", TGT.text, cols, image=torch.full((3, 32, 32), 2.0))
    big = img.resize((64, 64))   # a PIL image of another size is resized
    assert E.edit(teacher, "sdedit", TGT.text, cols, image=big)[0].pixels.shape == (1, 3, 32, 32)
    for s in (float("nan"), float("inf"), 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"^strength: "):
            E.edit(teacher, "sdedit", TGT.text, cols, image=img, strength=s)
    with pytest.raises(ValueError, match=r"^mask: no mask given"):
        E.edit(teacher, "inpaint", TGT.text, cols, image=img)
    with pytest.raises(ValueError, match=r"^mask: empty"):
        E.edit(teacher, "inpaint", TGT.text, cols, image=img, mask=torch.zeros(32, 32))
    with pytest.raises(ValueError, match=r"^mask: covers the whole image"):
        E.edit(teacher, "inpaint", TGT.text, cols, image=img, mask=torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"^mask: 8x8, expected 32x32"):
        E.edit(teacher, "inpaint", TGT.text, cols, image=img, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"prompt_up, prompt_flipped"):
        E.edit(teacher, "anagram", SRC.text, cols)
    with pytest.raises(ValueError, match=r"^prompt_high: expected a string"):
        E.edit(teacher, "hybrid", [SRC.text, None], cols)
    with pytest.raises(ValueError, match=r"^technique: "):
        E.edit(teacher, "deblur", SRC.text, cols)
    with pytest.raises(ValueError, match=r"^sigma: "):
        E.edit(teacher, "hybrid", [SRC.text, SRC.text], cols, sigma=float("nan"))


def test_edit_evaluation_end_to_end(teacher, tmp_path):
    from cdlab.evaluate import edit as V

    res = V.run_edit_evaluation(teacher, n=2, techniques=("sdedit", "inpaint"),
                                students=["tiny-mbcd-4"], out_dir=tmp_path / "ev")
    rows = {(r["technique"], r["column"]): r for r in res["rows"]}
    assert rows[("sdedit", E.TEACHER_50)]["nfe"] == 60 and rows[("sdedit", "tiny-mbcd-4")]["nfe"] == 3
    assert rows[("inpaint", E.TEACHER_4)]["nfe"] == 8
    assert rows[("sdedit", "input (no edit)")]["success"] == 0.0      # the source never reads as the target
    assert rows[("sdedit", "input (no edit)")]["preservation"] == 1.0
    assert rows[("inpaint", "input (no edit)")]["outside_mae"] == 0.0
    for r in res["rows"]:
        assert 0.0 <= r["success"] <= 1.0
    saved = json.loads((tmp_path / "ev" / "edit_results.json").read_text())
    assert len(saved["rows"]) == len(res["rows"]) and "| sdedit | tiny-mbcd-4 |" in (
        tmp_path / "ev" / "edit_table.md").read_text()
    with pytest.raises(FileExistsError):
        V.write_edit_evaluation(res, tmp_path / "ev")


def test_eval_cases_and_masks():
    from cdlab.evaluate import edit as V
    from cdlab.world import check

    sd = V.make_cases("sdedit", 8)
    assert sd == V.make_cases("sdedit", 8)
    for c in sd:
        diff = [a for a, v in c["source"].as_dict().items() if v != c["target"].as_dict()[a]]
        assert diff == [c["changed"]]
    for c in V.make_cases("anagram", 16):
        assert c["up"].shape != "triangle" and c["up"].color == c["flipped"].color
    cap = Caption("large", "red", "square", "top left", "white")
    m = V.inpaint_mask(cap)
    up = torch.nn.functional.interpolate(E.mask_to_latent(m, 4), scale_factor=4, mode="nearest")
    assert torch.equal(up, m) and 0.2 < m.mean() < 0.8   # latent-aligned, neither empty nor everything
    obj = torch.tensor([[p != (245, 245, 245) for p in row] for row in
                        [[render(cap, 0).getpixel((x, y)) for x in range(32)] for y in range(32)]])
    assert bool((m[0, 0].bool() | ~obj).all())   # the whole object is inside the mask
    sk = V.scribble(cap, 1)
    assert sk.size == (32, 32) and list(sk.getdata()) == list(V.scribble(cap, 1).getdata())
    assert check(sk, cap)["background"] and check(sk, cap)["color"]


@pytest.mark.sd15
@pytest.mark.slow
def test_every_technique_runs_on_sd15_random(sd15_teacher):
    """SD1.5's architecture with random weights (64 px, 8x8 latents): the code paths and shapes of every
    technique (the VAE round trip, CFG with two prompts, the projections on 4-channel latents), the teacher at 2
    steps; nothing about quality. A student column runs every technique on the tiny architecture (the tests
    above) and on SD1.5's in Compare (tests/test_sd15_externals.py): its switch and sampler are the same here."""
    teacher = sd15_teacher
    cols = [E.Column("teacher-2", "teacher", 2, teacher.guidance)]  # ~0.9 s a UNet pass here
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    runs = {
        "sdedit": E.edit(teacher, "sdedit", "a photo of a cat", cols, image=img, strength=0.5),
        "inpaint": E.edit(teacher, "inpaint", "a photo of a cat", cols, image=img, mask=mask),
        "anagram": E.edit(teacher, "anagram", ["an old man", "a campfire"], cols),
        "hybrid": E.edit(teacher, "hybrid", ["a skull", "a waterfall"], cols),
    }
    want = {"sdedit": 2, "inpaint": 4, "anagram": 8, "hybrid": 8}  # CFG pairs
    for tech, nfe in want.items():
        (r,) = runs[tech]
        assert r.nfe == nfe, tech
        assert r.pixels.shape == (1, 3, 64, 64) and r.latents.shape == (1, 4, 8, 8)
        assert torch.isfinite(r.latents).all()
