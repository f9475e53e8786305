"""The embedded text-image world: a caption grammar, a Pillow renderer and a checker.

A caption names five attributes::

    "a small red circle at the top left on a blue background"
       size  colour shape  position          background

``render`` draws it (deterministic by seed: the seed jitters the exact placement and size, so
the set of images is unbounded); ``check`` reads an image back and says, attribute by
attribute, whether it satisfies a caption. The checker is this world's stand-in for CLIP score.
"""
from __future__ import annotations

from cdlab.world.grammar import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Caption,
    all_words,
    parse_caption,
    sample_caption,
    sample_captions,
)
from cdlab.world.render import IMAGE_SIZE, render
from cdlab.world.checker import check, adherence

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLORS", "POSITIONS", "SHAPES", "SIZES", "Caption",
    "all_words", "parse_caption", "sample_caption", "sample_captions", "IMAGE_SIZE", "render",
    "check", "adherence",
]
