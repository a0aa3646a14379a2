"""Provenance benchmark: watermark quality, robustness, false positives and speed.

Clips are procedural (moving textures, gradients, noise, shapes, gratings, 1/f "natural"
fields...), nothing is downloaded. Attacks are done with PyAV (H.264 re-encode at a CRF) and
numpy/PIL (resize, crop, brightness, frame dropping).

    python benchmarks/provenance_bench.py                 # full run (several minutes on 2 cores)
    python benchmarks/provenance_bench.py --quick         # smaller sweep
    python benchmarks/provenance_bench.py --skip speed,quality,robustness,extra,fp   # small frames only
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kinema.provenance.watermark import _gauss  # the SSIM window, shared with the embedder

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


# --------------------------------------------------------------------------- benchmark


def _fmt_p(p: float) -> str:
    return f"{p:.1e}"


def bench_quality(kinds, n_frames: int) -> list[dict]:
    from kinema.provenance import watermark as wm

    rows = []
    for i, kind in enumerate(kinds):
        clip = make_clip(kind, 100 + i, n=n_frames)
        marked = np.stack(list(wm.embed_frames(clip, wm.new_payload())))
        enc_a, enc_b = h264(clip, 18), h264(marked, 18)
        rows.append(
            {
                "kind": kind,
                "psnr": psnr(marked, clip),
                "ssim": ssim(marked[::4], clip[::4]),
                "psnr_h264": psnr(enc_b, enc_a),
                "ssim_h264": ssim(enc_b[::4], enc_a[::4]),
            }
        )
        print(f"quality {kind}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def bench_robustness(kinds, attacks: dict, n_frames: int) -> dict[str, list[dict]]:
    from kinema.provenance import watermark as wm

    out: dict[str, list[dict]] = {name: [] for name in attacks}
    for i, kind in enumerate(kinds):
        clip = make_clip(kind, 200 + i, n=n_frames)
        payload = wm.new_payload()
        marked = np.stack(list(wm.embed_frames(clip, payload)))
        for name, attack in attacks.items():
            t = time.perf_counter()
            d = wm.detect_frames(attack(marked))
            out[name].append(
                {"kind": kind, "detected": d.detected, "p": d.p_value, "exact": d.payload == payload, "bit_errors": d.bit_errors, "z": d.sync_z, "s": time.perf_counter() - t}
            )
            print(f"robust {kind:16s} {name:18s} det={d.detected} p={d.p_value:.1e} exact={d.payload == payload} err={d.bit_errors}", file=sys.stderr, flush=True)
    return out


FP_SIZES = [(720, 1280), (480, 832), (360, 640), (720, 720), (576, 1024), (128, 128), (96, 160), (160, 96)]
SMALL_SIZES = [(128, 128), (160, 96), (96, 160), (96, 96)]


def disc_clip(seed: int, n: int = 17, h: int = 128, w: int = 128) -> np.ndarray:
    """What kinema's built-in model makes: a coloured disc moving over a colour gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = _colorize(xx / w * rng.uniform(0.3, 0.9) + yy / h * rng.uniform(0.0, 0.4), rng)
    colour, r = rng.uniform(0, 255, 3), rng.uniform(0.1, 0.3) * min(h, w)
    (y0, x0), (y1, x1) = rng.uniform(0.2, 0.8, 2), rng.uniform(0.2, 0.8, 2)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        f = bg.copy()
        a = t / max(n - 1, 1)
        f[(xx - w * (x0 + (x1 - x0) * a)) ** 2 + (yy - h * (y0 + (y1 - y0) * a)) ** 2 < r * r] = colour
        out[t] = np.clip(f, 0, 255)
    return out


SMALL_ATTACKS = {
    "crf18 (as written)": lambda v: h264(v, 18, 8.0),
    "crf23": lambda v: h264(v, 23, 8.0),
    "crf28": lambda v: h264(v, 28, 8.0),
    "bright+30": lambda v: h264(brightness(v, 1.3), 18, 8.0),
    "bright-30": lambda v: h264(brightness(v, 0.7), 18, 8.0),
}


def bench_small(n_clips: int, n_frames: int = 17) -> dict:
    """Small frames (the built-in model's 128x128, 17 frames at 8 fps, and other small sizes):
    per-frame quality and detection after the attacks, on moving-disc clips and a few kinds."""
    from kinema.provenance import watermark as wm

    rows = []
    for i in range(n_clips):
        h, w = SMALL_SIZES[i % len(SMALL_SIZES)]
        kind = ("disc", "disc", "gradient_shapes", "texture_pan", "pink_pan", "dark")[(i // len(SMALL_SIZES)) % 6]
        clip = disc_clip(300 + i, n_frames, h, w) if kind == "disc" else make_clip(kind, 300 + i, n=n_frames, h=h, w=w)
        payload = wm.new_payload()
        marked = np.stack(list(wm.embed_frames(clip, payload)))
        row = {"kind": kind, "size": f"{h}x{w}", "psnr": min(psnr(m, c) for m, c in zip(marked, clip)),
               "ssim": min(ssim(m[None], c[None]) for m, c in zip(marked, clip))}
        for name, attack in SMALL_ATTACKS.items():
            d = wm.detect_frames(attack(marked))
            row[name] = (d.detected and d.payload == payload, d.p_value)
        rows.append(row)
        print(f"small {row}", file=sys.stderr, flush=True)
    return {"rows": rows}


def bench_false_positives(n_clips: int, sizes: list | None = None) -> dict:
    from kinema.provenance import watermark as wm

    sizes = sizes or FP_SIZES
    ps, zs, fps_ = [], [], 0
    t0 = time.perf_counter()
    for i in range(n_clips):
        kind = KINDS[i % len(KINDS)]
        h, w = sizes[(i // len(KINDS)) % len(sizes)]
        clip = make_clip(kind, 10_000 + i, n=8, h=h, w=w) if h >= 192 or i % 2 else disc_clip(10_000 + i, 17, h, w)
        if i % 3 == 1:
            clip = h264(clip, 23 + (i % 13))
        if i % 7 == 3:
            clip = resize(clip, 0.5 + 0.1 * (i % 5))
        d = wm.detect_frames(clip)
        ps.append(d.p_value)
        zs.append(d.sync_z)
        fps_ += int(d.detected)
        if d.detected:
            print(f"FALSE POSITIVE {i} {kind} {h}x{w} p={d.p_value}", file=sys.stderr, flush=True)
    ps = np.array(ps)
    return {
        "clips": n_clips,
        "false_positives": fps_,
        "min_p": float(ps.min()),
        "frac_p_below_0.01": float(np.mean(ps < 0.01)),
        "frac_p_below_0.1": float(np.mean(ps < 0.1)),
        "max_sync_z": float(max(zs)),
        "seconds": time.perf_counter() - t0,
    }


def bench_speed() -> dict:
    import os

    from kinema.provenance import finalize_video, verify_file

    clip = make_clip("pink_pan", 7, n=120)  # 5 s at 24 fps, 720p
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("KINEMA_CONFIG_DIR", str(Path(d) / "config"))
        finalize_video(clip[:2], Path(d) / "warmup.mp4", 24.0, model_name="bench")  # identity creation, imports
        t = time.perf_counter()
        facts = finalize_video(clip, Path(d) / "v.mp4", 24.0, model_name="bench")
        t_mark = time.perf_counter() - t
        t = time.perf_counter()
        rep = verify_file(Path(d) / "v.mp4")
        t_verify = time.perf_counter() - t
    ok = rep["watermark"]["payload"] == facts["watermark"]["payload"] and rep["c2pa"]["state"] in ("trusted", "valid")
    return {"mark_s": t_mark, "verify_s": t_verify, "roundtrip_ok": ok}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer clips (a smoke run)")
    ap.add_argument("--frames", type=int, default=24, help="frames per robustness clip")
    ap.add_argument("--fp-clips", type=int, default=200, help="unmarked clips for the false-positive test")
    ap.add_argument("--small-clips", type=int, default=48, help="clips for the small-frame section")
    ap.add_argument("--fp-sizes", default="", help="comma list of HxW for the false-positive clips (default: all)")
    ap.add_argument("--skip", default="", help="comma list of: quality,robustness,extra,small,fp,speed")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    kinds = KINDS[:4] if args.quick else KINDS
    results: dict = {}
    if "speed" not in skip:
        results["speed"] = bench_speed()
    if "quality" not in skip:
        results["quality"] = bench_quality(kinds, 24)
    if "robustness" not in skip:
        results["robustness"] = bench_robustness(kinds, ATTACKS, args.frames)
    if "extra" not in skip:
        results["extra"] = bench_robustness(kinds, EXTRA_ATTACKS, args.frames)
    if "small" not in skip:
        results["small"] = bench_small(8 if args.quick else args.small_clips)
    if "fp" not in skip:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.fp_sizes.split(",") if s] or None
        results["fp"] = bench_false_positives(20 if args.quick else args.fp_clips, sizes)
    if args.json:
        args.json.write_text(__import__("json").dumps(results, indent=2, default=float))
    print_report(results)


def print_report(results: dict) -> None:
    if "speed" in results:
        s = results["speed"]
        print("\n## Speed (5 s 720p clip, 120 frames)\n")
        print("| mark (watermark + H.264 + sign) | verify (decode + detect + C2PA) | round trip |")
        print("|---|---|---|")
        print(f"| {s['mark_s']:.1f} s | {s['verify_s']:.1f} s | {'ok' if s['roundtrip_ok'] else 'FAIL'} |")
    if "quality" in results:
        print("\n## Quality (marked vs unmarked, 720p)\n")
        print("| clip | PSNR dB | SSIM | PSNR dB (both H.264 CRF 18) | SSIM (both H.264) |")
        print("|---|---|---|---|---|")
        for r in results["quality"]:
            print(f"| {r['kind']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_h264']:.2f} | {r['ssim_h264']:.4f} |")
        q = results["quality"]
        print(f"| **min** | {min(r['psnr'] for r in q):.2f} | {min(r['ssim'] for r in q):.4f} | {min(r['psnr_h264'] for r in q):.2f} | {min(r['ssim_h264'] for r in q):.4f} |")
    for key, title in (("robustness", "Robustness (720p clips; the issue's attacks)"), ("extra", "Robustness, other attacks (generality)")):
        if key not in results:
            continue
        print(f"\n## {title}\n")
        print("| attack | detected (p <= 1e-6) | payload exact | median p | worst p | mean coded-bit errors /264 | detect s |")
        print("|---|---|---|---|---|---|---|")
        for name, rows in results[key].items():
            n = len(rows)
            det = sum(r["detected"] for r in rows)
            exact = sum(r["exact"] for r in rows)
            ps = sorted(r["p"] for r in rows)
            errs = [r["bit_errors"] for r in rows if r["bit_errors"] is not None]
            err = f"{np.mean(errs):.1f}" if errs else "-"
            print(f"| {name} | {det}/{n} | {exact}/{n} | {_fmt_p(ps[n // 2])} | {_fmt_p(ps[-1])} | {err} | {np.mean([r['s'] for r in rows]):.1f} |")
    if "small" in results:
        rows = results["small"]["rows"]
        print("\n## Small frames (17 frames at 8 fps; disc = the built-in model's kind of clip)\n")
        print("| attack | detected, exact payload | median p | worst p |")
        print("|---|---|---|---|")
        for name in SMALL_ATTACKS:
            ok = sum(r[name][0] for r in rows)
            ps = sorted(r[name][1] for r in rows)
            print(f"| {name} | {ok}/{len(rows)} | {_fmt_p(ps[len(ps) // 2])} | {_fmt_p(ps[-1])} |")
        fails = [f"{r['kind']} {r['size']} {name}" for r in rows for name in SMALL_ATTACKS if not r[name][0]]
        print(f"\nper-frame quality: min PSNR {min(r['psnr'] for r in rows):.2f} dB, min SSIM {min(r['ssim'] for r in rows):.4f}; misses: {', '.join(fails) or 'none'}")
    if "fp" in results:
        f = results["fp"]
        print("\n## False positives (unmarked clips: 10 kinds x 8 sizes incl. small, some H.264 / resized)\n")
        print("| clips | detected | smallest p | share p < 0.01 | share p < 0.1 | largest sync z |")
        print("|---|---|---|---|---|---|")
        print(f"| {f['clips']} | {f['false_positives']} | {f['min_p']:.2g} | {f['frac_p_below_0.01']:.3f} | {f['frac_p_below_0.1']:.3f} | {f['max_sync_z']:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
