"""The embedded teacher's architecture: Stable Diffusion's own classes, shrunk.

A CLIP BPE tokenizer built offline over the world's words, a ``CLIPTextModel``, an
``AutoencoderKL`` (32x32 RGB -> 8x8x4 latents), a ``UNet2DConditionModel`` and a
``DDIMScheduler`` with SD1.5's schedule. ``build_pipeline`` returns a randomly initialised
``StableDiffusionPipeline``; ``cdlab.tiny.train_teacher`` trains it.
"""
from __future__ import annotations

import json
import os
import tempfile

IMAGE_SIZE = 32
MAX_LENGTH = 24  # tokens, with start and end; the grammar's captions use at most 14

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, projection_dim=64, hidden_act="quick_gelu",
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
    norm_num_groups=16, sample_size=IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=8, norm_num_groups=16,
)
# SD1.5's training schedule; "trailing" spacing as in the course notebook.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    prediction_type="epsilon",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(path: str) -> None:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) in which every grammar word is one token.

    Any other text still tokenizes, character by character, as in CLIP's byte-level BPE.
    """
    from cdlab.world import all_words

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    chars = list(_bytes_to_unicode().values())
    # Learn the merges with a real BPE trainer on the grammar's words: BPE reproduces the
    # segmentation of its training words, so every word ends as one token, whatever its letters.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = all_words()
    trainer = trainers.BpeTrainer(vocab_size=100000, min_frequency=1, end_of_word_suffix="</w>",
                                  initial_alphabet=[], show_progress=False)
    bpe.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    for m in merges:
        tok = m.replace(" ", "")
        if tok not in vocab:
            vocab.append(tok)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
        }, f)


def build_pipeline(seed: int = 0):
    """A randomly initialised tiny ``StableDiffusionPipeline`` (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d)
        tokenizer = CLIPTokenizer.from_pretrained(d)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
