"""The judge of the flow track: a small CNN trained on Fashion-MNIST's training set, whose 128-d penultimate
layer is the feature space of the track's FID, and whose argmax is its class accuracy.

    python -m cdlab.flow.classifier --out runs/fashion-classifier            # about 3 epochs; prints test accuracy

Why a classifier of our own and not Inception: FID's Inception network was trained on ImageNet photographs,
and 28x28 grey garments are far outside them. A classifier trained on the real images sees what separates
Fashion-MNIST's images, so the Fréchet distance of its features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule", eq. 6; computed by :func:`cdlab.metrics.fid`) sees texture that class accuracy does
not: issue 24's sketch kept accuracy 0.98 from 50 Euler steps down to 1 while this FID went 32.7 -> 102.2.

The network (``Classifier``)::

    x [1, 28, 28] -> conv 32 -> conv 32 -> maxpool ............ [32, 14, 14]
                  -> conv 64 -> conv 64 -> maxpool ............ [64, 7, 7]
                  -> flatten -> linear 128 -> ReLU ............ features [128]     (FID's feature space)
                  -> dropout -> linear 10 ..................... logits [10]

every conv 3x3 with padding 1, BatchNorm and ReLU. It takes pixels in ``[0, 1]`` (the flow teacher's range;
samples are clipped to it first).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cdlab.paths import assets_dir, write_json_atomic

__all__ = ["NUM_FEATURES", "classifier_dir", "Classifier", "as_feature", "train_classifier", "accuracy", "save_classifier",
           "load_classifier", "save_reference_stats", "load_reference_stats", "main"]

NUM_FEATURES = 128
WEIGHTS = "classifier.safetensors"
STATS = "test-features.safetensors"  # FID's reference: mean and covariance of the test set's features


def classifier_dir() -> Path:
    """The shipped classifier: ``cdlab/assets/fashion-classifier`` (read at call time)."""
    return assets_dir() / "fashion-classifier"


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class Classifier(nn.Module):
    """The judge (module docstring). ``forward(x) -> logits``; ``features(x) -> [B, 128]``.

    ``num_features`` is the width :func:`cdlab.metrics.fid` reads from a feature module; calling
    :meth:`as_feature` gives that module.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(1, 32), _conv(32, 32), nn.MaxPool2d(2),
                                  _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, NUM_FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(NUM_FEATURES, num_classes))
        self.num_features = NUM_FEATURES

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate activations of images ``[B, 1, 28, 28]`` in ``[0, 1]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def stages(self) -> tuple[list[nn.Module], list[tuple[int, int]]]:
        """:meth:`features` in three pieces, each reading the one before, and their outputs' (channels, side):
        ``[32, 14, 14]``, ``[64, 7, 7]``, then the 128-d vector (side 0). A GAN's frozen feature network
        (:class:`cdlab.flow.unet.FeatureDiscriminator`) reads all three."""
        b = self.body
        return [b[:3], b[3:6], b[6:]], [(32, 14), (64, 7), (NUM_FEATURES, 0)]


class _Features(nn.Module):
    """A classifier as :func:`cdlab.metrics.fid`'s feature module: clipped pixels in, features out, in batches."""

    def __init__(self, classifier: Classifier, batch_size: int = 1000) -> None:
        super().__init__()
        self.classifier, self.batch_size, self.num_features = classifier, batch_size, NUM_FEATURES

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(x.to(dev).clamp(0, 1)).cpu()
                          for x in images.split(self.batch_size)])


def as_feature(classifier: Classifier) -> nn.Module:
    """The classifier as FID's feature extractor (``cdlab.metrics.fid(images, reference, feature=...)``)."""
    return _Features(classifier.eval())


@torch.no_grad()
def accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """The fraction of ``images`` (clipped to [0, 1]) the classifier labels as ``labels``."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    right = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        right += int((classifier(x.to(dev).clamp(0, 1)).argmax(1).cpu() == y).sum())
    return right / len(labels)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu",
                     log=print) -> Classifier:
    """Adam with a cosine rate over ``epochs`` passes of the training set, light augmentation (random shifts
    of up to 2 px, horizontal flips: a flipped garment is the same garment)."""
    torch.manual_seed(seed)
    net = Classifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images), generator=g)
        for idx in order.split(batch_size):
            x, y = images[idx].to(device), labels[idx].to(device)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (2, 3))[..., 2:30, 2:30]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return net.eval()


def save_classifier(net: Classifier, out: str | Path, info: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / WEIGHTS))
    write_json_atomic(out / "classifier.json", info)
    return out


def load_classifier(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Classifier:
    """The classifier saved in ``folder`` (default: the shipped one), in eval mode."""
    folder = Path(folder) if folder is not None else classifier_dir()
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}: train one with `python -m cdlab.flow.classifier --out "
                                f"{folder}` (needs Fashion-MNIST: apt-get install dataset-fashion-mnist)")
    net = Classifier()
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval()


def save_reference_stats(net: Classifier, images: torch.Tensor, folder: str | Path) -> Path:
    """The mean and covariance of ``images``' features (the real test set's: FID's reference, computed once),
    written beside the classifier, so an evaluation needs neither the data nor 10,000 forward passes."""
    from cdlab.metrics import feature_stats

    stats = feature_stats(as_feature(net)(images))
    path = Path(folder) / STATS
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path), metadata={"images": str(len(images))})
    return path


def load_reference_stats(folder: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """The saved reference statistics of the classifier in ``folder`` (default: the shipped one), or None."""
    path = (Path(folder) if folder is not None else classifier_dir()) / STATS
    return load_file(str(path)) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    from cdlab.flow.data import load_fashion_mnist

    p = argparse.ArgumentParser(prog="python -m cdlab.flow.classifier", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for classifier.safetensors and classifier.json")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", default=None, help="folder of the idx files (default: Debian's)")
    p.add_argument("--train-images", type=int, default=60000, help="train on the first N images (a quick check)")
    p.add_argument("--seed", type=int, default=0, help="its initial weights' and data order's (another seed: "
                   "another network, e.g. a GAN's frozen features that are not the judge's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stats-only", action="store_true",
                   help="only (re)compute the test set's feature statistics for the classifier in --out")
    args = p.parse_args(argv)
    if args.stats_only:
        xt, _ = load_fashion_mnist("test", args.data)
        print(f"wrote {save_reference_stats(load_classifier(args.out), xt, args.out)}")
        return 0
    if not 1 <= args.epochs <= 100:
        p.error(f"--epochs must be in [1, 100], got {args.epochs}")
    if not 1 <= args.train_images <= 60000:
        p.error(f"--train-images must be in [1, 60000], got {args.train_images}")
    x, y = load_fashion_mnist("train", args.data)
    x, y = x[:args.train_images], y[:args.train_images]
    xt, yt = load_fashion_mnist("test", args.data)
    start = time.monotonic()
    net = train_classifier(x, y, args.epochs, seed=args.seed, device=args.device)
    acc = accuracy(net, xt, yt)
    info = {"test_accuracy": round(acc, 4), "epochs": args.epochs, "train_images": len(x), "test_images": len(xt),
            "seconds": round(time.monotonic() - start, 1), "device": str(args.device), "seed": args.seed}
    save_classifier(net.cpu(), args.out, info)
    save_reference_stats(net.cpu(), xt, args.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
