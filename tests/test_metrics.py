"""cdlab.metrics: the SD1.5 metrics run through torchmetrics' code with small local stand-in models,
checked against the formulas they implement.

The stand-ins of the SD suite take what the real models take: CLIP at 224x224 pixels (its image
processor's resize and centre crop) and 77 tokens, an FID extractor that quantises to 8 bits and resizes
to 299x299 like torch-fidelity's InceptionV3 and returns its 2048 pool3-wide features, LPIPS on the
images as given. ``TinyFeatures`` (16 features) is kept for the Fréchet formula check alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cdlab import metrics


# ----------------------------------------------------------------------------- stand-ins

class TinyFeatures(nn.Module):
    """A small random conv net: images in [0, 1] -> [B, 16] (FID's feature extractor, passed like Inception)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.Conv2d(8, 16, 3, 2, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


class InceptionSizedFeatures(nn.Module):
    """FID's stand-in at InceptionV3's sizes: images in [0, 1] at any size are quantised to 8 bits and
    resized bilinearly to 299x299, then scaled to [-1, 1] (what torch-fidelity's FeatureExtractorInceptionV3
    does to its uint8 input), and come out ``[B, 2048]``, pool3's width.

    Only the first ``VARYING`` of the 2048 features vary (a small random conv net's); the others are 0.
    The FID state and formula are the real ones (2048x2048 covariances), and LAPACK's balancing deflates
    the zero rows and columns, so the 2048x2048 eigenvalue solve of torchmetrics' FID takes about a
    second on two CPU cores instead of 30-100 s with 2048 varying features.
    """

    num_features = 2048
    VARYING = 64

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 13, 13), nn.Tanh(), nn.Conv2d(16, self.VARYING, 3, 2, 1), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen: list[tuple[int, ...]] = []   # the shapes it was given
        self.resized: tuple[int, ...] | None = None

    def forward(self, images):
        assert images.dtype == torch.float32 and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        self.seen.append(tuple(images.shape))
        x = (images * 255).round()
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        self.resized = tuple(x.shape)
        f = self.net((x - 128) / 128)
        return torch.cat([f, f.new_zeros(f.shape[0], self.num_features - self.VARYING)], dim=1)


class TinyPyramid(nn.Module):
    """LPIPS' feature pyramid stand-in; it takes the images as given (it records their shapes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        fa = self.a(x)
        return [fa, self.b(fa)]


CLIP_IMAGE_SIZE = 224   # openai/clip-vit-large-patch14's processor: resize and centre-crop to 224
CLIP_TEXT_TOKENS = 77   # and its text model's positions


def clip_stand_in(tokenizer_dir: str):
    """A random tiny CLIPModel and its CLIPProcessor at the real model's input sizes: 224x224 pixels and
    77-token text, with the CLIP BPE tokenizer saved in ``tokenizer_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=CLIP_TEXT_TOKENS)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_TEXT_TOKENS,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=CLIP_IMAGE_SIZE, patch_size=32),
        projection_dim=16,
    )
    size = CLIP_IMAGE_SIZE
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                            crop_size={"height": size, "width": size}), tokenizer=tok)
    return CLIPModel(config), proc


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """`clip_stand_in` saved with save_pretrained (the layout of openai/clip-*)."""
    from cdlab.tiny.architecture import write_tokenizer

    d = tmp_path_factory.mktemp("tiny-clip")
    write_tokenizer(str(d / "tok"))
    model, proc = clip_stand_in(str(d / "tok"))
    model.save_pretrained(str(d / "clip"))
    proc.save_pretrained(str(d / "clip"))
    return str(d / "clip")


def _images(seed: int, n: int = 6, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * 0.6 + 0.2 + shift).clamp(0, 1)


# ----------------------------------------------------------------------------- tiny-world metrics

def test_agreement_error_is_mean_abs_pixel_error():
    a, b = _images(0), _images(1)
    per = metrics.agreement_error(a, b, reduction="none")
    assert per.shape == (6,)
    assert torch.allclose(per, (a - b).abs().mean((1, 2, 3)))
    assert metrics.agreement_error(a, a).item() == 0.0
    assert metrics.agreement_error(a, b).item() == pytest.approx((a - b).abs().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.agreement_error(a, b[:3])


def test_world_adherence_reads_rendered_images():
    from cdlab.world import render, sample_captions

    caps = sample_captions(4, seed=3)
    ims = torch.stack([torch.from_numpy(__import__("numpy").array(render(c, seed=i))).permute(2, 0, 1)
                       for i, c in enumerate(caps)]).float() / 255
    assert metrics.world_adherence(ims, caps)["all"] == 1.0
    # The same images judged against other captions are mostly wrong.
    assert metrics.world_adherence(ims, caps[1:] + caps[:1])["all"] < 1.0


def test_to_unit_maps_vae_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert metrics.to_unit(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


# ----------------------------------------------------------------------------- CLIP score

def test_clip_score_matches_cosine_of_clip_features(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = _images(2, n=3)
    prompts = ["a small red circle in the center on a blue background",
               "a large green square at the top left on a white background",
               "a small black cross at the bottom right on a yellow background"]
    got = metrics.clip_score(images, prompts, clip_model=clip_dir)

    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pix = proc(images=[im for im in (images * 255).round().to(torch.uint8)], return_tensors="pt")["pixel_values"]
        assert pix.shape == (3, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)  # 32 px images, seen at CLIP's 224
        fi = model.get_image_features(pixel_values=pix)
        tx = proc(text=prompts, return_tensors="pt", padding=True)
        assert proc.tokenizer.model_max_length == model.config.text_config.max_position_embeddings == 77
        ft = model.get_text_features(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"])
    fi = getattr(fi, "pooler_output", fi)
    ft = getattr(ft, "pooler_output", ft)
    cos = torch.nn.functional.cosine_similarity(fi, ft, dim=-1)
    assert got == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)


def test_clip_model_missing_gives_clear_error(tmp_path):
    with pytest.raises((RuntimeError, ValueError), match="CLIP|model_name_or_path"):
        metrics.clip_score(_images(0, 2), ["a", "b"], clip_model=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- FID

def _frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Reference Fréchet distance via the symmetric square root sqrt(S1)^T S2 sqrt(S1)."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    tr = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * tr)


def test_fid_matches_frechet_formula_and_orders_shifts():
    feat = TinyFeatures()
    ref = _images(0, n=40)
    near, far = _images(1, n=40, shift=0.02), _images(2, n=40, shift=0.3)
    d_near = metrics.fid(near, ref, feature=feat)
    d_far = metrics.fid(far, ref, feature=feat)
    with torch.no_grad():
        expect = _frechet(feat(near), feat(ref))
    assert d_near == pytest.approx(expect, rel=1e-3, abs=1e-6)
    assert metrics.fid(ref, ref, feature=feat) == pytest.approx(0.0, abs=1e-6)
    assert d_far > d_near > 0


def test_fid_feature_needs_num_features():
    with pytest.raises(ValueError, match="num_features"):
        metrics.fid(_images(0), _images(1), feature=nn.Flatten())


# ----------------------------------------------------------------------------- LPIPS

def test_lpips_net_follows_the_lpips_formula():
    net = metrics.LPIPSNet(TinyPyramid(), channels=(8, 12))
    a, b = _images(0, n=4), _images(1, n=4)
    got = metrics.lpips(a, b, net=net)
    assert got.shape == (4,)
    assert torch.allclose(metrics.lpips(a, a, net=net), torch.zeros(4), atol=1e-7)
    assert torch.allclose(got, metrics.lpips(b, a, net=net), atol=1e-6)
    # By hand: unit-normalise channels, squared difference, 1x1 weights, spatial mean, sum of layers.
    with torch.no_grad():
        expect = torch.zeros(4)
        for f0, f1, lin in zip(net.features(2 * a - 1), net.features(2 * b - 1), net.lins):
            n0 = f0 / (f0.norm(dim=1, keepdim=True) + 1e-10)
            n1 = f1 / (f1.norm(dim=1, keepdim=True) + 1e-10)
            expect += ((n0 - n1) ** 2 * lin.weight.reshape(1, -1, 1, 1)).sum(1).mean((1, 2))
    assert torch.allclose(got, expect, atol=1e-6)
    assert (got > 0).all()


def test_lpips_rejects_out_of_range_images():
    net = metrics.LPIPSNet(TinyPyramid(), channels=(8, 12))
    with pytest.raises(ValueError, match="range"):
        metrics.lpips(_images(0) * 3, _images(1), net=net)


# ----------------------------------------------------------------------------- the SD suite

def _suite(clip_dir, **kwargs):
    return metrics.SDMetrics(clip_model=clip_dir, fid_feature=InceptionSizedFeatures(),
                             lpips_net=metrics.LPIPSNet(TinyPyramid(), (8, 12)), device="cpu", **kwargs)


def test_sd_metrics_columns_accumulate_over_batches(clip_dir):
    suite = _suite(clip_dir, fid_min_samples=4)  # lowered from 2048, so 8 images get an FID
    prompts = ["a small red circle in the center on a blue background"] * 8
    ref, imgs = _images(0, n=8), _images(1, n=8, shift=0.1)
    col = suite.column()
    col.update(imgs[:5], prompts[:5], ref[:5])
    col.update(imgs[5:], prompts[5:], ref[5:])
    got = col.compute()
    # The stand-ins saw what the real models see: FID's at 299x299, LPIPS' at the images' own 32x32.
    assert suite.fid_feature.seen[0] == (5, 3, 32, 32) and suite.fid_feature.resized == (3, 3, 299, 299)
    assert set(suite.lpips_net.features.seen) == {(5, 3, 32, 32), (3, 3, 32, 32)}
    assert got["fid_sd_samples"] == 8 and got["fid_sd_min_samples"] == 4 and "fid_sd_note" not in got
    assert got["lpips"] == pytest.approx(float(metrics.lpips(imgs, ref, net=suite.lpips_net).mean()), rel=1e-5)
    assert got["fid_sd"] > 0
    assert got["fid_sd"] == pytest.approx(metrics.fid(imgs, ref, feature=suite.fid_feature), rel=1e-4)
    assert got["clip_score"] == pytest.approx(metrics.clip_score(imgs, prompts, metric=suite.clip_metric), rel=1e-4)
    same = suite.column()
    same.update(ref, prompts, ref)
    assert same.compute()["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert same.compute()["fid_sd"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        col.update(imgs, prompts[:2], ref)


def test_fid_is_refused_below_its_minimum_sample_count(clip_dir):
    """Fewer samples than InceptionV3's 2048 features: the FID is NaN with the count, not a number."""
    assert metrics.FID_MIN_SAMPLES == metrics.FID_FEATURES == 2048
    suite = _suite(clip_dir)
    assert suite.num_features == 2048 and suite.fid_min_samples == 2048  # the default: the feature width
    prompts = ["a small red circle in the center on a blue background"] * 8
    ref, imgs = _images(0, n=8), _images(1, n=8, shift=0.1)
    col = suite.column()
    col.update(imgs, prompts, ref)
    got = col.compute()
    assert got["fid_sd"] != got["fid_sd"]  # NaN
    assert got["fid_sd_samples"] == 8 and got["fid_sd_min_samples"] == 2048
    assert got["fid_sd_note"] == "n/a (8 < 2048 samples)" == metrics.fid_refusal(8, 2048)
    assert got["clip_score"] >= 0 and got["lpips"] > 0  # the other metrics are reported at any n
    assert metrics.fid_refusal(2048, 2048) is None
    # At exactly the minimum it is a number.
    suite.fid_min_samples = 8
    assert col.compute()["fid_sd"] > 0
    suite.fid_min_samples = 9
    assert col.compute()["fid_sd_note"] == "n/a (8 < 9 samples)"


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, True, "8"])
def test_fid_min_samples_must_be_an_integer_of_at_least_two(bad):
    with pytest.raises(ValueError, match="fid_min_samples"):
        metrics.SDMetrics(clip_model="unused", fid_feature=InceptionSizedFeatures(), fid_min_samples=bad)


def test_seed_diversity_is_the_mean_pairwise_distance_within_a_caption():
    from cdlab.metrics import seed_diversity

    same = torch.full((6, 3, 4, 4), 0.3)
    assert seed_diversity(same, 3) == 0.0  # every seed drew the same picture
    # one caption, seeds at 0, 0.5 and 1: pairwise |a - b| = 0.5, 1, 0.5 -> mean 2/3; a second caption with
    # all seeds equal adds 0, so the average over captions is 1/3
    a = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0, 0.2, 0.2, 0.2)])
    assert seed_diversity(a, 3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="seeds"):
        seed_diversity(a, 4)
