"""Fashion-MNIST's idx files, crafted for tests: the bytes of one file, and a small training set on disk."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def idx_bytes(values: np.ndarray, magic: bytes | None = None) -> bytes:
    """``values`` as an idx file of unsigned bytes (``magic``: another header, to test the reader's refusals)."""
    header = magic if magic is not None else bytes([0, 0, 0x08, values.ndim])
    return header + struct.pack(f">{values.ndim}I", *values.shape) + values.astype(np.uint8).tobytes()


def write_train_set(folder: Path, n: int) -> Path:
    """``n`` random 28x28 training images (seed 0) and the labels 0..9 in turn, in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (n, 28, 28))))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 10))
    return folder
