"""Shared fixtures, each defined once and returning named objects, and the two-worker scheduler.

Teachers (loaded once per module, or once per worker for SD1.5's size; a test leaves its teacher as it found it):

    tiny_pipe_dir     a randomly initialised tiny pipeline saved with ``save_pretrained`` (SD1.5's folder layout)
    random_teacher    ``load_teacher(tiny_pipe_dir)``: that random tiny pipeline as a Teacher
    tiny_teacher      ``load_teacher("tiny")``: the embedded, trained tiny teacher
    sd15_teacher      ``load_teacher("sd15-random")``: SD1.5's architecture with random weights at 64 px

Folders and processes:

    cache_outside_the_repository  (autouse) ``$CDLAB_CACHE_DIR`` under the session's tmp, never the repo's cache/
    run_dirs          RunDirs: ``$CDLAB_RUNS_DIR`` and ``$CDLAB_ADAPTERS_DIR`` under the test's tmp_path
    module_run_dirs   ``with module_run_dirs(name) as dirs``: the same for a module fixture's run (a new tmp folder)
    child_env         the environment for a ``python -m cdlab`` subprocess writing into ``run_dirs``
    latent_cache_dir  one encoded-latents cache for a module's training runs
    fake_hub          FakeHub: ``cdlab.students.external._hub_download`` patched to serve local files, recording calls
    shipped_app       ServedApp: the app on the embedded tiny teacher with a copy of the shipped students
    hostile_app       ServedApp: the app test_app_hostile and test_app_limits send hostile input to (one unit)
    start_app         ``with start_app(model, work, students, base) as app``: a module's own app (a ServedApp)
    client            a gradio client on the module's ``app`` (a module serving the app defines ``app``)
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs two workers (pytest-xdist, one per core): one CPU thread each, for torch in the workers
    # and in what they start (the app servers, training subprocesses), instead of four threads on two cores.
    # Set before anything imports torch, which reads these once.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


@pytest.fixture(scope="session", autouse=True)
def cache_outside_the_repository(tmp_path_factory) -> Iterator[Path]:
    """``$CDLAB_CACHE_DIR`` (encoded latents, teacher pairs) under the session's tmp for every test and every
    process a test starts, unless a test sets its own: a test never writes into the repository's ``cache/``,
    where a user's cached pairs are (hours of a teacher's sampling). The models cache is ``$CDLAB_MODELS_DIR``
    and stays shared: SD1.5's random stand-in is built once a machine.

    The temporary folder (``$TMPDIR``, ``tempfile.tempdir``) moves under the session's tmp too, for the
    workers and every app, trainer and browser they start: what they leave there (gradio_client leaves an
    empty folder in the temporary folder per file it downloads, Gradio its cache, Chromium its profiles) goes
    with the session's tmp, which pytest.ini removes after a green run (``tmp_path_retention_policy``)."""
    import tempfile

    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("CDLAB_CACHE_DIR", str(folder))
        tmp = tmp_path_factory.mktemp("tmp")
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))
        yield folder


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
# sd15 in its node id (its file's or its own name), which collection checks. The browser page tests share one
# app (``shipped_app``, a session fixture: one per worker), so their three files are one unit too; so do
# test_app_hostile and test_app_limits (``hostile_app``).
# Every unit longer than a few seconds, the longest first (the mean of three runs' `--durations=0`, summed per unit,
# docs/performance.md), so each worker takes the next longest when it is free and the two end on short units, within
# seconds of each other (longest-processing-time-first); the rest keep their order, after these.
FIRST_UNITS = ("sd15", "browser-pages", "tests/browser/test_journey.py", "tests/test_flow.py",
               "tests/test_classroom.py", "tests/test_evaluate.py", "tests/test_train.py",
               "tests/test_compare_stream.py", "tests/test_train_process.py", "tests/test_flow_train_tab.py",
               "tests/test_app_client.py", "tests/test_checkpoints.py", "tests/test_ui_compare.py", "served-hostile",
               "tests/test_build_teacher.py", "tests/test_dmd.py", "tests/test_students.py", "tests/test_edit_tab.py",
               "tests/test_student_loading.py", "tests/test_bench.py", "tests/test_config.py", "tests/test_edit.py",
               "tests/test_readme.py", "tests/test_generate.py", "tests/test_samplers.py", "tests/test_probe.py",
               "tests/test_world.py")
SHARED_UNITS = {**{f"tests/browser/{f}": "browser-pages"
                   for f in ("test_browser.py", "test_compare_page.py", "test_edit_page.py")},
                **{f"tests/{f}": "served-hostile" for f in ("test_app_hostile.py", "test_app_limits.py")}}


def xdist_unit(nodeid: str) -> str:
    if "sd15" in nodeid:
        return "sd15"
    path = nodeid.split("::")[0]
    return SHARED_UNITS.get(path, path)


# Disk the suite needs (a run's peak above its start, measured with `df` every second: 0.99 GB with SD1.5's stand-in
# already built, docs/performance.md), with room to spare, and the stand-in itself when it has to be built.
SUITE_DISK_GB, SD15_STANDIN_GB = 1.5, 2.2


def _disk_needed() -> list[tuple[str, float, float]]:
    """``(folder, free GB, needed GB)`` for the temporary folder and SD1.5's stand-in's cache."""
    import tempfile

    from cdlab.paths import models_dir
    from cdlab.sd15_random import is_built

    tmp, models = Path(tempfile.gettempdir()), models_dir()
    build = 0.0 if is_built() else SD15_STANDIN_GB
    probe = next((p for p in (models, *models.parents) if p.exists()), Path("/"))
    free = {str(f): shutil.disk_usage(f).free / 1e9 for f in (tmp, probe)}
    if os.stat(tmp).st_dev == os.stat(probe).st_dev:
        return [(str(tmp), free[str(tmp)], SUITE_DISK_GB + build)]
    return [(str(tmp), free[str(tmp)], SUITE_DISK_GB), (str(probe), free[str(probe)], build)]


_DISK_AT_START: list[str] = []  # the controller's reading, printed again in the summary (``-q`` hides the header)


def pytest_report_header(config):
    return _DISK_AT_START


def pytest_sessionstart(session):
    """Stop at once, saying why, when the disk cannot hold the run: a full disk fails tests by the hundred with
    errors that name anything but the disk."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    disk = _disk_needed()
    _DISK_AT_START[:] = ["cdlab: free disk at the start: " + ", ".join(
        f"{f} {have:.1f} GB (needs {need:.1f})" for f, have, need in disk)]
    short = [(f, have, need) for f, have, need in disk if have < need]
    if short:
        pytest.exit("cdlab: not enough free disk for the suite: " + "; ".join(
            f"{f} has {have:.1f} GB free, the run needs {need:.1f} GB" for f, have, need in short), returncode=3)


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
    for line in _DISK_AT_START:
        tw.line(line)
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


@pytest.fixture(scope="module")
def random_teacher(tiny_pipe_dir):
    """``tiny_pipe_dir`` loaded as a Teacher (float32, CPU): random weights of the tiny architecture."""
    from cdlab.teachers import load_teacher

    return load_teacher(tiny_pipe_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_teacher():
    """The embedded, trained tiny teacher (``load_teacher("tiny")``, float32, CPU)."""
    from cdlab.teachers import load_teacher

    return load_teacher("tiny", device="cpu")


# ------------------------------------------------------------------------------------------- folders, processes


@dataclass
class RunDirs:
    """Where a test's training runs and students go (``$CDLAB_RUNS_DIR``, ``$CDLAB_ADAPTERS_DIR``)."""
    root: Path
    runs: Path
    adapters: Path


def use_run_dirs(monkeypatch: pytest.MonkeyPatch, root: Path) -> RunDirs:
    """Point ``$CDLAB_RUNS_DIR`` and ``$CDLAB_ADAPTERS_DIR`` at ``root/runs`` and ``root/adapters``."""
    dirs = RunDirs(Path(root), Path(root) / "runs", Path(root) / "adapters")
    monkeypatch.setenv("CDLAB_RUNS_DIR", str(dirs.runs))
    monkeypatch.setenv("CDLAB_ADAPTERS_DIR", str(dirs.adapters))
    return dirs


@pytest.fixture
def run_dirs(tmp_path, monkeypatch) -> RunDirs:
    """This test's runs and students under its ``tmp_path`` (the environment variables restored after it)."""
    return use_run_dirs(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def module_run_dirs(tmp_path_factory):
    """``with module_run_dirs(name) as dirs:`` a module fixture's runs and students (a `RunDirs`) under a new
    tmp folder ``name``, for a run trained once per module; the environment variables are restored on exit."""
    @contextlib.contextmanager
    def under(name: str) -> Iterator[RunDirs]:
        with pytest.MonkeyPatch.context() as mp:
            yield use_run_dirs(mp, tmp_path_factory.mktemp(name))
    return under


@pytest.fixture(scope="session")
def train_form():
    """``train_form(**change)``: the keyword arguments of the app's ``/train_start`` for a small tiny-world run
    (5 steps, no previews), with ``change`` applied; the served-app tests send hostile values through it."""
    def form(**change) -> dict:
        values = dict(method="mbcd", num_boundaries=4, lora_rank=4, lr=1e-3, max_steps=5, batch_size=8,
                      guidance=3.0, guidance_max=3.0, preview_every=0, student_name="", data_kind="tiny world",
                      data_path="", extra_config="", overwrite=False, owner="")
        values.update(change)
        return values
    return form


@pytest.fixture
def child_env(run_dirs) -> dict[str, str]:
    """The environment of a ``python -m cdlab ...`` subprocess: ``run_dirs``, one CPU thread, offline, the
    repository importable."""
    from cdlab.paths import REPO_ROOT

    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CDLAB_RUNS_DIR=str(run_dirs.runs),
                CDLAB_ADAPTERS_DIR=str(run_dirs.adapters), PYTHONPATH=str(REPO_ROOT))


@pytest.fixture(scope="module")
def latent_cache_dir(tmp_path_factory) -> str:
    """A cache of encoded latents (and DMD regression pairs) shared by one module's training runs."""
    return str(tmp_path_factory.mktemp("latent-cache"))


@dataclass
class FakeHub:
    """``files`` by ``(repo_id, filename)``, served in place of the Hugging Face hub; ``calls`` in order."""
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def download(self, repo_id: str, filename: str) -> str:
        import huggingface_hub

        self.calls.append((repo_id, filename))
        if (repo_id, filename) not in self.files:
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}/{filename} is not on the fake hub")
        return str(self.files[(repo_id, filename)])


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """An empty `FakeHub` that ``load_external_student`` downloads from (it looks ``_hub_download`` up in its
    module when it runs); a test adds the files it serves to ``fake_hub.files``."""
    hub = FakeHub()
    monkeypatch.setattr("cdlab.students.external._hub_download", hub.download)
    return hub


# ------------------------------------------------------------------------------------------- the app, served


@dataclass
class ServedApp:
    """``python app.py`` in a subprocess: its URL, its working folder (runs, adapters, evals, data, cache) and
    the students it offers (``base``: the base model id their cards name)."""
    url: str
    work: Path
    students: list[str]
    base: str


@contextlib.contextmanager
def _serve(model: str, work: Path, students: list[str], base: str) -> Iterator[ServedApp]:
    from cdlab.ui.bench import serve_app

    with serve_app(model, work) as url:
        yield ServedApp(url, Path(work), list(students), base)


@pytest.fixture(scope="session")
def start_app():
    """``start_app(model, work, students, base)``: a context manager serving ``python app.py --model MODEL`` on
    ``work`` (students already saved under ``work/adapters``), yielding a `ServedApp`. For a module that needs
    an app of its own (hostile inputs, a whole session that trains)."""
    return _serve


@pytest.fixture(scope="session")
def shipped_app(tmp_path_factory):
    """The app on the embedded tiny teacher with a copy of the shipped students, shared by the browser page
    tests (one xdist unit: tests/conftest.py). Tests may train in it; none may delete a student."""
    from cdlab.paths import REPO_ROOT, TINY_ID
    from cdlab.students import list_students
    from cdlab.teachers import TINY_TEACHER_DIR

    if not (Path(TINY_TEACHER_DIR) / "model_index.json").is_file():
        pytest.skip("the embedded tiny teacher is not in this checkout")
    shipped = [c.name for c in list_students(root=REPO_ROOT / "adapters", base_model=TINY_ID)]
    work = tmp_path_factory.mktemp("tiny-app")
    shutil.copytree(REPO_ROOT / "adapters", work / "adapters", dirs_exist_ok=True)
    with _serve("tiny", work, shipped, TINY_ID) as app:
        yield app


@pytest.fixture(scope="session")
def hostile_app(tmp_path_factory):
    """The app that test_app_hostile and test_app_limits send hostile input to (one xdist unit: tests/conftest.py):
    the embedded tiny teacher, two random students (the first listed in ``SHIPPED``, as shipped with the
    repository) and a symlink in its data folder that leads outside it (``/etc``). A test leaves no run behind."""
    from cdlab.teachers import TINY_ID
    from cdlab.ui.bench import make_random_students

    work = tmp_path_factory.mktemp("hostile") / "work"
    work.mkdir()
    students = make_random_students(TINY_ID, work / "adapters", n=2)
    (work / "adapters" / "SHIPPED").write_text(f"# shipped with the repository\n{students[0]}\n")
    (work / "data").mkdir()
    os.symlink("/etc", work / "data" / "escape")  # a symlink inside the data root that leads outside
    with _serve("tiny", work, students, TINY_ID) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    """A gradio client on the module's ``app`` (a `ServedApp`)."""
    from gradio_client import Client

    return Client(app.url, verbose=False)
