"""Checkpoints: fsynced before they are published, resume falls back past unreadable ones (all-or-nothing,
still an exact resume), and the one checkpoint-folder helper shared by the trainer and the app."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cdlab.train import checkpoints as C
from cdlab.train.config import TrainConfig, load_json
from cdlab.train.trainer import list_checkpoints, train

REPO = Path(__file__).resolve().parent.parent


def _cfg(model, cache_dir, **kw):
    base = dict(model=model, data_size=32, batch_size=8, max_steps=4, log_every=1, checkpoint_every=2,
                keep_checkpoints=3, preview_every=0, cache_dir=cache_dir, warmup_steps=1, lr=2e-3, lora_rank=4,
                probe_size=8, threads=1, save_student=False)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lora(run_dir):
    return load_file(str(list_checkpoints(run_dir)[-1][1] / "lora.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_pipe_dir, latent_cache_dir, module_run_dirs):
    """An uninterrupted 6-step run: its final LoRA weights and its metrics."""
    with module_run_dirs("reference"):
        res = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="ref", max_steps=6), log=lambda m: None)
    assert res.state == "finished" and res.step == 6
    return SimpleNamespace(lora=_lora(res.run_dir), rows=_metrics(res.run_dir))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated-lora": lambda ck: _truncate(ck / "lora.safetensors"),
    "missing-optimizer": lambda ck: (ck / "optimizer.pt").unlink(),
    # the last file read: a failure after the others were read fine must not leave a mix
    "truncated-rng": lambda ck: _truncate(ck / "rng_rank0.pt"),
    # still loads (torch.load ignores trailing bytes): only the file list in state.json tells
    "grown-lr-scheduler": lambda ck: (ck / "lr_scheduler.pt").open("ab").write(b"\0" * 8),
}


@pytest.fixture(scope="module")
def four_steps(tiny_pipe_dir, latent_cache_dir, module_run_dirs) -> Path:
    """A 4-step run "r" (checkpoints at 2 and 4), trained once; each damage test damages a copy of it."""
    with module_run_dirs("four-steps"):
        first = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="r"), log=lambda m: None)
    assert first.state == "finished" and first.step == 4
    return first.run_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_previous_checkpoint(four_steps, run_dirs, reference, damage):
    run = run_dirs.runs / "r"
    shutil.copytree(four_steps, run)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    state = json.loads((run / "checkpoints" / "ckpt_000004" / "state.json").read_text())
    assert state["files"] == {p.name: p.stat().st_size for p in (run / "checkpoints" / "ckpt_000004").iterdir()
                              if p.name != "state.json"}
    assert {"lora.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng_rank0.pt"} <= state["files"].keys()
    DAMAGE[damage](run / "checkpoints" / "ckpt_000004")

    log: list[str] = []
    cfg = dataclasses.replace(load_json(run / "config.json"), max_steps=6)
    resumed = train(cfg, resume=run, log=log.append)
    text = "\n".join(log)
    assert "skipping checkpoint ckpt_000004" in text, text
    assert "resume: ckpt_000002 (step 2" in text, text
    assert resumed.state == "finished" and resumed.step == 6
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # trimmed at the step actually used (2), then replayed
    ref_lora, ref_rows = reference.lora, reference.rows
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6)
    lora = _lora(run)
    assert lora.keys() == ref_lora.keys() and all(torch.equal(lora[k], ref_lora[k]) for k in lora)
    # the unreadable one was set aside; the run wrote a good step-4 checkpoint again
    assert (run / "checkpoints" / ".bad-ckpt_000004").is_dir()
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]


def test_no_readable_checkpoint_is_a_clear_error(tiny_pipe_dir, latent_cache_dir, run_dirs):
    res = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="r", max_steps=2), log=lambda m: None)
    ck = res.run_dir / "checkpoints" / "ckpt_000002"
    _truncate(ck / "lora.safetensors")
    cfg = dataclasses.replace(load_json(res.run_dir / "config.json"), max_steps=4)
    with pytest.raises(ValueError, match=r"none of the 1 checkpoints .* is readable "
                                         r"\(ckpt_000002: lora.safetensors has \d+ bytes, state.json says \d+\)"):
        train(cfg, resume=res.run_dir, log=lambda m: None)
    assert json.loads((res.run_dir / "status.json").read_text())["state"] == "failed"
    # without the file list (a checkpoint written before it existed) the truncated file itself fails to load
    state = json.loads((ck / "state.json").read_text())
    del state["files"]
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"\(ckpt_000002: unreadable \(SafetensorError"):
        train(cfg, resume=res.run_dir, log=lambda m: None)


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tiny_pipe_dir, latent_cache_dir, run_dirs, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    res = train(_cfg(tiny_pipe_dir, latent_cache_dir, run_name="f", max_steps=2, ema_decay=0.9), log=lambda m: None)
    folder = res.run_dir / "checkpoints"
    tmp, final = str(folder / ".tmp-ckpt_000002"), str(folder / "ckpt_000002")
    [i] = [k for k, e in enumerate(events) if e == ("replace", tmp, final)]
    before = [e[1] for e in events[:i] if e[0] == "fsync"]
    names = sorted(p.name for p in Path(final).iterdir())
    assert {"lora.safetensors", "ema.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng_rank0.pt",
            "state.json"} <= set(names)
    for n in names:
        assert f"{tmp}/{n}" in before, n
    assert tmp in before and before.index(tmp) > max(before.index(f"{tmp}/{n}") for n in names)  # files, then folder
    assert ("fsync", str(folder)) in events[i + 1:]  # the rename itself made durable
    # write_json_atomic: the temporary file is fsynced before each rename over status.json / state.json
    json_replaces = [k for k, e in enumerate(events) if e[0] == "replace" and e[2].endswith(".json")]
    assert json_replaces
    for k in json_replaces:
        src = events[k][1]
        last = [e for e in events[:k] if src in e[1:]][-1]
        assert last == ("fsync", src), (events[k], last)


def test_fsync_tree_order_and_manifest(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"12345")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"1")
    seen = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    C.fsync_tree(tmp_path / "d")
    d = str(tmp_path / "d")
    assert sorted(seen[:2]) == [f"{d}/a.bin", f"{d}/sub/b.bin"] and seen[2:] == [f"{d}/sub", d]
    sizes = C.file_sizes(tmp_path / "d")
    assert sizes == {"a.bin": 5}
    C.verify_files(tmp_path / "d", sizes)
    (tmp_path / "d" / "a.bin").write_bytes(b"123")
    with pytest.raises(C.CheckpointError, match="a.bin has 3 bytes"):
        C.verify_files(tmp_path / "d", sizes)
    with pytest.raises(C.CheckpointError, match="c.bin is missing"):
        C.verify_files(tmp_path / "d", {"c.bin": 1})


def test_one_checkpoint_folder_helper_for_trainer_and_app(tmp_path):
    from cdlab.train import trainer
    from cdlab.ui import runs as R

    assert trainer.list_checkpoints is C.list_checkpoints and R.latest_checkpoint is C.latest_checkpoint
    ck = tmp_path / "checkpoints"
    for name in ("ckpt_000010", "ckpt_000200", ".tmp-ckpt_000300", ".old-ckpt_000001", ".bad-ckpt_000400"):
        (ck / name).mkdir(parents=True)
    (ck / "ckpt_000010" / "state.json").write_text("{}")
    (ck / "ckpt_000500").write_text("")  # a file, not a folder
    assert C.list_checkpoints(tmp_path) == [(10, ck / "ckpt_000010")]
    assert C.list_checkpoints(tmp_path, complete=False) == [(10, ck / "ckpt_000010"), (200, ck / "ckpt_000200")]
    assert R.latest_checkpoint(tmp_path) == ck / "ckpt_000200"
    assert C.latest_checkpoint(tmp_path, complete=True) == ck / "ckpt_000010"
    assert C.latest_checkpoint(tmp_path / "nothing") is None and C.list_checkpoints(tmp_path / "nothing") == []


def test_checkpoints_module_and_ui_runs_stay_light():
    # checkpoints.py loads with torch blocked; the app's runs module does not pull in the trainer
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('ck', {str(REPO / 'cdlab/train/checkpoints.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.CKPT_RE.match('ckpt_000001')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    code = ("import sys, cdlab.ui.runs\n"
            "heavy = [m for m in ('cdlab.train.trainer', 'accelerate', 'diffusers', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
