"""The flow teacher's own samples, the pairs its reflow and DMD students learn from.

    from cdlab.flow.pairs import cached_teacher_pairs
    z, x1 = cached_teacher_pairs(unet, 4096, guidance=1.5, seed=0, cache="cache")   # 100 NFE a pair, cached

A pair is a noise ``z`` and the teacher's Euler-50 sample with CFG from it (:func:`teacher_pairs`): reflow's
coupling (Liu et al. 2023) and DMD's regression targets (Yin et al. 2024), :mod:`cdlab.flow.distill`. With W
windows (piecewise rectified flow, Yan et al. 2024) the teacher's states at the window edges (:func:`window_edges`)
are kept instead of its last one alone.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from cdlab.flow import matching
from cdlab.paths import write_safetensors_atomic

__all__ = ["PAIR_CHUNK", "window_edges", "teacher_pairs", "pair_labels", "pair_noise", "cached_teacher_pairs"]


def window_edges(windows: int) -> list[float]:
    """The flow times ``[0, 1/W, ..., 1]`` that cut ``[0, 1]`` into W windows: where the lab's W-step sampler
    stands (its timesteps ``consistency_timesteps(W, W)`` are ``t = 1 - k / 1000``, the first, k = 999, taken as
    pure noise at t = 0), e.g. 4 -> [0, 0.25, 0.5, 0.75, 1]."""
    if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= 50:
        raise ValueError(f"windows must be an integer in [1, 50], got {windows!r}")
    return [j / windows for j in range(windows + 1)]


@torch.no_grad()
def teacher_pairs(unet: nn.Module, labels: torch.Tensor, num_steps: int = 50, guidance: float = matching.GUIDANCE,
                  generator: torch.Generator | None = None, batch_size: int = matching.ROWS // 2,
                  windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflow's coupling: noise ``z`` (CPU ``generator``) and the teacher's Euler sample ``x1`` from it, with CFG.

    ``windows`` W > 1 (piecewise rectified flow): the second tensor is the teacher's states at the window edges
    after the start, ``[B, W, 1, 28, 28]`` (the last is ``x1``). The Euler grid is then the ``num_steps`` grid with
    the edges added (50 steps and 4 windows: 52 steps, the edges 0.25 and 0.75 are not on it).

    ``batch_size``: images a UNet call (with CFG twice as many rows, :data:`cdlab.flow.matching.ROWS`); the samples
    do not depend on it, up to float rounding."""
    z = torch.randn((len(labels), 1, 28, 28), generator=generator)
    if windows == 1:
        return z, matching.sample(unet, labels, num_steps, guidance, x0=z, batch_size=batch_size).cpu()
    edges = window_edges(windows)
    grid = sorted({round(i / num_steps, 12) for i in range(num_steps + 1)} | {round(e, 12) for e in edges})
    device, states = next(unet.parameters()).device, []
    for i in range(0, len(z), batch_size):
        velocity = matching.guided_velocity(unet, matching.one_hot(labels[i:i + batch_size]).to(device), guidance)
        x, row = z[i:i + batch_size].to(device), []
        for a, b in zip(edges, edges[1:]):
            x = matching.sample_euler(velocity, x, torch.tensor([t for t in grid if a <= t <= b]))
            row.append(x.cpu())
        states.append(torch.stack(row, 1))
    return z, torch.cat(states)


PAIR_CHUNK = 256  # pairs a cache file holds


def pair_labels(count: int) -> torch.Tensor:
    """The class of pair ``i`` is ``i % 10``: every class equally often."""
    return torch.arange(count) % matching.NUM_CLASSES


def _chunk_size(count: int) -> int:
    return max(1, min(PAIR_CHUNK, count))


def _chunk_generator(seed: int, k: int) -> torch.Generator:
    """Chunk ``k``'s generator: its pairs' noise is its first draw (:func:`teacher_pairs`)."""
    return torch.Generator().manual_seed(seed * 100003 + k)


def pair_noise(count: int, seed: int) -> torch.Tensor:
    """The noises ``z`` of :func:`cached_teacher_pairs`' first ``count`` pairs, without the teacher: another
    sampler's pairs from the same noises and classes (``tools/flow_student_trial.py --pairs-from``)."""
    chunk = _chunk_size(count)
    return torch.cat([torch.randn((chunk, 1, 28, 28), generator=_chunk_generator(seed, k))
                      for k in range(math.ceil(count / chunk))])[:count]


@torch.no_grad()
def cached_teacher_pairs(unet: nn.Module, count: int, *, guidance: float, seed: int, num_steps: int = 50,
                         windows: int = 1, cache: str | Path | None = None, log: Callable[[str], None] = print,
                         should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``count`` reflow pairs (:func:`teacher_pairs`, labels :func:`pair_labels`) made in chunks of
    :data:`PAIR_CHUNK` (fewer when ``count`` is smaller), chunk ``k``'s noise from its own generator, seeded
    ``seed * 100003 + k``, so that the pairs do not depend on how many are asked for or how often the run stopped.

    At 50 steps with CFG a pair costs 100 NFE (about 0.3 s on one CPU thread), so with ``cache`` (a folder) every
    chunk is written there as it is made (``flow-pairs-<key>/chunk-<k>.safetensors``, atomically) and read back
    by any later run of the same teacher weights, guidance, steps, seed and chunk size: a run cut off loses at
    most the chunk it was making, and a run with more pairs reuses a shorter one's. ``should_stop`` is asked
    before each chunk is made: True returns None (a Stop while the pairs are drawn, which take minutes)."""
    from cdlab.train.data import base_fingerprint

    chunk = _chunk_size(count)
    piecewise = "" if windows == 1 else f"|windows={windows}"
    key = hashlib.sha256(f"flow-pairs|v1|{base_fingerprint(unet)}|{float(guidance)!r}|{num_steps}|{seed}|{chunk}"
                         f"{piecewise}".encode()).hexdigest()[:20]
    folder = None if cache is None else Path(cache) / f"flow-pairs-{key}"
    zs, xs, made, start = [], [], 0, time.monotonic()
    for k in range(math.ceil(count / chunk)):
        path = None if folder is None else folder / f"chunk-{k:05d}.safetensors"
        if path is not None and path.is_file():
            t = load_file(str(path))
            zs.append(t["z"])
            xs.append(t["x1"])
            continue
        if should_stop is not None and should_stop():
            return None
        labels = pair_labels((k + 1) * chunk)[k * chunk:]
        z, x1 = teacher_pairs(unet, labels, num_steps, guidance, _chunk_generator(seed, k), windows=windows)
        zs.append(z)
        xs.append(x1)
        made += chunk
        if path is not None:
            write_safetensors_atomic(path, {"z": z, "x1": x1})
        log(f"reflow pairs: {min((k + 1) * chunk, count)} of {count} ({made} made, "
            f"{time.monotonic() - start:.0f} s)")
    return torch.cat(zs)[:count], torch.cat(xs)[:count]
