"""Shared fixtures: a tiny random SD pipeline saved with ``save_pretrained`` (the same folder layout
and loading path as SD1.5), for tests that need a pipeline but not the trained embedded teacher."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs two workers (pytest-xdist, one per core): one CPU thread each, for torch in the workers
    # and in what they start (the app servers, training subprocesses), instead of four threads on two cores.
    # Set before anything imports torch, which reads these once.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory) -> str:
    """Path of a randomly initialised tiny StableDiffusionPipeline in diffusers' folder layout."""
    from cdlab.tiny.architecture import build_pipeline

    path = tmp_path_factory.mktemp("tiny-random-pipe")
    build_pipeline(seed=0).save_pretrained(str(path), safe_serialization=True)
    return str(path)


# Work units (pytest.ini: two pytest-xdist workers). A unit goes whole to one worker: a test file (its module
# fixtures, such as a launched app, built once), except that every test on SD1.5's architecture is one unit
# "sd15": one SD1.5-sized model in memory (about 10 GB with its training states), not one per worker; two
# did not fit in 24 GB. xdist's own --dist loadgroup cannot do this under pytest 9 (it renames node ids, which
# pytest 9 no longer allows), so the scheduler below splits by this function, and a test marked sd15 must say
# sd15 in its node id (its file's or its own name), which collection checks.
FIRST_UNITS = ("tests/browser/test_journey.py", "sd15")  # the longest units, sent first; the rest keep their order


def xdist_unit(nodeid: str) -> str:
    return "sd15" if "sd15" in nodeid else nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` (one process) has no such hook
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    unnamed = [item.nodeid for item in items if item.get_closest_marker("sd15") and "sd15" not in item.nodeid]
    if unnamed:
        raise pytest.UsageError("tests marked sd15 must say sd15 in their file's or their own name (they are "
                                "scheduled on one worker by name, tests/conftest.py): " + ", ".join(unnamed))
    rank = {u: i for i, u in enumerate(FIRST_UNITS)}
    items.sort(key=lambda item: rank.get(xdist_unit(item.nodeid), len(rank)))  # stable


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say which tests ran (per file, with outcomes) and which were skipped and why: CI prints this."""
    from collections import Counter, defaultdict

    stats = terminalreporter.stats
    per_file: dict[str, Counter] = defaultdict(Counter)
    for outcome in ("passed", "failed", "error", "xfailed", "xpassed"):
        for rep in stats.get(outcome, []):
            if getattr(rep, "when", "call") in ("call", "setup") and hasattr(rep, "nodeid"):
                if outcome == "passed" and rep.when != "call":
                    continue
                per_file[rep.nodeid.split("::")[0]][outcome] += 1
    skipped: dict[str, list[str]] = defaultdict(list)
    for rep in stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        skipped[reason.removeprefix("Skipped: ")].append(rep.nodeid)
    tw = terminalreporter
    tw.section("cdlab: which tests ran")
    for f in sorted(per_file):
        tw.line(f"{f}: " + ", ".join(f"{n} {k}" for k, n in sorted(per_file[f].items())))
    tw.line(f"total: {sum(sum(c.values()) for c in per_file.values())} ran, "
            f"{sum(len(v) for v in skipped.values())} skipped")
    if skipped:
        tw.section("cdlab: skipped, and why")
        for reason, ids in skipped.items():
            tw.line(f"{len(ids)} skipped: {reason}")
            for i in ids:
                tw.line(f"    {i}")


@pytest.fixture(scope="session")
def sd15_teacher():
    """SD1.5's architecture with random weights at 64 px (8x8 latents), float32 on the CPU: built once into
    the models cache (``$CDLAB_MODELS_DIR``), then loaded through ``from_pretrained`` like the hub model.
    Tests that use it must leave it as they found it (no adapter active, nothing fused)."""
    from cdlab.teachers import load_teacher

    return load_teacher("sd15-random", resolution=64, device="cpu")
