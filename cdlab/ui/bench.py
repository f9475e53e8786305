"""Compare benchmarks on the tiny teacher.

    OMP_NUM_THREADS=2 python -m cdlab.ui.bench [--model tiny] [--repeats 5]      # one request's latency
    python -m cdlab.ui.bench load [--requests 20] [--columns 5] [--train]       # many users at once

``bench_compare``: teacher-50 (CFG), teacher-4 and 3 students, 4 student steps; target on 2 CPU cores:
one Compare request returns in 3 s or less (median, after one warm-up).

``bench_load``: the launched app (``python app.py``, a subprocess) gets one training run and ``requests``
concurrent Compare requests (different prompts and seeds) through gradio_client; prints how many were
served and failed, and the p50 / p95 / max latency from submission to result.

Students are random LoRAs (speed does not depend on their weights) in a scratch adapters folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def bench_compare(model: str = "tiny", repeats: int = 5, n_students: int = 3) -> dict:
    """Seconds per Compare request (median, min, max over ``repeats`` after a warm-up) and per column."""
    from cdlab.teachers import load_teacher
    from cdlab.ui.compare import TEACHER_4, TEACHER_50, Comparer
    from cdlab.ui.testing import make_random_students

    teacher = load_teacher(model)
    root = Path(tempfile.mkdtemp(prefix="cdlab-bench-adapters-"))
    names = make_random_students(teacher.base_id, root, n=n_students)
    cmp = Comparer(teacher, adapters_root=root)
    cols = [TEACHER_50, TEACHER_4, *names]
    prompt = "a small red circle at the top left on a blue background"
    cmp.run(prompt, 0, 3.0, 4, cols)  # warm-up: loads the adapters onto the UNet
    times, last = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        last = cmp.run(prompt, i, 3.0, 4, cols)
        times.append(time.perf_counter() - t0)
    return {"teacher": teacher.describe(), "columns": len(cols), "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times),
            "per_column_s": {c.label: round(c.seconds, 4) for c in last.columns}}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bench_load(requests: int = 20, columns: int = 5, train: bool = True, model: str = "tiny",
               workdir: Path | None = None, train_steps: int = 100_000) -> dict:
    """``requests`` concurrent Compare requests (and, with ``train``, one training run) against the launched app.

    Returns served/failed counts, latencies (seconds from submission to result) and the training run's
    state while the requests ran.
    """
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from cdlab.teachers import TINY_ID
    from cdlab.ui.compare import TEACHER_4, TEACHER_50, tiny_prompts
    from cdlab.ui.runs import read_json
    from cdlab.ui.testing import make_random_students, serve_app

    work = Path(workdir or tempfile.mkdtemp(prefix="cdlab-load-"))
    names = make_random_students(TINY_ID, work / "adapters", n=max(0, columns - 2))
    cols = ([TEACHER_50, TEACHER_4] + names)[:columns]
    prompts = tiny_prompts(requests)
    out: dict = {"requests": requests, "columns": len(cols), "train": train}
    with serve_app(model, work) as url:
        owner = None
        if train:
            boss = Client(url, verbose=False)
            extra = ('{"max_steps": %d, "data_size": 32, "log_every": 5, "preview_every": 0, "batch_size": 8, '
                     '"checkpoint_every": 1000, "probe_size": 4}' % train_steps)
            _, _, owner = boss.predict(method="mbcd", num_boundaries=4, lora_rank=4, lr=1e-3, max_steps=train_steps,
                                       batch_size=8, guidance=3.0, guidance_max=3.0, preview_every=0,
                                       student_name="load-student", data_kind="tiny world", data_path="",
                                       extra_config=extra, overwrite=False, owner="", api_name="/train_start")
            run = next((work / "runs").iterdir())
            end = time.time() + 120
            while time.time() < end:  # until the trainer is really stepping
                st = read_json(run / "status.json") or {}
                if st.get("state") == "running" and int(st.get("step") or 0) >= 1:
                    break
                time.sleep(0.5)
        client = Client(url, verbose=False)

        def one(i: int) -> tuple[bool, float, str]:
            t0 = time.perf_counter()
            try:
                client.predict(prompts[i % len(prompts)], 1000 + i, 5.0, "4", cols, False, api_name="/compare")
                return True, time.perf_counter() - t0, ""
            except Exception as e:  # counted as failed, with its reason
                return False, time.perf_counter() - t0, f"{type(e).__name__}: {e}"

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=requests) as pool:
            results = list(pool.map(one, range(requests)))
        out["wall_s"] = time.perf_counter() - t0
        if train:
            status = json.loads((run / "status.json").read_text())
            out["training_state"], out["training_step"] = status.get("state"), status.get("step")
            boss.predict(run.name, owner, api_name="/train_stop")
    lat = [s for ok, s, _ in results if ok]
    out.update(served=len(lat), failed=sum(not ok for ok, _, _ in results),
               errors=[e for ok, _, e in results if not ok][:3],
               p50_s=percentile(lat, 50), p95_s=percentile(lat, 95), max_s=max(lat, default=float("nan")))
    return out


def main(argv=None) -> int:
    import torch

    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv[:1] == ["load"]:
        p = argparse.ArgumentParser(prog="python -m cdlab.ui.bench load", description=bench_load.__doc__.splitlines()[0])
        p.add_argument("--requests", type=int, default=20)
        p.add_argument("--columns", type=int, default=5)
        p.add_argument("--no-train", action="store_true")
        a = p.parse_args(argv[1:])
        r = bench_load(a.requests, a.columns, train=not a.no_train)
        print(f"{r['requests']} concurrent Compare requests, {r['columns']} columns each"
              + (f", beside a training run ({r['training_state']} at step {r['training_step']})" if r["train"] else ""))
        print(f"served {r['served']}/{r['requests']}, failed {r['failed']}; latency p50 {r['p50_s']:.2f} s, "
              f"p95 {r['p95_s']:.2f} s, max {r['max_s']:.2f} s; wall {r['wall_s']:.2f} s")
        for e in r["errors"]:
            print("  error:", e)
        return 0 if r["failed"] == 0 else 1
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    r = bench_compare(args.model, args.repeats)
    print(f"{r['teacher']} · torch threads {torch.get_num_threads()} · {r['columns']} columns")
    print(f"Compare request: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}); target <= 3 s")
    for k, v in r["per_column_s"].items():
        print(f"  {k:28s} {v:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
