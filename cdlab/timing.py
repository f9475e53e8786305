"""Timing on any device: GPU work is asynchronous, so a clock read needs the device to finish first."""
from __future__ import annotations

from typing import Any

__all__ = ["sync"]


def sync(device: Any) -> None:
    """Wait for the CUDA work queued on ``device`` (a no-op on the CPU), so ``time.perf_counter`` measures it."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)
