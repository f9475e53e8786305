"""The trainer as a process: data parallel under torchrun (2 CPU ranks, gloo), SIGTERM, kill -9 and resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdlab.train import cli
from cdlab.train.trainer import list_checkpoints

COMMON = ["--data_size", "48", "--batch_size", "8", "--lora_rank", "4", "--preview_every", "0", "--probe_size", "8",
          "--warmup_steps", "0", "--lr", "3e-3"]


def _steps(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in f.read_text().splitlines()] if f.is_file() else []


def _wait_for_step(proc, run: Path, step: int, timeout: float = 90.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if _steps(run) and _steps(run)[-1] >= step:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def test_data_parallel_two_cpu_ranks_stay_in_sync(tiny_pipe_dir, tmp_path, child_env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cdlab", "train", "--model", tiny_pipe_dir, "--run_name", "ddp", "--student_name", "ddp-test",
           "--max_steps", "10", "--log_every", "2", "--checkpoint_every", "5", "--cache_dir", str(tmp_path / "cache"),
           # A random teacher's CFG at the tiny profile's w=5 makes 10 steps too noisy to show a trend.
           "--guidance", "3.0", *COMMON]
    proc = subprocess.run(cmd, env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]  # one writer: rank 0
    assert rows[-1]["probe_loss"] < 0.95 * rows[0]["probe_loss"]  # the fixed-batch loss falls
    for step, ckpt in list_checkpoints(run):
        r0 = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
        r1 = torch.load(ckpt / "rng_rank1.pt", weights_only=True)
        assert torch.equal(r0["lora_sums"], r1["lora_sums"]), f"ranks diverged by step {step}"
        assert not torch.equal(r0["data_gen"], r1["data_gen"])  # ...while drawing different batches
    card = json.loads((tmp_path / "adapters" / "ddp-test" / "card.json").read_text())
    assert card["metrics"]["samples_seen"] == 10 * 8 * 2


def test_sigterm_stops_cleanly_and_kill_9_loses_at_most_one_interval(tiny_pipe_dir, tmp_path, child_env, monkeypatch):
    run = tmp_path / "runs" / "crash"
    base = [sys.executable, "-m", "cdlab", "train", "--log_every", "1", "--checkpoint_every", "3",
            "--cache_dir", str(tmp_path / "cache"), *COMMON]
    # 1. SIGTERM: a checkpoint at the current step, state "stopped", exit 0, no student yet
    proc = subprocess.Popen(base + ["--model", tiny_pipe_dir, "--run_name", "crash", "--student_name", "crash-test",
                                    "--max_steps", "100000"],
                            env=child_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped"
    assert list_checkpoints(run)[-1][0] == status["step"] == _steps(run)[-1]
    assert not (tmp_path / "adapters" / "crash-test").exists()
    # 2. resume, then kill -9 mid-run
    proc = subprocess.Popen(base + ["--resume", str(run)], env=child_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, status["step"] + 7)
    proc.kill()
    proc.wait(timeout=30)
    last = _steps(run)[-1]
    newest = list_checkpoints(run)[-1][0]
    assert 0 <= last - newest <= 3  # at most one checkpoint interval lost
    # 3. resume in-process to the end: the metrics are one contiguous run
    monkeypatch.setenv("CDLAB_RUNS_DIR", child_env["CDLAB_RUNS_DIR"])
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", child_env["CDLAB_ADAPTERS_DIR"])
    assert cli.main(["--resume", str(run), "--max_steps", str(last + 2)]) == 0
    assert _steps(run) == list(range(1, last + 3))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (tmp_path / "adapters" / "crash-test" / "card.json").is_file()
