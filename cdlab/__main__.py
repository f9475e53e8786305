"""``python -m cdlab <command> ...``: one entry point for every job.

    python -m cdlab doctor [--offline]                     # first run on a new machine: does the SD1.5 path work?
    python -m cdlab generate --model tiny --prompt "..."   # one image from the teacher / a student
    python -m cdlab train --model tiny --config FILE.json --key value ...
    python -m cdlab evaluate --model tiny
    python -m cdlab bench sampling|train
    python -m cdlab build-teacher                          # re-train the embedded tiny teacher
    python -m cdlab coco --images DIR --captions FILE --out DIR
"""
from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it; imported only when asked for.
COMMANDS = {
    "doctor": "cdlab.doctor",
    "generate": "cdlab.generate",
    "train": "cdlab.train.cli",
    "evaluate": "cdlab.evaluate",
    "bench": "cdlab.bench",
    "build-teacher": "cdlab.tiny.train_teacher",
    "coco": "cdlab.train.coco",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
