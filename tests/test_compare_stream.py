"""Compare streams the lesson (issue 23): each request's columns arrive as they finish, the students' before
teacher-50's, under 30 clients at once, and those Compares leave no files behind (``/tmp``, Gradio's cache); and
``bench_load``'s 20 Compares beside a training run are all served (the same app: one launch for the module).

One app on the embedded tiny teacher serves the module, with its own temporary folder (``TMPDIR`` and
``GRADIO_TEMP_DIR`` under it, so only its own files are counted) and a short ``delete_cache``.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cdlab.columns import TEACHER_4, TEACHER_50
from cdlab.ui import compare as C

PROMPT = "a large red circle in the center on a white background"
CACHE_FREQUENCY, CACHE_AGE = 1, 2  # the test app's delete_cache, in seconds


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from cdlab.paths import TINY_ID
    from cdlab.teachers import TINY_TEACHER_DIR
    from cdlab.ui.bench import make_random_students, serve_app
    from cdlab.ui.hosting import DELETE_CACHE_ENV

    if not (Path(TINY_TEACHER_DIR) / "model_index.json").is_file():
        pytest.skip("the embedded tiny teacher is not in this checkout")
    work = tmp_path_factory.mktemp("stream-app")
    students = make_random_students(TINY_ID, work / "adapters", n=1)
    tmp = work / "tmp"
    (tmp / "gradio").mkdir(parents=True)
    env = {"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           DELETE_CACHE_ENV: f"{CACHE_FREQUENCY},{CACHE_AGE}"}
    with serve_app("tiny", work, env=env) as url:
        yield {"url": url, "students": students, "tmp": tmp, "work": work}


def _client(app):
    from gradio_client import Client

    return Client(app["url"], verbose=False, download_files=False)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_thirty_clients_all_served_and_students_arrive_before_teacher_50_and_leave_no_files(app):
    """30 Compares at once through gradio_client: every one is served, and in every one the student's image
    and the naive teacher's arrive in an update before teacher-50's (guidance 1: no CFG, a cheaper teacher-50).
    Nothing under the app's temporary folder outlives ``delete_cache``: no ``cdlab-compare-*`` folder per
    Compare (the PNG's folder is removed once Gradio copied it), and Gradio's cache is emptied of the images."""
    from cdlab.ui.bench import watch_compares

    tmp = app["tmp"]
    before = len(_files(tmp))
    client = _client(app)
    student = app["students"][0]
    cols = [TEACHER_50, TEACHER_4, student]
    jobs = []
    for i in range(30):
        job = client.submit(prompt=PROMPT, seed=500 + i, guidance=1.0, steps="1", columns=cols,
                            show_trajectory=False, api_name="/compare")
        job.t0 = time.perf_counter()
        jobs.append(job)
    seen = watch_compares(jobs, [student], timeout=240)
    assert [r["error"] for r in seen] == [""] * 30
    assert all(r["last"] is not None for r in seen)
    for r in seen:
        assert r["updates"] >= 2, r  # a partial update, then the whole result
        assert r["order"][-1] == TEACHER_50 and set(r["order"]) == {TEACHER_50, TEACHER_4, f"{student} (1 step)"}, r
        assert r["first_student"] < r["last"], r
    final = jobs[0].result()
    assert [row[0] for row in final[2]["data"]] == [TEACHER_50, TEACHER_4, f"{student} (1 step)"]
    assert final[0].count("<figure") == 3 and "sampling" not in final[0] and "columns in" in final[5]

    served = [Path(p["path"] if isinstance(p, dict) else p) for p in (job.result()[4] for job in jobs)]
    assert len(set(served)) == 30 and all(p.suffix == ".png" and p.is_relative_to(tmp / "gradio") for p in served)
    assert not list(tmp.glob("cdlab-compare-*"))  # each Compare's own folder is gone at once
    # the images and PNGs went to Gradio's cache (3 images + 1 PNG per Compare; files only: Gradio keeps the
    # emptied folders) ...
    deadline = time.time() + CACHE_AGE + 4 * CACHE_FREQUENCY + 10
    while len(_files(tmp)) > before + 5 and time.time() < deadline:
        time.sleep(0.5)
    assert len(_files(tmp)) <= before + 5, [str(p) for p in _files(tmp)][:10]  # ... and left it with delete_cache


@pytest.mark.slow
def test_twenty_concurrent_compares_beside_a_training_run(app):
    """Load (issue 10): 20 Compare requests at once while a training run steps: all served, none failed.
    ``bench_load`` on this module's app (after the file count above: the run writes its own files), at guidance 1
    as the test above (no CFG: a teacher-50 of 50 UNet passes, not 100; the CLI's load runs CFG 5)."""
    from cdlab.ui.bench import bench_load

    r = bench_load(requests=20, columns=3, train=True, workdir=app["work"], url=app["url"], guidance=1.0)
    print(f"load: served {r['served']}/20, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, wall {r['wall_s']:.1f} s")
    assert r["served"] == 20 and r["failed"] == 0, r["errors"]
    assert r["training_state"] == "running" and r["training_step"] >= 1  # it trained the whole time
    assert r["p50_s"] <= r["p95_s"] <= r["max_s"]


def test_the_load_benchmark_on_the_flow_section_uses_the_shipped_flow_students(tmp_path):
    """``python -m cdlab.ui.bench load --section flow``'s students: copies of the shipped flow students, the 4-step
    ones first (its timings are docs/performance.md's, from the command, not a test's); any other section is
    refused by name before an app starts."""
    from cdlab.paths import REPO_ROOT
    from cdlab.ui import bench as B

    with pytest.raises(ValueError, match="section must be 'main' or 'flow', got 'edit'"):
        B.bench_load(section="edit", workdir=tmp_path)
    assert not any(tmp_path.iterdir())
    names = B._flow_students(tmp_path / "adapters", 3)
    assert names == ["fashion-dmd-4", "fashion-mbcd-4", "fashion-reflow-4"]
    for name in names:
        for f in ("card.json", "pytorch_lora_weights.safetensors"):
            assert (tmp_path / "adapters" / name / f).read_bytes() == (REPO_ROOT / "adapters" / name / f).read_bytes()


def test_a_batch_samples_students_first_and_streams_each_request(tiny_teacher, tmp_path):
    """Without Gradio: three requests queued together are one or two batches; each batch samples the student,
    then teacher-4, then teacher-50 (cheapest first), and each request's stream yields a partial result with the
    students and teacher-4 and teacher-50 still pending, then the whole result in its own column order."""
    from cdlab.ui.bench import make_random_students

    (student,) = make_random_students(tiny_teacher.base_id, tmp_path, n=1)
    cmp = C.Comparer(tiny_teacher, adapters_root=tmp_path, cache_size=0)
    ran: list[str] = []
    sample_unit = cmp._sample_unit
    cmp._sample_unit = lambda members, *a: (ran.append(members[0][1].label), sample_unit(members, *a))[1]
    cols = [TEACHER_50, student, TEACHER_4]
    streams: dict[int, list[C.CompareResult]] = {}

    def consume(i: int) -> None:
        streams[i] = list(cmp.stream(PROMPT, 40 + i, 1.0, 2, cols))  # guidance 1: no CFG, cheaper

    with tiny_teacher.lock:  # hold the worker until every request is queued
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        deadline = time.time() + 20
        while cmp.batcher.pending() < 3 and time.time() < deadline:
            time.sleep(0.02)
    for th in threads:
        th.join(60)
    assert sorted(streams) == [0, 1, 2] and cmp.batcher.rounds <= 2
    order = [f"{student} (2 steps)", TEACHER_4, TEACHER_50]
    assert ran == order * cmp.batcher.rounds  # per batch: the student, the naive teacher, then teacher-50
    for results in streams.values():
        *partials, final = results
        assert partials and all(TEACHER_50 in p.pending for p in partials)
        assert [c.label for c in partials[-1].columns] == [f"{student} (2 steps)", TEACHER_4]
        assert partials[-1].columns[0].speedup_estimated  # no teacher-50 yet: estimated from NFE
        assert final.pending == [] and [c.label for c in final.columns] == [TEACHER_50, f"{student} (2 steps)", TEACHER_4]
        assert len({r.result_id for r in results}) == 1 and not final.columns[1].speedup_estimated
    from cdlab.ui.compare_view import columns_html

    row = columns_html(streams[0][0])
    labels = [x.split('"')[0] for x in row.split('data-label="')[1:]]
    assert labels == [TEACHER_50, f"{student} (2 steps)", TEACHER_4]  # the pending one keeps its place
    assert row.count("sampling…") >= 2 and row.count("<img") == len(streams[0][0].columns)


def test_a_running_round_adopts_the_items_queued_since_it_began():
    """`MicroBatcher.adopt`: items queued while a round runs join it (up to ``max_items``), each gets its own
    result, and only the round's own worker may adopt."""
    from cdlab.batching import MicroBatcher

    started, go = threading.Event(), threading.Event()

    def run_batch(items):
        started.set()
        go.wait(10)
        items = items + batcher.adopt()
        return [x * 10 for x in items]

    batcher = MicroBatcher(run_batch, max_items=3)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.submit(i))) for i in range(4)]
    threads[0].start()
    assert started.wait(10)
    for th in threads[1:]:
        th.start()
    while batcher.pending() < 4:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="worker thread"):
        batcher.adopt()
    go.set()
    for th in threads:
        th.join(10)
    assert results == {0: 0, 1: 10, 2: 20, 3: 30}
    assert batcher.sizes == [3, 1]  # the first round took two more (max_items 3), the fourth waited for the next


def test_delete_cache_setting_and_its_file_sets(monkeypatch):
    """``delete_cache`` comes from `DELETE_CACHE` or ``$CDLAB_DELETE_CACHE`` (refused by name when malformed); the
    file sets Gradio's cleaner walks may grow while it walks them (a plain set raises there)."""
    from cdlab.ui import hosting as H

    monkeypatch.delenv(H.DELETE_CACHE_ENV, raising=False)
    assert H.delete_cache() == H.DELETE_CACHE
    monkeypatch.setenv(H.DELETE_CACHE_ENV, "1, 2")
    assert H.delete_cache() == (1, 2)
    for bad in ("0,5", "a,b", "3", "1,2,3", "-1,2"):
        monkeypatch.setenv(H.DELETE_CACHE_ENV, bad)
        with pytest.raises(ValueError, match=H.DELETE_CACHE_ENV):
            H.delete_cache()
    files = H._SnapshotSet(f"f{i}" for i in range(100))
    for name in files:  # what a request does while the cleaner walks the set
        files.add(name + "-new")
    assert len(files) == 200
    with pytest.raises(RuntimeError, match="changed size"):
        plain = set(files)
        for name in plain:
            plain.add(name + "-again")


def test_an_idle_app_polls_its_queue_every_10_ms_not_every_1():
    """`quiet_idle_queue`: Gradio's queue polls every 1 ms for events and 10 ms for progress while idle (about 5%
    of a core for an app nobody uses); the app's queue polls every 10 and 50 ms, never faster than Gradio's own,
    and an object without Gradio's queue attributes is left alone."""
    import gradio as gr

    from cdlab.ui import hosting as H

    with gr.Blocks() as demo:
        gr.Markdown("x")
    q = demo._queue
    assert (q.sleep_when_free, q.progress_update_sleep_when_free) == (0.001, 0.01)  # Gradio's, on Linux
    assert H.quiet_idle_queue(demo)
    assert (q.sleep_when_free, q.progress_update_sleep_when_free) == (H.IDLE_POLL_S, H.PROGRESS_POLL_S) == (0.01, 0.05)
    q.sleep_when_free = 0.2  # slower already: kept
    assert H.quiet_idle_queue(demo) and q.sleep_when_free == 0.2
    assert not H.quiet_idle_queue(object())
