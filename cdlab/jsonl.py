"""Reading ``metadata.jsonl`` (the Hugging Face imagefolder convention), shared by the trainer's
data sources and the evaluation's COCO prompts."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed object)`` for every non-blank line; a line that is not JSON
    raises ``error("<path>:<line>: not JSON (...)")``."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not JSON ({e.msg})") from None
