"""The course's COCO recipe: an image folder of COCO val2017 images with one caption each.

    python -m cdlab coco --images val2017 --captions annotations/captions_val2017.json --out data/coco5k --n 5000

Reads the official files (``val2017/*.jpg`` and ``captions_val2017.json``), takes ``n`` images that have a
caption (a seeded random choice; the first caption of each, by annotation id), and writes
``OUT/images/<file_name>`` (hard links when possible, else copies) and ``OUT/metadata.jsonl`` with
``{"file_name": "images/...", "text": "..."}`` lines: the Hugging Face imagefolder convention that
``python -m cdlab train --data OUT`` reads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path


def build_coco_subset(images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike,
                      n: int = 5000, seed: int = 0) -> Path:
    """Write the subset and return ``OUT/metadata.jsonl``. Raises ``ValueError``/``FileNotFoundError`` clearly."""
    images, captions, out = Path(images), Path(captions), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"COCO images folder not found: {images} (expected e.g. val2017/)")
    if not captions.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {captions} (expected captions_val2017.json)")
    try:
        ann = json.loads(captions.read_text())
        by_id = {im["id"]: im["file_name"] for im in ann["images"]}
        first: dict[int, tuple[int, str]] = {}
        for a in ann["annotations"]:
            text = " ".join(str(a.get("caption", "")).split())
            if text and (a["image_id"] not in first or a["id"] < first[a["image_id"]][0]):
                first[a["image_id"]] = (a["id"], text)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{captions} is not a COCO captions file ({type(e).__name__}: {e})") from None
    usable = sorted(i for i in first if i in by_id and (images / by_id[i]).is_file())
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if len(usable) < n:
        raise ValueError(f"only {len(usable)} COCO images have both a caption and a file in {images}; asked for {n}")
    chosen = sorted(random.Random(seed).sample(usable, n))
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in chosen:
        name = by_id[i]
        src, dst = images / name, out / "images" / name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        lines.append(json.dumps({"file_name": f"images/{name}", "text": first[i][1], "image_id": i}))
    meta = out / "metadata.jsonl"
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdlab coco", description="Build the course's COCO image folder.")
    p.add_argument("--images", required=True, help="COCO images folder, e.g. val2017")
    p.add_argument("--captions", required=True, help="captions_val2017.json")
    p.add_argument("--out", required=True, help="output folder (images/ and metadata.jsonl)")
    p.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        meta = build_coco_subset(args.images, args.captions, args.out, args.n, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"cdlab coco: error: {e}", file=sys.stderr)
        return 2
    print(f"cdlab coco: wrote {args.n} images and {meta}")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
