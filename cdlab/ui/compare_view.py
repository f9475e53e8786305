"""How a Compare result is shown: one row of labelled columns, the aligned trajectory grid, the legend,
and the same as one downloadable PNG. Pure functions of a `cdlab.ui.compare.CompareResult` (no Gradio).

The page shows the columns as HTML (not a gallery): every column sits in one row at any width, and its
label (method, steps, NFE, seconds, speed-up) is written out in full underneath, never truncated.
"""
from __future__ import annotations

import base64
import html
import io
import textwrap
from typing import Any

from PIL import Image, ImageDraw

LEGEND = (
    "**teacher-50**: DDIM, 50 steps, CFG, the reference · **teacher-4**: the same teacher naively at 4 steps · "
    "**students**: LoRAs distilled to few steps (CT, CD, MBCD, DMD) · **NFE**: network evaluations · **speed-up**: "
    "teacher-50's time per image ÷ the column's"
)
FLOW_LEGEND = (
    "**teacher-50**: Euler, 50 steps, CFG, the reference · **teacher-4**: the same teacher naively at 4 steps · "
    "**students**: LoRAs on the flow teacher (2-rectified flow, multi-boundary CD, DMD), Euler on their own "
    "velocity, no CFG · **NFE**: network evaluations · **speed-up**: teacher-50's time per image ÷ the column's"
)


def legend(teacher: Any) -> str:
    """The legend under Compare's row: the flow teacher's (Euler) or the diffusion teachers' (DDIM)."""
    return FLOW_LEGEND if getattr(teacher, "solver", "DDIM") == "Euler" else LEGEND


def upscale(image, size: int = 256):
    """Enlarge a small image with nearest-neighbour so pixels stay crisp (tiny teacher: 32 px)."""
    if image.width >= size:
        return image
    f = max(1, size // image.width)
    return image.resize((image.width * f, image.height * f), Image.NEAREST)


def error_image(reason: str, resolution: int = 256, size: int = 256):
    """A grey square that says why a column could not be produced (shown in the column's place)."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.text((8, 8), "column failed:", fill=(160, 0, 0))
    for i, line in enumerate(textwrap.wrap(reason, 38)[:14]):
        d.text((8, 26 + 15 * i), line, fill=(40, 40, 40))
    return img


def data_uri(image) -> str:
    """An inline ``data:`` URI of a PIL image: PNG up to 128 px (crisp pixels, a few kB), JPEG above."""
    buf = io.BytesIO()
    im = image.convert("RGB")
    if max(im.size) <= 128:
        im.save(buf, format="PNG", optimize=True)
        kind = "png"
    else:
        im.save(buf, format="JPEG", quality=90)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _img(image, alt: str, cls: str) -> str:
    pixel = ' style="image-rendering: pixelated"' if image.width < 128 else ""
    return f'<img class="{cls}" src="{data_uri(image)}" alt="{html.escape(alt)}"{pixel}>'


def row_html(cells: list[dict], row_id: str, **data: Any) -> str:
    """Labelled images in ONE row (flex, no wrapping), each label written out in full underneath.

    Each cell: ``label`` (`str`), ``images`` (`list[tuple[PIL.Image, str]]`: image and alt text; several sit side
    by side, e.g. an anagram upright and flipped), ``lines`` (`list[str]`: the caption, first line bold),
    ``failed`` (`bool`), ``pending`` (`bool`: still sampling, a grey box instead of images). ``data`` become ``data-*`` attributes of the row (tests read them)."""
    out = []
    for c in cells:
        cap = "".join(f'<span class="cdlab-cap-{"name" if i == 0 else "line"}">{html.escape(x)}</span>'
                      for i, x in enumerate(c["lines"]))
        cls = "cdlab-col" + "".join(f" cdlab-col-{k}" for k in ("failed", "pending") if c.get(k))
        if c.get("pending"):  # still sampling: a box in the image's place
            imgs = '<div class="cdlab-col-wait">sampling…</div>'
        elif len(c["images"]) > 1:  # several views of one result: each with its name under it
            imgs = "".join(f'<div class="cdlab-col-view">{_img(im, alt, "cdlab-col-img")}'
                           f'<span class="cdlab-col-view-name">{html.escape(alt)}</span></div>' for im, alt in c["images"])
            imgs = f'<div class="cdlab-col-pair">{imgs}</div>'
        else:
            imgs = "".join(_img(im, alt, "cdlab-col-img") for im, alt in c["images"])
        out.append(f'<figure class="{cls}" data-label="{html.escape(c["label"])}">{imgs}'
                   f'<figcaption>{cap}</figcaption></figure>')
    attrs = "".join(f' data-{k.replace("_", "-")}="{html.escape(str(v))}"' for k, v in data.items())
    return f'<div class="cdlab-row" id="{html.escape(row_id)}"{attrs}>{"".join(out)}</div>'


def columns_html(result: Any, prefix: str = "") -> str:
    """Every Compare column in ONE row (id ``<prefix>compare-columns``), each image with its full label
    underneath; a partial result's columns still sampling (``result.pending``) hold their place with a grey
    "sampling…" box."""
    cells = {c.label: {"label": c.label, "images": [(c.image, c.label)], "lines": c.caption_lines(),
                       "failed": bool(c.error)} for c in result.columns}
    pending = list(getattr(result, "pending", []) or [])
    for label in pending:
        cells[label] = {"label": label, "images": [], "lines": [label, "sampling…"], "pending": True}
    order = list(getattr(result, "labels", []) or []) or list(cells)
    return row_html([cells[k] for k in order if k in cells], prefix + "compare-columns", columns=len(cells),
                    result=getattr(result, "result_id", ""), pending=len(pending))


def trajectory_html(result: Any, prefix: str = "") -> str:
    """The trajectories as a grid aligned by timestep: one row per column, one cell per grid timestep
    (x_t, the latent the step started from, and x̂0, its prediction of the clean image), then the final
    image. Teacher-50 contributes its step nearest each grid timestep (e.g. t=759 for 750), so one glance
    shows at which step the naive teacher departs from the reference and the students do not."""
    grid = list(getattr(result, "grid", []) or [])
    if not grid:
        return ""
    head = "".join(f"<th>t = {t}</th>" for t in grid) + "<th>final</th>"
    rows = []
    for c in result.columns:
        if c.error or not c.trajectory:
            continue
        cells = []
        for x0, xt, tt in zip(c.trajectory, c.trajectory_xt, c.trajectory_timesteps):
            if x0 is None:
                cells.append('<td class="cdlab-traj-empty">no step here</td>')
                continue
            cells.append(f'<td><div class="cdlab-traj-pair">{_img(xt, f"x_t at t={tt}", "cdlab-traj-img")}'
                         f'{_img(x0, f"x0 predicted at t={tt}", "cdlab-traj-img")}</div>'
                         f'<div class="cdlab-traj-t">x_t → x̂0 · t={tt}</div></td>')
        cells.append(f'<td>{_img(c.image, "final", "cdlab-traj-img")}</td>')
        rows.append(f'<tr><th class="cdlab-traj-label">{html.escape(c.label)}</th>{"".join(cells)}</tr>')
    if not rows:
        return ""
    return (f'<table class="cdlab-traj" id="{prefix}trajectory-grid" data-grid="{",".join(map(str, grid))}">'
            f'<thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


CSS = """
.cdlab-row {display: flex; flex-wrap: nowrap; gap: 10px; width: 100%; align-items: flex-start}
.cdlab-col {flex: 1 1 0; min-width: 0; margin: 0}
.cdlab-col-img {width: 100%; aspect-ratio: 1 / 1; object-fit: contain; display: block; border-radius: 4px}
.cdlab-col-pair {display: flex; gap: 3px}
.cdlab-col-view {flex: 1 1 0; min-width: 0}
.cdlab-col-view-name {display: block; font-size: 0.7em; opacity: 0.7; text-align: center}
.cdlab-col figcaption {font-size: 0.8em; line-height: 1.3; margin-top: 4px; overflow-wrap: anywhere}
.cdlab-col figcaption span {display: block}
.cdlab-cap-name {font-weight: 600}
.cdlab-col-failed figcaption {color: #a00}
.cdlab-col-wait {width: 100%; aspect-ratio: 1 / 1; border-radius: 4px; background: #eee; color: #777;
  display: flex; align-items: center; justify-content: center; font-size: 0.8em}
.cdlab-traj {border-collapse: collapse; font-size: 0.75em}
.cdlab-traj td, .cdlab-traj th {padding: 3px 6px; text-align: center; vertical-align: middle}
.cdlab-traj-label {text-align: right !important; max-width: 180px; overflow-wrap: anywhere}
.cdlab-traj-pair {display: flex; gap: 2px}
.cdlab-traj-img {width: 56px; height: 56px; display: block}
.cdlab-traj-empty {color: #999}
"""


def compose_comparison(result: Any, cell: int = 256, with_trajectory: bool | None = None):
    """One captioned PNG: a header, the columns with their full labels, then (optionally) the aligned grid."""
    if with_trajectory is None:
        with_trajectory = any(c.trajectory for c in result.columns)
    n = max(1, len(result.columns))
    line = 14
    header_h = 3 * line + 8
    caption_h = 5 * line + 6
    grid = list(getattr(result, "grid", []) or []) if with_trajectory else []
    traj_rows = [c for c in result.columns if c.trajectory and not c.error] if grid else []
    small = max(32, cell // 4)
    label_w = 170
    traj_w = label_w + (len(grid) + 1) * (2 * small + 10) if traj_rows else 0
    width = max(n * (cell + 8) + 8, traj_w + 16, 480)
    traj_h = (line + len(traj_rows) * (small + 8) + 8) if traj_rows else 0
    height = header_h + cell + caption_h + traj_h + 8
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    prompt = result.prompt if len(result.prompt) <= 90 else result.prompt[:87] + "..."
    d.text((8, 4), f"prompt: {prompt}", fill="black")
    d.text((8, 4 + line), f"seed {result.seed} · guidance {result.guidance:g} · student steps {result.student_steps or 'as trained'}",
           fill="black")
    d.text((8, 4 + 2 * line), f"teacher: {result.teacher}", fill="black")

    def fit(img, size):
        img = img.convert("RGB")
        return img.resize((size, size), Image.NEAREST if img.width < size else Image.BICUBIC)

    for i, c in enumerate(result.columns):
        x = 8 + i * (cell + 8)
        canvas.paste(fit(c.image, cell), (x, header_h))
        for k, text in enumerate(c.caption_lines()[:5]):
            d.text((x, header_h + cell + 2 + k * line), text[:44], fill="black")
    y = header_h + cell + caption_h
    if traj_rows:
        for k, t in enumerate(grid + ["final"]):
            d.text((8 + label_w + k * (2 * small + 10), y), f"t = {t}" if t != "final" else "final", fill="black")
        y += line
        for c in traj_rows:
            d.text((8, y + small // 2 - 6), c.label[:26], fill="black")
            for k, (x0, xt) in enumerate(zip(c.trajectory, c.trajectory_xt)):
                x = 8 + label_w + k * (2 * small + 10)
                if x0 is None:
                    d.text((x + 4, y + small // 2 - 6), "–", fill="gray")
                    continue
                canvas.paste(fit(xt, small), (x, y))
                canvas.paste(fit(x0, small), (x + small + 2, y))
            canvas.paste(fit(c.image, small), (8 + label_w + len(grid) * (2 * small + 10), y))
            y += small + 8
    return canvas
