"""How a cdlab command ends: ``shutdown.exit(main())``, in place of ``sys.exit(main())``.

When a command returns, CPython runs the ``atexit`` handlers and then tears its modules down, running its cyclic
garbage collector over every object still alive as it goes. After torch, diffusers and Gradio are imported that
walk is most of the end: the app took about 1.8 s to end after a SIGTERM (Ctrl-C, a host stopping it, a test), and
a trainer about 1 s after its main returned, busy on a CPU core all that time. `gc.freeze` moves every tracked
object to a permanent generation the collector no longer walks (CPython's own API, documented for servers that fork),
so the end takes a fraction of that. ``python -m cdlab.ui.bench exit`` measures both ways on the same machine.

What still happens: every ``atexit`` handler (logging flushes and closes its handlers, temporary folders are
removed), the flush of ``sys.stdout`` and ``sys.stderr``, the operating system's release of the memory. What no
longer does: the teardown's collection, and with it the finalizers of the objects it would have freed, an unclosed
file's flush among them (a file written and never closed can end empty). Python promises neither ("It is not
guaranteed that __del__() methods are called for objects that still exist when the interpreter exits", the
language reference, ``object.__del__``; its tutorial warns that a file written without ``with`` or ``close()``
may not reach the disk). So a command closes its files, stops its threads and saves its checkpoints before it
returns, as the app and the trainers do (``MetricsWriter`` and the trainer's log are closed before they return).
"""
from __future__ import annotations

import gc
import sys
from typing import NoReturn

__all__ = ["exit"]


def exit(code: int | None = 0) -> NoReturn:
    """``sys.exit(code)`` without the collector's passes over the whole heap at the interpreter's end.

    For a command's ``if __name__ == "__main__":`` block only: after it, nothing in the process is collected.

    Args:
        code (`int`, *optional*): the exit status, as ``sys.exit`` takes it.
    """
    gc.freeze()
    sys.exit(code)
