"""The Edit tab's logic without Gradio (cdlab.ui.edit_tab): what the image editor's value means for each
technique, every bad input refused with the field named, and each preset run on the embedded tiny teacher
with its shipped students, from the tab's own entry point."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdlab.ui import edit_tab as ET
from cdlab.ui.compare import TEACHER_4, TEACHER_50, InputError


@pytest.fixture(scope="module")
def comparer(tiny_teacher):
    """The tab's Comparer on the embedded tiny teacher (its shipped students), without micro-batching."""
    from cdlab.ui.compare import Comparer

    return Comparer(tiny_teacher, batching=False)


def _layer(box, size=32, alpha=150):
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    y0, y1, x0, x1 = box
    arr[y0:y1, x0:x1] = (255, 0, 255, alpha)
    return Image.fromarray(arr, "RGBA")


def test_inpaint_takes_the_background_and_the_painted_alpha_as_mask():
    bg = Image.new("RGB", (32, 32), (10, 200, 10))
    v = ET.editor_inputs({"background": bg, "layers": [_layer((8, 16, 4, 12)), _layer((20, 24, 20, 28))],
                          "composite": None}, "inpaint", 32)
    assert np.asarray(v.image).tolist() == np.asarray(bg).tolist()  # the paint is NOT part of the image
    m = np.asarray(v.mask) > 0
    assert m.sum() == 8 * 8 + 4 * 8 and m[8:16, 4:12].all() and m[20:24, 20:28].all() and not m[0, 0]
    assert v.notes == []


def test_sdedit_takes_the_composite_and_strokes_alone_are_a_sketch_on_white():
    comp = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    comp.paste((200, 0, 0, 255), (4, 4, 12, 12))
    v = ET.editor_inputs({"background": None, "layers": [], "composite": comp}, "sdedit", 32)
    arr = np.asarray(v.image)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[6, 6].tolist() == [200, 0, 0]  # flattened on white
    only = ET.editor_inputs({"background": None, "layers": [_layer((0, 8, 0, 8), alpha=255)], "composite": None},
                            "sdedit", 32)
    assert np.asarray(only.image)[2, 2].tolist() == [255, 0, 255] and np.asarray(only.image)[20, 20].tolist() == [255] * 3


def test_strokes_of_different_sizes_are_drawn_on_one_paper():
    """Only strokes, in layers of two sizes: each is scaled to the paper (the first layer's size), then the
    sketch to the teacher's size."""
    big, small = _layer((0, 16, 0, 16), size=64, alpha=255), _layer((16, 32, 16, 32), size=32, alpha=255)
    v = ET.editor_inputs({"background": None, "layers": [big, small], "composite": None}, "sdedit", 32)
    arr = np.asarray(v.image)
    assert v.image.size == (32, 32) and arr[2, 2].tolist() == [255, 0, 255] and arr[28, 28].tolist() == [255, 0, 255]
    assert arr[2, 28].tolist() == [255, 255, 255]


def test_an_upload_of_another_square_size_is_resized_with_a_note():
    v = ET.editor_inputs(Image.new("RGB", (300, 310), "red"), "sdedit", 32)
    assert v.image.size == (32, 32) and "300×310" in v.notes[0] and "32×32" in v.notes[0]
    assert ET.editor_inputs({"background": None}, "anagram", 32).image is None  # anagrams take no image


@pytest.mark.parametrize("value, technique, match", [
    (None, "sdedit", "image: no image"),
    ({"background": None, "layers": [], "composite": None}, "inpaint", "image: no image"),
    ({"background": Image.new("RGB", (32, 32)), "layers": [], "composite": None}, "inpaint", "mask: empty"),
    ({"background": Image.new("RGB", (32, 32)), "layers": [_layer((0, 32, 0, 32))], "composite": None},
     "inpaint", "mask: covers the whole image"),
    ({"background": None, "layers": [_layer((0, 8, 0, 8))], "composite": Image.new("RGBA", (32, 32))},
     "inpaint", "inpainting needs a background"),
    (Image.new("RGB", (64, 32)), "sdedit", "not square"),
    (Image.new("RGB", (5000, 5000)), "sdedit", "too large"),
    (Image.new("RGB", (4, 4)), "sdedit", "too small"),
    ({"background": Image.new("RGB", (32, 32)), "evil": 1}, "sdedit", "unknown keys"),
    (np.zeros((32, 32, 3), dtype=np.float64), "sdedit", "expected an image"),
    ({"background": Image.new("RGB", (32, 32)), "layers": "x"}, "inpaint", "layers must be a list"),
    (Image.new("RGB", (32, 32)), "warp", "technique"),
])
def test_bad_editor_values_are_refused_naming_the_field(value, technique, match):
    with pytest.raises(InputError, match=match):
        ET.editor_inputs(value, technique, 32)


def test_files_that_are_not_images_and_oversized_images_are_refused(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image at all")
    with pytest.raises(InputError, match=r"image \(background\): not a readable image"):
        ET.editor_inputs({"background": str(txt), "layers": [], "composite": None}, "sdedit", 32)
    big = tmp_path / "big.png"
    Image.new("L", (4100, 4100)).save(big)  # small on disk, too many pixels
    with pytest.raises(InputError, match="too large"):
        ET.editor_inputs({"background": str(big), "layers": [], "composite": None}, "sdedit", 32)


@pytest.mark.parametrize("kw, match", [
    (dict(technique="inpaint!"), "technique"),
    (dict(prompt="x" * 2000), "prompt: .*limit"),
    (dict(prompt="a\x00b"), "prompt: .*control"),
    (dict(technique="anagram", prompt="a", prompt_2=""), "prompt_2: empty"),
    (dict(strength=float("nan")), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(strength="lots"), "strength"),
    (dict(seed=-1), "seed"),
    (dict(seed=1e30), "seed"),
    (dict(student_steps="3"), "student_steps"),
    (dict(columns=[]), "columns: tick"),
    (dict(columns=["lcm-lora (external)"]), "columns: unknown or not editable"),
    (dict(columns=["../../etc"]), "columns: unknown"),
    (dict(columns="teacher-4 (naive)"), "columns"),
])
def test_run_edit_refuses_each_bad_field_by_name(tiny_teacher, comparer, kw, match):
    t, cmp = tiny_teacher, comparer
    args = dict(technique="sdedit", editor_value=Image.new("RGB", (32, 32), "white"), prompt="", prompt_2="",
                strength=0.5, seed=0, student_steps="4", columns=[TEACHER_4])
    args.update(kw)
    with pytest.raises(InputError, match=match):
        ET.run_edit(t, cmp, **args)


def test_run_edit_runs_students_as_its_comparer_does(tiny_teacher, monkeypatch):
    """The Edit tab switches students as the page's Comparer does: fused weights, or peft's unfused layers."""
    import cdlab.columns
    from cdlab.ui.compare import Comparer

    real, calls = cdlab.columns.use_student, []

    def spy(pipe, name, *, fuse=True):
        calls.append((name, fuse))
        return real(pipe, name, fuse=fuse)

    monkeypatch.setattr(cdlab.columns, "use_student", spy)
    for fuse in (True, False):
        ET.run_edit(tiny_teacher, Comparer(tiny_teacher, batching=False, fuse=fuse), "sdedit",
                    Image.new("RGB", (32, 32), "white"), "", "", 0.5, 0, "4", ["tiny-mbcd-4"])
    assert [c for c in calls if c[0] == "tiny-mbcd-4"] == [("tiny-mbcd-4", True), ("tiny-mbcd-4", False)]


def test_every_preset_runs_in_every_column_and_the_teacher_does_what_was_asked(tiny_teacher, comparer):
    """Each technique, from its preset, in the tab's own entry point: the input column (with the mask for
    inpainting), then one column per ticked column from one noise, NFE as the technique costs; and the
    50-step teacher's result reads as asked (the world's checker), which is what makes the preset a demo."""
    t, cmp = tiny_teacher, comparer
    cols = ET.edit_column_choices(cmp)
    assert cols[:2] == [TEACHER_50, TEACHER_4] and "tiny-mbcd-4" in cols
    seen = set()
    for p in ET.presets(t):
        v = ET.run_edit(t, cmp, p.technique, p.editor_value(), p.prompt, p.prompt_2, p.strength, p.seed, "4",
                        [TEACHER_50, TEACHER_4, "tiny-mbcd-4"])
        seen.add(p.technique)
        heads = [c.label for c in v.columns]
        uses_image = ET.USES_IMAGE[p.technique]
        assert heads == (["input"] if uses_image else []) + [TEACHER_50, TEACHER_4, "tiny-mbcd-4"], p.name
        if p.technique == "inpaint":
            assert [alt for _, alt in v.columns[0].images] == ["input", "mask"]
        by = {c.label: c for c in v.columns}
        two = 2 if p.technique in ("anagram", "hybrid") else 1  # two eps a step
        k50 = 50 if p.strength == 1.0 else int(50 * p.strength)
        assert by[TEACHER_50].nfe == 2 * two * k50 and by["tiny-mbcd-4"].nfe <= 4 * two
        assert all(c.seconds > 0 for c in v.columns if c.label != "input")
        if p.technique != "hybrid":  # hybrids read "far" at 0.5 for every column (README's table)
            assert "✗" not in by[TEACHER_50].lines[-1] and "✓" in by[TEACHER_50].lines[-1], (p.name, by[TEACHER_50].lines)
        html = v.html()
        assert html.count("<figure") == len(v.columns) and f'data-technique="{p.technique}"' in html
        assert len(v.table) == 3 and len(v.gallery()) == sum(len(c.images) for c in v.columns)
    assert seen == set(ET.TECHNIQUES)
