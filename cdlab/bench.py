"""Speed benchmarks: sampling latency (teacher-50 with CFG vs the 4-step student), its breakdown, the
fast paths each measured with and without, and consistency-distillation training throughput and MFU.
Every ratio is measured in ONE run on whatever device is present.

    python -m cdlab bench sampling                     # CUDA: SD1.5-architecture random weights, 512², fp16
    python -m cdlab bench sampling --model tiny        # CPU: the embedded tiny teacher
    python -m cdlab bench train [--batch 16]           # CD samples/s and model-FLOP utilisation
    python -m cdlab bench sampling --quick             # a smoke run (used by the tests)

``--model``: ``auto`` (default: ``sd15-random`` on CUDA, ``tiny`` otherwise), ``tiny``, ``sd15`` (the real
weights, from the hub cache), ``sd15-random`` (SD1.5's UNet/VAE/text-encoder configs with random
weights: it times the same as the real ones) or a local pipeline folder. The student is a random
LoRA (rank 64, SD's LCM-LoRA targets) saved and loaded the way trained students are; its speed does
not depend on its weights. ``--json FILE`` also writes the numbers.

FLOP bound of the latency ratio (SD1.5 at 512²): a UNet pass costs about 0.84 TFLOP per image and the
VAE decode about 2.5 TFLOP, so (100 x 0.84 + 2.5) / (4 x 0.84 + 2.5) ~ 14.8 (the text encoder adds a
little to both sides).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdlab.columns import TEACHER_50, Column, initial_noise, sample_column
from cdlab.loss import consistency_loss
from cdlab.prompts import COURSE_PROMPTS
from cdlab.students import StudentCard, attach_lora, load_student, save_student, use_student
from cdlab.teachers import TeacherLoadError, load_teacher
from cdlab.timing import sync
from cdlab.tiny.architecture import build_pipeline
from cdlab.world import IMAGE_SIZE

# SD1.5's architecture with random weights lives with the teachers (cdlab.sd15_random); re-exported here.
from cdlab.sd15_random import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG  # noqa: E402,F401

SD15_RANDOM = "sd15-random"
TAESD_ID = "madebyollin/taesd"
STUDENT_RANK = 64
STUDENT_NAME = "bench-student"

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "T4": 65e12, "V100": 125e12,
}

Printer = Callable[[str], Any]


# ----------------------------------------------------------------------------- loading

def load_bench_teacher(model: str = "auto", device: str | None = None, dtype: Any = None) -> Any:
    """The teacher a benchmark runs on (see the module docstring for ``model``)."""
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if model == "auto":
        model = SD15_RANDOM if cuda else "tiny"
    if model == SD15_RANDOM:  # 512² on a GPU (the real size), 64² on the CPU
        return load_teacher(SD15_RANDOM, device=device or ("cuda" if cuda else "cpu"), dtype=dtype,
                            resolution=512 if cuda else 64)
    try:
        return load_teacher(model, device=device, dtype=dtype)
    except TeacherLoadError:
        if model != "tiny":
            raise
        # The embedded teacher is not built yet: its architecture with random weights times the same.
        with tempfile.TemporaryDirectory(prefix="cdlab-bench-tiny-") as d:  # read into memory, then removed
            build_pipeline(seed=0).save_pretrained(d, safe_serialization=True)
            teacher = load_teacher(d, device=device, dtype=dtype)
        teacher.name = "tiny (random weights: the embedded teacher is not built)"
        return teacher


@contextlib.contextmanager
def random_student(teacher: Any, name: str, rank: int = STUDENT_RANK) -> Iterator[Path]:
    """A rank-``rank`` LoRA student ``name`` of the teacher's UNet that changes its output (LoRA B drawn from
    N(0, 1e-3²), seed 0; A is random already), saved in a temporary adapters root: yields that root, which is
    removed afterwards (the student is 257 MB at SD1.5's size at rank 64). The UNet is left without it."""
    with tempfile.TemporaryDirectory(prefix="cdlab-random-student-") as d:
        attach_lora(teacher.unet, rank=rank, adapter_name=name)
        try:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                for pname, p in teacher.unet.named_parameters():
                    if f"lora_B.{name}" in pname:
                        p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3)
            card = StudentCard(name=name, base_model=teacher.base_id, base_fingerprint=teacher.base_fingerprint,
                               method="mbcd", num_boundaries=4, steps=4)
            save_student(teacher.unet, name, card, root=d, adapter_name=name)
        finally:
            teacher.unet.delete_adapters(name)
        yield Path(d)


def attach_bench_student(teacher: Any, rank: int = STUDENT_RANK) -> str:
    """Save a random LoRA student of the teacher's UNet (`random_student`) and load it the way trained students
    are loaded (into memory: its temporary folder is gone afterwards)."""
    with random_student(teacher, STUDENT_NAME, rank) as root:
        load_student(teacher, STUDENT_NAME, root=root)
    return STUDENT_NAME


# ----------------------------------------------------------------------------- timing

def timeit(fn: Callable[[], Any], device: Any, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.3f} s"


def _bench_prompt(teacher: Any) -> str:
    if teacher.resolution == IMAGE_SIZE:
        return "a small red circle at the top left on a blue background"
    return COURSE_PROMPTS[0]


# ----------------------------------------------------------------------------- sampling

class _Sampling:
    """The two end-to-end jobs (teacher-50 + CFG, student-4: `cdlab.columns` columns, sampled by
    `sample_column` on ``self.unet``) and their parts, on one prompt and the seeding rule's noise."""

    def __init__(self, teacher: Any, student: str, guidance: float, batch: int = 1) -> None:
        self.t = teacher
        self.student = student
        self.guidance = guidance
        self.teacher_column = Column(TEACHER_50, "teacher", 50, guidance)
        card = StudentCard(name=student, base_model=teacher.base_id, method="mbcd", num_boundaries=4, steps=4)
        self.student_column = Column(student, "student", 4, num_boundaries=4, student=student, card=card)
        self.prompts = [_bench_prompt(teacher)] * batch
        self.x_T = initial_noise(teacher, range(batch))
        self.cond, self.uncond = teacher.encode(self.prompts)
        self.unet = teacher.unet      # may be swapped for a compiled module
        self.decoder: Callable[[Any], Any] | None = None  # may be swapped for a tiny VAE
        self._held: contextlib.ExitStack | None = None   # the open use_student of the current mode

    def _mode(self, name: str | None) -> None:
        """Leave the current mode and run as ``name`` (None: the teacher) with peft's unfused adapter, the path
        the fast paths below are measured against, until the next switch (`use_student`, held open)."""
        self.close()
        self._held = contextlib.ExitStack()
        self._held.enter_context(use_student(self.t.pipe, name, fuse=False))

    def teacher_mode(self) -> None:
        self._mode(None)

    def student_mode(self) -> None:
        self._mode(self.student)

    def close(self) -> None:
        """Back to the plain teacher, the student's switch closed."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def encode(self) -> Any:
        return self.t.encode(self.prompts)

    def decode(self, latents: Any) -> Any:
        if self.decoder is not None:
            return self.decoder(latents)
        vae = self.t.vae
        return vae.decode(latents / vae.config.scaling_factor).sample

    def unet_cfg_step(self) -> Any:
        x = torch.cat([self.x_T, self.x_T])
        t = torch.full((x.shape[0],), 999, device=x.device, dtype=torch.long)
        return self.unet(x, t, encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample

    def unet_step(self) -> Any:
        t = torch.full((self.x_T.shape[0],), 999, device=self.x_T.device, dtype=torch.long)
        return self.unet(self.x_T, t, encoder_hidden_states=self.cond).sample

    def teacher50(self) -> Any:
        cond, uncond = self.encode()
        out = sample_column(self.t, self.teacher_column, self.x_T, cond, uncond, unet=self.unet)
        return self.decode(out.latents)

    def student4(self) -> Any:
        cond, _ = self.encode()
        out = sample_column(self.t, self.student_column, self.x_T, cond, None, unet=self.unet,
                            scheduler=self.t.scheduler)
        return self.decode(out.latents)


def _tiny_vae(teacher: Any) -> tuple[Any, str | None]:
    """TAESD (Bohan 2023) when its weights are on disk and the latent space is SD's; else a reason."""
    vae = teacher.vae
    if int(vae.config.latent_channels) != 4 or int(teacher.pipe.vae_scale_factor) != 8:
        return None, "skipped: not SD's latent space (TAESD decodes SD1.5 latents only)"
    try:
        from diffusers import AutoencoderTiny

        taesd = AutoencoderTiny.from_pretrained(TAESD_ID, torch_dtype=teacher.dtype, local_files_only=True)
    except Exception:  # not in the local cache: the hub is not reachable here
        return None, "skipped: weights not available"
    return taesd.to(teacher.device).eval(), None


def bench_sampling(teacher: Any, *, repeats: int = 3, quick: bool = False, compile: bool | None = None,
                   compile_mode: str | None = None, guidance: float | None = None, out: Printer = print) -> dict:
    """Latency of teacher-50 (CFG) vs student-4 and the ratio, the breakdown, and the fast paths.

    Args:
        teacher: a loaded ``Teacher`` (its UNet gets a random bench student adapter).
        repeats: timed runs per number (the median is reported), after one warm-up.
        quick: one timed run, fast paths on student-4 only, no ``torch.compile``.
        compile: try ``torch.compile`` (default: yes unless ``quick``); ``compile_mode`` is its ``mode``.
        guidance: the teacher's CFG scale (default ``teacher.guidance``, else 7.5).
        out: where the report lines go.
    """
    if quick:
        repeats = 1
    compile = (not quick) if compile is None else compile
    dev = teacher.device
    student = attach_bench_student(teacher)
    guidance = float(teacher.guidance) if guidance is None else guidance
    s = _Sampling(teacher, student, guidance=guidance)
    res: dict[str, Any] = {"device": _device_name(dev), "teacher": teacher.describe(), "dtype": str(teacher.dtype),
                           "resolution": teacher.resolution, "batch": 1, "repeats": repeats, "fast_paths": {}}
    T = lambda fn: timeit(fn, dev, repeats=repeats)  # noqa: E731

    out(f"# sampling benchmark · {res['device']} · {teacher.describe()} · {teacher.resolution}² · batch 1")
    with torch.inference_mode():
        _bench_end_to_end(s, res, T, out)
        out("fast paths (median latency without -> with; 'wins' = at least 3% faster):")
        _bench_fast_paths(s, res, T, out, quick=quick, compile=compile, compile_mode=compile_mode)
        s.close()

    out(f"RESULT ratio teacher-50/student-4 = {res['ratio']:.2f}x on {res['device']} "
        f"({_fmt_s(res['teacher50_s'])} vs {_fmt_s(res['student4_s'])})")
    return res


def _bench_end_to_end(s: _Sampling, res: dict, T: Callable, out: Printer) -> None:
    """teacher-50 and student-4 end to end, their ratio, and the breakdown into encoder, UNet steps and decoder."""
    s.teacher_mode()
    t50 = T(s.teacher50)
    enc = T(s.encode)
    cfg_step = T(s.unet_cfg_step)
    lat = s.x_T
    dec = T(lambda: s.decode(lat))
    s.student_mode()
    s4 = T(s.student4)
    st_step = T(s.unet_step)
    ratio = t50 / s4
    res.update(teacher50_s=t50, student4_s=s4, ratio=ratio,
               breakdown={"text_encoder_s": enc, "unet_cfg_step_s": cfg_step, "unet_student_step_s": st_step,
                          "vae_decode_s": dec})
    out(f"teacher 50 steps + CFG (100 NFE): {_fmt_s(t50)}")
    out(f"student 4 steps (4 NFE):          {_fmt_s(s4)}")
    out(f"ratio teacher-50 / student-4:     {ratio:.2f}x")
    out("breakdown:")
    out(f"  text encoder (prompt + empty): {_fmt_s(enc)}")
    out(f"  UNet step with CFG (batch 2):  {_fmt_s(cfg_step)}  x 50 = {_fmt_s(50 * cfg_step)}")
    out(f"  UNet step, student (LoRA):     {_fmt_s(st_step)}  x 4 = {_fmt_s(4 * st_step)}")
    out(f"  VAE decode:                    {_fmt_s(dec)}")
    parts50, parts4 = enc + 50 * cfg_step + dec, enc + 4 * st_step + dec
    out(f"  sum of parts: teacher {_fmt_s(parts50)}, student {_fmt_s(parts4)}, ratio {parts50 / parts4:.2f}x")
    res["breakdown"]["ratio_from_parts"] = parts50 / parts4


def _measure(s: _Sampling, res: dict, T: Callable, out: Printer, label: str, on: Callable[[], Any],
             off: Callable[[], Any], teacher_too: bool) -> None:
    """One fast path: each job's median latency without and with it (``on`` / ``off`` switch it)."""
    jobs = [("student4", s.student_mode, s.student4)]
    if teacher_too:
        jobs.insert(0, ("teacher50", s.teacher_mode, s.teacher50))
    entry: dict[str, Any] = {}
    for job, mode, fn in jobs:
        mode()
        without = T(fn)
        try:
            on()
            mode()
            with_ = T(fn)
        finally:
            off()
        entry[job] = {"without_s": without, "with_s": with_, "speedup": without / with_}
        out(f"  {label:<28} {job:<10} {_fmt_s(without)} -> {_fmt_s(with_)}  ({without / with_:.2f}x)")
    entry["wins"] = all(v["speedup"] >= 1.03 for v in entry.values() if isinstance(v, dict))
    out(f"  {label:<28} -> {'wins' if entry['wins'] else 'does not win'}")
    res["fast_paths"][label] = entry


def _bench_fast_paths(s: _Sampling, res: dict, T: Callable, out: Printer, *, quick: bool, compile: bool,
                      compile_mode: str | None) -> None:
    """SDPA, channels_last, the fused LoRA, ``torch.compile`` and a tiny VAE decoder, each without and with."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    teacher, student = s.t, s.student

    def measure(label: str, on: Callable[[], Any], off: Callable[[], Any], teacher_too: bool = True) -> None:
        _measure(s, res, T, out, label, on, off, teacher_too and not quick)

    # 1. SDPA vs the vanilla attention processor (diffusers' default is SDPA).
    mods = [teacher.unet, teacher.vae]
    measure("SDPA attention",
            on=lambda: [m.set_attn_processor(AttnProcessor2_0()) for m in mods],
            off=lambda: [m.set_attn_processor(AttnProcessor()) for m in mods])
    for m in mods:  # restore diffusers' default
        m.set_attn_processor(AttnProcessor2_0())

    # 2. channels_last memory format for the convolutions.
    measure("channels_last",
            on=lambda: [m.to(memory_format=torch.channels_last) for m in mods],
            off=lambda: [m.to(memory_format=torch.contiguous_format) for m in mods])

    # 3. The student's LoRA fused into the weights (no extra low-rank matmuls per layer).
    s.student_mode()
    ref = s.student4()
    teacher.pipe.fuse_lora(components=["unet"], adapter_names=[student])
    fused_diff = float((s.student4().float() - ref.float()).abs().max())
    teacher.pipe.unfuse_lora(components=["unet"])
    out(f"  fused LoRA max |difference| of the student-4 image: {fused_diff:.2e}")
    measure("fused LoRA",
            on=lambda: teacher.pipe.fuse_lora(components=["unet"], adapter_names=[student]),
            off=lambda: teacher.pipe.unfuse_lora(components=["unet"]), teacher_too=False)
    res["fast_paths"]["fused LoRA"]["max_abs_diff"] = fused_diff
    s.student_mode()

    # 4. torch.compile of the UNet.
    if compile:
        _bench_compile(s, teacher, res, T, out, compile_mode)
    else:
        out("  torch.compile                skipped: --quick / --no-compile")
        res["fast_paths"]["torch.compile"] = {"skipped": "quick / no-compile"}

    # 5. A tiny VAE decoder for previews.
    taesd, why = _tiny_vae(teacher)
    if taesd is None:
        out(f"  tiny VAE decoder (TAESD)     {why}")
        res["fast_paths"]["tiny VAE"] = {"skipped": why}
        return
    lat = s.x_T
    tiny_dec = lambda z: taesd.decode(z / taesd.config.scaling_factor).sample  # noqa: E731
    d_full, d_tiny = T(lambda: s.decode(lat)), T(lambda: tiny_dec(lat))
    out(f"  tiny VAE decoder (TAESD)     decode {_fmt_s(d_full)} -> {_fmt_s(d_tiny)} ({d_full / d_tiny:.2f}x)")
    measure("tiny VAE decoder", on=lambda: setattr(s, "decoder", tiny_dec), off=lambda: setattr(s, "decoder", None))
    res["fast_paths"]["tiny VAE decoder"]["decode"] = {"without_s": d_full, "with_s": d_tiny}


def _bench_compile(s: _Sampling, teacher: Any, res: dict, T: Callable, out: Printer, mode: str | None) -> None:
    entry: dict[str, Any] = {}
    try:
        compiled = torch.compile(teacher.unet, mode=mode)
        for job, mode, fn in (("teacher50", s.teacher_mode, s.teacher50), ("student4", s.student_mode, s.student4)):
            mode()
            s.unet = teacher.unet
            without = T(fn)
            s.unet = compiled
            t0 = time.perf_counter()
            fn()  # compilation happens here
            sync(teacher.device)
            warm = time.perf_counter() - t0
            with_ = T(fn)
            entry[job] = {"without_s": without, "with_s": with_, "speedup": without / with_, "first_call_s": warm}
            out(f"  {'torch.compile':<28} {job:<10} {_fmt_s(without)} -> {_fmt_s(with_)}  "
                f"({without / with_:.2f}x; first call {_fmt_s(warm)})")
        entry["wins"] = all(v["speedup"] >= 1.03 for v in entry.values() if isinstance(v, dict))
        out(f"  {'torch.compile':<28} -> {'wins' if entry['wins'] else 'does not win'}")
    except Exception as e:  # inductor needs a working compiler toolchain; the CPU may lack one
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        entry = {"skipped": f"failed: {msg}"}
        out(f"  torch.compile                skipped: failed ({msg})")
    finally:
        s.unet = teacher.unet
    res["fast_paths"]["torch.compile"] = entry


# ----------------------------------------------------------------------------- training

def _device_name(device: Any) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cuda_peak_flops(name: str) -> float | None:
    """Dense bf16 tensor-core peak of a CUDA device, looked up by name (longest match first)."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_FLOPS[key]
    return None


def measure_cpu_peak_flops(n: int = 1024, seconds: float = 1.0, dtype: Any = None) -> float:
    """Best achieved FLOP/s of an ``n x n`` float32 matmul on this CPU (its practical peak)."""
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def unet_forward_flops(unet: Any, x: Any, t: Any, cond: Any) -> int:
    """FLOPs of one UNet forward on this batch, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, t, encoder_hidden_states=cond)
    return int(counter.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def bench_train(teacher: Any, *, batch: int | None = None, steps: int | None = None, quick: bool = False,
                num_boundaries: int = 4, rank: int = STUDENT_RANK, out: Printer = print) -> dict:
    """Consistency-distillation training throughput (samples/s) and model-FLOP utilisation.

    One step = ``cdlab.loss.consistency_loss`` with the teacher (CFG: cond + uncond in one pass), the
    stop-gradient target pass, the student's forward and backward, and an AdamW step on the LoRA.

    Model FLOPs per sample are counted, not assumed: ``FlopCounterMode`` over one whole step (forward,
    backward, optimiser). With a frozen base and a LoRA the backward pass computes input gradients only
    (about one forward, not two), so a step is about 5 UNet forwards a sample: teacher cond + uncond (2),
    target (1), student forward (1) and backward (~1). The old rule of 6 overstated MFU by about 20%;
    both are printed.
    """
    dev = teacher.device
    cuda = str(dev).startswith("cuda")
    batch = batch or (2 if quick else (16 if cuda else 32))
    steps = steps or (2 if quick else 10)
    unet = teacher.unet
    attach_lora(unet, rank=rank, adapter_name="bench-train")
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    autocast = teacher.dtype if cuda and teacher.dtype != torch.float32 else None
    c, h, w = teacher.latent_shape
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, c, h, w, generator=gen).to(dev, teacher.dtype)
    with torch.no_grad():
        cond, uncond = teacher.encode([_bench_prompt(teacher)] * batch)

    def step() -> None:
        out_ = consistency_loss(unet, latents, cond, teacher.scheduler, teacher=unet, uncond=uncond[:1],
                                guidance=(3.0, 15.0), num_boundaries=num_boundaries, generator=gen,
                                autocast_dtype=autocast)
        out_["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    unet.train()
    try:
        step_flops = count_flops(step) / batch  # the counted step is also the warm-up (allocations, cuDNN autotune)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dev)
        elapsed = time.perf_counter() - t0
        tt = torch.full((batch,), 500, device=dev, dtype=torch.long)
        with torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext():
            fwd = unet_forward_flops(unet, latents, tt, cond) / batch
    finally:
        unet.eval()
        unet.delete_adapters("bench-train")
    sps = batch * steps / elapsed
    model_flops = step_flops * sps
    if cuda:
        name = _device_name(dev)
        peak, peak_src = cuda_peak_flops(name), f"{name} dense bf16/fp16 table"
    else:
        peak, peak_src = measure_cpu_peak_flops(), "float32 matmul measured now"
    mfu = model_flops / peak if peak else None
    res = {"device": _device_name(dev), "teacher": teacher.describe(), "batch": batch, "steps": steps,
           "samples_per_s": sps, "step_s": elapsed / steps, "unet_forward_flops_per_sample": fwd,
           "model_flops_per_sample": step_flops, "forwards_per_step": step_flops / fwd,
           "mfu_rule_of_6": 6 * fwd * sps / peak if peak else None, "achieved_flops": model_flops, "peak_flops": peak,
           "peak_source": peak_src, "mfu": mfu}
    out(f"# CD training benchmark · {res['device']} · {teacher.describe()} · batch {batch} · {steps} steps")
    out(f"samples/s: {sps:.2f}   ({elapsed / steps * 1000:.1f} ms/step)")
    out(f"UNet forward: {fwd / 1e9:.3f} GFLOP/sample; CD step counted: {step_flops / 1e9:.3f} GFLOP/sample "
        f"= {step_flops / fwd:.2f} forwards (frozen base + LoRA: the backward is about one forward)")
    out(f"achieved: {model_flops / 1e12:.3f} TFLOP/s; peak: "
        + (f"{peak / 1e12:.3f} TFLOP/s ({peak_src})" if peak else f"unknown ({res['device']})"))
    out(f"RESULT MFU = {mfu * 100:.1f}% (the old rule of 6 forwards would say {res['mfu_rule_of_6'] * 100:.1f}%)"
        if mfu is not None else "RESULT MFU = unknown (no peak for this device)")
    return res


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdlab bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("sampling", "train"))
    parser.add_argument("--model", default="auto", help="auto | tiny | sd15 | sd15-random | a pipeline folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default fp16 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--batch", type=int, default=None, help="training batch")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        if args.dtype and not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {args.dtype!r}")
        if dtype is None and args.what == "train" and torch.cuda.is_available() and args.device in (None, "cuda"):
            dtype = torch.bfloat16  # training runs in bf16 (no loss scaling needed); the peak table is bf16
        teacher = load_bench_teacher(args.model, device=args.device, dtype=dtype)
    except Exception as e:  # a clear one-line error, not a stack trace
        print(f"error: could not load {args.model!r}: {e}", file=sys.stderr)
        return 1
    if args.what == "sampling":
        res = bench_sampling(teacher, repeats=args.repeats, quick=args.quick,
                             compile=False if args.no_compile else None, compile_mode=args.compile_mode)
    else:
        res = bench_train(teacher, batch=args.batch, steps=args.steps, quick=args.quick)
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    from cdlab import shutdown

    shutdown.exit(main())
