"""The captions an evaluation samples, and the checks a caption list passes.

The tiny world draws its own captions (``DEFAULT_N`` of them by ``PROMPT_SEED``; its checker reads them); an
SD1.5 evaluation takes a caption list: a prompt file (:func:`read_prompts`: a ``.txt``, one caption a line,
blank lines and lines starting with ``#`` skipped; a ``.json`` list of strings; or a COCO ``metadata.jsonl``,
the COCO recipe's format), a list of strings, COCO captions drawn from a ``metadata.jsonl``, or the course's 8
prompts. Every caption is validated by :func:`check_prompts`, with errors that name the field or flag.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from cdlab.prompts import coco_captions, course_prompts
from cdlab.world import sample_captions

__all__ = ["DEFAULT_N", "PROMPT_SEED", "MAX_CAPTION_CHARS", "EvaluationError", "check_prompts", "read_prompts",
           "evaluation_prompts"]

# 128 world captions: 271 tiny-UNet passes (0.2 GFLOP/image each) on 128 images is ~7 TFLOP, about a minute
# at the ~110 GFLOP/s two CPU cores reach; 256 would pass the 2-minute budget.
DEFAULT_N = 128
PROMPT_SEED = 2024            # the fixed caption draw of the tiny world
MAX_CAPTION_CHARS = 1000      # a longer "caption" in a prompt file is a wrong file, not a caption


class EvaluationError(ValueError):
    """Bad evaluation input (steps, sizes, paths, captions)."""


def check_prompts(captions: Sequence[Any], what: str = "prompts",
                  labels: Sequence[str] | None = None) -> list[str]:
    """Validate a caption list: at least one, each a non-empty string (surrounding whitespace stripped)
    of at most ``MAX_CAPTION_CHARS`` characters without control characters.

    Args:
        captions: the captions.
        what (`str`): the field or flag named in errors (``"--prompts"`` on the command line).
        labels: where each caption came from (``"<file>:3"``), for errors; default ``"caption <i>"``.

    Returns:
        The stripped captions.

    Raises:
        EvaluationError: one line naming ``what`` and the bad caption.
    """
    if isinstance(captions, (str, bytes)) or not isinstance(captions, Sequence):
        raise EvaluationError(f"{what}: expected a list of caption strings, got {type(captions).__name__}")
    if not captions:
        raise EvaluationError(f"{what}: no captions")
    out = []
    for i, text in enumerate(captions):
        where = labels[i] if labels is not None else f"caption {i + 1}"
        if not isinstance(text, str):
            raise EvaluationError(f"{what}: {where}: a caption must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise EvaluationError(f"{what}: {where}: empty caption")
        bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise EvaluationError(f"{what}: {where}: caption has a control character (U+{ord(bad):04X})")
        if len(text) > MAX_CAPTION_CHARS:
            raise EvaluationError(
                f"{what}: {where}: caption of {len(text)} characters (at most {MAX_CAPTION_CHARS})")
        out.append(text)
    return out


def read_prompts(path: str | os.PathLike, n: int | None = None, *, what: str = "prompts") -> list[str]:
    """The captions of a prompt file, in file order, validated by `check_prompts`.

    Args:
        path: a ``.txt`` file (one caption a line; blank lines and lines starting with ``#`` skipped), a
            ``.json`` list of strings, or a ``metadata.jsonl`` (the COCO recipe's format, read by
            `cdlab.prompts.coco_captions`; a folder holding one works too).
        n (`int`, *optional*): take the first ``n`` captions (default all); the file must hold that many.
        what (`str`): the field or flag named in errors (``"--prompts"`` on the command line).

    Raises:
        EvaluationError: missing or unreadable file, unknown format, no captions, a bad caption, or fewer
            captions than ``n``; one line naming ``what``.
    """
    p = Path(path)
    if not p.exists():
        raise EvaluationError(f"{what}: no such file: {p}")
    suffix = p.suffix.lower()
    labels: list[str] | None = None
    try:
        if p.is_dir() or suffix == ".jsonl":
            captions: Any = coco_captions(p)
            labels = [f"{p.name if p.is_file() else p}: caption {i + 1}" for i in range(len(captions))]
        elif suffix == ".json":
            try:
                captions = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{what}: {p} is not valid JSON ({e.msg}, line {e.lineno})") from None
            if not isinstance(captions, list):
                raise EvaluationError(
                    f"{what}: {p} must hold a JSON list of caption strings, got a {type(captions).__name__}")
            labels = [f"{p.name}[{i}]" for i in range(len(captions))]
        elif suffix in (".txt", ""):
            captions, labels = [], []
            # split("\n"), not splitlines(): a form feed or other control character is an error, not a line break
            for lineno, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    captions.append(text)
                    labels.append(f"{p.name}:{lineno}")
        else:
            raise EvaluationError(f"{what}: {p}: expected a .txt (one caption a line), a .json list of strings "
                                  f"or a metadata.jsonl, not {p.suffix!r}")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{what}: {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (FileNotFoundError, ValueError, TypeError) as e:  # coco_captions: no metadata.jsonl, bad rows
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"{what}: {e}") from None
    except OSError as e:
        raise EvaluationError(f"{what}: cannot read {p}: {e.strerror or e}") from None
    if not captions:
        raise EvaluationError(f"{what}: {p} holds no captions")
    captions = check_prompts(captions, what, labels)
    if n is not None:
        if n < 1:
            raise EvaluationError(f"n must be >= 1, got {n}")
        if n > len(captions):
            raise EvaluationError(f"{what}: {p} holds {len(captions)} captions, fewer than the {n} asked for")
        captions = captions[:n]
    return captions


def evaluation_prompts(world: bool, n: int | None, metadata: str | Path | None, seed: int,
                       prompts: str | os.PathLike | Sequence[str] | None = None,
                       ) -> tuple[list[str], list | None, str]:
    """The captions of an evaluation: ``(texts, world captions or None, where they came from)``.

    Args:
        world (`bool`): the tiny world's suite: ``n`` captions drawn by ``PROMPT_SEED + seed`` (default
            ``DEFAULT_N``); ``prompts`` is refused (the checker reads only the world's own captions).
        n (`int`, *optional*): how many (a prompt file or list: its first ``n``; the course's 8: cycled).
        metadata: a COCO ``metadata.jsonl``, ``n`` captions drawn from it by ``seed``.
        seed (`int`): the evaluation's seed.
        prompts: a prompt file (:func:`read_prompts`) or a list of caption strings.

    Raises:
        EvaluationError: both ``prompts`` and ``metadata``, a caption list for the world, a bad caption, or
            fewer captions than ``n``.
    """
    if prompts is not None and metadata:
        raise EvaluationError("give prompts or metadata, not both")
    if world:
        if prompts is not None:
            raise EvaluationError("prompts: a caption list is for the SD metrics (suite 'sd'); the tiny world "
                                  "draws its own captions, which its checker reads")
        caps = sample_captions(DEFAULT_N if n is None else n, seed=PROMPT_SEED + seed)
        return [c.text for c in caps], caps, "tiny-world captions"
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts, n), None, f"captions from {Path(prompts).name}"
    if prompts is not None:
        texts = check_prompts(prompts, "prompts")
        if n is not None and n > len(texts):
            raise EvaluationError(f"prompts: {len(texts)} captions given, fewer than the {n} asked for")
        return texts[:n], None, "given captions"
    if metadata:
        texts = coco_captions(metadata, n, seed=seed)
        return texts, None, f"COCO captions ({Path(metadata).name})"
    return course_prompts(n), None, "the course's 8 prompts"
