"""cdlab.metrics: the SD1.5 metrics run through torchmetrics' code with small local stand-in models,
checked against the formulas they implement."""
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


class TinyPyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        fa = self.a(x)
        return [fa, self.b(fa)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A random tiny CLIPModel + CLIPProcessor saved with save_pretrained (the layout of openai/clip-*)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from cdlab.tiny.architecture import write_tokenizer

    d = tmp_path_factory.mktemp("tiny-clip")
    write_tokenizer(str(d / "tok"))
    tok = CLIPTokenizer.from_pretrained(str(d / "tok"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(d / "clip"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
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
        fi = model.get_image_features(pixel_values=pix)
        tx = proc(text=prompts, return_tensors="pt", padding=True)
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

def test_sd_metrics_columns_accumulate_over_batches(clip_dir):
    suite = metrics.SDMetrics(clip_model=clip_dir, fid_feature=TinyFeatures(),
                              lpips_net=metrics.LPIPSNet(TinyPyramid(), (8, 12)), device="cpu")
    prompts = ["a small red circle in the center on a blue background"] * 8
    ref, imgs = _images(0, n=8), _images(1, n=8, shift=0.1)
    col = suite.column()
    col.update(imgs[:5], prompts[:5], ref[:5])
    col.update(imgs[5:], prompts[5:], ref[5:])
    got = col.compute()
    assert got["lpips"] == pytest.approx(float(metrics.lpips(imgs, ref, net=suite.lpips_net).mean()), rel=1e-5)
    assert got["fid_sd"] == pytest.approx(metrics.fid(imgs, ref, feature=suite.fid_feature), rel=1e-4)
    assert got["clip_score"] == pytest.approx(metrics.clip_score(imgs, prompts, metric=suite.clip_metric), rel=1e-4)
    same = suite.column()
    same.update(ref, prompts, ref)
    assert same.compute()["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert same.compute()["fid_sd"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        col.update(imgs, prompts[:2], ref)
