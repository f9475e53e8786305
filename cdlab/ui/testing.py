"""Serving the app in a subprocess for the client and browser tests and the screenshot script."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(model: str, workdir: Path, timeout: float = 120.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``python app.py --model MODEL`` with runs/adapters/evals/data/cache under ``workdir``; yield its URL.

    The server's output goes to ``workdir/server.log``; a server that dies or never answers raises
    ``RuntimeError`` with that log's tail.
    """
    from cdlab.paths import REPO_ROOT

    workdir = Path(workdir)
    for d in ("runs", "adapters", "evals", "data"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {**os.environ, "CDLAB_RUNS_DIR": str(workdir / "runs"), "CDLAB_ADAPTERS_DIR": str(workdir / "adapters"),
                "CDLAB_EVALS_DIR": str(workdir / "evals"), "CDLAB_DATA_DIRS": str(workdir / "data"),
                "CDLAB_CACHE_DIR": str(workdir / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--model", model, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                cwd=str(REPO_ROOT), start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.time() > end:
                    raise RuntimeError(f"the app did not answer within {timeout:g} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_random_students(base_id: str, root: Path, n: int = 3, rank: int = 4) -> list[str]:
    """``n`` students with random LoRA weights for ``base_id`` under ``root`` (tests, benchmarks, demos)."""
    import torch

    from cdlab.students import StudentCard, attach_lora, save_student
    from cdlab.tiny.architecture import build_pipeline

    names = []
    methods = [("cd", 1), ("mbcd", 4), ("ct", 4), ("mbcd", 2)]
    for i in range(n):
        method, k = methods[i % len(methods)]
        pipe = build_pipeline(seed=0)
        attach_lora(pipe.unet, rank=rank)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pipe.unet.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        name = f"random-{method}-{i}"
        save_student(pipe.unet, name, StudentCard(name=name, base_model=base_id, method=method, num_boundaries=k,
                                                  steps=4), root=root, overwrite=True)
        names.append(name)
    return names
