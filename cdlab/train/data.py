"""Training data: image-caption sources, and their latents and text embeddings cached on disk.

Sources (``TrainConfig.data``):

* ``"world"``: the embedded world, ``data_size`` captions from ``cdlab.world.sample_captions`` each
  rendered with its own jitter seed;
* a folder with ``metadata.jsonl`` (the Hugging Face imagefolder convention: one JSON object a line
  with ``file_name`` and ``text``), e.g. what ``python -m cdlab coco`` writes;
* ``"hf:NAME"``: a Hugging Face ``datasets`` dataset with image and caption columns.

Every item is read once, up front: a missing file, an unreadable image or an empty caption is a
counted skip (reported), never an error in the middle of a training step. With ``cache_latents``
the VAE latent distribution (mean, std) of every image and the text embedding of every distinct
caption are computed once and stored as safetensors under
``<cache_root>/<key>/`` where the key hashes the model's VAE and text-encoder weights, the
resolution and the data, so a training step runs only the UNet.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdlab.jsonl import iter_jsonl

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


class DataError(ValueError):
    """The data set cannot be used; the message says what is wrong and where."""


# ------------------------------------------------------------------------------------------ sources


@dataclass
class Source:
    """A list of (image, caption) items; ``load(i)`` returns ``(PIL image, caption)`` or raises."""

    description: str
    fingerprint: str
    captions: list[str]
    loader: Any  # callable i -> PIL.Image

    def __len__(self) -> int:
        return len(self.captions)

    def load(self, i: int):
        return self.loader(i), self.captions[i]


def world_source(n: int, seed: int, resolution: int) -> Source:
    from cdlab.world import render, sample_captions

    if n < 1:
        raise DataError("data_size must be >= 1 for the world data set")
    caps = sample_captions(n, seed=seed)
    jitter = seed * 1_000_003

    def load(i: int):
        return render(caps[i], seed=jitter + i, size=resolution)

    return Source(f"tiny world ({n} images, seed {seed})", f"world:{n}:{seed}",
                  [c.text for c in caps], load)


def folder_source(path: str | os.PathLike, max_items: int = 0) -> Source:
    root = Path(path).expanduser()
    meta = root / "metadata.jsonl"
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if not meta.is_file():
        raise DataError(f"{root} has no metadata.jsonl (one JSON object a line: "
                        '{"file_name": "0001.jpg", "text": "a caption"}); build one with `python -m cdlab coco`')
    files: list[str] = []
    caps: list[str] = []
    h = hashlib.sha256()
    for lineno, row in iter_jsonl(meta, error=DataError):
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{meta}:{lineno}: needs a 'file_name' field")
        text = row.get("text", row.get("caption", ""))
        if isinstance(text, list):
            text = text[0] if text else ""
        files.append(str(row["file_name"]))
        caps.append(str(text or ""))
        fp = root / files[-1]
        st = fp.stat() if fp.is_file() else None
        h.update(f"{files[-1]}\t{caps[-1]}\t{st.st_size if st else -1}\t{st.st_mtime_ns if st else -1}\n".encode())
        if max_items and len(files) >= max_items:
            break
    if not files:
        raise DataError(f"{meta} lists no images")

    def load(i: int):
        from PIL import Image

        with Image.open(root / files[i]) as im:
            return im.convert("RGB")

    return Source(f"image folder {root} ({len(files)} entries)", f"folder:{h.hexdigest()}", caps, load)


HF_MAX_ROWS = 10_000  # rows read from a ``datasets`` data set at most (data_size 0, "all", reads this many)


def _hf_image(value: Any):
    """A row's image as PIL RGB: decoded here, one at a time (a PIL image, a path, or ``{"bytes", "path"}``)."""
    from PIL import Image

    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        with Image.open(value) as f:
            return f.convert("RGB")
    return value.convert("RGB")


def hf_source(name: str, split: str, image_column: str, caption_column: str, max_items: int = 0) -> Source:
    """The first ``max_items`` rows (at most `HF_MAX_ROWS`; 0: that many) of a ``datasets`` data set, streamed:
    only those rows are downloaded, never the whole split, and their images stay compressed until read."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data 'hf:{name}' needs the `datasets` package: pip install datasets "
                        "(or convert it to an image folder with metadata.jsonl)") from None
    n = min(max_items or HF_MAX_ROWS, HF_MAX_ROWS)
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        if isinstance((getattr(ds, "features", None) or {}).get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes now, pixels when read
        rows = list(ds.take(n))
    except Exception as e:
        raise DataError(f"could not load the datasets data set {name!r} (split {split!r}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not rows:
        raise DataError(f"data set {name!r} (split {split!r}) has no rows")
    missing = [c for c in (image_column, caption_column) if c not in rows[0]]
    if missing:
        raise DataError(f"data set {name!r} has no column(s) {missing}; it has {sorted(rows[0])}. "
                        "Set image_column / caption_column.")
    caps = []
    for row in rows:
        c = row[caption_column]
        c = c[0] if isinstance(c, list) and c else c
        caps.append(str(c or ""))
    h = hashlib.sha256("\n".join(caps).encode())
    for row in rows:  # the images' bytes where the rows hold them (the cache key changes with the pictures)
        v = row[image_column]
        if isinstance(v, dict):
            h.update(v.get("bytes") or str(v.get("path")).encode())
    fp = h.hexdigest()[:16]
    return Source(f"datasets {name}[{split}] (first {len(rows)} rows)", f"hf:{name}:{split}:{fp}:{n}", caps,
                  lambda i: _hf_image(rows[i][image_column]))


def make_source(data: str, *, data_size: int, data_seed: int, resolution: int, image_column: str = "image",
                caption_column: str = "text", data_split: str = "train") -> Source:
    """The source named by ``TrainConfig.data``."""
    if data == "world":
        return world_source(data_size, data_seed, resolution)
    if data.startswith("hf:"):
        return hf_source(data[3:], data_split, image_column, caption_column, data_size)
    return folder_source(data, data_size)


def image_to_tensor(image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> ``[3, R, R]`` in [-1, 1]: shorter side resized to R, then centre-cropped."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def scan(source: Source, resolution: int) -> tuple[list[int], dict[str, int], list[str]]:
    """Indices of usable items, skip counts by reason, and a few example messages."""
    good: list[int] = []
    skipped = {"empty_caption": 0, "missing_or_unreadable_image": 0}
    examples: list[str] = []
    for i in range(len(source)):
        if not source.captions[i].strip():
            skipped["empty_caption"] += 1
            if len(examples) < 5:
                examples.append(f"item {i}: empty caption")
            continue
        try:
            img = source.loader(i)
            img.load()
        except Exception as e:  # PIL raises many types for a bad file
            skipped["missing_or_unreadable_image"] += 1
            if len(examples) < 5:
                examples.append(f"item {i}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        good.append(i)
    return good, skipped, examples


# ---------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_text(pipe: Any, captions: list[str], batch: int = 256) -> torch.Tensor:
    """Text embeddings ``[N, L, D]`` (padded to the tokenizer's max length, as the pipeline does)."""
    out = []
    te = pipe.text_encoder
    for i in range(0, len(captions), batch):
        tok = pipe.tokenizer(captions[i:i + batch], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out.append(te(tok.input_ids.to(te.device))[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(pipe: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior, already times ``scaling_factor`` (fp32, on the VAE's device)."""
    vae = pipe.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    sf = vae.config.scaling_factor
    return dist.mean.float() * sf, dist.std.float() * sf


def model_fingerprint(pipe: Any) -> str:
    """A hash of the VAE's and text encoder's weights (per-tensor sums), configs and tokenizer."""
    h = hashlib.sha256()
    for module in (pipe.vae, pipe.text_encoder):
        conf = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        h.update(json.dumps(conf, sort_keys=True, default=str).encode())
        for n, p in module.state_dict().items():
            x = p.detach().double()
            h.update(f"{n}:{tuple(p.shape)}:{x.sum().item():.10e}:{x.abs().sum().item():.10e}".encode())
    h.update(str(pipe.tokenizer.model_max_length).encode())
    h.update(str(len(pipe.tokenizer)).encode())
    return h.hexdigest()


def base_fingerprint(unet: torch.nn.Module) -> str:
    """A hash of a UNet's base weights (per-tensor sums; LoRA tensors skipped): what the teacher computes."""
    h = hashlib.sha256()
    for n, p in unet.state_dict().items():
        if "lora_" in n:
            continue
        x = p.detach().double()
        h.update(f"{n}:{tuple(p.shape)}:{x.sum().item():.10e}".encode())
    return h.hexdigest()


@dataclass
class TrainData:
    """Data ready for the UNet: ``batch(idx, generator) -> (latents, cond)``; ``uncond`` is ``[1, L, D]``."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text_embeds: torch.Tensor  # [U, L, D], one row per distinct caption
    text_index: torch.Tensor   # [N] -> row of text_embeds
    uncond: torch.Tensor
    captions: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    cache_path: str = ""
    from_cache: bool = False

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x_0 sampled from the cached posterior (mean + std * n), and the captions' embeddings."""
        mean = self.latent_mean[idx].float()
        std = self.latent_std[idx].float()
        n = torch.randn(mean.shape, generator=generator)
        return (mean + std * n).to(device), self.text_embeds[self.text_index[idx]].float().to(device)


class OnTheFly:
    """The same interface as `TrainData`, but every batch is loaded, rendered and encoded with the VAE
    and text encoder at each step (the slow path the cache replaces; kept for comparison)."""

    def __init__(self, source: Source, good: list[int], pipe: Any, resolution: int, skipped: dict[str, int]):
        self.source, self.good, self.pipe, self.resolution = source, good, pipe, resolution
        self.skipped = skipped
        self.captions = [source.captions[i] for i in good]
        self.uncond = encode_text(pipe, [""])
        self.cache_path, self.from_cache = "", False

    def __len__(self) -> int:
        return len(self.good)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.source.load(self.good[int(i)]) for i in idx]
        pixels = torch.stack([image_to_tensor(im, self.resolution) for im, _ in items])
        mean, std = encode_images(self.pipe, pixels)
        n = torch.randn(mean.shape, generator=generator).to(mean.device)
        cond = encode_text(self.pipe, [c for _, c in items])
        return (mean + std * n).to(device), cond.to(device)


def cache_key(model_fp: str, resolution: int, source: Source) -> str:
    raw = f"v{CACHE_VERSION}|{model_fp}|{resolution}|{source.fingerprint}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _load_cached(folder: Path) -> TrainData:
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    t = load_file(str(folder / "data.safetensors"))
    return TrainData(t["latent_mean"], t["latent_std"], t["text_embeds"], t["text_index"], t["uncond"],
                     meta["captions"], meta.get("skipped", {}), str(folder), True)


def build_cache(source: Source, pipe: Any, resolution: int, root: Path, *, batch: int = 64,
                log=logger.info, fingerprint: str | None = None) -> TrainData:
    """Load the cached latents/embeddings for (model, resolution, data), computing them if absent.
    ``fingerprint``: the pipe's `model_fingerprint`, when the caller has it (None: computed here).

    The cache folder is written under a temporary name and renamed into place, so a crash leaves
    no half cache behind; a concurrent writer of the same key simply loses the rename.
    """
    from safetensors.torch import save_file

    key = cache_key(fingerprint or model_fingerprint(pipe), resolution, source)
    folder = Path(root) / key
    if (folder / "meta.json").is_file() and (folder / "data.safetensors").is_file():
        data = _load_cached(folder)
        skipped = sum(data.skipped.values())
        log(f"data: cached latents {folder} ({len(data)} items" + (f", {skipped} skipped when built)" if skipped else ")"))
        return data

    good, skipped, examples = scan(source, resolution)
    _report_skips(source, good, skipped, examples, log)
    means, stds = [], []
    for i in range(0, len(good), batch):
        pixels = torch.stack([image_to_tensor(source.loader(j), resolution) for j in good[i:i + batch]])
        m, s = encode_images(pipe, pixels)
        means.append(m.cpu().half())
        stds.append(s.cpu().half())
    captions = [source.captions[j] for j in good]
    distinct = sorted(set(captions))
    row = {c: k for k, c in enumerate(distinct)}
    tensors = {
        "latent_mean": torch.cat(means).contiguous(),
        "latent_std": torch.cat(stds).contiguous(),
        "text_embeds": encode_text(pipe, distinct).half().contiguous(),
        "text_index": torch.tensor([row[c] for c in captions], dtype=torch.long),
        "uncond": encode_text(pipe, [""]).contiguous(),
    }
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        save_file(tensors, str(tmp / "data.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({
            "version": CACHE_VERSION, "source": source.description, "resolution": resolution,
            "num_items": len(good), "num_captions": len(distinct), "skipped": skipped, "captions": captions}))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    log(f"data: cached {len(good)} latents and {len(distinct)} caption embeddings in {folder}")
    return _load_cached(folder)


def _report_skips(source: Source, good: list[int], skipped: dict[str, int], examples: list[str], log) -> None:
    if sum(skipped.values()):
        log(f"data: skipped {sum(skipped.values())} of {len(source)} items of {source.description}: "
            + ", ".join(f"{k} {v}" for k, v in skipped.items() if v) + "; e.g. " + "; ".join(examples))
    if not good:
        raise DataError(f"no usable items in {source.description}: "
                        + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ". " + "; ".join(examples))


def prepare_data(source: Source, pipe: Any, resolution: int, *, cache: bool, cache_root: Path, log=logger.info,
                 fingerprint: str | None = None):
    """`TrainData` from the cache (built if needed), or an `OnTheFly` loader when ``cache`` is off."""
    if cache:
        return build_cache(source, pipe, resolution, cache_root, log=log, fingerprint=fingerprint)
    good, skipped, examples = scan(source, resolution)
    _report_skips(source, good, skipped, examples, log)
    return OnTheFly(source, good, pipe, resolution, skipped)
