"""``python -m cdlab evaluate --edit``: the edits of :mod:`cdlab.edit` measured on the tiny world.

Per technique, ``n`` fixed cases (default 128, deterministic by ``--seed``), each in every column: the
teacher at 50 DDIM+CFG steps, the teacher naively at 4, every consistency student of the teacher at 4 steps.
Every column of a case starts from the same noise (``teacher.initial_noise(seed + i)``), sampled by
:func:`cdlab.columns.run_columns` with the technique as its hook (:class:`cdlab.edit.EditTechnique`). The world's
checker (`cdlab.world.check`) reads the results; nothing about it is tuned here.

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

import functools
import math
import random
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from cdlab.columns import TEACHER_4, TEACHER_50, Column, initial_noise, run_columns, student_column, teacher_columns
from cdlab.edit import LATENT_BLUR_SIGMA, EditTechnique, mask_to_latent
from cdlab.edit import TECHNIQUES as EDITS
from cdlab.evaluate.store import check_out_dir, new_out_dir
from cdlab.images import decode_unit, encode_image, image_to_tensor, to_pil
from cdlab.paths import write_json_atomic
from cdlab.students import load_student, students_of
from cdlab.teachers import is_tiny, teacher_lock
from cdlab.world import BACKGROUNDS, COLORS, SHAPES, SIZES, check, render, sample_captions
from cdlab.world.checker import read
from cdlab.world.grammar import PALETTE
from cdlab.world.render import CENTERS, RADIUS, shape_polygon

DEFAULT_N = 128           # cases per technique
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
           "render_edit_table", "write_edit_evaluation"]


# ----------------------------------------------------------------------------- cases

def _change(c: Any, attr: str, rng: random.Random) -> Any:
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
    img.paste(hatch, (0, 0), ImageChops.multiply(hl, mask))
    return img.resize((size, size), Image.Resampling.BOX)


def inpaint_mask(caption: Any, size: int = 32, factor: int = 4) -> torch.Tensor:
    """``[1, 1, size, size]``: the box of half-side ``INPAINT_BOX`` around the caption's centre, snapped
    outward to the ``factor``-pixel latent grid (so the pixel mask IS the upsampled latent mask)."""
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
    return [check(im, c) for im, c in zip(images, captions)]


def _flip_pil(im: Any) -> Any:
    return im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def _score(technique: str, cases: list[dict], images: list, pixels: torch.Tensor, extra: dict) -> dict:
    """success (and preservation / error) of one column's images."""
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


@dataclass
class _Prepared:
    """Everything a technique's columns share: its cases and inputs, and their encodings (made once)."""

    technique: str
    cases: list[dict]
    inputs: dict
    embeddings: list | None = None     # one (cond, uncond) per prompt role
    x_img: torch.Tensor | None = None  # the input images in [-1, 1]
    x0: torch.Tensor | None = None     # their latents
    mask: torch.Tensor | None = None   # the latent inpainting mask
    encode_seconds: float = 0.0

    @property
    def extra(self) -> dict:
        """What :func:`_score` needs besides the images: the original (in [0, 1]) and the pixel mask."""
        return {"original": (self.x_img + 1) / 2 if self.x_img is not None else None,
                "mask": self.inputs.get("mask")}


def _prepare(technique: str, n: int, seed: int, teacher: Any) -> _Prepared:
    """A technique's ``n`` cases and their inputs (not yet encoded)."""
    cases = make_cases(technique, n, seed)
    return _Prepared(technique, cases, _inputs(technique, cases, teacher))


def _encode(p: _Prepared, teacher: Any) -> _Prepared:
    """The prompts, images and mask of a technique encoded for the teacher, timed (every column's share)."""
    inp = p.inputs
    t0 = time.perf_counter()
    p.embeddings = [teacher.encode(prompts) for prompts in inp["prompts"]]
    if "images" in inp:
        p.x_img = torch.cat([image_to_tensor(im, int(teacher.resolution)) for im in inp["images"]])
        p.x0 = encode_image(teacher, p.x_img)
    if "mask" in inp:
        p.mask = mask_to_latent(inp["mask"], int(teacher.pipe.vae_scale_factor)).to(teacher.device)
    p.encode_seconds = time.perf_counter() - t0
    return p


def _input_row(p: _Prepared, teacher: Any) -> dict:
    """The checker on the inputs themselves (no edit); for inpainting also the VAE round trip's outside error."""
    row = {"technique": p.technique, "column": "input (no edit)", "kind": "input", "nfe": 0, "seconds": 0.0,
           **_score(p.technique, p.cases, list(p.inputs["images"]), (p.x_img + 1) / 2, p.extra)}
    if p.technique == "inpaint":
        rt = decode_unit(teacher, p.x0)
        row["vae_roundtrip_outside_mae"] = _score(p.technique, p.cases, to_pil(rt), rt, p.extra)["outside_mae"]
    return row


def _edit_row(p: _Prepared, teacher: Any, column: Column, noise: torch.Tensor, seeds: list[int],
              adapters_root: Any) -> dict:
    """One technique in one column (:func:`run_columns` with the technique as its hook), scored."""
    edit = EditTechnique(EDITS["sdedit" if p.technique.startswith("sketch") else p.technique], p.x0, p.mask,
                         p.inputs["strength"])
    [run] = run_columns(teacher, [column], list(zip(*p.inputs["prompts"])), seeds, noise=noise,
                        embeddings=p.embeddings, technique=edit, decode=functools.partial(decode_unit, teacher),
                        adapters_root=adapters_root)
    return {"technique": p.technique, "column": column.name, "kind": column.kind, "steps": column.steps,
            "timesteps": run.timesteps, "nfe": run.nfe, "seconds": (run.seconds + p.encode_seconds) / len(seeds),
            **_score(p.technique, p.cases, to_pil(run.images), run.images, p.extra)}


def _control_row(p: _Prepared, teacher: Any, guidance: float, noise: torch.Tensor, seeds: list[int]) -> dict:
    """The teacher-50 on the (first) prompt alone, plain text-to-image from the same noise: what the technique
    adds (hybrid: p_high alone; anagram: p_up alone)."""
    which = 1 if p.technique == "hybrid" else 0
    [run] = run_columns(teacher, teacher_columns(guidance)[:1], p.inputs["prompts"][which], seeds, noise=noise,
                        embeddings=[p.embeddings[which]], decode=functools.partial(decode_unit, teacher))
    return {"technique": p.technique, "column": f"control: {TEACHER_50} on {'p_high' if which else 'p_up'} alone",
            "kind": "control", "nfe": run.nfe, "seconds": None,
            **_score(p.technique, p.cases, to_pil(run.images), run.images, {})}


def _edit_students(teacher: Any, students: Sequence[str] | None, adapters_root: Any) -> list:
    """The consistency students of the teacher to evaluate (default: all of them)."""
    cards = [c for c in students_of(teacher, adapters_root) if c.scheduler == "consistency"]
    if students is not None:
        missing = set(students) - {c.name for c in cards}
        if missing:
            raise ValueError(f"student(s) {sorted(missing)} not found for {teacher.base_id!r}")
        cards = [c for c in cards if c.name in set(students)]
    return cards


def run_edit_evaluation(
    teacher: Any, *, n: int | None = None, techniques: Sequence[str] = TECHNIQUES,
    students: Sequence[str] | None = None, seed: int = 0, guidance: float | None = None, adapters_root: Any = None,
    out_dir: str | Path | None = None, write: bool = True, progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict:
    """Measure every technique in every column (see the module doc); return (and write) the results.

    Raises:
        ValueError: not a tiny-world teacher (the checker reads only world images), bad ``n``, unknown
            technique or student.
        FileExistsError: ``out_dir`` holds an edit evaluation and not ``overwrite`` (checked first).
    """
    if write:  # before any sampling: an --out holding an edit evaluation is replaced only with overwrite
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
    cards = _edit_students(teacher, students, adapters_root)
    columns = teacher_columns(guidance) + [student_column(c, 4) for c in cards]
    t_start = time.perf_counter()
    prepared = [_prepare(t, n, seed, teacher) for t in techniques]
    units, done = len(techniques) * (len(columns) + 1), 0

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done / units, 1.0), msg)

    seeds = list(range(seed, seed + n))
    with teacher_lock(teacher), torch.inference_mode():
        noise = initial_noise(teacher, seeds)
        rows: list[dict] = []
        for p in prepared:
            _encode(p, teacher)
            if p.x_img is not None:
                rows.append(_input_row(p, teacher))
            tick(f"{p.technique}: inputs")
        for cd in cards:  # every student loads (or fails) before anything samples
            load_student(teacher, cd.name, root=adapters_root, activate=False)  # its base and fingerprint
        for col in columns:
            for p in prepared:
                rows.append(_edit_row(p, teacher, col, noise, seeds, adapters_root))
                tick(f"{p.technique}: {col.name}")
        rows += [_control_row(p, teacher, guidance, noise, seeds) for p in prepared
                 if p.technique in ("anagram", "hybrid")]
    results = _edit_results(teacher, n, seed, guidance, [c.name for c in cards], rows, t_start)
    if write:
        results["out_dir"] = str(write_edit_evaluation(results, out_dir, overwrite))
    return results


def _edit_results(teacher: Any, n: int, seed: int, guidance: float, students: list[str], rows: list[dict],
                  t_start: float) -> dict:
    """The edit evaluation's results: its settings, every row, and the goal per technique."""
    return {
        "kind": "edit", "created": datetime.now().isoformat(timespec="seconds"),
        "model": getattr(teacher, "name", "teacher"), "describe": teacher.describe(), "n": n, "seed": seed,
        "guidance": guidance, "sdedit_strength": SDEDIT_STRENGTH, "sketch_strength": SKETCH_STRENGTH,
        "projection_strength": PROJECTION_STRENGTH,
        "inpaint_tolerance": INPAINT_TOL, "far_sigma_px": FAR_SIGMA_PX, "latent_blur_sigma": LATENT_BLUR_SIGMA,
        "students": students, "rows": rows, "goal": _goal(rows, students),
        "elapsed_s": time.perf_counter() - t_start,
    }


def _goal(rows: list[dict], students: list[str]) -> dict:
    """Per technique: the best student's success / teacher-50's, and whether it beats the naive teacher-4."""
    goal = {}
    for tech in dict.fromkeys(r["technique"] for r in rows):
        by = {r["column"]: r["success"] for r in rows if r["technique"] == tech}
        t50, t4 = by.get(TEACHER_50), by.get(TEACHER_4)
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
             f"{results.get('projection_strength', results['sketch_strength'])} (without a prompt), inpainting "
             f"tolerance {results['inpaint_tolerance']}. {results['created']}.", "",
             "| technique | column | success ↑ | preservation ↑ | outside MAE ↓ (≤ tol) | detail | NFE "
             "| s / image |",
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
    out = new_out_dir("edit-") if out_dir is None else Path(out_dir)
    check_out_dir(out, "edit_results.json", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "edit_results.json", {k: v for k, v in results.items() if k != "out_dir"})
    (out / "edit_table.md").write_text(render_edit_table(results))
    return out
