"""cdlab.train.data and cdlab.train.coco: sources, bad data, the latent cache, the COCO recipe."""
from __future__ import annotations

import builtins
import json

import pytest
import torch
from PIL import Image

from cdlab.train import coco
from cdlab.train.data import (
    DataError,
    encode_images,
    encode_text,
    folder_source,
    image_to_tensor,
    make_source,
    prepare_data,
    world_source,
)


@pytest.fixture(scope="module")
def pipe(random_teacher):
    """The random tiny teacher's pipeline (its trailing DDIM scheduler)."""
    return random_teacher.pipe


def _folder(tmp_path, rows, images):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, color in images.items():
        Image.new("RGB", (40, 32), color).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_world_source_is_deterministic_and_sized():
    a, b = world_source(5, seed=3, resolution=32), world_source(5, seed=3, resolution=32)
    assert a.captions == b.captions and a.fingerprint == b.fingerprint
    im = a.loader(2)
    assert im.size == (32, 32) and list(im.getdata()) == list(b.loader(2).getdata())
    assert world_source(5, seed=4, resolution=32).fingerprint != a.fingerprint
    x = image_to_tensor(Image.new("RGB", (64, 48), (255, 0, 0)), 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1], -torch.ones(32, 32))


def test_bad_items_are_counted_skips(tmp_path, pipe):
    root = _folder(tmp_path / "f", [
        {"file_name": "ok1.png", "text": "a red square"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "broken.png", "text": "not an image"},
        {"file_name": "ok2.png", "text": "   "},
        {"file_name": "ok3.png", "text": "a blue square"},
    ], {"ok1.png": "red", "ok2.png": "green", "ok3.png": "blue"})
    (root / "broken.png").write_bytes(b"this is not a png")
    logs = []
    data = prepare_data(folder_source(root), pipe, 32, cache=True, cache_root=tmp_path / "cache", log=logs.append)
    assert len(data) == 2 and data.captions == ["a red square", "a blue square"]
    assert data.skipped == {"empty_caption": 1, "missing_or_unreadable_image": 2}
    assert any("skipped 3 of 5" in m for m in logs)
    x0, cond = data.batch(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert x0.shape == (3, 4, 8, 8) and cond.shape == (3, 24, 64)
    on_the_fly = prepare_data(folder_source(root), pipe, 32, cache=False, cache_root=tmp_path / "unused", log=logs.append)
    assert len(on_the_fly) == 2 and on_the_fly.skipped == data.skipped


def test_unusable_data_sets_give_clear_errors(tmp_path, pipe):
    with pytest.raises(DataError, match="no metadata.jsonl"):
        folder_source(tmp_path)
    with pytest.raises(DataError, match="not found"):
        folder_source(tmp_path / "nope")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: not JSON"):
        folder_source(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="file_name"):
        folder_source(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(DataError, match="no usable items"):
        prepare_data(folder_source(tmp_path), pipe, 32, cache=True, cache_root=tmp_path / "c", log=lambda m: None)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        make_source("hf:some/dataset", data_size=0, data_seed=0, resolution=32)


def test_latent_cache_matches_direct_encoding_and_is_keyed(tmp_path, pipe):
    src = world_source(12, seed=0, resolution=32)
    logs = []
    first = prepare_data(src, pipe, 32, cache=True, cache_root=tmp_path, log=logs.append)
    assert not any("cached latents" in m for m in logs)
    again = prepare_data(world_source(12, seed=0, resolution=32), pipe, 32, cache=True, cache_root=tmp_path, log=logs.append)
    assert any("cached latents" in m for m in logs) and again.from_cache
    assert torch.equal(first.latent_mean, again.latent_mean)
    pixels = torch.stack([image_to_tensor(src.loader(i), 32) for i in (0, 5)])
    mean, std = encode_images(pipe, pixels)
    assert torch.allclose(first.latent_mean[[0, 5]].float(), mean, atol=2e-2, rtol=1e-2)  # stored as fp16
    assert torch.allclose(first.latent_std[[0, 5]].float(), std, atol=2e-2, rtol=1e-2)
    emb = encode_text(pipe, [src.captions[5]])
    assert torch.allclose(first.text_embeds[first.text_index[5]].float(), emb[0], atol=1e-2)
    assert torch.allclose(first.uncond, encode_text(pipe, [""]))
    # another data set or resolution is another key
    prepare_data(world_source(12, seed=1, resolution=32), pipe, 32, cache=True, cache_root=tmp_path, log=logs.append)
    prepare_data(world_source(12, seed=0, resolution=16), pipe, 16, cache=True, cache_root=tmp_path, log=logs.append)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


def _fake_coco(root):
    images = root / "val2017"
    images.mkdir(parents=True)
    ann = {"images": [], "annotations": []}
    for i in range(1, 7):
        name = f"{i:012d}.jpg"
        ann["images"].append({"id": i, "file_name": name})
        if i != 6:  # image 6 is listed but its file is missing
            Image.new("RGB", (48, 40), (40 * i, 0, 0)).save(images / name)
        if i != 5:  # image 5 has no caption
            ann["annotations"] += [{"id": 100 + i, "image_id": i, "caption": f"second caption {i}"},
                                   {"id": 10 + i, "image_id": i, "caption": f"  first   caption {i} "}]
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    return images, root / "annotations" / "captions_val2017.json"


def test_coco_recipe_on_a_fake_layout(tmp_path, capsys):
    images, captions = _fake_coco(tmp_path)
    out = tmp_path / "coco3"
    assert coco.main(["--images", str(images), "--captions", str(captions), "--out", str(out), "--n", "3"]) == 0
    rows = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len({r["image_id"] for r in rows}) == 3
    for r in rows:
        assert r["image_id"] in (1, 2, 3, 4)  # 5: no caption, 6: no file
        assert r["text"] == f"first caption {r['image_id']}"  # lowest annotation id, whitespace normalised
        assert (out / r["file_name"]).is_file()
    src = folder_source(out)
    assert len(src) == 3 and src.loader(0).size == (48, 40)
    assert coco.main(["--images", str(images), "--captions", str(captions), "--out", str(out), "--n", "5"]) == 2
    assert "only 4 COCO images" in capsys.readouterr().err
    assert coco.main(["--images", str(tmp_path / "x"), "--captions", str(captions), "--out", str(out)]) == 2
    assert "images folder not found" in capsys.readouterr().err
