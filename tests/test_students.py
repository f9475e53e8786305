"""Students on disk: save -> plain diffusers load, cards, listing, names, errors, adapter switching,
and the external catalogue through a patched hub download. All on the tiny random pipeline."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cdlab import students as S

TINY = "cdlab/tiny-teacher"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RANK, ALPHA = 4, 8.0  # alpha != rank, so a lost alpha/r scale would show


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probe_inputs(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 24, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([999, 250]), emb


@torch.no_grad()
def _probe(unet):
    x, t, emb = _probe_inputs(unet)
    return unet(x, t, encoder_hidden_states=emb).sample


def _randomize(unet, seed, adapter="default"):
    """Noise on lora_A and lora_B, so the LoRA really changes the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_" in name and f".{adapter}." in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _card(name="", base=TINY, **kw):
    return S.StudentCard(name=name, base_model=base, method="mbcd", num_boundaries=4, steps=4, **kw)


@pytest.fixture(scope="module")
def made(tiny_pipe_dir, tmp_path_factory):
    """A root with students s1 and s2 (same LoRA shape, different weights) and their in-memory outputs."""
    root = tmp_path_factory.mktemp("adapters")
    pipe = _pipe(tiny_pipe_dir)
    base = _probe(pipe.unet)
    S.attach_lora(pipe.unet, rank=RANK, alpha=ALPHA)
    out = {}
    for name, seed in (("s1", 1), ("s2", 2)):
        _randomize(pipe.unet, seed)
        out[name] = _probe(pipe.unet)
        S.save_student(pipe.unet, name, _card(metrics={"fid": 12.5}), root=root)
    return SimpleNamespace(root=root, base=base, out=out, train_unet=pipe.unet)


def _copy_root(made, tmp_path):
    dst = tmp_path / "adapters"
    shutil.copytree(made.root, dst)
    return dst


# ------------------------------------------------------------------------------------- LoRA


def test_attach_lora_targets_the_lcm_lora_module_set(tiny_pipe_dir):
    unet = _pipe(tiny_pipe_dir).unet
    base = _probe(unet)
    S.attach_lora(unet, rank=RANK, alpha=ALPHA, adapter_name="stu")
    wrapped = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and "stu" in m.lora_A]
    for target in S.DEFAULT_TARGET_MODULES:  # the tiny UNet has every kind, SD1.5's layout shrunk
        assert any(n.endswith("." + target) for n in wrapped), target
    assert not any(n.endswith(("norm1", "conv_in", "conv_out", "time_embedding.linear_1")) for n in wrapped)
    # lora_B starts at zero: the student starts as the teacher, exactly.
    assert torch.equal(_probe(unet), base)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _randomize(unet, 0, "stu")
    assert (_probe(unet) - base).abs().max() > 1e-2
    with pytest.raises(S.StudentError, match="already has a LoRA adapter named 'stu'"):
        S.attach_lora(unet, adapter_name="stu")
    with pytest.raises(S.StudentError, match="none of the LoRA target modules"):
        S.attach_lora(unet, target_modules=["q_proj"], adapter_name="other")


def test_attach_lora_keeps_lora_fp32_on_an_fp16_unet(tiny_pipe_dir):
    unet = _pipe(tiny_pipe_dir).unet.half()
    S.attach_lora(unet, rank=RANK)
    lora = {n: p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    base = {n: p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert set(base.values()) == {torch.float16}
    # peft casts activations to the LoRA dtype and back: fp16 out, fp32 grads for the optimiser.
    _randomize(unet, 0)
    x, t, emb = _probe_inputs(unet)
    out = unet(x.half(), t, encoder_hidden_states=emb.half()).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


# ------------------------------------------------------------------------------- on disk


def test_saved_student_loads_in_plain_diffusers(made, tiny_pipe_dir, tmp_path):
    folder = made.root / "s1"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "card.json", S.WEIGHT_NAME]
    pipe = _pipe(tiny_pipe_dir)
    assert torch.allclose(_probe(pipe.unet), made.base)
    pipe.load_lora_weights(str(folder))  # plain diffusers, no cdlab, no weight_name
    got = _probe(pipe.unet)
    assert (made.out["s1"] - made.base).abs().max() > 1e-2
    torch.testing.assert_close(got, made.out["s1"], rtol=0, atol=1e-5)

    # alpha/r is folded into the weights: a loader that ignores diffusers' metadata agrees too.
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(folder / S.WEIGHT_NAME)), str(bare / S.WEIGHT_NAME))
    pipe2 = _pipe(tiny_pipe_dir)
    pipe2.load_lora_weights(str(bare))
    torch.testing.assert_close(_probe(pipe2.unet), made.out["s1"], rtol=0, atol=1e-5)


def test_card_round_trip_and_readme(made):
    card = S.read_card("s1", made.root)
    assert card.name == "s1" and card.base_model == TINY and card.method == "mbcd"
    assert (card.lora_rank, card.lora_alpha) == (RANK, ALPHA)
    assert card.target_modules == sorted(S.DEFAULT_TARGET_MODULES)
    assert card.metrics == {"fid": 12.5} and card.created.endswith("Z")
    again = S.StudentCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again == card
    readme = (made.root / "s1" / "README.md").read_text()
    assert 'pipe.load_lora_weights("adapters/s1", adapter_name="s1")' in readme
    assert 'timestep_spacing="trailing"' in readme and "num_inference_steps=4" in readme


@pytest.mark.parametrize("change, field", [
    ({"method": "distill"}, "method"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance": "high"}, "guidance"),
    ({"num_boundaries": 0}, "num_boundaries"),
    ({"scheduler_kwargs": []}, "scheduler_kwargs"),
    ({"scheduler_kwargs": {"eta": 0.3}}, "scheduler_kwargs"),  # the consistency sampler has no eta
    ({"scheduler_kwargs": {"shift": 0.0}}, "scheduler_kwargs"),
    ({"scheduler_kwargs": {"shift": float("nan")}}, "scheduler_kwargs"),
    ({"scheduler_kwargs": {"shift": "0.3"}}, "scheduler_kwargs"),
    ({"scheduler_kwargs": {"shift": True}}, "scheduler_kwargs"),
    ({"target_modules": "to_q"}, "target_modules"),
    ({"name": "../up"}, "invalid student name"),
    ({"base_fingerprint": "38A4775E86D6F4B4"}, "base_fingerprint"),
    ({"base_fingerprint": "38a4775e86d6f4b"}, "base_fingerprint"),
    ({"base_fingerprint": "38a4775e86d6f4b4\n"}, "base_fingerprint"),
    ({"base_fingerprint": 38}, "base_fingerprint"),
])
def test_card_validation_names_the_field(change, field):
    d = _card(name="ok").to_dict() | change
    with pytest.raises(S.StudentError, match=field):
        S.StudentCard.from_dict(d)


def test_a_consistency_card_carries_its_grids_shift():
    card = S.StudentCard.from_dict(_card(name="ok").to_dict() | {"scheduler_kwargs": {"shift": 0.3}, "steps": 4,
                                                                   "num_boundaries": 4})
    assert card.scheduler_kwargs == {"shift": 0.3}
    assert "| timesteps | [999, 474, 231, 91] at 4 steps (shift 0.3) |" in S.render_readme(card)


def test_card_missing_fields_and_wrong_type():
    with pytest.raises(S.StudentError, match="missing required field.*base_model"):
        S.StudentCard.from_dict({"name": "x", "method": "cd"})
    with pytest.raises(S.StudentError, match="JSON object"):
        S.StudentCard.from_dict(["x"])


def test_list_students_sorts_filters_and_skips_malformed(made, tmp_path, caplog):
    root = _copy_root(made, tmp_path)
    S.save_student(made.train_unet, "a-sd", _card(base=SD15), root=root)
    (root / "broken").mkdir()
    (root / "broken" / "card.json").write_text("{not json")
    shutil.copy(root / "s1" / S.WEIGHT_NAME, root / "broken" / S.WEIGHT_NAME)
    (root / "nocard").mkdir()
    shutil.copy(root / "s1" / S.WEIGHT_NAME, root / "nocard" / S.WEIGHT_NAME)
    (root / "binonly").mkdir()
    (root / "binonly" / "card.json").write_text(json.dumps(_card(name="binonly").to_dict()))
    (root / "binonly" / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    (root / "bad name").mkdir()
    (root / ".tmp-s3-x").mkdir()
    (root / "stray.txt").write_text("not a folder")

    with caplog.at_level(logging.WARNING, logger="cdlab.students"):
        cards = S.list_students(root)
    assert [c.name for c in cards] == ["a-sd", "s1", "s2"]
    warned = caplog.text
    for bad in ("broken", "nocard", "binonly", "bad name"):
        assert bad in warned
    assert ".tmp-s3-x" not in warned
    assert [c.name for c in S.list_students(root, base_model=TINY)] == ["s1", "s2"]
    assert [c.name for c in S.list_students(root, base_model=SD15)] == ["a-sd"]
    assert S.list_students(tmp_path / "nowhere") == []


def test_adapters_dir_follows_the_environment(made, monkeypatch):
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(made.root))
    assert S.adapters_dir() == made.root
    assert [c.name for c in S.list_students()] == ["s1", "s2"]


def test_overwrite_replaces_the_student_whole(made, tiny_pipe_dir, tmp_path):
    root = _copy_root(made, tmp_path)
    (root / "s1" / "junk.bin").write_bytes(b"stale")
    _randomize(made.train_unet, 3)
    new = _probe(made.train_unet)
    S.save_student(made.train_unet, "s1", _card(metrics={"fid": 9.0}), root=root, overwrite=True)
    assert sorted(p.name for p in (root / "s1").iterdir()) == ["README.md", "card.json", S.WEIGHT_NAME]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert S.read_card("s1", root).metrics == {"fid": 9.0}
    pipe = _pipe(tiny_pipe_dir)
    S.load_student(pipe, "s1", root)
    torch.testing.assert_close(_probe(pipe.unet), new, rtol=0, atol=1e-5)


def test_save_refuses_bad_input_and_keeps_the_old_student(made, tiny_pipe_dir, tmp_path):
    root = _copy_root(made, tmp_path)
    before = (root / "s1" / S.WEIGHT_NAME).read_bytes()
    with pytest.raises(S.StudentError, match="does not match"):
        S.save_student(made.train_unet, "s1", _card(name="s2"), root=root)
    with pytest.raises(S.StudentError, match="method"):
        S.save_student(made.train_unet, "s1", S.StudentCard(name="s1", base_model=TINY, method="x"), root=root)
    with pytest.raises(S.StudentError, match="no LoRA adapter named 'default'.*attach_lora"):
        S.save_student(_pipe(tiny_pipe_dir).unet, "s1", _card(), root=root)
    with pytest.raises(S.StudentError, match="invalid student name"):
        S.save_student(made.train_unet, "../s1", _card(), root=root)
    assert (root / "s1" / S.WEIGHT_NAME).read_bytes() == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_an_existing_student_is_replaced_only_with_overwrite(made, tmp_path):
    root = _copy_root(made, tmp_path)
    before = {p.name: p.read_bytes() for p in (root / "s1").iterdir()}
    with pytest.raises(S.StudentError, match=r"student 's1' already exists.*overwrite=True \(CLI: --overwrite\)"):
        S.save_student(made.train_unet, "s1", _card(metrics={"fid": 1.0}), root=root)
    assert {p.name: p.read_bytes() for p in (root / "s1").iterdir()} == before  # nothing lost
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    S.save_student(made.train_unet, "s3", _card(), root=root)  # a free name needs no flag
    assert S.read_card("s3", root).name == "s3"


def test_shipped_students(made, tmp_path):
    root = _copy_root(made, tmp_path)
    assert S.shipped_students(root) == set() and not S.is_shipped("s1", root)
    (root / S.SHIPPED_NAME).write_text("# ship with the repository\ns1   # the first\n\n  s2\n")
    assert S.shipped_students(root) == {"s1", "s2"}
    assert S.is_shipped("s1", root) and not S.is_shipped("s3", root)
    assert [c.name for c in S.list_students(root)] == ["s1", "s2"]  # SHIPPED is not a student
    before = (root / "s1" / S.WEIGHT_NAME).read_bytes()
    for kwargs in ({}, {"overwrite": True, "allow_shipped": False}, {"allow_shipped": False}):
        with pytest.raises(S.StudentError, match="'s1'"):
            S.save_student(made.train_unet, "s1", _card(), root=root, **kwargs)
    with pytest.raises(S.StudentError, match="ships with the repository"):
        S.save_student(made.train_unet, "s1", _card(), root=root, overwrite=True, allow_shipped=False)
    assert (root / "s1" / S.WEIGHT_NAME).read_bytes() == before
    S.save_student(made.train_unet, "s1", _card(metrics={"fid": 2.0}), root=root, overwrite=True)  # the CLI may
    assert S.read_card("s1", root).metrics == {"fid": 2.0}


def test_the_repository_lists_its_shipped_students():
    repo_adapters = Path(S.__file__).resolve().parent.parent.parent / "adapters"
    assert S.shipped_students(repo_adapters) == {"tiny-ct-4", "tiny-cd-4", "tiny-mbcd-4", "tiny-dmd-1", "tiny-dmd-4",
                                                  "fashion-reflow-4", "fashion-reflow-1", "fashion-dmd-1", "fashion-dmd-4",
                                                  "fashion-mbcd-4"}
    assert {c.name for c in S.list_students(repo_adapters)} >= S.shipped_students(repo_adapters)


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["s1", "tiny-cd_N4", "A" * 64, "0"])
def test_valid_names(name):
    assert S.validate_name(name) == name


@pytest.mark.parametrize("name", [
    "../x", "/abs", "a/b", "a\\b", "..", ".hidden", "-flag", "", "a" * 65, "x y", "a.b", "train", "keys", None,
])
def test_invalid_names_are_refused(name):
    with pytest.raises(S.StudentError, match="student name"):
        S.validate_name(name)


def test_paths_stay_inside_the_adapters_root(made, tiny_pipe_dir, tmp_path):
    root = _copy_root(made, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(root / "s1", outside)
    (root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(S.StudentError, match="outside the adapters folder"):
        S.student_dir("evil", root)
    pipe = _pipe(tiny_pipe_dir)
    for name in ("evil", "../outside", str(outside)):
        with pytest.raises(S.StudentError):
            S.load_student(pipe, name, root)
    assert not getattr(pipe.unet, "peft_config", None)


# ----------------------------------------------------------------------------- on a pipeline


def test_missing_or_malformed_students_give_clear_errors(made, tiny_pipe_dir, tmp_path):
    root = _copy_root(made, tmp_path)
    pipe = _pipe(tiny_pipe_dir)
    with pytest.raises(S.StudentError, match=rf"no student 'nope': {root.resolve() / 'nope'} does not exist"):
        S.load_student(pipe, "nope", root)

    (root / "s1" / S.WEIGHT_NAME).rename(root / "s1" / "pytorch_lora_weights.bin")
    with pytest.raises(S.StudentError, match=r"s1/pytorch_lora_weights\.safetensors is missing.*safetensors only"):
        S.load_student(pipe, "s1", root)

    (root / "s2" / S.WEIGHT_NAME).write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(S.StudentError, match=r"s2/pytorch_lora_weights\.safetensors is not a readable safetensors"):
        S.load_student(pipe, "s2", root)

    shutil.copytree(made.root / "s1", root / "s3")
    (root / "s3" / "card.json").write_text('{"name": "s3", "base_model": "x", "method": "ct", "steps": -1}')
    with pytest.raises(S.StudentError, match="'steps' must be a positive integer"):
        S.load_student(pipe, "s3", root)
    (root / "s3" / "card.json").unlink()
    with pytest.raises(S.StudentError, match=r"has no card: .*s3/card\.json is missing"):
        S.load_student(pipe, "s3", root)
    assert not getattr(pipe.unet, "peft_config", None)


def test_weights_that_do_not_fit_the_unet_are_refused(made, tiny_pipe_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy_root(made, tmp_path)
    f = root / "s1" / S.WEIGHT_NAME
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("to_q.lora_A.weight"))
    sd[key] = torch.zeros(RANK, 7)  # wrong in_features
    save_file(sd, str(f))
    pipe = _pipe(tiny_pipe_dir)
    with pytest.raises(S.StudentError, match="does not load into this UNet"):
        S.load_student(pipe, "s1", root)
    assert "s1" not in (getattr(pipe.unet, "peft_config", None) or {})


def test_a_card_of_other_weights_of_its_base_is_neither_listed_nor_loaded(made, tiny_pipe_dir, tmp_path):
    """A teacher retrained under the same id (the tiny teacher rebuilt, a flow run folder trained again, the
    shipped flow teacher replaced) is another base: a card that records other weights is not its student. A card
    that records none (older than the field, or a hub model's) is judged by the id alone, as before."""
    root = _copy_root(made, tmp_path)
    ours, other = "38a4775e86d6f4b4", "0c3c55286fb213ab"
    S.save_student(made.train_unet, "s-ours", _card(base_fingerprint=ours), root=root)
    S.save_student(made.train_unet, "s-other", _card(base_fingerprint=other), root=root)
    assert S.read_card("s-other", root).base_fingerprint == other
    assert "| base weights | sha256 `0c3c55286fb213ab...`" in (root / "s-other" / "README.md").read_text()
    listed = [c.name for c in S.list_students(root, base_model=TINY, base_fingerprint=ours)]
    assert listed == ["s-ours", "s1", "s2"]  # s1, s2 record no weights
    assert [c.name for c in S.list_students(root, base_model=TINY)] == ["s-other", "s-ours", "s1", "s2"]
    assert [c.fits(TINY, other) for c in S.list_students(root, base_model=TINY)] == [True, False, True, True]
    pipe = _pipe(tiny_pipe_dir)
    teacher = SimpleNamespace(pipe=pipe, base_id=TINY, base_fingerprint=ours)  # a cdlab Teacher carries both
    with pytest.raises(S.StudentError, match="distilled from other weights of 'cdlab/tiny-teacher' "
                                             "\\(fingerprint 0c3c55286fb213ab; this teacher's is 38a4775e86d6f4b4\\)"):
        S.load_student(teacher, "s-other", root)
    with pytest.raises(S.StudentError, match="other weights"):  # the same through the explicit arguments
        S.load_student(pipe, "s-other", root, base_model=TINY, base_fingerprint=ours)
    assert not any("s-other" in n for n, _ in pipe.unet.named_parameters())  # refused before anything loads
    assert S.load_student(teacher, "s-ours", root).name == "s-ours"
    assert S.load_student(teacher, "s1", root).name == "s1"


def test_the_shipped_students_record_the_shipped_teachers_weights():
    """Each shipped student names its teacher's weights, and they are the shipped teacher's: a teacher replaced in
    the repository without its students distilled again fails here, not in a user's Compare tab."""
    from cdlab.flow.pipeline import flow_fingerprint
    from cdlab.paths import FLOW_ID, REPO_ROOT, weights_fingerprint
    from cdlab.teachers import TINY_TEACHER_DIR

    shipped = {TINY: weights_fingerprint(TINY_TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors"),
               FLOW_ID: flow_fingerprint()}
    cards = S.list_students(REPO_ROOT / "adapters")
    assert {c.base_model for c in cards} == set(shipped) and len(cards) == 10
    assert [(c.name, c.base_fingerprint) for c in cards] == [(c.name, shipped[c.base_model]) for c in cards]
    import hashlib
    digest = hashlib.sha256((TINY_TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert shipped[TINY] == digest.hexdigest()[:16]  # what `sha256sum` prints, cut to 16 digits


def test_base_model_mismatch_is_refused(made, tiny_pipe_dir):
    pipe = _pipe(tiny_pipe_dir)
    with pytest.raises(S.StudentError, match=f"distilled from '{TINY}', but this pipeline is '{SD15}'"):
        S.load_student(pipe, "s1", made.root, base_model=SD15)
    teacher = SimpleNamespace(pipe=pipe, base_id=SD15)  # a cdlab Teacher carries its base
    with pytest.raises(S.StudentError, match="distilled from"):
        S.load_student(teacher, "s1", made.root)
    card = S.load_student(SimpleNamespace(pipe=pipe, base_id=TINY), "s1", made.root)
    assert card.name == "s1"
    torch.testing.assert_close(_probe(pipe.unet), made.out["s1"], rtol=0, atol=1e-5)


def test_named_adapters_switch_on_one_unet(made, tiny_pipe_dir):
    pipe = _pipe(tiny_pipe_dir)
    base = _probe(pipe.unet)
    calls = []
    plain_load = pipe.load_lora_weights

    def counting_load(*args, **kwargs):
        calls.append(kwargs.get("adapter_name"))
        return plain_load(*args, **kwargs)

    pipe.load_lora_weights = counting_load
    unet = pipe.unet
    S.load_student(pipe, "s1", made.root)
    out1 = _probe(unet)
    S.load_student(pipe, "s2", made.root)
    out2 = _probe(unet)
    assert pipe.unet is unet and set(unet.peft_config) == {"s1", "s2"}
    torch.testing.assert_close(out1, made.out["s1"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out2, made.out["s2"], rtol=0, atol=1e-5)
    assert (out1 - out2).abs().max() > 1e-2

    with S.use_student(pipe, "s1", fuse=False):  # peft's unfused adapter: what loading left active
        assert torch.equal(_probe(unet), out1)
    assert torch.equal(_probe(unet), base)  # the plain teacher again, bit for bit
    with S.use_student(pipe, "s2", fuse=False):
        assert torch.equal(_probe(unet), out2)
    with S.use_student(pipe, None):
        assert torch.equal(_probe(unet), base)

    S.load_student(pipe, "s1", made.root)  # idempotent: no second read, just re-activation
    assert calls == ["s1", "s2"]
    assert torch.equal(_probe(unet), out1)
    for fuse in (True, False):
        with pytest.raises(S.StudentError, match="'s9' is not loaded.*loaded: \\['s1', 's2'\\]"):
            with S.use_student(pipe, "s9", fuse=fuse):
                pass
    with pytest.raises(S.StudentError, match="'s9' is not loaded"):
        S.prepare_student(pipe, "s9")


def test_fused_weights_keep_the_base_weights_memory_layout(random_teacher):
    """peft's delta of a k×k conv LoRA is transposed in memory; the swapped-in ``W + ΔW`` must still be laid out as
    ``W`` (a weight in another layout is reordered by every convolution: the doctor measured the student-4
    column 3x slower than the naive teacher's 4 steps on SD1.5's architecture)."""
    from cdlab.students import attach_lora, unload_student
    from cdlab.students.switch import _fused_tensors

    attach_lora(random_teacher.unet, rank=4, adapter_name="layout")
    try:
        pairs = _fused_tensors(random_teacher.pipe, "layout")
        convs = [(w, f) for w, f in pairs if w.dim() == 4 and w.shape[2:] != (1, 1)]
        assert convs and all(f.stride() == w.stride() for w, f in pairs)
    finally:
        unload_student(random_teacher.pipe, "layout")


def test_the_fused_weight_is_pefts_for_every_layer_kind(random_teacher):
    """`_fused_weight` (one ``addmm``, also for a k×k convolution) is ``W`` plus peft's own ``get_delta_weight``
    for every layer a LoRA wraps: linear and 3x3 convolutions, at a LoRA scale that is not 1, in ``W``'s layout."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cdlab.students import attach_lora, unload_student
    from cdlab.students.switch import _fused_weight

    attach_lora(random_teacher.unet, rank=4, alpha=8, adapter_name="delta")
    try:
        layers = [m for m in random_teacher.unet.modules() if isinstance(m, BaseTunerLayer) and "delta" in m.lora_A]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in layers:
                m.lora_B["delta"].weight.copy_(torch.randn(m.lora_B["delta"].weight.shape, generator=g))
        kinds = {(type(m.get_base_layer()).__name__, tuple(m.get_base_layer().weight.shape[2:])) for m in layers}
        assert {("Linear", ()), ("Conv2d", (3, 3))} <= kinds, kinds
        for m in layers:
            w = m.get_base_layer().weight
            got = _fused_weight(m, "delta")
            assert got.shape == w.shape and got.stride() == w.stride() and m.scaling["delta"] == 2.0
            torch.testing.assert_close(got, w + m.get_delta_weight("delta"), rtol=1e-5, atol=1e-5)
    finally:
        unload_student(random_teacher.pipe, "delta")


def test_use_student_swaps_in_fused_weights_and_gives_the_teacher_back(made, tiny_pipe_dir):
    """The default switch: the fused weights ``W + ΔW`` swapped in (computed once, by `prepare_student` or on
    first use), the same model as the unfused adapter, and the teacher's own tensors back after, even when the
    block raises."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = _pipe(tiny_pipe_dir)
    base = _probe(pipe.unet)
    for name in ("s1", "s2"):
        S.load_student(pipe, name, made.root, activate=False)
    S.load_student(pipe, "s2", made.root)  # s2 active: use_student must switch it off for s1's fused weights
    ptrs = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    with S.use_student(pipe, None):
        assert torch.equal(_probe(pipe.unet), base)
    assert S.prepare_student(pipe, "s1") is True and S.prepare_student(pipe, None) is False
    outs = {}
    for name in ("s1", "s2", "s1"):
        with S.use_student(pipe, name):
            outs.setdefault(name, []).append(_probe(pipe.unet))
            layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
            assert layers and all(m.disable_adapters for m in layers)  # no LoRA branch runs: the UNet alone
        assert torch.equal(_probe(pipe.unet), base)
    assert torch.equal(outs["s1"][0], outs["s1"][1])
    for name in ("s1", "s2"):
        torch.testing.assert_close(outs[name][0], made.out[name], rtol=0, atol=1e-5)
        with S.use_student(pipe, name, fuse=False):
            torch.testing.assert_close(_probe(pipe.unet), outs[name][0], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"):
        with S.use_student(pipe, "s2"):
            raise RuntimeError("inside")
    assert torch.equal(_probe(pipe.unet), base)
    assert {n: p.data_ptr() for n, p in pipe.unet.named_parameters()} == ptrs  # its own tensors, not copies

    S.unload_student(pipe, "s1")
    assert set(pipe.unet.peft_config) == {"s2"}
    S.unload_student(pipe, "s1")  # not loaded: nothing
    with pytest.raises(S.StudentError, match="'s1' is not loaded"):
        with S.use_student(pipe, "s1"):
            pass


def test_use_student_fuses_a_lora_variant_in_place_and_restores_it(tiny_pipe_dir):
    """A student that is not vanilla LoRA (DoRA here) has no swappable ``W + ΔW``: `use_student` fuses it into the
    base weights for the block and gives the teacher back bit for bit, in fp16 too."""
    from peft import LoraConfig

    pipe = _pipe(tiny_pipe_dir)
    pipe.unet.to(torch.float16)
    x, t, emb = _probe_inputs(pipe.unet)

    @torch.no_grad()
    def probe():
        return pipe.unet(x.half(), t, encoder_hidden_states=emb.half()).sample

    base = probe()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], use_dora=True),
                          adapter_name="dora")
    _randomize(pipe.unet, 3, adapter="dora")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    assert S.prepare_student(pipe, "dora") is False
    with S.use_student(pipe, "dora", fuse=False):
        unfused = probe()
    with S.use_student(pipe, "dora"):
        fused = probe()
    assert (unfused - base).abs().max() > 1e-2
    torch.testing.assert_close(fused, unfused, rtol=0, atol=2e-2)
    assert torch.equal(probe(), base)
    with pytest.raises(RuntimeError, match="mid-block"):  # an error inside the block: restored all the same
        with S.use_student(pipe, "dora"):
            raise RuntimeError("mid-block")
    assert torch.equal(probe(), base)
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before)  # the base weights bit for bit, in fp16
    pipe.fuse_lora(components=["unet"], adapter_names=["dora"])  # fused by other code: nothing exact to restore
    with pytest.raises(S.StudentError, match="already fused into the UNet"):
        with S.use_student(pipe, "dora"):
            pass


# ------------------------------------------------------------------------------- externals


def test_external_catalogue_matches_the_model_cards(tiny_pipe_dir):
    cat = S.EXTERNAL_STUDENTS
    assert {k: (e.repo_id, e.filename, e.scheduler) for k, e in cat.items()} == {
        "lcm-lora": ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors", "LCMScheduler"),
        "tcd": ("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors", "TCDScheduler"),
        "pcm": ("wangfuyun/PCM_Weights", "sd15/pcm_sd15_smallcfg_4step_converted.safetensors", "TCDScheduler"),
        "hyper-sd": ("ByteDance/Hyper-SD", "Hyper-SD15-4steps-lora.safetensors", "DDIMScheduler"),
    }
    pipe = _pipe(tiny_pipe_dir)
    for key, ext in cat.items():
        S.validate_name(key)  # usable as a peft adapter name
        card = S.StudentCard(name=key, base_model=SD15, method="external", steps=ext.steps,
                             guidance=ext.guidance, scheduler=ext.scheduler, scheduler_kwargs=ext.scheduler_kwargs)
        sched = S.make_scheduler(pipe, card)
        assert type(sched).__name__ == ext.scheduler
        assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
        kw = S.sampling_kwargs(card)
        assert kw["num_inference_steps"] == 4 and kw["guidance_scale"] == 1.0
        if key == "pcm":
            assert sched.config.timestep_spacing == "trailing" and kw["eta"] == 0.0
        if key == "hyper-sd":
            assert sched.config.timestep_spacing == "trailing" and "eta" not in kw
        if key == "tcd":
            assert kw["eta"] == 0.3


def test_make_scheduler_for_our_students_and_unknown_names(tiny_pipe_dir):
    pipe = _pipe(tiny_pipe_dir)
    sched = S.make_scheduler(pipe, _card(name="s1"))
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config.timestep_spacing == "trailing" and sched.config.set_alpha_to_one is True
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    with pytest.raises(S.StudentError, match="unknown scheduler 'NopeScheduler'"):
        S.make_scheduler(pipe, _card(name="s1", scheduler="NopeScheduler"))
    with pytest.raises(S.StudentError, match="unknown scheduler 'StableDiffusionPipeline'"):
        S.make_scheduler(pipe, _card(name="s1", scheduler="StableDiffusionPipeline"))


@pytest.fixture
def s1_hub(made, fake_hub, tmp_path):
    """The fake hub (conftest) serving s1's weights file as every catalogue file."""
    for ext in S.EXTERNAL_STUDENTS.values():
        dst = tmp_path / "hub" / ext.repo_id / ext.filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made.root / "s1" / S.WEIGHT_NAME, dst)
        fake_hub.files[(ext.repo_id, ext.filename)] = dst
    return fake_hub


def test_load_external_students_through_the_hub(made, tiny_pipe_dir, s1_hub):
    pipe = _pipe(tiny_pipe_dir)
    base = _probe(pipe.unet)
    for key, ext in S.EXTERNAL_STUDENTS.items():
        card = S.load_external_student(pipe, key)
        assert (card.name, card.method, card.base_model) == (key, "external", SD15)
        assert (card.scheduler, card.steps, card.guidance) == (ext.scheduler, ext.steps, ext.guidance)
        assert card.training_config["repo_id"] == ext.repo_id
        torch.testing.assert_close(_probe(pipe.unet), made.out["s1"], rtol=0, atol=1e-5)
    assert s1_hub.calls == [(e.repo_id, e.filename) for e in S.EXTERNAL_STUDENTS.values()]
    assert set(pipe.unet.peft_config) == set(S.EXTERNAL_STUDENTS)

    S.load_external_student(pipe, "tcd")  # idempotent: no second download
    assert len(s1_hub.calls) == len(S.EXTERNAL_STUDENTS)
    with S.use_student(pipe, None):
        assert torch.equal(_probe(pipe.unet), base)

    # The card's recipe runs in the plain pipeline: TCD, 4 steps, eta 0.3, no CFG.
    card = S.load_external_student(pipe, "tcd")
    pipe.scheduler = S.make_scheduler(pipe, card)
    run = dict(prompt="a red circle", output_type="latent", **S.sampling_kwargs(card))
    with S.use_student(pipe, "tcd"):
        student = pipe(generator=torch.Generator().manual_seed(0), **run).images
    teacher = pipe(generator=torch.Generator().manual_seed(0), **run).images
    assert student.shape == (1, 4, 8, 8) and torch.isfinite(student).all()
    assert (student - teacher).abs().max() > 1e-3


def test_external_failures_are_clear(tiny_pipe_dir, s1_hub, monkeypatch):
    pipe = _pipe(tiny_pipe_dir)
    assert not hasattr(S, "_hub_download")  # a patch there would silently do nothing: it fails loudly instead
    with pytest.raises(S.StudentError, match="unknown external student 'lcm'.*lcm-lora, tcd, pcm, hyper-sd"):
        S.load_external_student(pipe, "lcm")
    with pytest.raises(S.StudentError, match=f"LoRA for {SD15}; this pipeline is '{TINY}'"):
        S.load_external_student(pipe, "tcd", base_model=TINY)

    def offline(repo_id, filename, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("cdlab.students.external._hub_download", offline)
    with pytest.raises(S.StudentError, match="Hyper-SD15-4steps-lora.safetensors from the hub repo "
                                             "ByteDance/Hyper-SD.*no network.*HF_HUB_OFFLINE"):
        S.load_external_student(pipe, "hyper-sd")
    assert not getattr(pipe.unet, "peft_config", None)


def test_hub_download_is_huggingface_hubs_looked_up_when_it_runs(monkeypatch):
    import huggingface_hub

    from cdlab.students import external

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: f"{repo_id}::{filename}")
    assert external._hub_download("a/b", "c.safetensors") == "a/b::c.safetensors"


def test_a_local_and_an_external_student_of_one_name_replace_each_other(made, tiny_pipe_dir, tmp_path, s1_hub):
    root = _copy_root(made, tmp_path)
    shutil.copytree(root / "s2", root / "tcd")
    (root / "tcd" / "card.json").write_text(json.dumps(_card(name="tcd").to_dict()))
    pipe = _pipe(tiny_pipe_dir)
    S.load_student(pipe, "tcd", root)
    torch.testing.assert_close(_probe(pipe.unet), made.out["s2"], rtol=0, atol=1e-5)
    S.load_external_student(pipe, "tcd")  # the hub serves s1's weights
    torch.testing.assert_close(_probe(pipe.unet), made.out["s1"], rtol=0, atol=1e-5)
    S.load_student(pipe, "tcd", root)
    torch.testing.assert_close(_probe(pipe.unet), made.out["s2"], rtol=0, atol=1e-5)
    assert set(pipe.unet.peft_config) == {"tcd"}


def test_a_fused_student_changed_on_disk_is_unfused_before_it_is_loaded_again(made, tiny_pipe_dir, tmp_path):
    root = _copy_root(made, tmp_path)
    pipe = _pipe(tiny_pipe_dir)
    S.load_student(pipe, "s1", root)
    pipe.fuse_lora(components=["unet"], adapter_names=["s1"])
    torch.testing.assert_close(_probe(pipe.unet), made.out["s1"], rtol=0, atol=1e-5)
    shutil.copy(root / "s2" / S.WEIGHT_NAME, root / "s1" / "new.safetensors")
    (root / "s1" / "new.safetensors").replace(root / "s1" / S.WEIGHT_NAME)  # "retrained": another file
    S.load_student(pipe, "s1", root)
    torch.testing.assert_close(_probe(pipe.unet), made.out["s2"], rtol=0, atol=1e-5)
    with S.use_student(pipe, None):
        torch.testing.assert_close(_probe(pipe.unet), made.base, rtol=0, atol=1e-5)  # no s1 left in the weights
