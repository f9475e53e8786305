"""Limits on every field, so nothing a visitor sends can break the shared app (issue 23): uploads checked
before decoding (the decompression bomb), prompts capped before parsing, the Train tab's advanced JSON
checked against the app's caps, HF data sets streamed, names that ``fullmatch``, and messages that name no
server folder nor carry internal exception text.

Each finding through the real endpoints of one served app (gradio_client, the embedded tiny teacher), plus
fast unit tests.
"""
from __future__ import annotations

import json
import struct
import sys
import time
import types
import zlib
from pathlib import Path

import pytest


PROMPT = "a small red circle at the top left on a blue background"
BOMB_SIDE = 13_000


# ------------------------------------------------------------------------------------------- helpers

def bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A real PNG of ``side``×``side`` px of one colour (1-bit grey, a few tens of KB): Pillow decodes it to
    that size (hundreds of MB as RGBA). Written row by row, so the test itself never holds the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte "none", then the row's bits (all black)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def small_png(path: Path, side: int = 32, mode: str = "RGB") -> Path:
    from PIL import Image

    Image.new(mode, (side, side), (200, 30, 30) if mode == "RGB" else (255, 0, 255, 150)).save(path)
    return path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def app_pid(url: str) -> int:
    """The served app's process: the ``app.py`` whose command line has this URL's port."""
    port = url.rstrip("/").rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"app.py") for a in args) and port.encode() in args:
                return int(proc.name)
    raise AssertionError(f"no app.py process on port {port}")


# ------------------------------------------------------------------------------------------- the served app

@pytest.fixture(scope="module")
def app(hostile_app):
    """This module's app: conftest's ``hostile_app`` (the embedded tiny teacher, two random students, the first
    listed as shipped), shared with test_app_hostile (one launch for both)."""
    return hostile_app


def _edit(client, image, technique="sdedit"):
    return client.predict(technique=technique, image=image, prompt="", prompt_2="", strength=0.5, seed=0,
                          student_steps="4", columns=["teacher-4 (naive)"], api_name="/edit")


def test_bomb_png_is_refused_before_decoding(client, app, tmp_path):
    """Finding 1: a 13000×13000 px PNG of a few tens of KB, as Edit's background and as a layer, is refused
    naming the field, and the app's memory grows by less than 100 MB (it grew by ~800 MB when decoded)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    pid = app_pid(app.url)
    plain = handle_file(str(small_png(tmp_path / "plain.png")))
    _edit(client, {"background": plain, "layers": [], "composite": None})  # warm: the edit path is loaded
    before = rss_mb(pid)
    cases = [({"background": handle_file(str(bomb)), "layers": [], "composite": None}, "background"),
             ({"background": plain, "layers": [handle_file(str(bomb))], "composite": None}, "layer 1")]
    for image, part in cases:
        with pytest.raises(AppError) as e:
            _edit(client, image)
        assert part in str(e.value) and "4096" in str(e.value), str(e.value)
    grown = rss_mb(pid) - before
    print(f"bomb: app RSS {before:.0f} MB before, grew by {grown:.0f} MB")
    assert grown < 100, f"the app's RSS grew by {grown:.0f} MB"
    row, *_ = _edit(client, {"background": plain, "layers": [], "composite": None})  # still serving
    assert "teacher-4" in row


def test_layer_count_is_checked_before_any_layer_is_decoded(client, tmp_path):
    """Seventeen layers are refused by count, before any is read: the 17th is not even an image."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    plain = handle_file(str(small_png(tmp_path / "plain.png")))
    stroke = handle_file(str(small_png(tmp_path / "stroke.png", mode="RGBA")))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(AppError, match="17 layers; at most 16"):
        _edit(client, {"background": plain, "layers": [stroke] * 16 + [handle_file(str(junk))], "composite": None})


def _prompt_notice_index(client) -> int:
    """The private endpoint the prompt box calls on every change (what a browser can call)."""
    for i, d in enumerate(client.config["dependencies"]):
        if d.get("api_visibility") == "private" and [t for t in d.get("targets", []) if t[1] == "change"]:
            inputs = [c for c in client.config["components"] if c["id"] in d["inputs"]]
            if len(inputs) == 1 and inputs[0]["props"].get("elem_id") == "prompt":
                return d.get("id", i)
    raise AssertionError("no prompt-change endpoint")


def test_long_prompt_is_refused_fast_through_the_api(client, app):
    """Finding 2: a 300k-character prompt is refused in under 50 ms of server time, whichever endpoint gets
    it: the prompt box's notice (called on every change), Compare and Edit; the server answers at once after."""
    import httpx
    from gradio_client.exceptions import AppError

    long = "a red circle " * 23_077  # 300k characters, words the grammar must read one by one
    assert len(long) >= 300_000
    fn = _prompt_notice_index(client)
    body = {"data": [long], "fn_index": fn, "session_hash": "limits-test", "event_data": None, "trigger_id": None}
    base = app.url.rstrip("/") + "/gradio_api"
    t0 = time.perf_counter()
    httpx.post(f"{base}/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": "limits-test"}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"process_completed"' in line:
                done = json.loads(line[5:])
                break
    seconds = time.perf_counter() - t0
    assert done["success"], done
    assert f"{len(long)} characters long; the limit is 500" in json.dumps(done["output"]), done["output"]
    assert done["output"]["duration"] < 0.05, done["output"]["duration"]  # the server's own time for the event
    assert seconds < 2.0, seconds  # with the request, the queue and the transfer
    for api, args in [("/compare", dict(prompt=long, seed=0, guidance=3.0, steps="4", columns=["teacher-4 (naive)"],
                                        show_trajectory=False)),
                      ("/edit", dict(technique="anagram", image=None, prompt=long, prompt_2="x", strength=1.0, seed=0,
                                     student_steps="4", columns=["teacher-4 (naive)"]))]:
        with pytest.raises(AppError, match="limit is 500"):
            client.predict(**args, api_name=api)


ADVANCED_CASES = [
    ("max-steps", '{"max_steps": 10000000}', "max_steps"),
    ("batch-size", '{"batch_size": 4096}', "batch_size"),
    ("lora-rank", '{"lora_rank": 1024}', "lora_rank"),
    ("data-size", '{"data_size": 10000000}', "data_size"),
    ("checkpoints", '{"max_steps": 20000, "checkpoint_every": 1}', "checkpoint_every"),
    ("keep-checkpoints", '{"keep_checkpoints": 1000}', "keep_checkpoints"),
    ("log-every", '{"max_steps": 20000, "log_every": 1}', "log_every"),
    ("preview-every", '{"max_steps": 20000, "preview_every": 1}', "preview_every"),
    ("resolution", '{"resolution": 4096}', "resolution"),
]


@pytest.mark.parametrize("case", ADVANCED_CASES, ids=[c[0] for c in ADVANCED_CASES])
def test_advanced_json_has_the_forms_caps(client, app, case, train_form):
    """Finding 5: the advanced JSON box is checked against the same caps as the form; the message names the
    field; nothing is launched."""
    from gradio_client.exceptions import AppError

    _, extra, field = case
    with pytest.raises(AppError) as e:
        client.predict(**train_form(extra_config=extra), api_name="/train_start")
    assert field in str(e.value), str(e.value)
    assert not [p for p in (app.work / "runs").iterdir() if p.is_dir()], "a run was launched"  # runs/.app-secret: no run


def test_messages_name_no_server_folder(client, app, train_form):
    """Finding 10: a refusal that names a folder shows it relative to the working folders."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(**train_form(student_name=app.students[1]), api_name="/train_start")  # [0]: shipped
    text = str(e.value)
    assert "already exists in adapters" in text and str(app.work) not in text, text


def test_internal_errors_carry_no_exception_text(client, app):
    """Finding 10: a failure outside our checks (here Gradio's own payload validation) reaches the page without
    its exception text (``show_error`` off: only gr.Error messages are shown); the server log has it all."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        _edit(client, {"background": 12345, "layers": "x", "composite": None})
    assert "EditorData" not in str(e.value) and "input_value" not in str(e.value), str(e.value)
    assert "validation errors for EditorData" in (app.work / "server.log").read_text()
    assert client.predict(technique="hybrid", image=None, prompt="a", prompt_2="b", strength=1.0, seed=0,
                          student_steps="4", columns=["teacher-4 (naive)"], api_name="/edit")


# ------------------------------------------------------------------------------------------- unit tests

def test_upload_header_is_read_without_decoding(tmp_path):
    """`upload_header` reads the bomb's size from its header: well under a second, no pixels decoded."""
    from cdlab.ui.compare import InputError
    from cdlab.ui.edit_inputs import check_editor_payload, upload_header

    bomb = bomb_png(tmp_path / "bomb.png")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"image \(background\): 13000×13000 px is too large"):
        check_editor_payload(str(bomb), [], None)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(InputError, match="not a readable image"):
        upload_header(b"GIF89a nonsense", "image (layer 2)")
    with pytest.raises(InputError, match="MB is too large"):
        upload_header(b"\0" * (21 * 2**20), "image (composite)")
    assert upload_header(str(small_png(tmp_path / "ok.png", side=40)), "image") == (40, 40)


def test_pillow_guard_is_restored_at_the_upload_limit(tmp_path):
    """`cap_decoding` sets Pillow's guard at the upload limit: ``Image.open`` itself refuses the bomb."""
    from PIL import Image

    from cdlab.ui.edit_inputs import PILLOW_MAX_IMAGE_PIXELS, cap_decoding

    old = Image.MAX_IMAGE_PIXELS
    try:
        cap_decoding()
        assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS
        with pytest.raises(Image.DecompressionBombError):
            Image.open(bomb_png(tmp_path / "bomb.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_prompt_notice_is_linear_and_capped_first(tiny_teacher):
    """Finding 2 in process: 300k characters are refused in < 50 ms; 500 characters of distinct unknown words
    read in well under a second (the old reader was quadratic in the words)."""
    from cdlab.ui.compare import Comparer
    from cdlab.world.grammar import MAX_PROMPT_CHARS, nearest_caption

    comparer = Comparer(tiny_teacher, adapters_root=Path("/nonexistent"))
    t0 = time.perf_counter()
    notice, nearest = comparer.prompt_notice("a red circle " * 23_077)
    assert time.perf_counter() - t0 < 0.05 and "the limit is 500" in notice and nearest is None
    with pytest.raises(ValueError, match="limit is 500"):
        nearest_caption("x " * 300_000)
    letters = "bdfhjkmnpqvwxz"  # words far from every caption word
    words = " ".join("qx" + letters[i % 14] + letters[i // 14 % 14] for i in range(MAX_PROMPT_CHARS // 5))
    t0 = time.perf_counter()
    caption, unknown = nearest_caption(words)
    assert time.perf_counter() - t0 < 0.5 and unknown == words.split() and caption.text == nearest_caption("")[0].text


def test_app_limits_table_drives_the_form_and_the_json():
    """One table (`APP_LIMITS`): inside the command line's BOUNDS, the form's ranges, and the JSON's caps."""
    from cdlab.train import config as C
    from cdlab.ui import train_tab as T

    for key, (lo, hi) in C.APP_LIMITS.items():
        blo, bhi = C.BOUNDS[key]
        assert blo <= lo <= hi <= bhi, key
    fields = T.form_fields("tiny")
    for f in fields:
        if f.kind in ("int", "float"):
            assert (f.minimum, f.maximum) == C.APP_LIMITS[f.key], f.key
    values = {f.key: f.default for f in fields}
    assert T.form_to_config(values, "tiny", "tiny world", "")["max_steps"] == values["max_steps"]
    hi = C.APP_LIMITS["max_steps"][1]
    for src in (dict(values, max_steps=hi + 1), values):
        extra = "" if src is not values else json.dumps({"max_steps": hi + 1})
        with pytest.raises(ValueError, match="steps"):
            T.form_to_config(src, "tiny", "tiny world", "", extra_json=extra)
    cfg = T.form_to_config(dict(values, max_steps=hi, preview_every=0), "tiny", "tiny world", "")
    assert cfg["max_steps"] == hi  # the cap itself is allowed, with the trainer's defaults for the rest


@pytest.mark.parametrize("name", ["name\n", "abc\n"])
def test_name_patterns_fullmatch(name, tmp_path):
    """Finding 11: a trailing newline is refused by every name pattern (``$`` would accept it)."""
    from cdlab.students import StudentError, validate_name
    from cdlab.train import config as C
    from cdlab.train.checkpoints import CKPT_RE
    from cdlab.ui.previews import student_previews

    with pytest.raises(StudentError):
        validate_name(name)
    cfg = C.resolve(C.TrainConfig())
    cfg.run_name = name
    with pytest.raises(ValueError, match="run_name"):
        C.check(cfg)
    assert C.RUN_NAME_RE.fullmatch(name) is None and C._HF_NAME_RE.fullmatch("user/" + name) is None
    assert CKPT_RE.fullmatch("ckpt_000100\n") is None
    (tmp_path / "previews").mkdir()
    (tmp_path / "previews" / "step_000010.png\n").write_bytes(b"")
    (tmp_path / "previews" / "step_000005.png").write_bytes(b"")
    assert [s for s, _ in student_previews(tmp_path)] == [5]


class _FakeStream:
    """A streamed data set: yields rows on demand and counts how many were pulled."""

    def __init__(self, rows):
        self.rows, self.pulled, self.features = rows, 0, {}

    def take(self, n):
        self.taken = n

        def gen():
            for row in self.rows[:n]:
                self.pulled += 1
                yield row
        return gen()


def test_hf_data_streams_only_what_data_size_needs(monkeypatch):
    """Finding 7: ``hf:NAME`` streams the split and reads only ``data_size`` rows (capped), never the whole."""
    from PIL import Image

    from cdlab.train import data as D

    calls, stream = [], _FakeStream([{"image": Image.new("RGB", (8, 8), (i, 0, 0)), "text": f"c{i}"}
                                     for i in range(1000)])

    def load_dataset(name, **kw):
        calls.append((name, kw))
        return stream

    fake = types.ModuleType("datasets")
    fake.load_dataset, fake.Image = load_dataset, type("Image", (), {})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    src = D.make_source("hf:user/set", data_size=7, data_seed=0, resolution=8)
    assert calls == [("user/set", {"split": "train", "streaming": True})]
    assert stream.taken == 7 and stream.pulled == 7 and len(src) == 7
    image, caption = src.load(3)
    assert caption == "c3" and image.getpixel((0, 0)) == (3, 0, 0)
    D.make_source("hf:user/set", data_size=0, data_seed=0, resolution=8)
    assert stream.taken == D.HF_MAX_ROWS  # "all" is capped


def test_unknown_errors_show_an_id_not_their_text(caplog):
    """Finding 10: an unexpected exception reaches the page as a generic message with an id the log records
    with the full traceback; a user error keeps its text, with folders shown relative."""
    import gradio as gr

    from cdlab.paths import adapters_dir
    from cdlab.ui.session import user_errors

    @user_errors
    def broken():
        raise RuntimeError("secret /srv/internal/state.db")

    @user_errors
    def refused():
        raise ValueError(f"student 'x' exists in {adapters_dir() / 'x'}")

    with caplog.at_level("ERROR", logger="cdlab.app"), pytest.raises(gr.Error) as e:
        broken()
    assert "secret" not in e.value.message and "RuntimeError" not in e.value.message
    error_id = e.value.message.split("(error ")[1].split(")")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    with pytest.raises(gr.Error) as e:
        refused()
    assert e.value.message == "student 'x' exists in adapters/x"


def test_a_refused_choice_is_named_and_not_echoed_whole():
    """A value outside a dropdown's choices (a 100k-character one through the API) is refused by the field's
    name, Gradio's own message cut to a few hundred characters: the start and the choices it lists."""
    import gradio as gr

    from cdlab.ui.session import MAX_ECHO, named_errors

    with gr.Blocks():
        (dd,) = named_errors(gr.Dropdown(["", "student-a"], value="", label="start from student"))
    assert dd.preprocess("student-a") == "student-a"
    with pytest.raises(gr.Error) as e:
        dd.preprocess("a" * 100_000)
    message = e.value.message
    assert message.startswith("start from student: Value: aaa") and message.endswith("['', 'student-a']")
    assert len(message) <= len("start from student: ") + MAX_ECHO


def test_docs_show_the_limits_the_code_has():
    """docs/hosting.md's limits are the constants: the training table as `app_limits_markdown` prints it."""
    from cdlab.paths import REPO_ROOT
    from cdlab.train.config import app_limits_markdown
    from cdlab.train.data import HF_MAX_ROWS
    from cdlab.ui import edit_inputs as E
    from cdlab.world.grammar import MAX_PROMPT_CHARS

    doc = (REPO_ROOT / "docs" / "hosting.md").read_text()
    assert app_limits_markdown() in doc
    for figure in (f"{MAX_PROMPT_CHARS} characters", f"{E.MAX_UPLOAD_BYTES // 2**20} MB a file",
                   f"{E.MAX_UPLOAD_SIDE} px a side", f"{E.MAX_LAYERS} layers", f"{E.MAX_UPLOAD_PIXELS} px",
                   f"= {E.PILLOW_MAX_IMAGE_PIXELS}", f"at most {HF_MAX_ROWS}"):
        assert figure in doc, figure


def test_editor_pieces_cannot_exhaust_memory(client, app):
    """The editor's browser path (pieces posted to ``accept_blobs`` before the edit): a layer index of twenty
    million (Gradio grew a list to that length: 160 MB) is refused, and memory stays flat."""
    import httpx

    editor = next(c["id"] for c in client.config["components"] if c["props"].get("elem_id") == "edit-image")
    pid = app_pid(app.url)
    before = rss_mb(pid)
    form = {"component_id": str(editor), "session_hash": "limits-blobs", "fn_name": "accept_blobs",
            "type": "layer", "index": str(20_000_000), "id": "v1"}
    r = httpx.post(app.url.rstrip("/") + "/gradio_api/component_server", data=form,
                   files={"blob": ("layer.png", b"\x89PNG", "image/png")}, timeout=60)
    assert r.status_code != 200 or "error" in r.text.lower(), r.text[:200]
    grown = rss_mb(pid) - before
    assert grown < 40, f"the app's RSS grew by {grown:.0f} MB"
    ok = httpx.post(app.url.rstrip("/") + "/gradio_api/component_server", data={**form, "index": "0"},
                    files={"blob": ("layer.png", b"\x89PNG", "image/png")}, timeout=60)
    assert ok.status_code == 200, ok.text[:200]  # a piece within the limits is kept as before


def test_run_status_and_log_name_no_server_folder(run_dirs):
    """Finding 10: a run's status message and log tail (what the Train tab and ``/train_status`` show) name
    folders as ``adapters/...`` and ``runs/...``, wherever the working folders are."""
    from cdlab.ui.jobs import LOG_NAME, JobManager
    from cdlab.ui.train_tab import poll

    run = run_dirs.runs / "r1"
    run.mkdir(parents=True)
    student = run_dirs.adapters / "s1"
    (run / "status.json").write_text(json.dumps({"state": "failed", "message": f"saved {student}", "step": 3}))
    (run / LOG_NAME).write_text(f"run {run}\nTraceback: {student / 'adapter.safetensors'}\n")
    view = poll(JobManager(run_dirs.runs, model="tiny"), "r1")
    shown = view.status_md + view.log_tail
    assert str(run_dirs.root) not in shown, shown
    assert "saved adapters/s1" in view.status_md and "run runs/r1" in view.log_tail
    assert "adapters/s1/adapter.safetensors" in view.log_tail
