"""Fixed prompts: the course's 8 sampling prompts, a fixed set of tiny-world captions, or COCO captions when a
dataset is given."""
from __future__ import annotations

import random
from pathlib import Path

from cdlab.jsonl import iter_jsonl
from cdlab.world import Caption, sample_captions

# The course's sampling prompts (the final project's "Sampling Prompts").
COURSE_PROMPTS: tuple[str, ...] = (
    "A sad puppy with large eyes.",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k.",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece.",
    "A girl with pale blue hair and a cami tank top.",
    "A lighthouse in a giant wave, origami style.",
    "Belle epoque, christmas, red house in the forest, photo realistic, 8k.",
    "A small cactus with a happy face in the Sahara desert.",
    "Green commercial building with refrigerator and refrigeration units outside.",
)

_CAPTION_KEYS = ("text", "caption", "prompt")


def coco_captions(metadata: str | Path, n: int | None = None, seed: int = 0) -> list[str]:
    """Captions from an image-folder dataset's ``metadata.jsonl`` (one JSON object a line, with a
    ``text``/``caption``/``prompt`` field; a list of captions takes its first). ``n`` of them, drawn
    without replacement, deterministic by seed; all of them, in file order, when ``n`` is None.
    """
    path = Path(metadata)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no COCO metadata at {path} (expected a metadata.jsonl)")
    captions: list[str] = []
    for lineno, row in iter_jsonl(path):
        key = next((k for k in _CAPTION_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"{path}:{lineno}: no caption field (one of {', '.join(_CAPTION_KEYS)})")
        text = row[key][0] if isinstance(row[key], list) else row[key]
        captions.append(str(text))
    if not captions:
        raise ValueError(f"{path} holds no captions")
    if n is None:
        return captions
    if n > len(captions):
        raise ValueError(f"asked for {n} captions but {path} holds only {len(captions)}")
    return random.Random(seed).sample(captions, n)


def course_prompts(n: int | None = None) -> list[str]:
    """The course's 8 prompts, cycled to ``n`` (each repeat gets its own seed in the evaluation)."""
    n = len(COURSE_PROMPTS) if n is None else n
    return [COURSE_PROMPTS[i % len(COURSE_PROMPTS)] for i in range(n)]


def tiny_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """A fixed, varied set of tiny-world captions (every shape, both sizes, several positions).

    The first is the Compare page's default: at seed 0 and the teacher's guidance the naive 4-step teacher
    draws it white on cyan while teacher-50 and every shipped student draw it right (checked by
    tests/test_ui_compare.py::test_the_default_preset_shows_naive_sampling_fail)."""
    fixed = [
        Caption("large", "yellow", "triangle", "top right", "gray"),
        Caption("large", "red", "circle", "center", "white"),
        Caption("small", "blue", "square", "top left", "yellow"),
        Caption("small", "yellow", "cross", "top right", "blue"),
    ]
    rest = [c for c in sample_captions(n, seed=seed) if c not in fixed] if n > len(fixed) else []
    return [c.text for c in (fixed + rest)[:n]]
