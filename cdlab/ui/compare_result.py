"""What a Compare request returns: each column's image, numbers and trajectory (`ColumnResult`), and the whole
comparison (`CompareResult`, whole or partial while it streams), with the speed-ups against teacher-50.
Pure data (no Gradio); `cdlab.ui.compare` makes them, `cdlab.ui.compare_view` shows them.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from cdlab.columns import TEACHER_50, steps_text
from cdlab.ui.compare_view import compose_comparison

__all__ = ["ColumnResult", "CompareResult", "fill_speedups"]


@dataclass
class ColumnResult:
    """One column's image, numbers and (optionally) its trajectory, aligned to the request's timestep grid.

    ``seconds`` is the wall time of the sampling that produced the column (activation, the sampler and
    decoding; loading an adapter the first time is ``load_seconds``, shown apart): when the micro-batcher served
    ``batch`` requests together, that call made all ``batch`` images, and ``seconds_per_image`` is
    ``seconds / batch``. A teacher column served from the cache (same prompt, seed and guidance as an
    earlier request) keeps the time it was measured with and has ``cached=True``.
    """

    label: str
    image: Any  # PIL.Image
    seconds: float
    nfe: int
    steps: int
    speedup: float | None = None
    speedup_estimated: bool = False
    method: str = ""
    batch: int = 1
    cached: bool = False
    load_seconds: float = 0.0  # reading the adapter / preparing its weights (first use only), not in ``seconds``
    timesteps: list[int] = field(default_factory=list)  # where the network was evaluated
    # The trajectory on the request's grid (`CompareResult.grid`): one entry per grid timestep, None where
    # this column has no step near it. x0: the prediction at that step; xt: the latent it was made from.
    trajectory: list[Any] = field(default_factory=list)
    trajectory_xt: list[Any] = field(default_factory=list)
    trajectory_timesteps: list[int | None] = field(default_factory=list)  # the column's own timestep per cell
    error: str | None = None  # set when this column could not be produced (its image says why)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.batch)

    def speedup_text(self) -> str:
        return "–" if self.speedup is None else f"{'≈' if self.speedup_estimated else ''}{self.speedup:.1f}×"

    def timing_text(self) -> str:
        if self.cached:
            text = f"{self.seconds:.2f} s (cached)"
        elif self.batch > 1:
            text = f"{self.seconds:.2f} s for {self.batch} requests at once"
        else:
            text = f"{self.seconds:.2f} s"
        if self.load_seconds >= 0.05:
            text += f" (+{self.load_seconds:.2f} s loading, first use)"
        return text

    def caption(self) -> str:
        """The column's full label in one line (the gallery caption, the API)."""
        if self.error:
            return f"{self.label} · failed: {self.error}"
        return f"{self.label} · {self.timing_text()} · NFE {self.nfe} · speed-up {self.speedup_text()}"

    def caption_lines(self) -> list[str]:
        """The column's label in full, line by line (under its image)."""
        if self.error:
            return [self.label, f"failed: {self.error}"]
        return [self.label, self.method, f"{steps_text(self.steps)} · NFE {self.nfe}", self.timing_text(),
                f"speed-up {self.speedup_text()} vs teacher-50"]


@dataclass
class CompareResult:
    prompt: str
    seed: int
    guidance: float
    student_steps: int | None  # None: each student at its card's steps ("as trained")
    teacher: str
    columns: list[ColumnResult]
    warnings: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    grid: list[int] = field(default_factory=list)  # the trajectory's timesteps, high to low (empty: none)
    batch: int = 1  # requests served together with this one (1: alone)
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # tells results apart
    pending: list[str] = field(default_factory=list)  # a partial result (`Comparer.stream`): labels still sampling
    labels: list[str] = field(default_factory=list)  # every column's label, in the request's order

    def table(self) -> list[list[Any]]:
        """Rows ``[column, seconds, NFE, speedup]`` for a table."""
        rows = []
        for c in self.columns:
            if c.error:
                rows.append([c.label, None, None, f"failed: {c.error}"])
                continue
            rows.append([c.label, round(c.seconds, 3), c.nfe, c.speedup_text()])
        return rows

    def compose(self, cell: int = 256, with_trajectory: bool | None = None):
        """The whole comparison as one captioned PIL image (the "Download" PNG)."""
        return compose_comparison(self, cell=cell, with_trajectory=with_trajectory)


def fill_speedups(results: list[ColumnResult]) -> None:
    """Speed-up against teacher-50, per image: measured when that column ran in this request (cached or not),
    else estimated from NFE (marked ≈)."""
    ref = next((r for r in results if r.label == TEACHER_50 and not r.error), None)
    for r in results:
        if r.error:
            continue
        if ref is not None and r.seconds > 0:
            r.speedup = ref.seconds_per_image / r.seconds_per_image
        elif r.nfe > 0:
            r.speedup, r.speedup_estimated = 100 / r.nfe, True  # teacher-50 with CFG: 100 NFE
