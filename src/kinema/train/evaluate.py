"""Automatic evaluation of the built-in model on the held-out (colour, shape, direction) prompts.

For every generated frame the object is found by colour segmentation against a fitted
background (a per-channel plane a + b x + c y, fitted robustly, so plain and gradient
backgrounds both work); the largest connected blob is the object. Then:

- colour: the blob's median RGB -> hue/saturation -> nearest colour word (white = bright and
  unsaturated);
- shape: median fill ratio area / bounding-box area over frames where the blob does not touch
  the border (square ~1.0, circle ~0.79, triangle ~0.5); a second, independent reading
  (`shape_template`) matches the blob against an ideal circle, square and upward triangle of
  the same area and centroid and takes the best mean IoU over those frames, so a result does
  not hang on one hand-set fill threshold;
- direction: the dominant axis and sign of the blob centroid's displacement (least-squares
  slope over the frames).

`run_eval` generates the held-out prompts with several seeds at the model's default settings
and reports per-attribute accuracy and seconds per video.
"""

from __future__ import annotations

import colorsys
import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .data import Layout

# Hue (degrees) of each chromatic colour word; white is decided by saturation/brightness.
_HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 125.0, "blue": 222.0, "purple": 280.0}


@dataclass
class Detection:
    colour: str | None
    shape: str | None
    direction: str | None
    found_frames: int
    displacement: tuple[float, float]
    fill: float | None
    rgb: tuple[int, int, int] | None
    shape_template: str | None = None
    template_iou: float | None = None


def _background(frame: np.ndarray) -> np.ndarray:
    """Robust per-channel plane fit of the background, [H, W, 3] float."""
    h, w, _ = frame.shape
    ys, xs = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], axis=1)
    values = frame.reshape(-1, 3)
    keep = np.ones(h * w, bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        resid = np.linalg.norm(values - design @ coef, axis=1)
        # the object covers a small part of the frame: drop the largest residuals
        keep = resid <= max(np.quantile(resid, 0.8), 12.0)
    return (design @ coef).reshape(h, w, 3)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = []
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def find_object(frame: np.ndarray, min_area: int = 20) -> np.ndarray | None:
    """Boolean mask of the object in a uint8 [H, W, 3] frame, or None when nothing stands out."""
    f = frame.astype(np.float64)
    resid = np.linalg.norm(f - _background(f), axis=2)
    thresh = max(45.0, 0.45 * float(resid.max()))
    blob = _largest_blob(resid > thresh)
    return blob if int(blob.sum()) >= min_area else None


def classify_colour(rgb: np.ndarray) -> str:
    r, g, b = (float(v) / 255.0 for v in rgb)
    hue, sat, val = colorsys.rgb_to_hsv(r, g, b)
    if sat < 0.25 and val > 0.6:
        return "white"
    deg = hue * 360.0
    return min(_HUES, key=lambda k: min(abs(deg - _HUES[k]), 360.0 - abs(deg - _HUES[k])))


def classify_fill(fill: float) -> str:
    if fill >= 0.88:
        return "square"
    if fill <= 0.66:
        return "triangle"
    return "circle"


def template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a blob with an ideal circle, axis-aligned square and upward equilateral triangle of
    the same area, centred on the blob's centroid (the centroid of each of the three shapes is
    its centre)."""
    from .data import shape_coverage

    ys, xs = np.nonzero(mask)
    area, cx, cy = float(len(xs)), xs.mean() + 0.5, ys.mean() + 0.5
    h, w = mask.shape
    gx, gy = np.arange(w)[None, :] + 0.5, np.arange(h)[:, None] + 0.5
    # `shape_coverage`'s size parameter r per shape for that area: circle pi r^2, square (2 * 0.88 r)^2,
    # triangle 3 sqrt(3) a^2 with inradius a = 0.675 r
    sizes = {"circle": np.sqrt(area / np.pi), "square": np.sqrt(area) / 1.76,
             "triangle": np.sqrt(area / (3 * np.sqrt(3))) / 0.675}
    out = {}
    for shape, r in sizes.items():
        ideal = shape_coverage(shape, gx, gy, cx, cy, r) >= 0.5
        out[shape] = float((ideal & mask).sum() / max((ideal | mask).sum(), 1))
    return out


def analyse_video(frames: np.ndarray) -> Detection:
    """Colour, shape and direction of the moving object in uint8 frames [T, H, W, 3]."""
    t, h, w, _ = frames.shape
    centres, times, fills, colours, ious = [], [], [], [], []
    for i in range(t):
        mask = find_object(frames[i])
        if mask is None:
            continue
        ys, xs = np.nonzero(mask)
        centres.append((xs.mean(), ys.mean()))
        times.append(i)
        colours.append(np.median(frames[i][mask], axis=0))
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        if x0 > 0 and y0 > 0 and x1 < w - 1 and y1 < h - 1:
            fills.append(mask.sum() / float((x1 - x0 + 1) * (y1 - y0 + 1)))
            ious.append(template_ious(mask))
    if len(times) < 2:
        return Detection(None, None, None, len(times), (0.0, 0.0), None, None)
    rgb = np.median(np.stack(colours), axis=0)
    tt = np.asarray(times, np.float64)
    c = np.asarray(centres)
    # least-squares slope of x(t), y(t), times the clip length: the fitted displacement
    slope = [np.polyfit(tt, c[:, k], 1)[0] * (t - 1) for k in (0, 1)]
    dx, dy = slope
    if max(abs(dx), abs(dy)) < 4.0:
        direction = None  # no clear motion
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    fill = float(np.median(fills)) if fills else None
    template, best_iou = None, None
    if ious:
        mean_iou = {k: float(np.mean([d[k] for d in ious])) for k in ious[0]}
        template = max(mean_iou, key=mean_iou.get)
        best_iou = mean_iou[template]
    return Detection(classify_colour(rgb), classify_fill(fill) if fill is not None else None, direction,
                     len(times), (float(dx), float(dy)), fill, tuple(int(v) for v in rgb), template, best_iou)


def score(rows: list[dict]) -> dict[str, float]:
    n = max(len(rows), 1)
    acc = {k: sum(r[k] == r[f"want_{k}"] for r in rows) / n for k in ("colour", "shape", "direction")}
    if rows and all("shape_template" in r for r in rows):
        acc["shape_template"] = sum(r["shape_template"] == r["want_shape"] for r in rows) / n
    return acc


def first_frame(combo: tuple[str, str, str], seed: int, size: int = 128, frames: int = 17) -> np.ndarray:
    """The first frame of a procedural clip of `combo` (image-to-video input), uint8 [H, W, 3].
    Its clip seeds are disjoint from the training clips' (dataset seeds 1000-3999)."""
    from .data import all_combos, make_clip

    return make_clip(90_000 + seed, all_combos().index(combo), size, frames, combos=[combo])[0][0]


def time_cli(model: Path | None, prompts: list[tuple[str, str, str]], runs: int) -> list[float]:
    """Wall-clock seconds of complete `kinema generate` processes (startup, load, sample, MP4)."""
    import subprocess
    import sys
    import tempfile

    from .data import canonical_caption

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            prompt = canonical_caption(*prompts[i % len(prompts)])
            cmd = [sys.executable, "-m", "kinema", "generate", prompt, "--seed", str(i), "-o",
                   str(Path(tmp) / f"v{i}.mp4")]
            if model is not None:
                cmd += ["--model", str(model)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return times


def run_eval(model: Path | None = None, seeds: int = 3, out: Path | None = None, videos: Path | None = None,
             steps: int | None = None, prompts: list[tuple[str, str, str]] | None = None,
             cli_runs: int = 3, log=print, i2v: bool = True, guidance: float | None = None) -> dict:
    """Generate every held-out prompt with `seeds` seeds and score the videos; with `i2v`, also
    start each prompt from the first frame of a procedural clip of the same combination and
    score where the video takes it."""
    from ..pipeline import load
    from .data import HELD_OUT, canonical_caption

    t0 = time.perf_counter()
    pipe = load(model)
    load_s = time.perf_counter() - t0
    rows: list[dict] = []
    i2v_rows: list[dict] = []
    gen_times = []
    height = pipe.spec.defaults.size[1]
    for colour, shape, direction in prompts or HELD_OUT:
        prompt = canonical_caption(colour, shape, direction)
        for task in ("t2v", "i2v") if i2v else ("t2v",):
            for seed in range(seeds):
                image = first_frame((colour, shape, direction), seed, height, pipe.spec.defaults.frames) \
                    if task == "i2v" else None
                t1 = time.perf_counter()
                video = pipe.generate(prompt, image, seed=seed, steps=steps, guidance=guidance)
                if task == "t2v":
                    gen_times.append(time.perf_counter() - t1)
                det = analyse_video(video.frames)
                if videos is not None:
                    videos.mkdir(parents=True, exist_ok=True)
                    video.save(videos / f"{task}_{prompt.replace(' ', '_')}_{seed}.mp4", watermark=False, sign=False)
                row = {"task": task, "prompt": prompt, "seed": seed, "want_colour": colour, "want_shape": shape,
                       "want_direction": direction, **asdict(det)}
                (rows if task == "t2v" else i2v_rows).append(row)
                log(f"{task} {prompt:40s} seed {seed}: {det.colour}/{det.shape}/{det.direction} "
                    f"fill {det.fill if det.fill is None else round(det.fill, 2)} template {det.shape_template} "
                    f"d {tuple(round(v) for v in det.displacement)}")
    acc = score(rows)
    acc_i2v = score(i2v_rows) if i2v_rows else None
    cli = time_cli(model, prompts or HELD_OUT, cli_runs) if cli_runs else []
    report = {
        "videos": len(rows),
        "accuracy": acc,
        "accuracy_i2v": acc_i2v,
        "seconds_per_video_generate": float(np.mean(gen_times)),
        "seconds_load": load_s,
        "seconds_per_video_cli": float(np.mean(cli)) if cli else None,
        "cli_runs": cli,
        "rows": rows + i2v_rows,
    }
    log(f"accuracy: colour {acc['colour']:.3f}  shape {acc['shape']:.3f} (template {acc['shape_template']:.3f})  "
        f"direction {acc['direction']:.3f}  "
        f"({len(rows)} videos, {report['seconds_per_video_generate']:.2f} s/video in-process, load {load_s:.1f} s)")
    if acc_i2v is not None:
        log(f"image-to-video (first frame of a clip of the same combination): colour {acc_i2v['colour']:.3f}  "
            f"shape {acc_i2v['shape']:.3f} (template {acc_i2v['shape_template']:.3f})  "
            f"direction {acc_i2v['direction']:.3f}  ({len(i2v_rows)} videos)")
    if cli:
        log(f"`kinema generate` wall-clock (process start to MP4 written): {np.mean(cli):.2f} s "
            f"(runs: {', '.join(f'{c:.2f}' for c in cli)})")
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def vae_round_trip(vae, repeats: int = 2, seed: int = 5,
                   combos: list[tuple[str, str, str]] | None = None,
                   layout: Layout | None = None) -> dict:
    """Score a VAE's own round trip (encode + decode) of procedural held-out clips.

    This is the ceiling of any model that draws through this VAE: a perfect DiT cannot score
    above what the decoder makes of the encoder's own latents. `repeats` clips per held-out
    combination (the default 24 clips are the ones quoted in benchmarks/builtin_eval.md);
    `combos` replaces the held-out list; `layout` the object sizes (default `data.LAYOUT`, what
    the built-in model draws). Returns accuracies and the mean fill ratio per true shape.
    """
    import torch

    from ..pipeline import to_uint8
    from .data import HELD_OUT, LAYOUT, render_clip, sample_spec
    from .vae_train import clips_to_tensor

    rng = np.random.default_rng(seed)
    rows, fills = [], {}
    for combo in (combos or HELD_OUT) * repeats:
        video = clips_to_tensor([render_clip(sample_spec(rng, combo=combo, layout=layout or LAYOUT))])
        with torch.no_grad():
            # quantized exactly as generated videos are
            det = analyse_video(to_uint8(vae.decode(vae.encode(video))).numpy())
        rows.append({**{f"want_{k}": v for k, v in zip(("colour", "shape", "direction"), combo)},
                     "colour": det.colour, "shape": det.shape, "direction": det.direction,
                     "shape_template": det.shape_template})
        if det.fill is not None:
            fills.setdefault(combo[1], []).append(det.fill)
    return {"clips": len(rows), "accuracy": score(rows),
            "mean_fill": {k: round(float(np.mean(v)), 3) for k, v in sorted(fills.items())}}
