"""The four published SD1.5 few-step LoRAs (LCM-LoRA, TCD, PCM, Hyper-SD) through the app's Compare, offline.

Each file is synthesized in its real key layout (``sd15_lora_layouts``: kohya keys, dtype, ``.alpha``) at
SD1.5's shapes, served through a patched ``cdlab.students.external._hub_download`` and loaded onto the shared
``sd15_teacher`` (SD1.5's architecture with random weights). The checks are independent of diffusers' loader:
every key of the file must land, with its values and alpha/rank scaling, on the module our own name mapping
says; the column must change the image; and the teacher must be left plain.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from sd15_lora_layouts import LAYOUTS, PUBLISHED_MB, VARIANTS, WRITERS, expected_lora, lora_param_count, write_layout

pytestmark = pytest.mark.sd15

PROMPT = "a red apple on a wooden table"
SEED = 7


# ------------------------------------------------------------------------------------------- helpers


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _adapter_layers(pipe, name: str) -> dict:
    """``{"unet.<path>" | "text_encoder.<path>": layer}`` for every layer that carries adapter ``name``."""
    out = {}
    for component in ("unet", "text_encoder"):
        for path, layer in _tuner_layers(getattr(pipe, component)).items():
            if name in layer.lora_A:
                out[f"{component}.{path}"] = layer
    return out


def _enabled_lora_layers(pipe) -> list[str]:
    return [f"{c}.{n}" for c in ("unet", "text_encoder") for n, m in _tuner_layers(getattr(pipe, c)).items()
            if not m.disable_adapters and m.active_adapters]


def assert_adapter_is_file(pipe, name: str, layout_file) -> int:
    """Adapter ``name`` is exactly the file: on every module the file targets (and no other), with
    lora_A = down, lora_B = up (fp16 tolerance) and scaling alpha / rank; no key of the file unused."""
    from safetensors import safe_open

    expected = expected_lora(layout_file, pipe)  # raises if a key maps to no module
    with safe_open(str(layout_file), "pt") as f:
        file_keys = set(f.keys())
    assert {k for e in expected.values() for k in e.keys} == file_keys
    got = _adapter_layers(pipe, name)
    assert set(got) == set(expected), (
        f"adapter {name}: missing on {sorted(set(expected) - set(got))[:5]}, "
        f"unexpected on {sorted(set(got) - set(expected))[:5]}")
    for q, e in expected.items():
        layer = got[q]
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        torch.testing.assert_close(a.float(), e.down.float(), rtol=1e-3, atol=1e-5, msg=f"{q} lora_A")
        torch.testing.assert_close(b.float(), e.up.float(), rtol=1e-3, atol=1e-5, msg=f"{q} lora_B")
        assert layer.scaling[name] == pytest.approx(e.scaling, rel=1e-3), f"{q}: scaling"
        assert float(b.abs().max()) > 0 and float(a.abs().max()) > 0, f"{q}: a zero LoRA changes nothing"
    return len(expected)


def _plain_eps(teacher) -> torch.Tensor:
    """One UNet call on fixed inputs: what the plain teacher computes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *teacher.latent_shape), generator=g)
    c = torch.randn((1, teacher.tokenizer.model_max_length, teacher.unet.config.cross_attention_dim), generator=g)
    with torch.inference_mode():
        return teacher.unet(x, 500, encoder_hidden_states=c).sample.clone()


def _external_card(key: str):
    from cdlab.students import EXTERNAL_STUDENTS, SD15_ID, StudentCard

    ext = EXTERNAL_STUDENTS[key]
    return StudentCard(name=key, base_model=SD15_ID, method="external", num_boundaries=ext.num_boundaries,
                       steps=ext.steps, guidance=ext.guidance, scheduler=ext.scheduler,
                       scheduler_kwargs=dict(ext.scheduler_kwargs))


def _plain_with_scheduler(teacher, key: str, steps: int):
    """The plain teacher (no adapter) sampled exactly as Compare samples external ``key``."""
    from cdlab.samplers import sample_scheduler
    from cdlab.students import make_scheduler, use_student

    card = _external_card(key)
    with torch.inference_mode(), use_student(teacher.pipe, None):
        cond, uncond = teacher.encode([PROMPT])
        out = sample_scheduler(teacher.unet, teacher.initial_noise(SEED), cond, uncond, card, steps,
                               make_scheduler(teacher.pipe, card),
                               generator=torch.Generator(device="cpu").manual_seed(SEED))
        return teacher.decode(out.latents)[0]


def _differs(img_a, img_b, min_mean_abs: float = 0.5) -> bool:
    a = np.asarray(img_a.convert("RGB"), dtype=np.float64)
    b = np.asarray(img_b.convert("RGB"), dtype=np.float64)
    return a.shape == b.shape and float(np.abs(a - b).mean()) > min_mean_abs


def _drop(pipe, name: str) -> None:
    from cdlab.students import unload_student

    unload_student(pipe, name)


@pytest.fixture(scope="module")
def plain_before(sd15_teacher):
    """The plain teacher's output before this module's tests (it must be the same after each of them)."""
    from cdlab.students import use_student

    with use_student(sd15_teacher.pipe, None):
        assert not _enabled_lora_layers(sd15_teacher.pipe), "another test left a LoRA active on sd15_teacher"
        return _plain_eps(sd15_teacher)


@pytest.fixture(scope="module")
def hub(sd15_teacher, tmp_path_factory):
    """The four files in their published layouts, by (repo_id, filename), like a hub cache."""
    from cdlab.students import EXTERNAL_STUDENTS

    root = tmp_path_factory.mktemp("fake-hub")
    files = {}
    for key, ext in EXTERNAL_STUDENTS.items():
        files[(ext.repo_id, ext.filename)] = WRITERS[key](sd15_teacher.pipe, root / ext.repo_id / ext.filename)
    return files


@pytest.fixture
def published_hub(hub, fake_hub):
    """The fake hub (conftest) serving the four files; ``published_hub.calls``: what was downloaded."""
    fake_hub.files.update(hub)
    return fake_hub


def _assert_plain(teacher, plain_before) -> None:
    assert not _enabled_lora_layers(teacher.pipe), "a LoRA is still active after Compare"
    assert torch.equal(_plain_eps(teacher), plain_before), "the plain teacher's output changed"


# ------------------------------------------------------------------------------------------- the layouts


def test_layout_sizes_match_the_published_files(sd15_teacher):
    """The layouts are the published files' size: the module set, rank and dtype are right."""
    for key, mb in PUBLISHED_MB.items():
        layout = LAYOUTS[key]
        size = lora_param_count(layout, sd15_teacher.pipe) * torch.finfo(layout.dtype).bits / 8 / 1e6
        assert size == pytest.approx(mb, rel=0.01), (key, size, mb)


def test_catalogue_and_layouts_agree():
    from cdlab.students import EXTERNAL_STUDENTS

    assert set(LAYOUTS) == set(EXTERNAL_STUDENTS) == set(WRITERS)


# ------------------------------------------------------------------------------------------- each student in Compare


# LCM-LoRA at 2 steps (LCM's scheduler injects noise between its steps), fused, as Compare runs it by default
# (the fused swap on SD1.5's UNet). The other three run with it, unfused (peft's active adapter), in
# test_compare_with_every_column, which also checks every external's file is on the UNet whole and changes the
# image; TCD's stochastic step (eta) against diffusers' TCDScheduler is test_sample_scheduler's, on the tiny UNet.
@pytest.mark.parametrize("key,fuse", [("lcm-lora", True)])
def test_external_student_in_compare(key, fuse, sd15_teacher, published_hub, hub, plain_before, tmp_path):
    from cdlab.students import EXTERNAL_STUDENTS
    from cdlab.ui.compare import TEACHER_4, Comparer

    t = sd15_teacher
    ext = EXTERNAL_STUDENTS[key]
    try:
        # the student at 2 steps (each UNet pass here is about a second): the naive teacher's 4-step grid, its
        # own 2 steps on 2 of its cells
        res = Comparer(t, adapters_root=tmp_path / "adapters", fuse=fuse).run(
            PROMPT, SEED, 1.0, 2, [TEACHER_4, f"{key} (external)"], show_trajectory=True)
        naive, col = res.columns
        assert not naive.error and not col.error, (naive.error, col.error)
        assert published_hub.calls == [(ext.repo_id, ext.filename)]
        assert naive.nfe == 4 and col.nfe == 2 and col.steps == 2
        assert res.grid == [999, 750, 500, 250] and len(col.trajectory) == 4  # one cell per grid step, aligned
        assert sum(f is not None for f in col.trajectory) == 2
        cells = [i for i, f in enumerate(col.trajectory) if f is not None]
        assert [col.trajectory_timesteps[i] for i in cells] == list(col.timesteps)  # each step on its own cell
        assert all(f.size == col.image.size for f in col.trajectory + col.trajectory_xt if f is not None)

        # every key of the file is on the UNet with its values (a LoRA that loads but changes nothing fails here)
        assert assert_adapter_is_file(t.pipe, key, hub[(ext.repo_id, ext.filename)]) == 278

        # the LoRA changes the output: against the naive teacher and the plain teacher on the same scheduler
        assert _differs(col.image, naive.image), "the external column looks like the naive teacher"
        plain = _plain_with_scheduler(t, key, 2)
        assert _differs(col.image, plain), f"{key}: the LoRA does not change the image"

        # Compare leaves the teacher plain
        _assert_plain(t, plain_before)
    finally:
        _drop(t.pipe, key)
    assert not _adapter_layers(t.pipe, key)


# ------------------------------------------------------------------------------------------- every column at once


@pytest.mark.slow
def test_compare_with_every_column(sd15_teacher, published_hub, hub, plain_before, tmp_path):
    from cdlab.students import StudentCard, attach_lora, save_student, unload_student, use_student
    from cdlab.ui.compare import TEACHER_4, TEACHER_50, Comparer

    t = sd15_teacher
    root = tmp_path / "adapters"
    tmp_adapter = "tmp-sd15-local"
    attach_lora(t.unet, rank=4, adapter_name=tmp_adapter)
    try:
        with torch.no_grad():  # a student that is not the teacher: nonzero lora_B
            for layer in _adapter_layers(t.pipe, tmp_adapter).values():
                layer.lora_B[tmp_adapter].weight.normal_(0, 0.01)
        card = StudentCard(name="sd15-local", base_model="cdlab/sd15-random", method="cd", num_boundaries=4, steps=4)
        save_student(t.unet, "sd15-local", card, root=root, adapter_name=tmp_adapter, overwrite=True)
    finally:
        unload_student(t.pipe, tmp_adapter)
    with use_student(t.pipe, None):
        pass  # the teacher: attach_lora left its adapter active

    # fuse=False: peft's unfused adapters. Fusing writes a fused copy of every LoRA layer's base weight (seconds
    # a student on SD1.5 here, five students); the fused swap on SD1.5 runs in test_external_student_in_compare
    # and in the doctor test.
    cmp = Comparer(t, adapters_root=root, fuse=False)
    externals = [f"{k} (external)" for k in ("lcm-lora", "tcd", "pcm", "hyper-sd")]
    assert cmp.column_choices() == [TEACHER_50, TEACHER_4, "sd15-local", *externals]
    # every column but teacher-50 (100 UNet passes, 90 s here; the doctor test runs it on this architecture):
    # the naive teacher, the local student and the four externals in ONE request, swapped on one UNet
    choices = [TEACHER_4, "sd15-local", *externals]
    names = ["lcm-lora", "tcd", "pcm", "hyper-sd", "sd15-local"]
    try:
        res = cmp.run(PROMPT, SEED, 7.5, 1, choices, show_trajectory=True)
        assert [c.error for c in res.columns] == [None] * len(choices), res.warnings
        assert [c.nfe for c in res.columns] == [8, 1, 1, 1, 1, 1]
        # one grid (the naive teacher's 4 steps); one-step columns fill the first cell only
        assert res.grid == [999, 750, 500, 250]
        assert [sum(f is not None for f in c.trajectory) for c in res.columns] == [4, 1, 1, 1, 1, 1]
        assert res.columns[0].trajectory_timesteps == [999, 749, 499, 249]  # its own DDIM steps, one a cell
        assert len(set(published_hub.calls)) == 4  # every external came through the (fake) hub
        from cdlab.students import EXTERNAL_STUDENTS

        for k in ("lcm-lora", "tcd", "pcm", "hyper-sd"):  # each file whole on the UNet, and it changes the image
            ext = EXTERNAL_STUDENTS[k]
            assert assert_adapter_is_file(t.pipe, k, hub[(ext.repo_id, ext.filename)]) == 278, k
        naive = res.columns[0].image
        assert all(_differs(c.image, naive) for c in res.columns[1:])
        _assert_plain(t, plain_before)
    finally:
        for name in names:
            _drop(t.pipe, name)


# ------------------------------------------------------------------------------------------- other layouts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_sd15_lora_layouts_load_whole(variant, sd15_teacher, tmp_path, monkeypatch, plain_before):
    """Layouts SD1.5 LoRAs also ship in (SGM/LDM module names, text-encoder keys, diffusers' and peft's
    formats): served as the LCM-LoRA file, every key must land on its module with its values."""
    from cdlab.students import load_external_student, use_student

    t = sd15_teacher
    path = write_layout(VARIANTS[variant], t.pipe, tmp_path / f"{variant}.safetensors", seed=11)
    monkeypatch.setattr("cdlab.students.external._hub_download", lambda repo_id, filename: str(path))
    try:
        load_external_student(t.pipe, "lcm-lora")
        n = assert_adapter_is_file(t.pipe, "lcm-lora", path)
        assert n == (278 + 72 if VARIANTS[variant].te_targets else 278)
        with use_student(t.pipe, None):
            _assert_plain(t, plain_before)
    finally:
        _drop(t.pipe, "lcm-lora")


# ------------------------------------------------------------------------------------------- the Edit tab


@pytest.mark.slow
def test_edit_tab_with_the_published_students(sd15_teacher, published_hub, hub, plain_before, monkeypatch):
    """The Edit tab on SD1.5's architecture offers the four published students as Compare names them; each
    edits on its own scheduler (SDEdit of the SD1.5 sketch preset at strength 0.5: the last 2 of its 4 steps,
    diffusers' img2img rule), its LoRA changes the result, and one that cannot be fetched fails alone."""
    from cdlab.edit import TEACHER_4, TEACHER_50
    from cdlab.ui import edit_tab as ET
    from cdlab.ui.compare import Comparer

    t = sd15_teacher
    keys = ["lcm-lora", "tcd", "pcm", "hyper-sd"]
    externals = [f"{k} (external)" for k in keys]
    # peft's unfused adapters (as test_compare_with_every_column): the Edit tab runs students as its Comparer does
    cmp = Comparer(t, adapters_root=None, fuse=False)
    monkeypatch.setattr(cmp, "students", lambda: [])  # the repository's students are the tiny teacher's
    assert ET.edit_column_choices(cmp) == [TEACHER_50, TEACHER_4, *externals]
    sketch = next(p for p in ET.presets(t) if p.technique == "sdedit")
    try:
        v = ET.run_edit(t, cmp, "sdedit", sketch.editor_value(), sketch.prompt, "", 0.5, 3, "4",
                        [TEACHER_4, *externals])
        assert [c.label for c in v.columns] == ["input", TEACHER_4, *keys]
        assert not any(c.failed for c in v.columns)
        by = {c.label: c for c in v.columns}
        assert by[TEACHER_4].nfe == 4  # 2 of its 4 DDIM steps, with CFG
        for k in keys:
            assert by[k].nfe == 2, k
            assert "2 steps from t=4" in by[k].lines[1], by[k].lines  # 499 (LCM, TCD) or 499 (trailing DDIM)
        assert len(set(published_hub.calls)) == 4
        results = {c.label: np.asarray(c.images[0][0], dtype=np.float32) for c in v.columns[1:]}
        assert all(np.abs(results[k] - results[TEACHER_4]).mean() > 1.0 for k in keys)
        _assert_plain(t, plain_before)

        # a published student that cannot be fetched fails alone, with the reason in its column
        _drop(t.pipe, "pcm")

        def offline(repo_id, filename):
            raise OSError("offline")

        monkeypatch.setattr("cdlab.students.external._hub_download", offline)
        from PIL import Image

        layer = Image.new("RGBA", sketch.background.size, (0, 0, 0, 0))
        layer.paste((255, 255, 255, 255), (16, 16, 48, 48))  # the brush: regenerate the middle
        value = {"background": sketch.background, "layers": [layer], "composite": sketch.background}
        v = ET.run_edit(t, cmp, "inpaint", value, sketch.prompt, "", 1.0, 3, "1",
                        ["lcm-lora (external)", "pcm (external)"])
        assert v.columns[0].label == "input"
        assert [(c.label, c.failed) for c in v.columns[1:]] == [("lcm-lora", False), ("pcm", True)]
        assert "offline" in v.columns[2].lines[1]
    finally:
        for k in keys:
            _drop(t.pipe, k)
