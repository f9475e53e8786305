"""Train the embedded tiny teacher from a seed and save it where ``load_teacher("tiny")`` finds it.

    python -m cdlab build-teacher --overwrite           # full recipe (the shipped weights), replacing them
    python -m cdlab build-teacher --unet_steps 200 --out /tmp/t   # a quick smoke run

Two stages, as Stable Diffusion was built:
1. the VAE (32x32 RGB <-> 8x8x4 latents) on rendered images of the world; its scaling factor is
   set so that the latents have unit variance, as SD's 0.18215 does for SD's data;
2. the UNet together with the text encoder, epsilon prediction on the cached latents, with
   10% of captions dropped to "" for classifier-free guidance and min-SNR-5 loss weighting.
   The text encoder is trained, not frozen: a random CLIP encoder scrambles the few words that
   matter here, and a trained one is what SD has. It is frozen afterwards (students never train it).
An EMA of the UNet and text-encoder weights is what gets saved.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from cdlab.paths import assets_dir

DEFAULT_OUT = assets_dir() / "tiny-teacher"


@dataclass
class TeacherConfig:
    seed: int = 0
    threads: int = 2                # torch CPU threads
    # stage 1: VAE
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6     # tiny KL: the latents must keep the detail, as in SD
    vae_object_weight: float = 8.0  # extra loss weight on object pixels: edges decide the shape
    # stage 2: UNet + text encoder
    pool_size: int = 30000          # (caption, seed) pairs rendered and encoded once
    unet_steps: int = 2400
    unet_batch: int = 128
    unet_lr: float = 1.5e-3
    text_lr: float = 3e-4
    warmup: int = 200
    cond_dropout: float = 0.1       # captions replaced by "" so CFG has an unconditional model
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    max_minutes: float = 0.0        # stop stage 2 early after this many minutes (0 = no limit)
    # stage 3: decoder fine-tune (encoder frozen, so the UNet's latent space is unchanged)
    decoder_steps: int = 1500
    decoder_lr: float = 5e-4
    stages: str = "vae,unet,decoder"  # "decoder" alone fine-tunes the decoder of an existing --out
    out: str = str(DEFAULT_OUT)
    overwrite: bool = False         # replace an existing --out (the shipped teacher is one): refused without it
    log_every: int = 100
    report_images: int = 512        # images each VAE report reconstructs and the checker reads back


def _images_to_tensor(images):
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _tensor_to_images(x):
    import numpy as np
    from PIL import Image

    arr = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _render_batch(rng: random.Random, n: int):
    from cdlab.world import render, sample_caption

    caps = [sample_caption(rng) for _ in range(n)]
    seeds = [rng.randrange(2**31) for _ in range(n)]
    return caps, _images_to_tensor([render(c, s) for c, s in zip(caps, seeds)])


def _object_mask(caps, x):
    """1 where a pixel differs from its caption's background colour (the object and its edges)."""
    import torch

    from cdlab.world.grammar import PALETTE

    bg = torch.tensor([PALETTE[c.background] for c in caps], dtype=torch.float32) / 127.5 - 1.0
    return ((x - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.05).float()


def _cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    return base * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def _recon_loss(rec, x, caps, cfg: TeacherConfig):
    """L1 + L2 reconstruction, object pixels weighted up (``vae_object_weight``)."""
    weight = 1.0 + cfg.vae_object_weight * _object_mask(caps, x)
    d = rec - x
    return ((d.abs() + d.pow(2)) * weight).mean() / weight.mean()


def train_vae(pipe, cfg: TeacherConfig, log) -> float:
    import torch

    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)
    t0 = time.time()
    for step in range(1, cfg.vae_steps + 1):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(cfg.vae_lr, step, cfg.vae_steps, warmup=100)
        caps, x = _render_batch(rng, cfg.vae_batch)
        post = vae.encode(x).latent_dist
        kl = post.kl().mean()
        loss = _recon_loss(vae.decode(post.sample()).sample, x, caps, cfg) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} kl {kl.item():.1f} "
                f"{time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        caps, x = _render_batch(random.Random(cfg.seed + 2), cfg.report_images)
        z = vae.encode(x).latent_dist.mode()
        scaling = float(1.0 / z.std())
        rec = vae.decode(z).sample
        err = (rec - x).abs().mean().item() / 2  # in [0, 1] pixel units
    vae.register_to_config(scaling_factor=scaling)
    from cdlab.world import adherence

    # The checker on reconstructions bounds what any teacher on these latents can reach.
    read_back = adherence(_tensor_to_images(rec), caps)
    log(f"vae done: scaling_factor {scaling:.4f}, reconstruction MAE {err:.4f} (pixels in [0,1]), "
        f"checker on reconstructions {read_back}")
    return {"mae": err, "checker": read_back}


@dataclasses.dataclass
class _Pool:
    latents: "object"
    ids: "object"


def build_pool(pipe, cfg: TeacherConfig, log) -> _Pool:
    """Render and encode ``pool_size`` captioned images once: stage 2 then runs only the UNet."""
    import torch

    rng = random.Random(cfg.seed + 3)
    lat, ids = [], []
    tok = pipe.tokenizer
    with torch.no_grad():
        for start in range(0, cfg.pool_size, 500):
            caps, x = _render_batch(rng, min(500, cfg.pool_size - start))
            lat.append(pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor)
            ids.append(tok([c.text for c in caps], padding="max_length", max_length=tok.model_max_length,
                           truncation=True, return_tensors="pt").input_ids)
    log(f"pool: {cfg.pool_size} latents cached")
    return _Pool(torch.cat(lat), torch.cat(ids))


def train_unet(pipe, pool: _Pool, cfg: TeacherConfig, log, save_fn) -> None:
    import torch
    import torch.nn.functional as F

    unet, te, sched = pipe.unet.train(), pipe.text_encoder.train(), pipe.scheduler
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.unet_lr, "base": cfg.unet_lr},
        {"params": te.parameters(), "lr": cfg.text_lr, "base": cfg.text_lr},
    ], weight_decay=1e-2)
    tok = pipe.tokenizer
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    abar = sched.alphas_cumprod
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    g = torch.Generator().manual_seed(cfg.seed + 4)
    t0 = time.time()
    n = pool.latents.shape[0]
    for step in range(1, cfg.unet_steps + 1):
        frac = step / cfg.unet_steps
        for grp in opt.param_groups:
            grp["lr"] = grp["base"] * min(1.0, step / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        x0, ids = pool.latents[idx], pool.ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout
        ids[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, noise, t)
        emb = te(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=emb).sample
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for m, e in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        minutes = (time.time() - t0) / 60
        if step % cfg.log_every == 0 or step == 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {minutes * 60:.0f}s")
        if step % 1000 == 0 or step == cfg.unet_steps or (cfg.max_minutes and minutes > cfg.max_minutes):
            save_fn(ema_unet, ema_te, step)
            if cfg.max_minutes and minutes > cfg.max_minutes:
                log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                break


def finetune_decoder(pipe, cfg: TeacherConfig, log) -> dict:
    """Stage 3, as SD's ft-MSE VAE: train the decoder alone on the frozen encoder's latents.

    The encoder and the scaling factor stay as they are, so the UNet trained in stage 2 sees the
    same latent space; only the pixels it decodes to get sharper.
    """
    import torch

    vae = pipe.vae
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 5)
    t0 = time.time()
    for step in range(1, cfg.decoder_steps + 1):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(cfg.decoder_lr, step, cfg.decoder_steps, warmup=50)
        caps, x = _render_batch(rng, cfg.vae_batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = _recon_loss(vae.decode(z).sample, x, caps, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == 1:
            log(f"decoder step {step}/{cfg.decoder_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    vae.requires_grad_(False)
    return _vae_report(pipe, cfg, log, "decoder")


def _vae_report(pipe, cfg: TeacherConfig, log, stage: str) -> dict:
    import torch

    from cdlab.world import adherence

    vae = pipe.vae.eval()
    with torch.no_grad():
        caps, x = _render_batch(random.Random(cfg.seed + 2), 512)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    err = (rec - x).abs().mean().item() / 2
    read_back = adherence(_tensor_to_images(rec), caps)
    log(f"{stage} done: reconstruction MAE {err:.4f} (pixels in [0,1]), checker on reconstructions {read_back}")
    return {"mae": err, "checker": read_back}


def main(argv: list[str] | None = None) -> int:
    cfg = TeacherConfig()
    ap = argparse.ArgumentParser(prog="python -m cdlab build-teacher", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(cfg):
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", action="store_true")
        else:
            ap.add_argument(f"--{f.name}", type=type(getattr(cfg, f.name)), default=getattr(cfg, f.name))
    cfg = TeacherConfig(**vars(ap.parse_args(argv)))
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # nothing lost by default: the shipped teacher lives at the default --out
        print(f"error: --out {out} already exists; pass --overwrite to replace it, or another --out", flush=True)
        return 2

    import torch

    from cdlab.tiny.architecture import build_pipeline

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    stages = {x.strip() for x in cfg.stages.split(",") if x.strip()}
    info: dict = {}

    def save(ema_unet=None, ema_te=None, step: int | None = None) -> None:
        if ema_unet is not None:
            pipe.unet.load_state_dict(ema_unet.state_dict())
            pipe.text_encoder.load_state_dict(ema_te.state_dict())
            info["unet_step"] = step
        tmp = out.with_name(out.name + ".tmp")
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        info.update({"config": dataclasses.asdict(cfg), "threads": cfg.threads, "torch": torch.__version__})
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)
        log(f"saved to {out}")

    if "vae" in stages or "unet" in stages:
        pipe = build_pipeline(seed=cfg.seed)
        info["vae"] = train_vae(pipe, cfg, log)
        info["minutes_vae"] = round((time.time() - t_start) / 60, 2)
        pool = build_pool(pipe, cfg, log)
        t_unet = time.time()
        train_unet(pipe, pool, cfg, log, save)
        info["minutes_unet"] = round((time.time() - t_unet) / 60, 2)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
        prev = out / "training.json"
        if prev.exists():
            info.update(json.loads(prev.read_text()))
    if "decoder" in stages:
        t_dec = time.time()
        info["decoder"] = finetune_decoder(pipe, cfg, log)
        info["minutes_decoder"] = round((time.time() - t_dec) / 60, 2)
        save()
    log("done")
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
