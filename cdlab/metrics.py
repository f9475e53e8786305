"""Image metrics of the evaluation: the tiny world's and Stable Diffusion's.

Tiny world (no learned judge): ``adherence`` (the world's checker, its stand-in for CLIP score) and
``agreement_error``, the mean absolute pixel error in [0, 1] against the 50-step teacher from the
same noise.

SD1.5, as distillation papers report them, through torchmetrics' own code:

* **CLIP score** (Hessel et al. 2021): torchmetrics' ``CLIPScore`` with ``openai/clip-vit-large-patch14``;
* **FID-SD**: Fréchet distance (Heusel et al. 2017) to the teacher's own 50-step samples, as PCM
  (Wang et al. 2024) reports it; torchmetrics' ``FrechetInceptionDistance`` state and formula,
  with InceptionV3 pool features (needs ``torch-fidelity``). It is refused (NaN, with the sample
  count) below ``FID_MIN_SAMPLES`` = 2048 samples, InceptionV3's pool3 width: with fewer samples than
  features each covariance has rank below its dimension (at most n - 1 of 2048), its matrix square
  root is ill-posed and the distance is strongly biased, by an amount that depends on n, so such
  numbers compare neither across runs nor with papers (which use 10k-30k samples);
* **LPIPS** (Zhang et al. 2018) to the 50-step teacher: torchmetrics' LPIPS network (AlexNet; needs
  ``torchvision``).

Every model is a constructor argument, so tests pass small local stand-ins the same way the
real ones are passed: a local CLIP folder (or a ``() -> (model, processor)`` callable) for
``clip_model``, any ``nn.Module`` mapping images in [0, 1] to ``[B, D]`` features for
``fid_feature``, and any ``nn.Module`` with LPIPS' ``forward(in0, in1, normalize)`` for ``lpips_net``
(``LPIPSNet`` builds one from a feature pyramid). So is the FID minimum (``fid_min_samples``,
default the feature width), which tests lower to exercise both the refused and the computed FID.

Images everywhere here are float tensors ``[B, 3, H, W]`` in [0, 1].
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

CLIP_MODEL = "openai/clip-vit-large-patch14"
FID_FEATURES = 2048  # InceptionV3 pool3, the standard FID feature
FID_MIN_SAMPLES = FID_FEATURES  # fewer samples than features: rank-deficient covariances, biased FID

__all__ = [
    "CLIP_MODEL", "FID_FEATURES", "FID_MIN_SAMPLES", "agreement_error", "world_adherence", "to_unit", "LPIPSNet",
    "SDMetrics", "ColumnMetrics", "clip_score", "fid", "fid_of_features", "feature_stats", "fid_refusal", "lpips", "seed_diversity",
]


# ----------------------------------------------------------------------------- tiny world

def to_unit(images: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> float32 images in [0, 1]."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def agreement_error(images: Tensor, reference: Tensor, reduction: str = "mean") -> Tensor:
    """Mean absolute pixel error in [0, 1] between images and the reference made from the same noise.

    ``reduction="none"`` gives one value per image (``[B]``).
    """
    if images.shape != reference.shape:
        raise ValueError(f"agreement_error: shapes differ, {tuple(images.shape)} vs {tuple(reference.shape)}")
    per_image = (images.float() - reference.float()).abs().flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


def seed_diversity(images: Tensor, seeds: int) -> float:
    """Diversity: ``images`` are ``captions x seeds`` samples, caption-major (``[C * S, 3, H, W]`` in [0, 1]);
    the mean |a - b| over every pair of one caption's samples, averaged over the captions (0: every seed draws
    the same picture; mode collapse shows as a value far below the teacher's)."""
    if seeds < 2 or images.shape[0] % seeds:
        raise ValueError(f"seed_diversity: {images.shape[0]} images are not captions x {seeds} seeds (seeds >= 2)")
    x = images.float().reshape(images.shape[0] // seeds, seeds, -1)
    d = (x[:, :, None] - x[:, None, :]).abs().mean(-1)  # [captions, seeds, seeds]
    off = ~torch.eye(seeds, dtype=torch.bool, device=d.device)
    return float(d[:, off].mean())


def world_adherence(images: Tensor, captions: Sequence[Any]) -> dict[str, float]:
    """The world's checker over a batch of image tensors: fraction right overall and per attribute."""
    from cdlab.world import adherence

    return adherence(tensor_to_pil(images), list(captions))


def tensor_to_pil(images: Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images (rounded to 8 bits, as a saved image would be)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ----------------------------------------------------------------------------- LPIPS

class LPIPSNet(nn.Module):
    """LPIPS' head over any feature pyramid: unit-normalise each layer's channels, weight the squared
    differences with a 1x1 convolution, average over space and sum over layers (Zhang et al. 2018, eq. 1).

    Args:
        features (`nn.Module`): maps ``[B, 3, H, W]`` in [-1, 1] to a sequence of feature maps.
        channels (`Sequence[int]`): channels of each feature map.
    """

    def __init__(self, features: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        for lin in self.lins:  # LPIPS' learned weights are non-negative
            nn.init.uniform_(lin.weight, 0.0, 1.0)
        self.eval().requires_grad_(False)

    def forward(self, in0: Tensor, in1: Tensor, normalize: bool = False) -> Tensor:
        if normalize:  # [0, 1] -> [-1, 1], as torchmetrics' LPIPS
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        total = 0.0
        for f0, f1, lin in zip(self.features(in0), self.features(in1), self.lins):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f0 - f1) ** 2).mean((2, 3), keepdim=True)
        return total  # [B, 1, 1, 1]


def _real_lpips_net() -> nn.Module:
    """torchmetrics' LPIPS (AlexNet backbone, the paper's linear weights)."""
    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
        return _NoTrainLpips(net="alex")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"LPIPS needs torchvision (pip install torchvision): {e}") from e


def lpips(images: Tensor, reference: Tensor, net: nn.Module | None = None) -> Tensor:
    """Per-image LPIPS ``[B]`` between images and reference, both in [0, 1] (lower is closer)."""
    from torchmetrics.functional.image.lpips import _lpips_update

    net = _real_lpips_net() if net is None else net
    return _lpips_update(images.float(), reference.float(), net=net, normalize=True).reshape(-1)


# ----------------------------------------------------------------------------- CLIP score

class _CLIPFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors: transformers 5 returns a model output
    (its ``pooler_output`` is the projected embedding), which torchmetrics 1.9 does not unwrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip_loader(clip_model: str | Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
    """The loader callable torchmetrics' ``CLIPScore(model_name_or_path=...)`` accepts, for a hub id,
    a local folder (which torchmetrics does not know by name) or a user's own loader."""

    def load() -> tuple[Any, Any]:
        if callable(clip_model):
            model, processor = clip_model()
        else:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(clip_model)
            processor = CLIPProcessor.from_pretrained(clip_model)
        return _CLIPFeatures(model.eval()), processor

    return load


def _to_uint8(images: Tensor) -> Tensor:
    # CLIP's processor rescales by 1/255, so it wants 8-bit values.
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _make_clip_metric(clip_model: str | Callable[[], tuple[Any, Any]]) -> Any:
    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        return CLIPScore(model_name_or_path=_clip_loader(clip_model))
    except (OSError, ValueError) as e:  # hub unreachable, folder incomplete, not a CLIP model
        raise RuntimeError(f"could not load the CLIP model {clip_model!r} for CLIP score: {e}") from e


def clip_score(images: Tensor, prompts: Sequence[str], clip_model: Any = CLIP_MODEL, *, metric: Any = None) -> float:
    """Mean CLIP score ``max(100 cos(image, text), 0)`` of images against their prompts."""
    m = _make_clip_metric(clip_model) if metric is None else metric
    m.reset()
    m.update(_to_uint8(images), list(prompts))
    return float(m.compute())


# ----------------------------------------------------------------------------- FID

class _Features(nn.Module):
    """Identity 'feature extractor' for torchmetrics' FID: features are extracted once per image set
    and shared by every column, so each column's FID state just accumulates them."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


class _InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3 (via torchmetrics), taking [0, 1] floats."""

    def __init__(self, num_features: int = FID_FEATURES) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"FID needs torch-fidelity (pip install torch-fidelity): {e}") from e
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(num_features)])
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(_to_uint8(images))


def _num_features(feature: nn.Module) -> int:
    n = getattr(feature, "num_features", None)
    if n is None:
        raise ValueError("an FID feature module needs a `num_features` attribute (its output width)")
    return int(n)


def _new_fid(num_features: int) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_Features(num_features), normalize=True)


def fid(images: Tensor, reference: Tensor, feature: nn.Module | None = None) -> float:
    """Fréchet distance between the feature Gaussians of two image sets (each of >= 2 images)."""
    feature = _InceptionFeatures() if feature is None else feature
    _num_features(feature)  # a feature module says its width
    with torch.no_grad():
        return fid_of_features(feature(images.float()), feature(reference.float()))


def fid_of_features(features: Tensor, reference: Tensor | dict[str, Tensor]) -> float:
    """Fréchet distance between the Gaussians of two feature sets ``[N, F]`` (Heusel et al. 2017, eq. 6):
    ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``, in float64, the trace of the square root from the
    eigenvalues of ``S_1 S_2`` as torchmetrics computes it. ``reference`` is a feature set or its
    :func:`feature_stats` (a data set's statistics, computed once and shipped)."""
    ref = reference if isinstance(reference, dict) else feature_stats(reference)
    if features.ndim != 2 or features.shape[1] != ref["mu"].shape[0]:
        raise ValueError(f"fid_of_features: expected [N, F] features of the reference's width "
                         f"{ref['mu'].shape[0]}, got {tuple(features.shape)}")
    mine = feature_stats(features)
    mu1, s1, mu2, s2 = mine["mu"], mine["sigma"], ref["mu"].double(), ref["sigma"].double()
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def feature_stats(features: Tensor) -> dict[str, Tensor]:
    """The mean ``mu`` ``[F]`` and covariance ``sigma`` ``[F, F]`` (unbiased) of features ``[N, F]``, float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats: expected [N, F] features with N >= 2, got {tuple(features.shape)}")
    x = features.double().cpu()
    return {"mu": x.mean(0), "sigma": torch.cov(x.T)}


def fid_refusal(n: int, minimum: int) -> str | None:
    """Why an FID over ``n`` samples is not reported, as the table's cell says it
    (``"n/a (8 < 2048 samples)"``); None when ``n`` reaches ``minimum``."""
    return None if n >= minimum else f"n/a ({n} < {minimum} samples)"


# ----------------------------------------------------------------------------- SD1.5 suite

class ColumnMetrics:
    """Running CLIP score, FID-SD and LPIPS of one evaluation column (a method at a step count)."""

    def __init__(self, suite: "SDMetrics") -> None:
        self.suite = suite
        self._fid = _new_fid(suite.num_features)
        self._clip_sum = 0.0
        self._lpips_sum = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor,
               reference_features: Tensor | None = None) -> None:
        """Add a batch: images and the 50-step teacher's images from the same noise, in [0, 1]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        dev = self.suite.device
        images, reference = images.to(dev, torch.float32), reference.to(dev, torch.float32)
        b = images.shape[0]
        self._clip_sum += clip_score(images, prompts, metric=self.suite.clip_metric) * b
        self._lpips_sum += float(lpips(images, reference, net=self.suite.lpips_net).sum())
        ref_f = self.suite.features(reference) if reference_features is None else reference_features
        self._fid.update(ref_f, real=True)
        self._fid.update(self.suite.features(images), real=False)
        self.n += b

    def compute(self) -> dict[str, Any]:
        """The column's means and its FID-SD.

        Returns:
            ``clip_score``, ``lpips`` (means over the images), ``fid_sd`` (NaN when the column has fewer
            than ``suite.fid_min_samples`` images), ``fid_sd_samples`` (the images it is over),
            ``fid_sd_min_samples``, and ``fid_sd_note`` (`fid_refusal`'s reason) only when it is refused.
        """
        if self.n == 0:
            raise RuntimeError("no images were added to this column")
        minimum = self.suite.fid_min_samples
        out: dict[str, Any] = {"clip_score": self._clip_sum / self.n, "lpips": self._lpips_sum / self.n,
                               "fid_sd_samples": self.n, "fid_sd_min_samples": minimum}
        note = fid_refusal(self.n, minimum)
        if note is None:
            out["fid_sd"] = float(self._fid.compute())
        else:
            out["fid_sd"] = float("nan")
            out["fid_sd_note"] = note
        return out


class SDMetrics:
    """The SD1.5 metric models, loaded once and shared by every column.

    Args:
        clip_model: hub id (default ``openai/clip-vit-large-patch14``), a local CLIP folder, or a
            ``() -> (CLIPModel, CLIPProcessor)`` callable.
        fid_feature (`nn.Module`, *optional*): images in [0, 1] -> ``[B, num_features]``; it must have
            ``num_features``. Default: InceptionV3 pool3 (torch-fidelity's FID weights).
        lpips_net (`nn.Module`, *optional*): LPIPS network, ``forward(in0, in1, normalize)``. Default:
            torchmetrics' AlexNet LPIPS.
        device: where the metric models run (default: CUDA when present).
        fid_min_samples (`int`, *optional*): the fewest images a column's FID-SD is reported over; below
            it the column's ``fid_sd`` is NaN with the reason. Default: the feature width
            (``fid_feature.num_features``; 2048, ``FID_MIN_SAMPLES``, for InceptionV3). At least 2.

    Raises:
        ValueError: ``fid_min_samples`` is not an integer >= 2, or ``fid_feature`` has no ``num_features``.
    """

    def __init__(self, clip_model: Any = CLIP_MODEL, fid_feature: nn.Module | None = None,
                 lpips_net: nn.Module | None = None, device: str | torch.device | None = None,
                 fid_min_samples: int | None = None) -> None:
        if fid_min_samples is not None and (isinstance(fid_min_samples, bool) or not isinstance(fid_min_samples, int)
                                            or fid_min_samples < 2):
            raise ValueError(f"fid_min_samples must be an integer >= 2 (a covariance needs two samples), "
                             f"got {fid_min_samples!r}")
        if fid_feature is not None:
            _num_features(fid_feature)  # before loading CLIP: a bad stand-in fails fast
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.clip_metric = _make_clip_metric(clip_model).to(self.device)
        self.fid_feature = (_InceptionFeatures() if fid_feature is None else fid_feature).to(self.device).eval()
        self.num_features = _num_features(self.fid_feature)
        self.fid_min_samples = self.num_features if fid_min_samples is None else int(fid_min_samples)
        self.lpips_net = (_real_lpips_net() if lpips_net is None else lpips_net).to(self.device).eval()

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """FID features ``[B, D]`` (float64) of images in [0, 1]."""
        return self.fid_feature(images.to(self.device, torch.float32)).double()

    def column(self) -> ColumnMetrics:
        return ColumnMetrics(self)
