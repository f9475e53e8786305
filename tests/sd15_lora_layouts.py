"""Offline stand-ins for the four published SD1.5 few-step LoRAs, in each file's real key layout.

The real files cannot be downloaded here, so ``write_layout`` synthesizes a safetensors file with the
same keys, shapes (read off the SD1.5-architecture pipeline it is given), dtype and ``.alpha`` tensors,
filled with random values; ``expected_lora`` reads such a file back WITHOUT diffusers' loader (our own
name mapping) and says which module of the pipeline each key must end up on, with which values.

What each published file looks like, and where that comes from
===============================================================

LCM-LoRA  latent-consistency/lcm-lora-sdv1-5 · pytorch_lora_weights.safetensors
    kohya keys with DIFFUSERS module paths: ``lora_unet_<diffusers.path.with_underscores>.lora_down.weight``
    / ``.lora_up.weight`` / ``.alpha`` (e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in.alpha``).
    - layout "unet | lora_down+lora_up+alpha | hf (diffusers names)": stable-diffusion.cpp PR #955, list of
      tested LoRA files (https://github.com/leejet/stable-diffusion.cpp/pull/955).
    - how the keys are made: LCM's training script, ``get_module_kohya_state_dict`` (peft key
      ``base_model.model.<path>.lora_A.weight`` -> ``lora_unet_<path_>.lora_down.weight``, plus one
      ``<name>.alpha`` = ``peft_config.lora_alpha`` cast to the save dtype):
      luosiallen/latent-consistency-model, LCM_Training_Script/consistency_distillation/
      train_lcm_distill_lora_sd_wds.py.
    - modules: that script's ``LoraConfig(r=args.lora_rank, target_modules=[to_q, to_k, to_v, to_out.0,
      proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2, conv_shortcut, downsamplers.0.conv,
      upsamplers.0.conv, time_emb_proj])`` (same file) -> attention, feed-forward, proj_in/out, every resnet
      conv/shortcut/time-embedding projection, down/upsampler convs. Not conv_in/conv_out/time_embedding.
    - alpha: no ``lora_alpha`` in that LoraConfig -> peft's default 8. Rank 64 (the LCM-LoRA report's
      SD1.5 setting; the file's 134.6 MB in fp16 is exactly these modules at rank 64: ComfyUI-Manager
      model-list.json, "LCM LoRA SD1.5" size 134.6MB; ``test_layout_sizes_match_the_published_files``).
    - dtype fp16 (the size above; the script saves at the fp16 training ``weight_dtype``).
    - no text-encoder keys (UNet-only LoRA; sd.cpp lists it as "unet", not "unet+te").

TCD  h1t/TCD-SD15-LoRA · pytorch_lora_weights.safetensors
    - size 135 MB (a downloader script found by code search: "Download TCD lora? (135MB)"), the same as
      LCM-LoRA: same module set and rank 64 in fp16. TCD's README builds on LCM-LoRA
      (jabir-zheng/TCD README.md, references) and loads with plain ``pipe.load_lora_weights`` (ibid.).
    - NOT SETTLED by the sources: the key style (no published key list found). Picked the LCM-LoRA family's
      layout: kohya keys with diffusers paths, alpha 8 (peft default), fp16, no text encoder.

PCM  wangfuyun/PCM_Weights · sd15/pcm_sd15_smallcfg_4step_converted.safetensors
    - the ``_converted`` files replace the first upload, whose peft keys (``base_model.model.<path>``)
      diffusers refused (G-U-N/Phased-Consistency-Model issue #2); PCM's own demo loads the converted file
      with ``pipe.load_lora_weights(..., subfolder="sd15")`` (G-U-N/Phased-Consistency-Model demo/app.py).
    - key style: PCM's SD1.5 trainer converts with the same ``get_module_kohya_state_dict`` as LCM's
      (lora_down/lora_up/alpha, diffusers paths): G-U-N/Phased-Consistency-Model
      code/text_to_image_sd15/train_pcm_lora_sd15.py; stable-diffusion.cpp, which then read only
      lora_up/lora_down files, judged PCM_Weights "should just work" (leejet/stable-diffusion.cpp #290).
    - modules: the same 14-name target list (train_pcm_lora_sd15.py, LoraConfig); rank 64
      (train_pcm_lora_sd15.sh ``--lora_rank=64``); alpha 8 (no lora_alpha -> peft default); fp16
      (``--mixed_precision=fp16``, saved at weight_dtype). No text encoder.
    - NOT SETTLED: the converted file's exact dtype (the sources give the training/saving dtype only).

Hyper-SD  ByteDance/Hyper-SD · Hyper-SD15-4steps-lora.safetensors
    - size 269 MB (ComfyUI-Manager model-list.json, "Hyper-SD LoRA (4steps) - SD1.5"), exactly twice
      LCM-LoRA's 134.6 MB: the same module set at rank 64 stored in fp32 (ByteDance ships fp16 separately
      and labels it, e.g. "Hyper-SDXL-1step-Unet-Comfyui.fp16", same model-list). Loads with plain
      ``pipe.load_lora_weights`` + ``fuse_lora()`` (Hyper-SD model card snippets, quoted in many repos).
    - NOT SETTLED: the key style and alpha (no published key list; no training code). Picked the layout of
      the family it loads alongside (kohya keys, diffusers paths, ``.alpha``) with alpha 8 (peft default),
      fp32, no text encoder. (Rank 128 in fp16 would have the same size; rank 64 fp32 is assumed.)

Because TCD's and Hyper-SD's key style is assumed, ``VARIANTS`` adds the other layouts SD1.5 LoRAs ship in:
kohya keys with the original SGM/LDM module names (``lora_unet_input_blocks_1_1_proj_in``; kohya sd-scripts
naming, e.g. kohya-ss/sd-scripts issue #1490), the same plus ``lora_te_`` text-encoder keys
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ComfyUI issue #2961), diffusers' older
``unet.<path>.lora.down.weight`` form, and peft's ``unet.<path>.lora_A.weight`` form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# diffusers' LCM-LoRA / PCM / TCD target list (train_lcm_distill_lora_sd_wds.py, train_pcm_lora_sd15.py)
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# kohya sd-scripts' default text-encoder targets (CLIPAttention, CLIPMLP linears)
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class Layout:
    """How one LoRA file is written.

    style: ``"kohya"`` (lora_unet_/lora_te_ + lora_down/lora_up/alpha, diffusers module paths),
    ``"kohya-sgm"`` (the same with SGM/LDM UNet paths), ``"diffusers"`` (``unet.<path>.lora.down.weight``)
    or ``"peft"`` (``unet.<path>.lora_A.weight``).
    """

    name: str
    style: str
    rank: int
    alpha: float | None  # None: the file has no .alpha (the loader uses alpha = rank)
    dtype: torch.dtype
    unet_targets: tuple[str, ...] = LCM_TARGETS
    te_targets: tuple[str, ...] = ()
    source: str = ""


LAYOUTS: dict[str, Layout] = {
    "lcm-lora": Layout("lcm-lora", "kohya", 64, 8.0, torch.float16,
                       source="lcm-lora-sdv1-5: kohya/diffusers paths, r64, alpha 8, fp16"),
    "tcd": Layout("tcd", "kohya", 64, 8.0, torch.float16,
                  source="TCD-SD15-LoRA: as LCM-LoRA (key style assumed)"),
    "pcm": Layout("pcm", "kohya", 64, 8.0, torch.float16,
                  source="pcm_sd15_*_converted: get_module_kohya_state_dict, r64, alpha 8, fp16"),
    "hyper-sd": Layout("hyper-sd", "kohya", 64, 8.0, torch.float32,
                       source="Hyper-SD15-4steps-lora: LCM-LoRA's modules at r64 in fp32 (key style, alpha assumed)"),
}

# Other layouts SD1.5 LoRAs ship in (small ranks: these only check the loader's key handling).
VARIANTS: dict[str, Layout] = {
    "kohya-sgm": Layout("kohya-sgm", "kohya-sgm", 4, 2.0, torch.float16),
    "kohya-sgm+te": Layout("kohya-sgm+te", "kohya-sgm", 4, 4.0, torch.float16, te_targets=TE_TARGETS),
    "kohya+te": Layout("kohya+te", "kohya", 4, 1.0, torch.float16, te_targets=TE_TARGETS),
    "diffusers": Layout("diffusers", "diffusers", 4, None, torch.float16),
    "peft": Layout("peft", "peft", 4, None, torch.float32),
}

# The published files' sizes (bytes, rounded as the source gives them), for the layouts above.
PUBLISHED_MB = {"lcm-lora": 134.6, "tcd": 135.0, "hyper-sd": 269.0}


# --------------------------------------------------------------------------- modules of the pipeline


def _base_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d modules by their ORIGINAL path, also when peft already wrapped some of them
    (a wrapped layer counts under its own name; its base_layer and lora_* children are skipped)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, torch.nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, BaseTunerLayer):
            out[name] = module.get_base_layer()
            skip.append(name)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = module
    return out


def _matches(path: str, targets: tuple[str, ...]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _selected(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {p: m for p, m in _base_modules(model).items() if _matches(p, targets)}


# --------------------------------------------------------------------------- SGM (original LDM) names


def sgm_path(path: str, unet_config: Any) -> str | None:
    """The original SGM/LDM UNet path of a diffusers UNet module path (SD1.x layout), or None.

    input_blocks.0 = conv_in; input_blocks.{3b+j+1}.{0,1} = down_blocks.b.{resnets,attentions}.j;
    input_blocks.{3b+3}.0.op = down_blocks.b.downsamplers.0.conv; middle_block.{0,1,2} = mid_block
    resnets.0 / attentions.0 / resnets.1; output_blocks.{3b+j}.{0,1} = up_blocks.b.{resnets,attentions}.j
    and its upsampler is output_blocks.{3b+2}.{1 if the block has no attention else 2}.conv; resnet parts:
    in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 = time_emb_proj, skip_connection = conv_shortcut;
    time_embed.{0,2} = time_embedding.linear_{1,2}; out.2 = conv_out.
    """
    lpb = int(unet_config.layers_per_block)
    up_types = list(unet_config.up_block_types)

    def resnet_part(rest: str) -> str:
        for d, s in (("conv1", "in_layers.2"), ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                     ("conv_shortcut", "skip_connection")):
            if rest == d:
                return s
        raise KeyError(rest)

    try:
        if path == "conv_in":
            return "input_blocks.0.0"
        if path == "conv_out":
            return "out.2"
        m = re.fullmatch(r"time_embedding\.linear_([12])", path)
        if m:
            return f"time_embed.{0 if m.group(1) == '1' else 2}"
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = (lpb + 1) * b + j + 1
            return f"input_blocks.{i}.0.{resnet_part(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
        if m:
            return f"input_blocks.{(lpb + 1) * (int(m.group(1)) + 1)}.0.op"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{resnet_part(rest)}"
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = (lpb + 1) * b + j
            return f"output_blocks.{i}.0.{resnet_part(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
        if m:
            b = int(m.group(1))
            has_attn = "CrossAttn" in up_types[b]
            return f"output_blocks.{(lpb + 1) * b + lpb}.{2 if has_attn else 1}.conv"
    except KeyError:
        return None
    return None


# --------------------------------------------------------------------------- key naming per style


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _names(layout: Layout, component: str, path: str, unet_config: Any) -> tuple[str, str, str | None]:
    """(down key, up key, alpha key or None) of one module in ``layout``."""
    if layout.style in ("kohya", "kohya-sgm"):
        if component == "unet":
            p = path if layout.style == "kohya" else sgm_path(path, unet_config)
            if p is None:
                raise ValueError(f"no SGM name for unet module {path}")
            base = _kohya("lora_unet", p)
        else:
            base = _kohya("lora_te", path)
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", (f"{base}.alpha" if layout.alpha else None)
    if layout.style == "diffusers":
        base = f"{component}.{path}"
        return f"{base}.lora.down.weight", f"{base}.lora.up.weight", (f"{base}.alpha" if layout.alpha else None)
    if layout.style == "peft":
        base = f"{component}.{path}"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None
    raise ValueError(f"unknown style {layout.style!r}")


def _shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) weight shapes of a LoRA on ``module``: Linear (r, in) / (out, r); Conv2d (r, in, kh, kw) /
    (out, r, 1, 1), the conv LoRA keeping the base kernel in its down projection (kohya, peft)."""
    if isinstance(module, torch.nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, torch.nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    raise TypeError(f"LoRA on {type(module).__name__} is not supported here")


# --------------------------------------------------------------------------- writing


def _components(pipe: Any, layout: Layout) -> list[tuple[str, torch.nn.Module, tuple[str, ...]]]:
    comps = [("unet", pipe.unet, layout.unet_targets)]
    if layout.te_targets:
        comps.append(("text_encoder", pipe.text_encoder, layout.te_targets))
    return comps


def layout_state_dict(layout: Layout, pipe: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA weights in ``layout`` at the shapes of ``pipe``'s modules.

    Magnitudes like a trained LoRA's: down ~ N(0, 1/fan_in) (kaiming-like), up ~ N(0, 0.02 / sqrt(rank)) so that
    the update is a few percent of the base layer and the sampled images stay finite yet change visibly.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for component, model, targets in _components(pipe, layout):
        for path, module in sorted(_selected(model, targets).items()):
            down_shape, up_shape = _shapes(module, layout.rank)
            fan_in = 1
            for d in down_shape[1:]:
                fan_in *= d
            down = torch.randn(down_shape, generator=g) / fan_in ** 0.5
            up = torch.randn(up_shape, generator=g) * (0.02 / layout.rank ** 0.5) * 10
            kd, ku, ka = _names(layout, component, path, model.config if component == "unet" else None)
            sd[kd] = down.to(layout.dtype).contiguous()
            sd[ku] = up.to(layout.dtype).contiguous()
            if ka is not None:
                sd[ka] = torch.tensor(float(layout.alpha), dtype=layout.dtype)
    return sd


def write_layout(layout: Layout | str, pipe: Any, path: str | Path, seed: int = 0) -> Path:
    """Write a random LoRA in ``layout`` (a `Layout` or a key of `LAYOUTS`/`VARIANTS`) for ``pipe`` to ``path``."""
    from safetensors.torch import save_file

    if isinstance(layout, str):
        layout = {**LAYOUTS, **VARIANTS}[layout]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(layout_state_dict(layout, pipe, seed), str(path))
    return path


def write_lcm_lora(pipe: Any, path: str | Path, seed: int = 0) -> Path:
    return write_layout(LAYOUTS["lcm-lora"], pipe, path, seed)


def write_tcd(pipe: Any, path: str | Path, seed: int = 1) -> Path:
    return write_layout(LAYOUTS["tcd"], pipe, path, seed)


def write_pcm(pipe: Any, path: str | Path, seed: int = 2) -> Path:
    return write_layout(LAYOUTS["pcm"], pipe, path, seed)


def write_hyper_sd(pipe: Any, path: str | Path, seed: int = 3) -> Path:
    return write_layout(LAYOUTS["hyper-sd"], pipe, path, seed)


WRITERS = {"lcm-lora": write_lcm_lora, "tcd": write_tcd, "pcm": write_pcm, "hyper-sd": write_hyper_sd}


# --------------------------------------------------------------------------- reading back, independently


@dataclass
class ExpectedLora:
    """What one file entry must become on a module: lora_A = down, lora_B = up, scaling = alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _key_tables(pipe: Any) -> dict[str, tuple[str, str]]:
    """Every module name a file may use for each LoRA-able module of ``pipe`` -> (component, path)."""
    table: dict[str, tuple[str, str]] = {}

    def add(name: str, target: tuple[str, str]) -> None:
        if table.get(name, target) != target:
            raise AssertionError(f"ambiguous module name {name}: {table[name]} and {target}")
        table[name] = target

    unet_config = pipe.unet.config
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path in _base_modules(model):
            add(f"{component}.{path}", (component, path))
            if component == "unet":
                add(_kohya("lora_unet", path), (component, path))
                sgm = sgm_path(path, unet_config)
                if sgm is not None:
                    add(_kohya("lora_unet", sgm), (component, path))
            else:
                add(_kohya("lora_te", path), (component, path))
    return table


_SUFFIXES = (  # (suffix, role)
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora.down.weight", "down"),
    (".lora.up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha"),
)


def expected_lora(layout_file: str | Path, pipe: Any) -> dict[str, ExpectedLora]:
    """``{"unet.<path>" | "text_encoder.<path>": ExpectedLora}`` for every module ``layout_file`` targets, read
    with this module's own name tables (diffusers paths, kohya names, SGM names), not diffusers' loader.

    Raises ValueError if any key of the file maps to no module of ``pipe`` or lacks its down/up partner: a key
    the loader could silently skip is an error here.
    """
    from safetensors.torch import load_file

    sd = load_file(str(layout_file))
    table = _key_tables(pipe)
    parts: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                break
        else:
            unknown.append(key)
            continue
        if name not in table:
            unknown.append(key)
            continue
        component, path = table[name]
        q = f"{component}.{path}"
        entry = parts.setdefault(q, {"keys": []})
        if role in entry:
            raise ValueError(f"{q} appears twice in {layout_file} ({entry['keys']} and {key})")
        entry[role] = tensor
        entry["keys"].append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys of {layout_file} map to no module: {sorted(unknown)[:5]}")
    out: dict[str, ExpectedLora] = {}
    for q, entry in parts.items():
        if "down" not in entry or "up" not in entry:
            raise ValueError(f"{q}: {entry['keys']} lacks its lora down/up partner")
        rank = int(entry["down"].shape[0])
        alpha = float(entry["alpha"].item()) if "alpha" in entry else float(rank)
        out[q] = ExpectedLora(entry["down"], entry["up"], alpha, entry["keys"])
    return out


def expected_targets(layout_file: str | Path, pipe: Any) -> set[str]:
    """The modules ``layout_file`` targets, as ``"unet.<diffusers path>"`` / ``"text_encoder.<path>"``."""
    return set(expected_lora(layout_file, pipe))


def lora_param_count(layout: Layout, pipe: Any) -> int:
    """Weights (not alphas) a file in ``layout`` holds for ``pipe``'s modules."""
    n = 0
    for _, model, targets in _components(pipe, layout):
        for module in _selected(model, targets).values():
            d, u = _shapes(module, layout.rank)
            n += int(torch.tensor(d).prod()) + int(torch.tensor(u).prod())
    return n
