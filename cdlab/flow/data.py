"""Fashion-MNIST (and MNIST) from their idx files, offline: the data of seed 003, part B ("Project 5B: Flow
Matching from Scratch").

The seed trains on MNIST through ``torchvision.datasets.MNIST``, which downloads it; here nothing is downloaded.
Debian ships Fashion-MNIST (``apt-get install dataset-fashion-mnist``) under
``/usr/share/datasets/fashion-mnist/``: 60,000 training and 10,000 test images, 28x28 grey, 10 classes, in the
idx format MNIST itself uses, so the same reader takes MNIST's files when pointed at them::

    from cdlab.flow.data import load_fashion_mnist, CLASS_NAMES
    images, labels = load_fashion_mnist("test")     # [10000, 1, 28, 28] float32 in [0, 1], [10000] int64
    CLASS_NAMES[int(labels[0])]                      # 'Ankle boot'

**Pixels.** ``torchvision``'s ``ToTensor`` maps uint8 to ``x / 255`` in ``[0, 1]``, and the seed's noising
(§1.2, ``z = x + sigma eps``) and flow (§2, ``x_t = (1 - t) x_0 + t x_1``) act on those values: the data
``x_1`` here is in ``[0, 1]`` too, not rescaled to ``[-1, 1]``.

**The idx format** (LeCun & Cortes, "The MNIST database", file format section): a 4-byte magic number
``0x00 0x00 <dtype> <ndim>`` (dtype ``0x08`` is unsigned byte, the only one these datasets use), then ``ndim``
big-endian uint32 sizes, then the values in C order. Images are ``ndim = 3`` (``N, 28, 28``), labels ``ndim = 1``.
:func:`read_idx` checks all of it, and caps the size it is willing to read before reading the values.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["CLASS_NAMES", "DEFAULT_ROOT", "ENV_VAR", "INSTALL_HINT", "MAX_IDX_BYTES", "PIXEL_RANGE", "SPLITS",
           "data_root", "find_split", "images_of_classes", "load_fashion_mnist", "read_idx"]

PIXEL_RANGE = (0.0, 1.0)  # the images' values (x / 255): what the app and the evaluation show, clipped to it

# The 10 classes of Fashion-MNIST, in label order (Xiao, Rasul & Vollgraf 2017, Table 1).
CLASS_NAMES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                "Sneaker", "Bag", "Ankle boot")
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "CDLAB_FASHION_MNIST"
# split -> the file-name prefix of MNIST's and Fashion-MNIST's idx files
SPLITS = {"train": "train", "test": "t10k"}
# The largest idx payload read: MNIST's training images are 47,040,000 bytes; 64 MiB leaves room, no more.
MAX_IDX_BYTES = 64 * 1024 * 1024
_UBYTE = 0x08
INSTALL_HINT = "apt-get install dataset-fashion-mnist"


def _read_exactly(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated idx file: {what} needs {n} bytes, found {len(data)}")
    return data


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """One idx file (raw, or gzip-compressed when its name ends in ``.gz``) as a uint8 array of its shape.

    Args:
        path: the file, e.g. ``t10k-images-idx3-ubyte.gz``.
        max_bytes (`int`): the largest payload (product of the sizes) accepted; checked from the header, and the
            file's own size checked against it, before any value is read.

    Raises:
        ValueError: a bad magic number (not ``00 00 08 ndim`` with ``ndim`` in 1..3), a payload over
            ``max_bytes``, a file shorter than its header says, or bytes after the payload.
    """
    path = Path(path)
    on_disk = path.stat().st_size
    if on_disk > max_bytes + 16:  # a header is at most 4 + 3 * 4 bytes; gzip only shrinks these files
        raise ValueError(f"{path}: {on_disk} bytes on disk, over the {max_bytes}-byte cap of an idx file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", _read_exactly(f, 4, path, "the magic number"))
        if zero != 0 or dtype != _UBYTE or not 1 <= ndim <= 3:
            raise ValueError(f"{path}: bad idx magic number 0x{zero:04x}{dtype:02x}{ndim:02x}: expected "
                             f"0x000008 followed by 01, 02 or 03 (unsigned bytes, 1 to 3 dimensions)")
        shape = struct.unpack(f">{ndim}I", _read_exactly(f, 4 * ndim, path, "the sizes"))
        size = int(np.prod(shape, dtype=np.int64))
        if size > max_bytes:
            raise ValueError(f"{path}: shape {shape} holds {size} bytes, over the cap of {max_bytes}")
        values = _read_exactly(f, size, path, f"shape {shape}")
        if f.read(1):
            raise ValueError(f"{path}: bytes after the {size} values of shape {shape}")
    return np.frombuffer(values, dtype=np.uint8).reshape(shape)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset folder: ``root`` if given, else ``$CDLAB_FASHION_MNIST``, else :data:`DEFAULT_ROOT`."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find(root: Path, name: str) -> Path:
    """``name.gz`` or ``name`` under root, with the install hint when neither is there."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no {name}.gz or {name} in {root}. Install it with `{INSTALL_HINT}` "
        f"(files in {DEFAULT_ROOT}), or point ${ENV_VAR} (or the data argument) at a folder of idx files "
        f"(MNIST's work too)")


def find_split(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The image and label files of one split (``"train"`` or ``"test"``), without reading them.

    Raises:
        FileNotFoundError: a file is missing (the message says how to install them). ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    folder, prefix = data_root(root), SPLITS[split]
    return _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one split, as the seed's dataloader gives them (``ToTensor``: ``x / 255``).

    Args:
        split (`str`): ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: the folder of ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (see :func:`data_root`).

    Returns:
        ``(images, labels)``: ``[N, 1, 28, 28]`` float32 in ``[0, 1]`` and ``[N]`` int64 in ``0..9``.

    Raises:
        FileNotFoundError: the files are missing (the message says how to install them).
        ValueError: an unknown split, or files that are not a matching pair of 28x28 images and 0..9 labels.
    """
    image_file, label_file = find_split(split, root)
    folder = image_file.parent
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}: {split} images have shape {images.shape}, expected [N, 28, 28]")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{folder}: {images.shape[0]} {split} images but labels of shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{folder}: {split} label {int(labels.max())} outside 0..{len(CLASS_NAMES) - 1}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def images_of_classes(images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """For each entry of ``classes``, an image of that class drawn at random from ``images`` (labelled
    ``labels``, as :func:`load_fashion_mnist` gives them): real images to set beside generated ones of those classes."""
    pick = torch.empty(len(classes), dtype=torch.long)
    for k in classes.unique().tolist():
        rows, where = (labels == k).nonzero()[:, 0], (classes == k).nonzero()[:, 0]
        if not len(rows):
            raise ValueError(f"no image of class {k} to draw from")
        pick[where] = rows[torch.randint(0, len(rows), (len(where),), generator=generator)]
    return images[pick]
