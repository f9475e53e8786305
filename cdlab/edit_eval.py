"""``python -m cdlab evaluate --edit``: the edits of :mod:`cdlab.edit` measured on the tiny world.

Per technique, ``n`` fixed cases (default 128, deterministic by ``--seed``), each in every column: the
teacher at 50 DDIM+CFG steps, the teacher naively at 4, every consistency student of the teacher at 4 steps.
Every column of a case starts from the same noise (``teacher.initial_noise(seed + i)``). The world's checker
(`cdlab.world.check`) reads the results; nothing about it is tuned here.

=========  ====================================================================================================
sdedit     §1.7.3: a rendered caption -> the caption with ONE attribute changed (colour, shape, size or
           background, in turn), strength ``SDEDIT_STRENGTH``. success: every attribute reads as the target;
           preservation: the four unchanged attributes read right.
inpaint    §1.7.2: a rendered caption; the mask is the latent-aligned box around the object (``INPAINT_BOX``);
           the prompt changes the object's colour or shape. success: the checker reads the prompted caption
           on the result; error: mean |result - original| in [0, 1] pixels outside the mask (and the share of
           cases within ``INPAINT_TOL``).
sketch     §1.7.1: a programmatic scribble (a jittered outline and hatching of the object's colour, at its
           place, on its background) projected by SDEdit at ``PROJECTION_STRENGTH`` with the EMPTY prompt (the
           course's projection; its "a high quality photo" has no counterpart in the world's grammar, so the
           projection here is unconditional). success: the checker reads the sketch's caption. The strength is
           0.25, a student boundary, so every column starts from the same noise level (at 0.6 an N = 4 student
           starts from 750 while the teacher starts from 600: without a prompt to say what to draw, that extra
           noise alone decides the row).
sketch_text  the same sketches projected with their caption as the prompt (§1.7.1 with §1.7.3's text guidance),
           at ``SKETCH_STRENGTH``.
anagram    §1.8: ``(p_up, p_flipped)`` = a caption without a triangle (a flipped triangle is not a world shape)
           and the same caption mirrored top <-> bottom. success: the result reads as p_up AND its vertical flip
           as p_flipped. In a one-object world the two readings are geometrically coupled, so this measures that
           the combined eps stays on the manifold and the flip is right, not that two scenes are reconciled.
hybrid     §1.9: ``(p_low, p_high)`` = a circle and the same caption with a cross or a triangle. success: the
           result reads as p_high up close (every attribute) AND its Gaussian blur (``FAR_SIGMA_PX``) reads as a
           circle (shape only: the checker's palette labelling misreads blurred edge colours).
=========  ====================================================================================================

Control rows (teacher-50 on the first/only prompt alone, no edit) and input rows (the checker on the inputs)
show what a technique adds. Writes ``evals/edit-<timestamp>/{edit_results.json, edit_table.md}``
(``CDLAB_EVALS_DIR`` overrides ``evals/``); the file names differ from ``results.json`` so the Evaluate tab's
list (quality against NFE) does not pick up an evaluation of another shape.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cdlab import edit as E

DEFAULT_N = 128
CASE_SEED = 4242
SDEDIT_STRENGTH = 0.6
SKETCH_STRENGTH = 0.6      # sketch_text: the sketch and its caption
PROJECTION_STRENGTH = 0.25  # sketch (no prompt): a boundary of the N = 4 students, where every column starts alike
INPAINT_BOX = 12          # half-side in px of the inpainting box around the object centre, snapped to the latent grid
INPAINT_TOL = 0.05        # a case "keeps" the outside when its mean abs error there is at most this
FAR_SIGMA_PX = 2.0        # the hybrid's far view: Gaussian blur of this many pixels
TECHNIQUES = ("sdedit", "inpaint", "sketch", "sketch_text", "anagram", "hybrid")
CHANGEABLE = ("color", "shape", "size", "background")

ProgressFn = Callable[[float, str], Any]

__all__ = ["DEFAULT_N", "TECHNIQUES", "make_cases", "scribble", "inpaint_mask", "run_edit_evaluation",
           "render_edit_table", "write_edit_evaluation", "main"]


# ----------------------------------------------------------------------------- cases

def _change(c: Any, attr: str, rng: random.Random) -> Any:
    from cdlab.world import BACKGROUNDS, COLORS, SHAPES, SIZES

    pool = {"color": COLORS, "shape": SHAPES, "size": SIZES, "background": BACKGROUNDS}[attr]
    other = "background" if attr == "color" else "color" if attr == "background" else None
    choices = [v for v in pool if v != getattr(c, attr) and (other is None or v != getattr(c, other))]
    return replace(c, **{attr: rng.choice(choices)})


_MIRROR = {"top left": "bottom left", "top right": "bottom right", "bottom left": "top left",
           "bottom right": "top right", "center": "center"}


def scribble(caption: Any, seed: int = 0, size: int = 32) -> Any:
    """A coarse "hand-drawn" version of ``caption``: its background, a wobbly outline of the shape (radius
    jittered +-15 % per vertex, 2 px strokes) and a few hatching strokes inside, in the object's colour
    shifted by up to +-25 per channel, at the caption's place and size (the renderer's centres and radii)."""
    from PIL import Image, ImageDraw

    from cdlab.world.grammar import PALETTE
    from cdlab.world.render import CENTERS, RADIUS, shape_polygon

    rng = random.Random(seed)
    ss = 4
    img = Image.new("RGB", (size * ss, size * ss), PALETTE[caption.background])
    d = ImageDraw.Draw(img)
    col = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in PALETTE[caption.color])
    fx, fy = CENTERS[caption.position]
    cx, cy = (fx * size + rng.uniform(-1.5, 1.5)) * ss, (fy * size + rng.uniform(-1.5, 1.5)) * ss
    r = RADIUS[caption.size] * rng.uniform(0.85, 1.1) * ss * size / 32
    poly = shape_polygon(caption.shape, cx, cy, r)
    if poly is None:
        import math

        poly = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in [k * 2 * math.pi / 14 for k in range(14)]]
    pts = [(x + rng.uniform(-0.15, 0.15) * r, y + rng.uniform(-0.15, 0.15) * r) for x, y in poly]
    d.line(pts + [pts[0]], fill=col, width=int(1.5 * ss), joint="curve")
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    hatch = Image.new("RGB", img.size, col)
    hl = Image.new("L", img.size, 0)
    hd = ImageDraw.Draw(hl)
    for k in range(rng.randint(2, 4)):  # diagonal hatching strokes, clipped to the outline
        off = rng.uniform(-1.2, 1.2) * r
        hd.line([(cx - r + off, cy + r), (cx + r + off, cy - r)], fill=255, width=int(1.5 * ss))
    from PIL import ImageChops

    img.paste(hatch, (0, 0), ImageChops.multiply(hl, mask))
    return img.resize((size, size), Image.Resampling.BOX)


def inpaint_mask(caption: Any, size: int = 32, factor: int = 4) -> torch.Tensor:
    """``[1, 1, size, size]``: the box of half-side ``INPAINT_BOX`` around the caption's centre, snapped
    outward to the ``factor``-pixel latent grid (so the pixel mask IS the upsampled latent mask)."""
    from cdlab.world.render import CENTERS

    fx, fy = CENTERS[caption.position]
    scale = size / 32
    x0, x1 = fx * size - INPAINT_BOX * scale, fx * size + INPAINT_BOX * scale
    y0, y1 = fy * size - INPAINT_BOX * scale, fy * size + INPAINT_BOX * scale
    snap = lambda v, up: max(0, min(size, int((v // factor + (1 if up and v % factor else 0)) * factor)))  # noqa: E731
    m = torch.zeros(1, 1, size, size)
    m[..., snap(y0, False):snap(y1, True), snap(x0, False):snap(x1, True)] = 1
    return m


def make_cases(technique: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` fixed cases of a technique: captions (source, prompts, what to read) and the render seed."""
    from cdlab.world import sample_captions

    key = TECHNIQUES.index("sketch" if technique == "sketch_text" else technique)  # both sketch rows: one set
    rng = random.Random(CASE_SEED + 1000 * key + seed)
    cases = []
    base = sample_captions(4 * n + 16, seed=CASE_SEED + key + seed)
    i = 0
    while len(cases) < n:
        c = base[i]
        i += 1
        k = len(cases)
        if technique == "sdedit":
            attr = CHANGEABLE[k % len(CHANGEABLE)]
            cases.append({"source": c, "target": _change(c, attr, rng), "changed": attr, "render_seed": k})
        elif technique == "inpaint":
            attr = ("color", "shape")[k % 2]
            cases.append({"source": c, "target": _change(c, attr, rng), "changed": attr, "render_seed": k})
        elif technique in ("sketch", "sketch_text"):
            cases.append({"source": c, "target": c, "render_seed": k})
        elif technique == "anagram":
            if c.shape == "triangle":
                continue
            cases.append({"up": c, "flipped": replace(c, position=_MIRROR[c.position])})
        else:  # hybrid
            high = replace(c, shape=("cross", "triangle")[k % 2])
            cases.append({"low": replace(c, shape="circle"), "high": high})
    return cases


# ----------------------------------------------------------------------------- scoring

def _reads(images: list, captions: list) -> list[dict[str, bool]]:
    from cdlab.world import check

    return [check(im, c) for im, c in zip(images, captions)]


def _flip_pil(im: Any) -> Any:
    from PIL import Image

    return im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _score(technique: str, cases: list[dict], images: list, pixels: torch.Tensor, extra: dict) -> dict:
    """success (and preservation / error) of one column's images."""
    import numpy as np
    from PIL import ImageFilter

    from cdlab.world.checker import read

    out: dict[str, Any] = {}
    if technique in ("sdedit", "sketch", "sketch_text", "inpaint"):
        reads = _reads(images, [c["target"] for c in cases])
        out["success"] = float(np.mean([all(r.values()) for r in reads]))
        if technique == "sdedit":
            out["preservation"] = float(np.mean(
                [all(v for a, v in r.items() if a != c["changed"]) for r, c in zip(reads, cases)]))
        if technique == "inpaint":
            orig, m = extra["original"], extra["mask"]
            keep = (1 - m).expand_as(orig)
            err = ((pixels.float() - orig).abs() * keep).flatten(1).sum(1) / keep.flatten(1).sum(1)
            out["outside_mae"] = float(err.mean())
            out["outside_within_tol"] = float((err <= INPAINT_TOL).float().mean())
    elif technique == "anagram":
        up = _reads(images, [c["up"] for c in cases])
        fl = _reads([_flip_pil(im) for im in images], [c["flipped"] for c in cases])
        out["success"] = float(np.mean([all(a.values()) and all(b.values()) for a, b in zip(up, fl)]))
        out["success_up"] = float(np.mean([all(a.values()) for a in up]))
        out["success_flipped"] = float(np.mean([all(b.values()) for b in fl]))
    else:
        near = _reads(images, [c["high"] for c in cases])
        far = [read(im.filter(ImageFilter.GaussianBlur(FAR_SIGMA_PX))).shape == c["low"].shape
               for im, c in zip(images, cases)]
        out["success"] = float(np.mean([all(a.values()) and f for a, f in zip(near, far)]))
        out["success_near"] = float(np.mean([all(a.values()) for a in near]))
        out["success_far"] = float(np.mean(far))
    return out


# ----------------------------------------------------------------------------- the run

def _inputs(technique: str, cases: list[dict], teacher: Any) -> dict:
    """Per technique: the prompts, images, masks and the strength of the batch."""
    from cdlab.world import render

    size = int(teacher.resolution)
    if technique == "sdedit":
        return {"prompts": [[c["target"].text for c in cases]], "strength": SDEDIT_STRENGTH,
                "images": [render(c["source"], c["render_seed"], size) for c in cases]}
    if technique == "inpaint":
        return {"prompts": [[c["target"].text for c in cases]], "strength": 1.0,
                "images": [render(c["source"], c["render_seed"], size) for c in cases],
                "mask": torch.cat([inpaint_mask(c["source"], size, int(teacher.pipe.vae_scale_factor))
                                   for c in cases])}
    if technique in ("sketch", "sketch_text"):
        prompts = [""] * len(cases) if technique == "sketch" else [c["target"].text for c in cases]
        strength = SKETCH_STRENGTH if technique == "sketch_text" else PROJECTION_STRENGTH
        return {"prompts": [prompts], "strength": strength,
                "images": [scribble(c["source"], 7919 + c["render_seed"], size) for c in cases]}
    if technique == "anagram":
        return {"prompts": [[c["up"].text for c in cases], [c["flipped"].text for c in cases]], "strength": 1.0}
    return {"prompts": [[c["low"].text for c in cases], [c["high"].text for c in cases]], "strength": 1.0}


def run_edit_evaluation(
    teacher: Any,
    *,
    n: int | None = None,
    techniques: Sequence[str] = TECHNIQUES,
    students: Sequence[str] | None = None,
    seed: int = 0,
    guidance: float | None = None,
    adapters_root: Any = None,
    out_dir: str | Path | None = None,
    write: bool = True,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict:
    """Measure every technique in every column (see the module doc); return (and write) the results.

    Raises:
        ValueError: not a tiny-world teacher (the checker reads only world images), bad ``n``, unknown
            technique or student.
    """
    from cdlab.students import activate_student, list_students, load_student
    from cdlab.students.activation import swapped_student
    from cdlab.teachers import is_tiny, teacher_lock
    from cdlab.timing import sync
    from cdlab.metrics import tensor_to_pil

    if write:  # before any sampling: an --out holding an edit evaluation is replaced only with overwrite
        from cdlab.evaluate import check_out_dir

        check_out_dir(out_dir, "edit_results.json", overwrite)
    if not is_tiny(teacher):
        raise ValueError("evaluate --edit: the edit metrics read images with the tiny world's checker; "
                         "load the tiny teacher (--model tiny)")
    n = DEFAULT_N if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bad = [t for t in techniques if t not in TECHNIQUES]
    if bad:
        raise ValueError(f"techniques: unknown {bad}; choose from {list(TECHNIQUES)}")
    guidance = float(teacher.guidance if guidance is None else guidance)
    cards = [c for c in list_students(root=adapters_root, base_model=teacher.base_id) if c.scheduler == "consistency"]
    if students is not None:
        missing = set(students) - {c.name for c in cards}
        if missing:
            raise ValueError(f"student(s) {sorted(missing)} not found for {teacher.base_id!r}")
        cards = [c for c in cards if c.name in set(students)]
    columns = E.teacher_columns(guidance) + [E.student_column(c, 4) for c in cards]
    t_start = time.perf_counter()
    size = int(teacher.resolution)
    rows: list[dict] = []
    prepared = {}
    for tech in techniques:
        cases = make_cases(tech, n, seed)
        inp = _inputs(tech, cases, teacher)
        prepared[tech] = (cases, inp)
    units = len(techniques) * (len(columns) + 1)
    done = 0

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done / units, 1.0), msg)

    with teacher_lock(teacher), torch.inference_mode():
        noise = torch.cat([teacher.initial_noise(seed + i, 1) for i in range(n)])
        # Everything a column needs that is not the column: embeddings, image latents, masks.
        shared = {}
        for tech, (cases, inp) in prepared.items():
            t0 = time.perf_counter()
            embs = [teacher.encode(p) for p in inp["prompts"]]
            x_img = torch.cat([E.image_to_tensor(im, size) for im in inp["images"]]) if "images" in inp else None
            x0 = E.encode_image(teacher, x_img) if x_img is not None else None
            m_lat = (E.mask_to_latent(inp["mask"], int(teacher.pipe.vae_scale_factor)).to(teacher.device)
                     if "mask" in inp else None)
            shared[tech] = (embs, x_img, x0, m_lat, time.perf_counter() - t0)
            extra: dict[str, Any] = {}
            if x_img is not None:  # the input row: the checker on the inputs themselves (and the VAE round trip)
                rt = E.decode_unit(teacher, x0)
                extra = {"original": (x_img + 1) / 2, "mask": inp.get("mask")}
                row = {"technique": tech, "column": "input (no edit)", "kind": "input", "nfe": 0, "seconds": 0.0,
                       **_score(tech, cases, [im for im in inp["images"]], (x_img + 1) / 2, extra)}
                if tech == "inpaint":
                    rr = _score(tech, cases, tensor_to_pil(rt), rt, extra)
                    row["vae_roundtrip_outside_mae"] = rr["outside_mae"]
                rows.append(row)
            tick(f"{tech}: inputs")
        for cd in cards:
            load_student(teacher.pipe, cd.name, root=adapters_root, base_model=teacher.base_id)
        try:
            for col in columns:
                activate_student(teacher.pipe, None)  # the teacher; a student runs as its fused weights swapped in
                with (swapped_student(teacher.pipe, col.student) if col.student else E._null()):
                    for tech in techniques:
                        cases, inp = prepared[tech]
                        embs, x_img, x0, m_lat, enc_s = shared[tech]
                        model = E.Denoiser(teacher.unet, col.guidance if col.kind == "teacher" else None)
                        ts = E.start_timesteps(col, inp["strength"])
                        sync(teacher.device)
                        t1 = time.perf_counter()
                        out = E.TECHNIQUES["sdedit" if tech.startswith("sketch") else tech](
                            model, noise, embs, ts, teacher.scheduler, x0=x0, mask=m_lat, strength=inp["strength"])
                        pixels = E.decode_unit(teacher, out.latents)
                        sync(teacher.device)
                        secs = (time.perf_counter() - t1 + enc_s) / n
                        extra = {"original": (x_img + 1) / 2 if x_img is not None else None, "mask": inp.get("mask")}
                        rows.append({"technique": tech, "column": col.name, "kind": col.kind, "steps": col.steps,
                                     "timesteps": out.timesteps, "nfe": out.nfe, "seconds": secs,
                                     **_score(tech, cases, tensor_to_pil(pixels), pixels, extra)})
                        tick(f"{tech}: {col.name}")
        finally:
            activate_student(teacher.pipe, None)
        # Controls: the teacher-50 on the (first) prompt alone, plain text-to-image from the same noise.
        from cdlab.samplers import ddim_timesteps, sample_ddim

        for tech in ("anagram", "hybrid"):
            if tech not in techniques:
                continue
            cases, inp = prepared[tech]
            embs = shared[tech][0]
            which = 1 if tech == "hybrid" else 0   # hybrid: p_high alone; anagram: p_up alone
            o = sample_ddim(teacher.unet, noise, embs[which][0], embs[which][1], guidance, ddim_timesteps(50),
                            teacher.scheduler)
            px = E.decode_unit(teacher, o.latents)
            rows.append({"technique": tech, "column": f"control: {E.TEACHER_50} on "
                         f"{'p_high' if which else 'p_up'} alone", "kind": "control", "nfe": o.nfe, "seconds": None,
                         **_score(tech, cases, tensor_to_pil(px), px, {})})
    results = {
        "kind": "edit", "created": datetime.now().isoformat(timespec="seconds"),
        "model": getattr(teacher, "name", "teacher"), "describe": teacher.describe(), "n": n, "seed": seed,
        "guidance": guidance, "sdedit_strength": SDEDIT_STRENGTH, "sketch_strength": SKETCH_STRENGTH,
        "projection_strength": PROJECTION_STRENGTH,
        "inpaint_tolerance": INPAINT_TOL, "far_sigma_px": FAR_SIGMA_PX, "latent_blur_sigma": E.LATENT_BLUR_SIGMA,
        "students": [c.name for c in cards], "rows": rows, "goal": _goal(rows, [c.name for c in cards]),
        "elapsed_s": time.perf_counter() - t_start,
    }
    if write:
        results["out_dir"] = str(write_edit_evaluation(results, out_dir, overwrite))
    return results


def _goal(rows: list[dict], students: list[str]) -> dict:
    """Per technique: the best student's success / teacher-50's, and whether it beats the naive teacher-4."""
    goal = {}
    for tech in dict.fromkeys(r["technique"] for r in rows):
        by = {r["column"]: r["success"] for r in rows if r["technique"] == tech}
        t50, t4 = by.get(E.TEACHER_50), by.get(E.TEACHER_4)
        studs = {s: by[s] for s in students if s in by}
        if t50 is None or not studs:
            continue
        best = max(studs, key=studs.get)
        goal[tech] = {"best_student": best, "ratio_to_teacher50": (studs[best] / t50) if t50 else None,
                      "beats_teacher4": studs[best] > (t4 or 0.0),
                      "meets_goal": bool(t50 and studs[best] >= 0.9 * t50 and studs[best] > (t4 or 0.0))}
    return goal


def render_edit_table(results: dict) -> str:
    """The Markdown table: one line per (technique, column)."""
    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "—" if v is None else fmt.format(v)

    lines = [f"Edit evaluation of **{results['model']}** ({results['describe']}), {results['n']} cases per "
             f"technique, guidance {results['guidance']:g}, SDEdit strength {results['sdedit_strength']}, sketch "
             f"strength {results['sketch_strength']} (with its caption) and "
             f"{results.get('projection_strength', results['sketch_strength'])} (without a prompt), inpainting tolerance {results['inpaint_tolerance']}. "
             f"{results['created']}.", "",
             "| technique | column | success ↑ | preservation ↑ | outside MAE ↓ (≤ tol) | detail | NFE | s / image |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in results["rows"]:
        detail = ""
        if "success_up" in r:
            detail = f"up {r['success_up']:.3f}, flipped {r['success_flipped']:.3f}"
        elif "success_near" in r:
            detail = f"near {r['success_near']:.3f}, far {r['success_far']:.3f}"
        elif "vae_roundtrip_outside_mae" in r:
            detail = f"VAE round trip outside MAE {r['vae_roundtrip_outside_mae']:.4f}"
        mae = (f"{r['outside_mae']:.4f} ({r['outside_within_tol']:.2f})" if "outside_mae" in r else "—")
        secs = "—" if r.get("seconds") is None else f"{r['seconds'] * 1000:.2f} ms"
        lines.append(f"| {r['technique']} | {r['column']} | {f(r['success'])} | {f(r.get('preservation'))} | {mae} "
                     f"| {detail} | {r['nfe']} | {secs} |")
    lines += ["", "Goal (best 4-step student >= 0.9 x teacher-50's success and ahead of the naive teacher-4):", ""]
    for tech, g in results["goal"].items():
        ratio = "—" if g["ratio_to_teacher50"] is None else f"{g['ratio_to_teacher50']:.2f}"
        lines.append(f"- {tech}: best student {g['best_student']}, {ratio} x teacher-50, "
                     f"{'ahead of' if g['beats_teacher4'] else 'NOT ahead of'} teacher-4: "
                     f"{'met' if g['meets_goal'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def write_edit_evaluation(results: dict, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """``edit_results.json`` and ``edit_table.md`` under a new ``evals/edit-<timestamp>``, or in ``out_dir``: one
    that holds an edit evaluation is replaced only with ``overwrite``."""
    from cdlab.evaluate import check_out_dir
    from cdlab.paths import evals_dir

    if out_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = evals_dir() / f"edit-{stamp}"
        k = 1
        while Path(out_dir).exists():
            out_dir = evals_dir() / f"edit-{stamp}-{k}"
            k += 1
    out = Path(out_dir)
    check_out_dir(out, "edit_results.json", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k != "out_dir"}
    (out / "edit_results.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "edit_table.md").write_text(render_edit_table(results))
    return out


def main(argv: Sequence[str] | None = None, *, model: str = "tiny", n: int | None = None, seed: int = 0,
         out: str | None = None, students: Sequence[str] | None = None, guidance: float | None = None,
         device: str | None = None, techniques: Sequence[str] | None = None, overwrite: bool = False) -> int:
    """The CLI body of ``python -m cdlab evaluate --edit`` (argparse lives in `cdlab.evaluate.main`)."""
    import sys

    from cdlab.evaluate import check_out_dir
    from cdlab.teachers import TeacherLoadError, load_teacher

    try:  # before the teacher loads
        check_out_dir(out, "edit_results.json", overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        teacher = load_teacher(model, device=device)
    except TeacherLoadError as e:
        print(f"error: could not load the teacher {model!r}: {e}", file=sys.stderr)
        return 1
    print(f"teacher: {teacher.describe()}", file=sys.stderr)

    def progress(frac: float, msg: str) -> None:
        print(f"[{frac * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)

    try:
        results = run_edit_evaluation(teacher, n=n, seed=seed, out_dir=out, students=students, guidance=guidance,
                                      techniques=techniques or TECHNIQUES, progress=progress, overwrite=overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render_edit_table(results))
    print(f"wrote {results['out_dir']} in {results['elapsed_s']:.1f} s")
    return 0
