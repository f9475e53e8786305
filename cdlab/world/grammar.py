"""Caption grammar of the embedded world: size x colour x shape x position x background."""
from __future__ import annotations

import difflib
import functools
import random
import re
from dataclasses import dataclass, fields

MAX_PROMPT_CHARS = 500  # the longest prompt the lab reads (Compare, Edit, the grammar's reader): checked first

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
    m = _PATTERN.fullmatch(text or "")
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


_FUNCTION_WORDS = {"a", "an", "at", "the", "in", "on"}
_FILLER = {"of", "with", "and", "is", "its", "it", "there"}  # harmless: dropped without a notice
_DEFAULT = Caption("large", "red", "circle", "center", "white")
_SYNONYMS = {"grey": "gray", "centre": "center", "big": "large", "little": "small", "tiny": "small",
             "box": "square", "rectangle": "square", "plus": "cross", "x": "cross", "ball": "circle",
             "dot": "circle", "disc": "circle", "disk": "circle", "violet": "purple", "middle": "center"}


_VOCAB = frozenset(all_words())
_CONTENT = [v for v in all_words() if v not in _FUNCTION_WORDS]


@functools.lru_cache(maxsize=4096)
def _close_word(word: str) -> str | None:
    """The content word ``word`` is a close misspelling of (``difflib`` ratio >= 0.8, words of 4 letters or
    more), or None."""
    close = difflib.get_close_matches(word, _CONTENT, n=1, cutoff=0.8) if len(word) >= 4 else []
    return close[0] if close else None


def nearest_caption(text: str) -> tuple[Caption, list[str]]:
    """The caption of the grammar closest to free text, and the words of ``text`` the world does not know.

    Reads the text word by word: a known word (or a close misspelling of a content word of 4 letters or
    more, by ``difflib`` at ratio 0.8, or a
    common synonym such as "grey", "big", "box") fills its attribute: the first colour is the object's and a
    colour after "on" is the background's; "top"/"bottom" with "left"/"right" give the position. Every
    attribute the text leaves open keeps the default caption's value ("a large red circle in the center on
    a white background"), and an object colour equal to the background moves the background to the next
    allowed one, so the result is always a valid caption.

    Raises ``ValueError`` for a text over `MAX_PROMPT_CHARS` characters, before reading any of it.

    Returns:
        ``(caption, unknown)``: ``unknown`` lists the words that are neither caption words nor close to one,
        in order, without repeats; empty when ``text`` is already a caption of the grammar.
    """
    text = text or ""
    if len(text) > MAX_PROMPT_CHARS:  # before any parsing: the work below is linear, but not free
        raise ValueError(f"The prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    try:
        return parse_caption(text), []
    except ValueError:
        pass
    found: dict[str, str] = {}
    unknown: dict[str, None] = {}  # an ordered set: one lookup per word, so the whole read is linear
    vert = horiz = None
    after_on = False
    for raw in re.findall(r"[a-zA-Z]+", text.lower()):
        w = _SYNONYMS.get(raw, raw)
        if w in _FILLER:
            continue
        if w not in _VOCAB:
            close = _close_word(w)
            if close:
                w = close
            else:
                unknown.setdefault(raw)
                continue
        if w == "on":
            after_on = True
        elif w in SIZES:
            found.setdefault("size", w)
        elif w in SHAPES:
            found.setdefault("shape", w)
        elif w in ("top", "bottom"):
            vert = vert or w
        elif w in ("left", "right"):
            horiz = horiz or w
        elif w == "center":
            found.setdefault("position", "center")
        elif w in COLORS or w in BACKGROUNDS:
            if after_on and w in BACKGROUNDS:
                found.setdefault("background", w)
            elif w in COLORS and "color" not in found:
                found["color"] = w
            elif w in BACKGROUNDS:
                found.setdefault("background", w)
    if vert and horiz and "position" not in found:
        found["position"] = f"{vert} {horiz}"
    values = {**_DEFAULT.as_dict(), **found}
    if values["color"] == values["background"]:
        if "background" in found and "color" not in found:
            values["color"] = next(c for c in COLORS if c != values["background"])
        else:
            values["background"] = next(b for b in BACKGROUNDS if b != values["color"])
    return Caption(**values), list(unknown)
