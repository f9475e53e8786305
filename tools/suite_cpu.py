"""Where the test suite's CPU goes: each test's wall time and the CPU of every process it ran, by kind.

    PYTHONPATH=tools python -m pytest -p suite_cpu -q            # writes suite-cpu-<worker>.json (CDLAB_SUITE_CPU_DIR, else .)
    python tools/suite_cpu.py suite-cpu-*.json                   # the report

A pytest plugin (loaded with ``-p``; the suite does not load it): in each worker a thread samples, every 0.2 s,
the CPU time (user + system) of the worker and of every process below it (a served app, a trainer, Chromium and
Playwright's driver), and adds each process's growth since the last sample to the test running then. A process
that ends between two samples loses at most its last 0.2 s. The report prints, per worker, the tests' wall time
beside their CPU; per unit (``tests/conftest.py``'s ``xdist_unit``) and per test, the CPU and its split by kind.
Two workers whose CPU adds up to about twice the wall are running a CPU-bound suite: what shortens it is less
work, not more overlap.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

INTERVAL = 0.2
KINDS = (("chrom", "chromium"), ("app.py", "app"), ("cdlab train", "trainer"), ("cdlab.train", "trainer"),
         ("cdlab.flow", "trainer"), ("playwright", "playwright"), ("node", "playwright"))


def _kind(cmdline: str) -> str:
    return next((kind for needle, kind in KINDS if needle in cmdline), "other")


class _Sampler:
    def __init__(self) -> None:
        self.current = "<between tests>"
        self.cpu: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wall: dict[str, float] = defaultdict(float)

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        last: dict[tuple, float] = {}
        kinds: dict[tuple, str] = {}
        while True:
            try:
                procs = [me] + me.children(recursive=True)
            except psutil.Error:
                procs = [me]
            test = self.current
            for p in procs:
                try:
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
                    if key not in kinds:
                        kinds[key] = "worker" if p.pid == me.pid else _kind(" ".join(p.cmdline()))
                except psutil.Error:
                    continue
                used = t.user + t.system
                self.cpu[test][kinds[key]] += used - last.get(key, 0.0)
                last[key] = used
            time.sleep(INTERVAL)


_sampler = _Sampler()


def pytest_configure(config) -> None:
    threading.Thread(target=_sampler.run, name="suite-cpu", daemon=True).start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _sampler.current = item.nodeid
    t0 = time.perf_counter()
    yield
    _sampler.wall[item.nodeid] += time.perf_counter() - t0
    _sampler.current = "<between tests>"


def pytest_sessionfinish(session) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if not _sampler.wall:
        return  # the xdist controller (its workers write theirs), or nothing ran
    out = Path(os.environ.get("CDLAB_SUITE_CPU_DIR", ".")) / f"suite-cpu-{worker}.json"
    out.write_text(json.dumps({"worker": worker, "wall": _sampler.wall,
                               "cpu": {t: dict(k) for t, k in _sampler.cpu.items()}}))


# --------------------------------------------------------------------------------------------------- the report


def report(paths: list[Path], top: int = 30) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import xdist_unit  # the scheduler's own grouping

    tests: list[tuple[float, float, dict, str]] = []
    for path in paths:
        d = json.loads(path.read_text())
        wall, cpu = d["wall"], d["cpu"]
        total = sum(sum(k.values()) for k in cpu.values())
        print(f"{d['worker']}: tests' wall {sum(wall.values()):.1f} s, CPU of its processes {total:.1f} s "
              f"({total - sum(sum(cpu.get(t, {}).values()) for t in wall):.1f} s of it between tests)")
        tests += [(sum(cpu.get(t, {}).values()), w, cpu.get(t, {}), t) for t, w in wall.items()]
    kinds = sorted({k for *_, by, _t in tests for k in by})
    units: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_kind: dict[str, float] = defaultdict(float)
    for c, w, by, t in tests:
        units[xdist_unit(t)][0] += w
        units[xdist_unit(t)][1] += c
        for k, v in by.items():
            by_kind[k] += v
    print("CPU by kind of process: " + ", ".join(f"{k} {by_kind[k]:.1f} s" for k in kinds))
    print("\nunits, most CPU first: wall s, CPU s")
    for u, (w, c) in sorted(units.items(), key=lambda x: -x[1][1]):
        print(f"  {w:7.1f} {c:7.1f}  {u}")
    print(f"\ntests, most CPU first (the {top} first): wall s, CPU s, by kind")
    for c, w, by, t in sorted(tests, key=lambda x: -x[0])[:top]:
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items(), key=lambda x: -x[1]) if v >= 0.1)
        print(f"  {w:6.1f} {c:6.1f}  {t}  [{split}]")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip())
        raise SystemExit(2)
    report([Path(p) for p in sys.argv[1:]])
