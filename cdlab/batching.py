"""A micro-batcher: requests that arrive while the model is busy are served together in one batch.

    batcher = MicroBatcher(run_batch, max_items=32)       # run_batch(list[item]) -> list[result]
    result = batcher.submit(item)                         # from any thread; blocks until served

One worker thread takes every waiting item (up to ``max_items``) each round and hands them to
``run_batch`` in arrival order. A request that finds the worker idle starts at once (no waiting
window, so a lone request pays nothing); requests that arrive during a round are served together in
the next. This is what makes a classroom's simultaneous requests cheap: a UNet call on 60 samples
costs far less than 30 calls on 2 (the caller's ``run_batch`` does the grouping).

``run_batch`` may return an `Exception` instance in an item's place: that item's ``submit`` raises
it, the others get their results. If ``run_batch`` itself raises, every item of the round raises.

A round may grow while it runs: ``run_batch`` can call `MicroBatcher.adopt` between its steps to take the
items queued since it began into the round (Compare does, so a request that arrives while the students of
a round sample still gets its students before that round's slow teacher-50); it then returns results for
its items followed by the adopted ones.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Ticket(Generic[T]):
    """One submitted item: its place in the queue and, once served, its result."""

    item: T
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    status: str = "waiting"  # "waiting" -> "running (batch of n)" -> "done"
    batch_size: int = 0


class MicroBatcher(Generic[T, R]):
    """Serve ``submit``-ted items in batches through ``run_batch`` on one worker thread.

    Args:
        run_batch: ``list[item] -> list[result or Exception]``, same length and order.
        max_items (`int`): the most items one round takes (the rest wait for the next round).
        name (`str`): the worker thread's name.
    """

    def __init__(self, run_batch: Callable[[list[T]], list[R]], max_items: int = 32, name: str = "cdlab-batcher"):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items!r}")
        self.run_batch = run_batch
        self.max_items = int(max_items)
        self._queue: deque[Ticket[T]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._name = name
        self._running = 0  # items of the round now running
        self._round: list[Ticket[T]] = []  # the tickets of the round now running (`adopt` extends it)
        self.rounds = 0  # how many batches ran (for tests and benchmarks)
        self.sizes: list[int] = []  # the size of each round, newest last (bounded)

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    def enqueue(self, item: T) -> Ticket[T]:
        """Queue ``item`` and return its ticket at once (``ticket.done`` is set when it is served)."""
        ticket = Ticket(item)
        with self._cv:
            self._queue.append(ticket)
            self._ensure_worker()
            self._cv.notify()
        return ticket

    def pending(self) -> int:
        """Items submitted and not yet served: the queued ones and those of the round now running."""
        with self._cv:
            return len(self._queue) + self._running

    def waiting_ahead(self, ticket: Ticket[T]) -> int:
        """How many queued items are ahead of ``ticket`` (0 once it runs)."""
        with self._cv:
            try:
                return list(self._queue).index(ticket)
            except ValueError:
                return 0

    def adopt(self) -> list[T]:
        """From inside ``run_batch`` (the worker thread): take the items queued since the round began into it, up
        to ``max_items`` in the round; returns them in arrival order (``run_batch`` answers for them after its own)."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("adopt() is for run_batch, on the batcher's worker thread")
        with self._cv:
            room = max(0, self.max_items - len(self._round))
            taken = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            self._round.extend(taken)
            self._running = len(self._round)
        for t in self._round:
            t.status, t.batch_size = f"running (batch of {len(self._round)})", len(self._round)
        return [t.item for t in taken]

    def submit(self, item: T, on_wait: Callable[[Ticket[T]], None] | None = None, poll_s: float = 0.25) -> R:
        """Queue ``item``, wait until its batch ran, return its result (or raise its error).

        ``on_wait(ticket)`` is called on the caller's thread about every ``poll_s`` seconds while it waits
        (e.g. to report progress: ``ticket.status``).
        """
        ticket = self.enqueue(item)
        while not ticket.done.wait(poll_s):
            if on_wait is not None:
                on_wait(ticket)
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    if not self._cv.wait(timeout=30.0) and not self._queue:
                        self._thread = None  # idle: the next submit starts a new worker
                        return
                batch = [self._queue.popleft() for _ in range(min(self.max_items, len(self._queue)))]
                self._running = len(batch)
                self._round = batch
            for t in batch:
                t.status, t.batch_size = f"running (batch of {len(batch)})", len(batch)
            try:
                results = self.run_batch([t.item for t in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # every item of this round fails with it; the worker goes on
                results = [e] * len(batch)
            with self._cv:
                self._running, self._round = 0, []
            self.rounds += 1
            self.sizes = (self.sizes + [len(batch)])[-1000:]
            for t, r in zip(batch, results):
                if isinstance(r, BaseException):
                    t.error = r
                else:
                    t.result = r
                t.status = "done"
                t.done.set()
