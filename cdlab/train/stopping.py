"""How a trainer stops: SIGTERM / SIGINT and the death of the app that started it, read as one flag between steps.

Both trainers the app launches use it, the distillation trainer (`cdlab.train.trainer`) and the flow teacher's
(`cdlab.flow.train_teacher`): the loop checks `StopFlag.requested` after each step, saves a checkpoint and exits.
Light on purpose (no torch, no accelerate): the flow teacher's process imports it without the diffusers stack.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["PARENT_ENV", "PARENT_POLL_S", "watch_parent", "StopFlag"]

PARENT_ENV = "CDLAB_PARENT_PID"  # set by the app (cdlab.ui.jobs): the process this trainer must not outlive
PARENT_POLL_S = 0.5


def watch_parent(on_orphaned: Callable[[], None], parent: int | None = None,
                 interval: float = PARENT_POLL_S) -> threading.Thread | None:
    """Call ``on_orphaned()`` once process ``parent`` (default ``$CDLAB_PARENT_PID``) is no longer this process's
    parent: it died, by SIGTERM or SIGKILL, and this one was re-parented. A daemon thread polls ``os.getppid()``
    (portable, and unlike Linux's ``PR_SET_PDEATHSIG`` not tied to the app's thread that started the trainer,
    which Gradio's thread pool may retire). None when there is no parent to watch (a run from the CLI)."""
    if parent is None:
        try:
            parent = int(os.environ.get(PARENT_ENV, ""))
        except ValueError:
            return None

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_orphaned()

    t = threading.Thread(target=poll, name="cdlab-parent-watch", daemon=True)
    t.start()
    return t


class StopFlag:
    """A stop request, read by a training loop between steps.

    ``requested``: SIGTERM or SIGINT arrived (a second SIGINT raises ``KeyboardInterrupt``), or the app is gone.
    ``orphaned``: the app that started the trainer is gone (`watch_parent`): stop, and publish nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self.orphaned = False

    def on_signal(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def on_orphaned(self) -> None:
        """The app died: stop as on SIGTERM (sent to itself, so a trainer still loading exits at once)."""
        self.orphaned = True
        self.requested = True
        os.kill(os.getpid(), signal.SIGTERM)

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """SIGTERM and SIGINT set the flag inside the block (main thread only: elsewhere Python refuses handlers);
        the previous handlers come back after it."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self.on_signal)
        try:
            yield self
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
