"""Compare benchmarks on the tiny teacher.

    OMP_NUM_THREADS=2 python -m cdlab.ui.bench [--model tiny] [--repeats 5]      # one request's latency
    python -m cdlab.ui.bench load [--requests 30] [--columns 5] [--train] [--client-nice 19]   # a classroom at once
    python -m cdlab.ui.bench load --section flow         # the same on the flow-matching section (a class a request)
    python -m cdlab.ui.bench exit [--repeats 3]          # how long the app and a trainer take to end (cdlab.shutdown)

``bench_compare``: teacher-50 (CFG), teacher-4 and 3 students, 4 student steps, on 2 CPU cores; targets
(issue 11): a cold five-column request <= 1.2 s median; teacher-50 / student-4 >= 13x; <= 0.3 s when only
the student steps or columns change (the teacher columns are cached).

``bench_load``: the launched app (``python app.py``, a subprocess) gets ``requests`` concurrent Compare
requests (different prompts and seeds) through gradio_client, beside one training run with ``--train``; each
streams its columns (students first). Prints, from one run, how many were served, the p50 / p95 of the seconds
from submission to the first student's image and to the last column, and the worst request's teacher-50 ÷
student time per image. Targets (issue 23): 30/30 served, first student p95 <= 3 s, last column p95 <= 15 s,
worst request >= 13x.

Students are random LoRAs (speed does not depend on their weights) in a scratch adapters folder
(`make_random_students`; ``--section flow``: copies of the shipped flow students), and the launched app runs on
scratch folders (`serve_app`); the client and browser tests run against the same.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import torch
from gradio_client import Client

from cdlab.columns import TEACHER_4, TEACHER_50
from cdlab.flow.data import CLASS_NAMES
from cdlab.flow.pipeline import FLOW_GUIDANCE
from cdlab.paths import FLOW_ID, REPO_ROOT, TINY_ID, read_json
from cdlab.prompts import tiny_prompts
from cdlab.students import StudentCard, attach_lora, list_students, save_student, student_dir
from cdlab.teachers import load_teacher
from cdlab.tiny.architecture import build_pipeline
from cdlab.ui.compare import Comparer


# ----------------------------------------------------------------------------- what the benchmarks run against

def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_env(workdir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` with cdlab's working folders (runs, adapters, evals, data, cache) under ``workdir``, the first
    four made, offline, then ``env`` on top: what `serve_app`'s app and `bench_exit`'s trainer run in."""
    workdir = Path(workdir)
    for d in ("runs", "adapters", "evals", "data"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "CDLAB_RUNS_DIR": str(workdir / "runs"), "CDLAB_ADAPTERS_DIR": str(workdir / "adapters"),
            "CDLAB_EVALS_DIR": str(workdir / "evals"), "CDLAB_DATA_DIRS": str(workdir / "data"),
            "CDLAB_CACHE_DIR": str(workdir / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


@contextlib.contextmanager
def serve_app(model: str, workdir: Path, timeout: float = 120.0, env: dict[str, str] | None = None,
              command: list[str] | None = None) -> Iterator[str]:
    """Run ``python app.py --model MODEL`` with runs/adapters/evals/data/cache under ``workdir``; yield its URL.
    Leaving the ``with`` block stops it as a host does: SIGTERM, then waiting for its end.

    What `bench_load` measures against, and what the client and browser tests drive. ``command``: what runs in
    place of ``[python, app.py]`` (`bench_exit`'s variant of the app's ``__main__``), given the same arguments.

    The server's output goes to ``workdir/server.log``; a server that dies or never answers raises
    ``RuntimeError`` with that log's tail.
    """
    workdir = Path(workdir)
    full_env = scratch_env(workdir, env)
    port = free_port()
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*(command or [sys.executable, str(REPO_ROOT / "app.py")]), "--model", model,
                                 "--port", str(port)],
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


# ----------------------------------------------------------------------------- the benchmarks

def bench_compare(model: str = "tiny", repeats: int = 5, n_students: int = 3) -> dict:
    """One Compare request through `Comparer.run` (the app's path): five columns, 4 student steps.

    - ``cold``: a new seed each time, so nothing is cached: median / min / max seconds over ``repeats``;
    - ``ratio``: teacher-50's column time ÷ each student column's, per request, median over the cold runs
      (target: >= 13, a student column costs what a plain UNet costs);
    - ``warm_steps`` / ``warm_students``: the same prompt, seed and guidance again with only the student
      steps changed, or only the student columns: the teacher columns come from the cache (target <= 0.3 s).
    """
    teacher = load_teacher(model)
    with tempfile.TemporaryDirectory(prefix="cdlab-bench-adapters-") as d:  # the random students, removed after
        return _bench_compare(teacher, Path(d), repeats, n_students)


def _bench_compare(teacher: Any, root: Path, repeats: int, n_students: int) -> dict:
    names = make_random_students(teacher.base_id, root, n=n_students)
    cmp = Comparer(teacher, adapters_root=root, batching=False)
    cols = [TEACHER_50, TEACHER_4, *names]
    prompt = "a large yellow triangle at the top right on a gray background"
    cmp.run(prompt, 10_000, 3.0, 4, cols)  # warm-up: loads the adapters onto the UNet
    cold, ratios, last = [], [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        last = cmp.run(prompt, i, 3.0, 4, cols)
        cold.append(time.perf_counter() - t0)
        t50 = last.columns[0].seconds
        ratios.append(statistics.median(t50 / c.seconds for c in last.columns[2:]))
    warm_steps, warm_students = [], []
    for i in range(repeats):
        cmp.run(prompt, 100 + i, 3.0, 4, cols)  # fills the cache for this seed
        t0 = time.perf_counter()
        cmp.run(prompt, 100 + i, 3.0, 2, cols)  # only the student steps changed
        warm_steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cmp.run(prompt, 100 + i, 3.0, 2, cols[:3])  # only the student columns changed
        warm_students.append(time.perf_counter() - t0)
    return {"teacher": teacher.describe(), "columns": len(cols), "median_s": statistics.median(cold),
            "min_s": min(cold), "max_s": max(cold), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "warm_steps_s": statistics.median(warm_steps),
            "warm_students_s": statistics.median(warm_students),
            "per_column_s": {c.label: round(c.seconds, 4) for c in last.columns}}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _speedups(table: dict, students: list[str]) -> list[float]:
    """The students' measured speed-ups vs teacher-50 (per image) in a /compare timings table."""
    out = []
    for label, _, _, speedup in table.get("data", []):
        if any(label.startswith(f"{n} (") for n in students) and isinstance(speedup, str) and speedup[:1].isdigit():
            out.append(float(speedup.rstrip("×")))
    return out


def watch_compares(jobs: list, students: list[str], timeout: float = 600.0, poll_s: float = 0.02) -> list[dict]:
    """Follow streamed /compare jobs (``gradio_client`` ``Job``s, submitted at ``job.t0``): per job, ``first_student``
    (seconds until an update showed a student's image), ``last`` (until the whole result), ``updates``, ``order``
    (column labels in the order they arrived), ``speedups`` (the students', from the final table) and ``error``."""
    seen = [dict(first_student=None, last=None, updates=0, order=[], speedups=[], error="") for _ in jobs]
    end = time.perf_counter() + timeout
    while time.perf_counter() < end and not all(r["last"] is not None or r["error"] for r in seen):
        for job, r in zip(jobs, seen):
            if r["last"] is not None or r["error"]:
                continue
            outs, now = job.outputs(), time.perf_counter() - job.t0
            for out in outs[r["updates"]:]:
                labels = [row[0] for row in out[2].get("data", [])]
                r["order"] += [x for x in labels if x not in r["order"]]
                if r["first_student"] is None and any(x not in (TEACHER_50, TEACHER_4) for x in labels):
                    r["first_student"] = now
            r["updates"] = len(outs)
            if job.done():
                try:
                    r["speedups"] = _speedups(job.result()[2], students)
                    r["last"] = time.perf_counter() - job.t0
                except Exception as e:  # counted as failed, with its reason
                    r["error"] = f"{type(e).__name__}: {e}"
        time.sleep(poll_s)
    return seen


def _start_training(url: str, work: Path, train_steps: int) -> tuple[Client, str, Path]:
    """One training run in the app, stepping before this returns: ``(its client, owner token, run folder)``."""
    boss = Client(url, verbose=False)
    extra = ('{"max_steps": %d, "data_size": 32, "log_every": 5, "preview_every": 0, "batch_size": 8, '
             '"checkpoint_every": 1000, "probe_size": 4}' % train_steps)
    _, owner = boss.predict(method="mbcd", num_boundaries=4, lora_rank=4, lr=1e-3, max_steps=train_steps,
                            batch_size=8, guidance=3.0, guidance_max=3.0, preview_every=0,
                            student_name="load-student", data_kind="tiny world", data_path="",
                            extra_config=extra, overwrite=False, owner="", api_name="/train_start")
    run = next(p for p in (work / "runs").iterdir() if p.is_dir())  # not runs/.app-secret, .trainer.lock
    end = time.time() + 120
    while time.time() < end:  # until the trainer is really stepping
        st = read_json(run / "status.json") or {}
        if st.get("state") == "running" and int(st.get("step") or 0) >= 1:
            break
        time.sleep(0.5)
    return boss, owner, run


def bench_load(requests: int = 30, columns: int = 5, train: bool = False, model: str = "tiny",
               workdir: Path | None = None, train_steps: int = 20_000,  # 20_000: the app's cap, APP_LIMITS
               client_nice: int = 0, url: str | None = None, guidance: float | None = None,
               section: str = "main") -> dict:
    """``requests`` concurrent Compare requests (and, with ``train``, one training run) against the launched app.

    Each request streams its columns (students first); returns served/failed counts, the seconds from submission
    to the first student's image and to the last column (p50 / p95 / max), the students' speed-up vs teacher-50
    (per request the median over its students; the worst request), and the training run's state meanwhile.

    ``client_nice``: once the app runs, this process (the 30 clients) lowers its CPU priority by this much
    (``os.nice``; the threads it starts afterwards inherit it). In a classroom each student's browser is on its own
    machine; here the clients share the app's cores, and gradio_client wakes two threads per job every 50 ms.
    The command line uses 19; a test calling this from pytest keeps 0 (the worker would stay reniced).

    ``url``: an app already serving ``workdir`` on ``model``'s base (a test's own app, so it is not launched twice);
    by default this launches ``python app.py --model MODEL`` on ``workdir`` and stops it afterwards.

    ``guidance``: the requests' CFG scale (the teacher columns at two UNet passes a step; 1: one). Default: 5 on
    the main section, the flow teacher's own (``FLOW_GUIDANCE``) on the flow section.

    ``section``: ``"main"``, the page's Compare on ``model`` (random students, the tiny world's prompts), or
    ``"flow"``, the flow-matching section's Compare beside it (``/flow_compare``: a class name for a prompt, the
    shipped flow students, copied into ``workdir``, the 4-step ones first).
    """
    if section not in ("main", "flow"):
        raise ValueError(f"section must be 'main' or 'flow', got {section!r}")
    if workdir is None:  # a temporary app folder (its students, runs and caches), removed afterwards
        with tempfile.TemporaryDirectory(prefix="cdlab-load-", ignore_cleanup_errors=True) as d:
            return bench_load(requests, columns, train, model, Path(d), train_steps, client_nice, url, guidance,
                              section)
    work = Path(workdir)
    if section == "flow":
        names, prompts, api = _flow_students(work / "adapters", columns - 2), list(CLASS_NAMES), "/flow_compare"
        guidance = FLOW_GUIDANCE if guidance is None else guidance
    else:
        names, prompts, api = make_random_students(TINY_ID, work / "adapters", n=max(0, columns - 2)), \
            tiny_prompts(requests), "/compare"
        guidance = 5.0 if guidance is None else guidance
    cols = ([TEACHER_50, TEACHER_4] + names)[:columns]
    out: dict = {"requests": requests, "columns": len(cols), "train": train, "section": section}
    with (contextlib.nullcontext(url) if url else serve_app(model, work)) as url:
        if train:
            boss, owner, run = _start_training(url, work, train_steps)
        if client_nice:
            os.nice(client_nice)  # the app (started before) keeps its priority; threads started from here inherit it
        out["client_nice"] = os.nice(0)
        # Results as the page gets them: JSON with file URLs (a browser fetches the images it shows; the
        # client does not download every gallery image and PNG here, which would time the client, not the app).
        client = Client(url, verbose=False, download_files=False)
        t0 = time.perf_counter()
        jobs = []
        for i in range(requests):
            job = client.submit(prompt=prompts[i % len(prompts)], seed=1000 + i, guidance=guidance, steps="4",
                                columns=cols, show_trajectory=False, api_name=api)
            job.t0 = time.perf_counter()
            jobs.append(job)
        seen = watch_compares(jobs, names)
        out["wall_s"] = time.perf_counter() - t0
        if train:
            status = json.loads((run / "status.json").read_text())
            out["training_state"], out["training_step"] = status.get("state"), status.get("step")
            boss.predict(run.name, owner, api_name="/train_stop")
    ok = [r for r in seen if r["last"] is not None]
    lat, first = [r["last"] for r in ok], [r["first_student"] for r in ok if r["first_student"] is not None]
    ratios = [statistics.median(r["speedups"]) for r in ok if r["speedups"]]
    out.update(served=len(ok), failed=requests - len(ok), errors=[r["error"] for r in seen if r["error"]][:3],
               p50_s=percentile(lat, 50), p95_s=percentile(lat, 95), max_s=max(lat, default=float("nan")),
               first_p50_s=percentile(first, 50), first_p95_s=percentile(first, 95),
               students_first=sum(1 for r in ok if r["order"] and r["order"][-1] == TEACHER_50),
               ratio_worst=min(ratios, default=float("nan")), ratio_median=percentile(ratios, 50),
               updates=sum(r["updates"] for r in ok))
    return out


def _flow_students(root: Path, n: int) -> list[str]:
    """Copy ``n`` of the shipped flow students (the 4-step ones first, then by name) into ``root``; their names."""
    shipped = sorted(list_students(root=REPO_ROOT / "adapters", base_model=FLOW_ID),
                     key=lambda c: (c.steps != 4, c.name))
    names = [c.name for c in shipped[:max(0, n)]]
    for name in names:
        shutil.copytree(student_dir(name, REPO_ROOT / "adapters"), root / name, dirs_exist_ok=True)
    return names


# ----------------------------------------------------------------------------- how a process ends

# The app's and a trainer's __main__ as they were (``sys.exit``) and as they are (`cdlab.shutdown.exit`): each child
# runs the command's own main, then ends the way {end} names; the trainer's prints when its main has returned.
# (Both run with the repository as their folder, which ``python -c`` puts first on sys.path.)
_APP_CHILD = "import sys; import app; from cdlab import shutdown; {end}(app.main(sys.argv[1:]))"
_TRAINER_CHILD = ("import sys, time; from cdlab import shutdown; from cdlab.__main__ import main; "
                  "rc = main(sys.argv[1:]); "
                  "print('cdlab-returned', time.monotonic(), file=sys.stderr, flush=True); {end}(rc)")
_ENDS = ("sys.exit", "shutdown.exit")


def bench_exit(repeats: int = 3) -> dict:
    """Seconds a process takes to end, ``sys.exit`` against `cdlab.shutdown.exit`, the two alternating, ``repeats``
    times each: the app (tiny teacher, one thread) from its SIGTERM to its end (leaving `serve_app`), and a
    one-step trainer (``python -m cdlab train --model tiny --max_steps 1``) from its main's return to its end.
    Returns ``{"app": {way: [seconds, ...]}, "trainer": {...}}``."""
    out: dict[str, dict[str, list[float]]] = {"app": {w: [] for w in _ENDS}, "trainer": {w: [] for w in _ENDS}}
    env = {"OMP_NUM_THREADS": "1"}
    for i, way in enumerate(_ENDS * repeats):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            command = [sys.executable, "-c", _APP_CHILD.format(end=way)]
            with serve_app("tiny", work, env=env, command=command):
                t0 = time.monotonic()
            out["app"][way].append(time.monotonic() - t0)
            proc = subprocess.run([sys.executable, "-c", _TRAINER_CHILD.format(end=way), "train", "--model", "tiny",
                                   "--max_steps", "1", "--data_size", "16", "--batch_size", "4", "--preview_every", "0",
                                   "--probe_size", "2", "--run_name", f"exit-{i}", "--student_name", f"exit-{i}"],
                                  env=scratch_env(work, env), cwd=str(REPO_ROOT), capture_output=True, text=True,
                                  timeout=300)
            end = time.monotonic()
            returned = [line for line in proc.stderr.splitlines() if line.startswith("cdlab-returned ")]
            if proc.returncode != 0 or not returned:
                raise RuntimeError(f"the trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            out["trainer"][way].append(end - float(returned[-1].split()[1]))
    return out


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["load"]:
        p = argparse.ArgumentParser(prog="python -m cdlab.ui.bench load", description=bench_load.__doc__.splitlines()[0])
        p.add_argument("--requests", type=int, default=30)
        p.add_argument("--columns", type=int, default=5)
        p.add_argument("--train", action="store_true", help="one training run beside the requests")
        p.add_argument("--client-nice", type=int, default=19, help="lower the clients' CPU priority by this much "
                       "once the app runs (in a classroom the browsers are on other machines; 0: compete)")
        p.add_argument("--section", choices=("main", "flow"), default="main",
                       help="the page's Compare (main) or the flow-matching section's (flow: a class, the shipped "
                       "flow students)")
        a = p.parse_args(argv[1:])
        r = bench_load(a.requests, a.columns, train=a.train, client_nice=a.client_nice, section=a.section)
        print(f"{r['requests']} concurrent {'flow ' if a.section == 'flow' else ''}Compare requests, "
              f"{r['columns']} columns each, streamed; "
              f"clients at nice {r['client_nice']}, the app at its own priority"
              + (f", beside a training run ({r['training_state']} at step {r['training_step']})" if r["train"] else ""))
        print(f"served {r['served']}/{r['requests']}, failed {r['failed']}; wall {r['wall_s']:.2f} s; "
              f"{r['updates']} updates; teacher-50 arrived last in {r['students_first']}/{r['served']}")
        print(f"first student image: p50 {r['first_p50_s']:.2f} s, p95 {r['first_p95_s']:.2f} s (target <= 3 s)")
        print(f"last column: p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, max {r['max_s']:.2f} s "
              f"(target p95 <= 15 s)")
        print(f"teacher-50 / student per image: worst request {r['ratio_worst']:.1f}x, median "
              f"{r['ratio_median']:.1f}x (target worst >= 13x)")
        for e in r["errors"]:
            print("  error:", e)
        return 0 if r["failed"] == 0 else 1
    if argv[:1] == ["exit"]:
        p = argparse.ArgumentParser(prog="python -m cdlab.ui.bench exit",
                                    description=bench_exit.__doc__.splitlines()[0])
        p.add_argument("--repeats", type=int, default=3)
        a = p.parse_args(argv[1:])
        if not 1 <= a.repeats <= 20:
            p.error(f"--repeats must be 1 to 20, got {a.repeats}")
        r = bench_exit(a.repeats)
        for what, label in (("app", "the app, SIGTERM to its end"),
                            ("trainer", "a trainer, its main's return to its end")):
            plain, fast = (statistics.median(r[what][w]) for w in _ENDS)
            print(f"{label}: sys.exit median {plain:.2f} s, shutdown.exit median {fast:.2f} s "
                  f"({plain / fast:.1f}x; each of {len(r[what][_ENDS[0]])} runs: "
                  + ", ".join(f"{w} {' '.join(f'{x:.2f}' for x in r[what][w])}" for w in _ENDS) + ")")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    r = bench_compare(args.model, args.repeats)
    print(f"{r['teacher']} · torch threads {torch.get_num_threads()} · {r['columns']} columns · {args.repeats} repeats")
    print(f"cold Compare request: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}); "
          f"target <= 1.2 s")
    print(f"teacher-50 / student-4 column time: median {r['ratio_median']:.1f}x (worst request "
          f"{r['ratio_min']:.1f}x); target >= 13x")
    print(f"only the student steps changed: median {r['warm_steps_s']:.3f} s; only the student columns changed: "
          f"median {r['warm_students_s']:.3f} s; target <= 0.3 s")
    for k, v in r["per_column_s"].items():
        print(f"  {k:28s} {v:.3f} s")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
