"""Provenance benchmark: watermark quality, robustness, false positives and speed.

Clips are procedural (moving textures, gradients, noise, shapes, gratings, 1/f "natural"
fields...), nothing is downloaded. Attacks are done with PyAV (H.264 re-encode at a CRF) and
numpy/PIL (resize, crop, brightness, frame dropping).

    python benchmarks/provenance_bench.py                 # full run (several minutes on 2 cores)
    python benchmarks/provenance_bench.py --quick         # smaller sweep
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- procedural clips


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1] with features about `cell` px wide (bilinear upsampling)."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    g = rng.random((gh, gw)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((int(gw * cell), int(gh * cell)), Image.BICUBIC)
    return np.clip(np.asarray(img)[:h, :w], 0, 1)


def _pink(rng: np.random.Generator, h: int, w: int, beta: float = 1.0) -> np.ndarray:
    """1/f^beta noise (natural-image-like spectrum), normalised to [0, 1]."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))) / f**beta
    img = np.fft.irfft2(spec, s=(h, w))
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    return img.astype(np.float32)


def _colorize(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.random(3) * 0.6 + 0.2, rng.random(3) * 0.8 + 0.2
    return np.clip(gray[..., None] * b * 255 + a * 40, 0, 255)


KINDS = ("texture_pan", "pink_pan", "gradient_shapes", "flat_noise", "grating", "dark", "bright", "checker_zoom", "static_pink", "mix")


def make_clip(kind: str, seed: int, n: int = 24, h: int = 720, w: int = 1280) -> np.ndarray:
    """A procedural uint8 RGB clip [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    vy, vx = rng.uniform(-6, 6, 2)
    out = np.empty((n, h, w, 3), np.uint8)
    if kind in ("texture_pan", "pink_pan", "dark", "bright", "static_pink", "mix"):
        pad = int(max(abs(vy), abs(vx)) * n) + 8
        if kind == "texture_pan":
            base = _smooth_noise(rng, h + 2 * pad, w + 2 * pad, rng.uniform(3, 40))
        else:
            base = _pink(rng, h + 2 * pad, w + 2 * pad, rng.uniform(0.8, 1.4))
        if kind == "mix":
            base = 0.6 * base + 0.4 * _smooth_noise(rng, h + 2 * pad, w + 2 * pad, rng.uniform(2, 8))
        col = _colorize(base, rng)
        if kind == "dark":
            col = col * 0.25
        if kind == "bright":
            col = 255 - (255 - col) * 0.3
        for t in range(n):
            if kind == "static_pink":
                dy, dx = pad, pad
            else:
                dy, dx = int(pad + vy * t), int(pad + vx * t)
            out[t] = np.clip(col[dy : dy + h, dx : dx + w], 0, 255)
        return out
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient_shapes":
        bg = _colorize((xx / w * 0.7 + yy / h * 0.3), rng)
        shapes = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 150), rng.random(3) * 255, rng.uniform(-8, 8, 2)) for _ in range(8)]
        for t in range(n):
            f = bg.copy()
            for cx, cy, r, c, v in shapes:
                m = (xx - cx - v[0] * t) ** 2 + (yy - cy - v[1] * t) ** 2 < r * r
                f[m] = c
            out[t] = f
        return out
    if kind == "flat_noise":
        c = rng.random(3) * 200 + 20
        for t in range(n):
            out[t] = np.clip(c + rng.normal(0, rng.uniform(1, 6), (h, w, 1)), 0, 255)
        return out
    if kind == "grating":
        fx, fy = rng.uniform(0.01, 0.2, 2)
        for t in range(n):
            g = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + 0.3 * t)
            out[t] = _colorize(g, rng if t == 0 else np.random.default_rng(seed))
        return out
    if kind == "checker_zoom":
        for t in range(n):
            s = 16 + 12 * math.sin(0.1 * t + seed)
            g = ((xx // s + yy // s) % 2).astype(np.float32)
            out[t] = _colorize(g * 0.8 + 0.1, np.random.default_rng(seed))
        return out
    raise ValueError(kind)


# --------------------------------------------------------------------------- attacks


def h264(frames: np.ndarray, crf: int, fps: float = 24.0) -> np.ndarray:
    from kinema.video_io import read_video, write_mp4

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.mp4"
        write_mp4(frames, p, fps, crf=crf, preset="veryfast")
        return read_video(p)[0]


def resize(frames: np.ndarray, factor: float) -> np.ndarray:
    h, w = frames.shape[1:3]
    nh, nw = int(round(h * factor / 2)) * 2, int(round(w * factor / 2)) * 2
    return np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BICUBIC)) for f in frames])


def crop(frames: np.ndarray, frac: float, off: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    h, w = frames.shape[1:3]
    ch, cw = int(h * frac) // 2 * 2, int(w * frac) // 2 * 2
    y0, x0 = int((h - ch) * off[0]), int((w - cw) * off[1])
    return np.ascontiguousarray(frames[:, y0 : y0 + ch, x0 : x0 + cw])


def brightness(frames: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(frames.astype(np.float32) * factor, 0, 255).astype(np.uint8)


ATTACKS = {
    "none": lambda v: v,
    "crf23": lambda v: h264(v, 23),
    "crf28": lambda v: h264(v, 28),
    "crf35": lambda v: h264(v, 35),
    "resize0.5": lambda v: resize(v, 0.5),
    "crop75": lambda v: crop(v, 0.75),
    "bright+30": lambda v: brightness(v, 1.3),
    "bright-30": lambda v: brightness(v, 0.7),
    "drop_odd": lambda v: v[::2],
    "crf28+resize0.5": lambda v: h264(resize(v, 0.5), 28),
}
EXTRA_ATTACKS = {  # not in the list: generality checks
    "resize0.75": lambda v: resize(v, 0.75),
    "resize0.4+crf28": lambda v: h264(resize(v, 0.4), 28),
    "crop60_offcentre": lambda v: crop(v, 0.6, (0.2, 0.7)),
    "crop85+resize0.6": lambda v: resize(crop(v, 0.85, (0.3, 0.4)), 0.6),
    "upscale1.5": lambda v: resize(v, 1.5),
    "crf35+resize0.5": lambda v: h264(resize(v, 0.5), 35),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def _gauss(img: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur (11 taps, edge replication)."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(img, radius, mode="edge")
    h, w = img.shape
    tmp = sum(k[i] * p[i : i + h, :] for i in range(2 * radius + 1))
    return sum(k[i] * tmp[:, i : i + w] for i in range(2 * radius + 1))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames of the luma (Gaussian window sigma 1.5, standard constants)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for fa, fb in zip(a, b):
        x = fa.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        y = fb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        mx, my = _gauss(x), _gauss(y)
        sxx, syy, sxy = _gauss(x * x) - mx * mx, _gauss(y * y) - my * my, _gauss(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(float(s.mean()))
    return float(np.mean(vals))
