"""Caption grammar of the embedded world: size x colour x shape x position x background."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields

# RGB of every colour word; objects and backgrounds draw from the same palette.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (40, 210, 220),
}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "blue", "green", "yellow", "cyan", "red")
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("size", "color", "shape", "position", "background")


@dataclass(frozen=True)
class Caption:
    """One point of the grammar."""

    size: str
    color: str
    shape: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in (("size", SIZES), ("color", COLORS), ("shape", SHAPES),
                              ("position", POSITIONS), ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {allowed}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} object on a {self.background} background is invisible")

    @property
    def text(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        return self.text


_PATTERN = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<color>\w+)\s+(?P<shape>\w+)\s+"
    r"(?:in the (?P<center>center)|at the (?P<position>(?:top|bottom) (?:left|right)))\s+"
    r"on an?\s+(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_caption(text: str) -> Caption:
    """Parse a caption of the grammar; raise ``ValueError`` with the expected form otherwise."""
    m = _PATTERN.match(text or "")
    if not m:
        raise ValueError(
            f"not a caption of the tiny world: {text!r}; expected e.g. "
            f"'{Caption('small', 'red', 'circle', 'top left', 'blue').text}'"
        )
    g = {k: (v.lower() if v else v) for k, v in m.groupdict().items()}
    return Caption(g["size"], g["color"], g["shape"], g["center"] or g["position"], g["background"])


def sample_caption(rng: random.Random) -> Caption:
    """Draw a caption uniformly over the grammar (object and background colours differ)."""
    color = rng.choice(COLORS)
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    return Caption(rng.choice(SIZES), color, rng.choice(SHAPES), rng.choice(POSITIONS), background)


def sample_captions(n: int, seed: int = 0) -> list[Caption]:
    """``n`` captions, deterministic by seed."""
    rng = random.Random(seed)
    return [sample_caption(rng) for _ in range(n)]


def all_words() -> list[str]:
    """Every word a caption can use (for building the tokenizer)."""
    words = {"a", "an", "at", "the", "in", "on", "background", "top", "bottom", "left", "right", "center"}
    words.update(COLORS, BACKGROUNDS, SHAPES, SIZES, PALETTE)
    return sorted(words)
