"""Students on a pipeline across modes and time: adapters loaded under ``torch.inference_mode()`` stay
normal tensors (the Compare -> Evaluate crash), and a student retrained on disk is loaded again."""
from __future__ import annotations

import shutil

import pytest
import torch

from cdlab import students as S
from cdlab.teachers import TINY_ID
from cdlab.ui.bench import make_random_students

PROMPT = "a small red circle at the top left on a blue background"


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_params(unet, adapter=None):
    return {n: p for n, p in unet.named_parameters() if "lora_" in n and (adapter is None or f".{adapter}." in n)}


@torch.no_grad()
def _probe(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 24, unet.config.cross_attention_dim, generator=g)
    return unet(x, torch.tensor([999]), encoder_hidden_states=emb).sample


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two random students of the tiny architecture (the same as ``tiny_pipe_dir``'s)."""
    root = tmp_path_factory.mktemp("adapters")
    make_random_students(TINY_ID, root, n=2)
    return root


# --------------------------------------------------------------------------- inference mode


def test_a_student_loaded_in_inference_mode_activates_outside_it(tiny_pipe_dir, root):
    a, b = [c.name for c in S.list_students(root)]
    pipe = _pipe(tiny_pipe_dir)
    with torch.inference_mode():  # as the Compare tab samples
        S.load_student(pipe, a, root)
        inside = _probe(pipe.unet).clone()
    S.load_student(pipe, b, root)  # outside inference mode: activates `b` (requires_grad_ on the LoRA)
    with S.use_student(pipe, a, fuse=False):  # raised "Setting requires_grad=True on inference tensor" before
        lora = _lora_params(pipe.unet)
        assert lora and not any(p.is_inference() for p in lora.values())
        torch.testing.assert_close(_probe(pipe.unet), inside, rtol=0, atol=0)
    with torch.inference_mode():  # and back inside, for both, unfused and fused
        for name in (b, a, None):
            with S.use_student(pipe, name, fuse=False):
                pass
        with S.use_student(pipe, a):
            torch.testing.assert_close(_probe(pipe.unet), inside, rtol=0, atol=1e-5)
    with S.use_student(pipe, b, fuse=False):
        assert not any(p.is_inference() for p in _lora_params(pipe.unet).values())


def test_an_adapter_loaded_in_inference_mode_by_other_code_is_repaired(tiny_pipe_dir, root):
    name = S.list_students(root)[0].name
    pipe = _pipe(tiny_pipe_dir)
    with torch.inference_mode():  # plain diffusers, not load_student
        pipe.load_lora_weights(str(root / name), weight_name=S.WEIGHT_NAME, adapter_name=name)
        expected = _probe(pipe.unet).clone()
        weights = {n: p.clone() for n, p in _lora_params(pipe.unet).items()}
    assert any(p.is_inference() for p in weights.values())
    with S.use_student(pipe, None):
        pass
    with S.use_student(pipe, name, fuse=False):
        repaired = _lora_params(pipe.unet)
        assert not any(p.is_inference() for p in repaired.values())
        # the repair copies every LoRA tensor bit for bit ...
        assert set(repaired) == set(weights) and all(torch.equal(repaired[n], weights[n]) for n in weights)
        # ... so the output is the same up to float kernels (new tensors may take another CPU GEMM path: ~1e-6)
        torch.testing.assert_close(_probe(pipe.unet), expected, rtol=1e-4, atol=1e-5)


def test_compare_then_evaluate_on_the_tiny_teacher(tmp_path):
    """The app's cross-tab path: Compare (under inference mode) loads a student, then Evaluate uses it."""
    from cdlab.evaluate import run_evaluation
    from cdlab.teachers import load_teacher
    from cdlab.ui.compare import TEACHER_4, Comparer

    teacher = load_teacher("tiny")
    [name] = make_random_students(teacher.base_id, tmp_path, n=1)
    cmp = Comparer(teacher, adapters_root=tmp_path)
    res = cmp.run(PROMPT, 0, 3.0, 4, [TEACHER_4, name])
    assert [c.error for c in res.columns] == [None, None] and res.columns[1].nfe == 4
    result = run_evaluation(teacher, n=4, steps=(1, 2), student_steps=(1,), adapters_root=tmp_path, write=False)
    assert [r["method"] for r in result["rows"] if r["kind"] == "student"] == [name]
    again = cmp.run(PROMPT, 0, 3.0, 4, [name])  # and back to Compare
    assert again.columns[0].error is None
    assert list(again.columns[0].image.getdata()) == list(res.columns[1].image.getdata())
    assert not any(p.is_inference() for p in _lora_params(teacher.unet).values())


# ------------------------------------------------------------------------------ reloading


def _file_lora(path, adapter):
    """The LoRA weights of a saved student, under the UNet's parameter names for ``adapter``."""
    from safetensors.torch import load_file

    def param_name(key):
        key = key.removeprefix("unet.")
        return key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")

    return {param_name(key): value for key, value in load_file(str(path)).items()}


def test_a_student_changed_on_disk_is_loaded_again(tiny_pipe_dir, tmp_path):
    from cdlab.samplers import consistency_timesteps, sample_consistency
    from cdlab.tiny.architecture import build_pipeline

    root = tmp_path / "adapters"
    [name] = make_random_students(TINY_ID, root, n=1)
    pipe = _pipe(tiny_pipe_dir)
    calls = []
    plain_load = pipe.load_lora_weights
    pipe.load_lora_weights = lambda *a, **kw: calls.append(kw["adapter_name"]) or plain_load(*a, **kw)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 24, pipe.unet.config.cross_attention_dim, generator=g)

    def sample():
        with torch.inference_mode():
            return sample_consistency(pipe.unet, x_T, cond, consistency_timesteps(4, 4), pipe.scheduler).latents

    S.load_student(pipe, name, root)
    first = sample()
    S.load_student(pipe, name, root)  # unchanged: not read again
    assert calls == [name]

    # Retrain: other weights, saved over the student.
    donor = build_pipeline(seed=0)
    S.attach_lora(donor.unet, rank=4)
    with torch.no_grad():
        for p in _lora_params(donor.unet).values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(123))
    card = S.read_card(name, root)
    S.save_student(donor.unet, name, card, root=root, overwrite=True)

    S.load_student(pipe, name, root)
    assert calls == [name, name]
    want = _file_lora(root / name / S.WEIGHT_NAME, name)
    got = _lora_params(pipe.unet, name)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].detach(), value, rtol=0, atol=0)
    second = sample()
    assert (second - first).abs().max() > 1e-3
    fresh = _pipe(tiny_pipe_dir)
    S.load_student(fresh, name, root)
    torch.testing.assert_close(_probe(pipe.unet), _probe(fresh.unet), rtol=0, atol=1e-6)

    # The same name from another folder is another file: loaded again too.
    other = tmp_path / "other"
    shutil.copytree(root, other)
    S.load_student(pipe, name, other)
    assert calls == [name, name, name] and set(pipe.unet.peft_config) == {name}


# --------------------------------------------------------------------------- switching cost


def test_switching_students_walks_the_unet_only_when_lora_is_on(tiny_pipe_dir, root, monkeypatch):
    """`use_student` turns LoRA off (``pipe.disable_lora()``, a walk over every module) only when some LoRA layer is
    on: after a fused student or the teacher, nothing to do (issue 23: twice per Compare column, a large part of a
    4-step student's time); after loading a student (peft turns it on) or running one unfused, the teacher is
    exact again."""
    a, b = [c.name for c in S.list_students(root)]
    pipe = _pipe(tiny_pipe_dir)
    teacher = _probe(pipe.unet).clone()
    calls = []
    real = pipe.disable_lora
    monkeypatch.setattr(pipe, "disable_lora", lambda: (calls.append(1), real())[1])
    S.load_student(pipe, a, root)  # peft's load turns the adapter on
    with S.use_student(pipe, None):
        torch.testing.assert_close(_probe(pipe.unet), teacher, rtol=0, atol=0)
    assert len(calls) == 1
    S.prepare_student(pipe, a)
    for name in (a, None, a, a, None):
        with S.use_student(pipe, name):
            pass
    assert len(calls) == 1  # every LoRA layer was off already
    with S.use_student(pipe, a, fuse=False):  # peft's unfused adapter: on for the block, off after
        assert not torch.equal(_probe(pipe.unet), teacher)
    assert len(calls) == 2
    S.load_student(pipe, b, root)  # new LoRA layers, on: listed again and turned off
    with S.use_student(pipe, a):
        pass
    assert len(calls) == 3
    torch.testing.assert_close(_probe(pipe.unet), teacher, rtol=0, atol=0)
