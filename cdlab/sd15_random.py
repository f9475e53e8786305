"""SD1.5's architecture with random weights: the offline stand-in that executes every SD1.5-only branch.

    from cdlab.teachers import load_teacher
    teacher = load_teacher("sd15-random", resolution=64)   # 8x8 latents, 77-token CLIP text, 4 channels

The UNet, VAE and CLIP text-encoder configs are stable-diffusion-v1-5's own (``unet/config.json``,
``vae/config.json``, ``text_encoder/config.json``: 860M + 84M + 123M parameters, 768-d text, vocabulary
49408, 77 positions); only ``sample_size`` follows ``resolution``. The weights are random (seed 0), made
once and saved with ``save_pretrained`` (safetensors, float16 on disk) under `models_dir`, so every later
load goes through ``StableDiffusionPipeline.from_pretrained``, the same path as the hub model.

What it proves: that code runs on SD1.5's shapes (fp16/bf16, 77 tokens, 4-channel latents, LoRA
targets, external LoRA file layouts, schedulers, metrics). What it does not: anything about image
quality; its samples are noise. The tokenizer is the tiny world's byte-level CLIP BPE (SD's own needs
the hub); its token ids index the same 49408-row embedding.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cdlab.paths import models_dir

SD15_RANDOM = "sd15-random"
SD15_RANDOM_ID = "cdlab/sd15-random"
DEFAULT_RESOLUTION = 64

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def is_sd15_architecture(unet_config) -> bool:
    """True for a UNet config of SD1.5's shape (768-d cross attention, 320-640-1280-1280 blocks, 4 channels)."""
    get = unet_config.get if isinstance(unet_config, dict) else (lambda k, d=None: getattr(unet_config, k, d))
    return (int(get("cross_attention_dim", 0) or 0) == 768 and int(get("in_channels", 0) or 0) == 4
            and tuple(get("block_out_channels", ()) or ()) == SD15_UNET_CONFIG["block_out_channels"])


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 64 <= resolution <= 1024 \
            or resolution % 64:
        raise ValueError(f"sd15-random: resolution must be a multiple of 64 from 64 to 1024, got {resolution!r}")
    return resolution


def folder(resolution: int = DEFAULT_RESOLUTION) -> Path:
    return models_dir() / f"{SD15_RANDOM}-{check_resolution(resolution)}"


def is_built(resolution: int = DEFAULT_RESOLUTION) -> bool:
    """Whether the pipeline folder for ``resolution`` is complete (`ensure` renames it into place whole)."""
    return (folder(resolution) / "model_index.json").is_file()


def ensure(resolution: int = DEFAULT_RESOLUTION, seed: int = 0) -> Path:
    """The pipeline folder for ``resolution``, built on first use (about 30 s and 2.1 GB on 2 CPU cores).

    Built in a temporary folder beside the final one and renamed into place, so a concurrent or
    interrupted build never leaves a half-written model behind.
    """
    final = folder(resolution)
    if is_built(resolution):
        return final
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cdlab.tiny.architecture import SCHEDULER_CONFIG, write_tokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tok_dir = tmp / "_tokenizer"
        write_tokenizer(str(tok_dir))
        cfg_path = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = SD15_TEXT_CONFIG["max_position_embeddings"]
        cfg_path.write_text(json.dumps(cfg))
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": resolution // 8})
        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "sample_size": resolution})
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, **SD15_TEXT_CONFIG))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(str(tmp / "pipe"), safe_serialization=True)
        try:
            os.replace(tmp / "pipe", final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
