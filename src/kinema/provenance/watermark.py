"""Invisible, weights-free video watermark.

Design (public detector, no secret: the point is provenance, not secrecy):

* Payload: 64 bits = a 16-bit kinema tag + a 48-bit per-video id. A CRC-16 is appended and the
  80 bits are protected by a rate-1/3, constraint-length-9 convolutional code (264 coded bits).
* Layout: a tile repeats over the whole frame with a period of 192 px (times `embed_scale`, so
  that large videos look the same once downscaled to 720p; frames under 192 px on the short
  side get one tile spanning the short side, e.g. 128 px at 128x128: the detector's scale
  search, already counted in the p-value, finds it like any downscale). The tile is a sum of
  2-D sinusoids whose frequencies are whole numbers of cycles per tile with radius 2..11 (wavelengths 17-96
  px): each carries two real coefficients (cosine and sine part), ~370 in all. A fixed public
  permutation makes 264 of them the coded bits (interleaved) and the rest a known sync
  pattern; all signs are scrambled by a fixed pseudo-noise sequence. Low/mid frequencies
  survive H.264, resizing and brightness changes; the same pattern sits in every frame, so
  frame drops do not matter and the detector averages frames to suppress moving content.
* Strength follows a perceptual mask (stronger in textured areas, weaker in flat/dark ones),
  scaled per frame so that the frame's PSNR is `MIN_PSNR_DB`, or lower in energy when an
  estimated SSIM-loss budget (`SSIM_LOSS`, flat or dark frames) binds first.
  Small frames (short side < 192 px) have their SSIM loss measured instead and capped at
  `SMALL_SSIM_LOSS`.
* Detection: average the luma of sampled frames; for each candidate scale, resample so that
  one tile spans 64 px, remove the local mean, clip outliers and fold all tiles onto one
  (cropping becomes a cyclic shift); whiten the folded spectrum ring by ring and correlate with
  the sync coefficients over every shift by FFT. Coefficients are orthogonal, so the whitened
  matched filter gives independent soft bits for a soft Viterbi decoder. The false-positive
  probability (p-value) is honest (views of the frames - plain, motion-stabilised, the mean
  after subtracting a motion-compensated host estimate, first frames after keyframes and, for
  frames under 192 px, the mean of per-frame clipped detail - are Bonferroni-counted):
  a Bonferroni bound over every (scale, shift) tested for the Gaussian sync statistic (its null variance is computed, not fitted), or - when a payload with
  a valid CRC and the kinema tag is decoded - the chance (2^-32 per decoded candidate) that noise
  decodes to such a payload; the reported value is twice the smaller of the two.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..errors import InputError

TAG = 0x4B31  # "K1": kinema watermark, layout version 1
PAYLOAD_BITS = 64
CRC_BITS = 16
BASE_PERIOD = 192.0  # tile period in pixels at embed_scale 1
R_MIN, R_MAX = 2.0, 11.0  # frequency band, cycles per tile
DET = 64  # tile size in the detection domain
K = 9  # convolutional code constraint length
GENERATORS = (0o557, 0o663, 0o711)  # rate 1/3, free distance 18
N_INFO = PAYLOAD_BITS + CRC_BITS
N_CODED = len(GENERATORS) * (N_INFO + K - 1)  # 264
MIN_PSNR_DB = 41.0  # per-frame PSNR of the mark (its energy budget)
SSIM_LOSS = 0.012  # per-frame budget of SSIM loss (estimated)
SMALL_SSIM_LOSS = 0.014  # measured (not estimated) SSIM-loss cap for frames under 192 px
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
SSIM_KAPPA = 0.2  # measured loss / proxy on flat and dark procedural clips (0.11-0.19)
DETECTION_P = 1e-6  # p-value at or below which a watermark counts as detected
SEED = 0x6B696E656D61  # "kinema": fixes the public layout


@dataclass(frozen=True)
class _Layout:
    """The fixed public layout. Coefficient j lives at frequency (ky[j], kx[j]) (cycles per
    tile), as its cosine (part 0) or sine (part 1) component."""

    ky: np.ndarray
    kx: np.ndarray
    part: np.ndarray
    pn: np.ndarray  # +-1 scrambling signs
    sync_idx: np.ndarray
    code_idx: np.ndarray  # in codeword order (interleaving)

    @staticmethod
    def build() -> "_Layout":
        freqs = []
        span = int(R_MAX) + 1
        for a in range(-span, span + 1):
            for b in range(-span, span + 1):
                # One of each +-k pair (half plane), inside the band.
                if (a > 0 or (a == 0 and b > 0)) and R_MIN <= math.hypot(a, b) <= R_MAX:
                    freqs.append((a, b))
        freqs = np.array(freqs)
        ky = np.repeat(freqs[:, 0], 2)
        kx = np.repeat(freqs[:, 1], 2)
        part = np.tile([0, 1], len(freqs))
        n = len(ky)
        rng = np.random.default_rng(SEED)
        pn = rng.integers(0, 2, n) * 2.0 - 1.0
        perm = rng.permutation(n)
        return _Layout(ky, kx, part, pn, np.sort(perm[N_CODED:]), perm[:N_CODED])

    @property
    def size(self) -> int:
        return len(self.ky)

    def values(self, coded: np.ndarray | None) -> np.ndarray:
        """Coefficient values (+-1, or 0 for coded ones when `coded` is None = sync only)."""
        v = np.zeros(self.size)
        v[self.sync_idx] = self.pn[self.sync_idx]
        if coded is not None:
            v[self.code_idx] = (2.0 * coded - 1.0) * self.pn[self.code_idx]
        return v


@functools.lru_cache(maxsize=1)
def _layout() -> _Layout:
    """The layout, built lazily (and once) to keep import cheap."""
    return _Layout.build()


# ----------------------------------------------------------------------------- payload coding


ID_HEX = (PAYLOAD_BITS - 16) // 4  # 12 hex digits of per-video id


def new_payload(video_id: str | None = None) -> str:
    """The payload: the kinema tag followed by the 48-bit per-video id, as 16 hex digits.

    `video_id` is 12 hex digits (e.g. derived from reproducible generation settings); a random
    id when None. Raises InputError for a malformed id."""
    if video_id is None:
        return f"{TAG:04x}{secrets.randbits(48):012x}"
    if not isinstance(video_id, str) or len(video_id) != ID_HEX or any(c not in "0123456789abcdefABCDEF" for c in video_id):
        raise InputError(f"video id must be {ID_HEX} hex digits, got {video_id!r}")
    return f"{TAG:04x}{video_id.lower()}"


def _crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.int64)


def _parse_payload(payload: str) -> int:
    try:
        value = int(payload, 16)
    except ValueError:
        value = -1
    if len(payload) != PAYLOAD_BITS // 4 or not 0 <= value < 1 << PAYLOAD_BITS:
        raise ValueError(f"watermark payload must be {PAYLOAD_BITS // 4} hex digits, got {payload!r}")
    return value


def _reg_outputs() -> np.ndarray:
    """Coded output bits [2^K, n_out] for every K-bit register value (newest bit = bit K-1)."""
    regs = np.arange(1 << K)
    return np.stack([np.array([bin(r & g).count("1") & 1 for r in regs]) for g in GENERATORS], 1)


def encode_payload(payload: str) -> np.ndarray:
    """Payload hex -> 264 coded bits (payload, CRC-16, K-1 zero tail bits, convolutional code)."""
    value = _parse_payload(payload)
    info = np.concatenate([_bits(value, 64), _bits(_crc16(value.to_bytes(8, "big")), 16), np.zeros(K - 1, np.int64)])
    outs = _reg_outputs()
    state, coded = 0, []
    for bit in info:
        reg = (int(bit) << (K - 1)) | state
        coded.extend(outs[reg])
        state = reg >> 1
    return np.array(coded, dtype=np.float64)


def viterbi_decode(soft: np.ndarray) -> np.ndarray:
    """Soft Viterbi: `soft[i]` > 0 means coded bit i is 1. Returns the N_INFO info bits (tail dropped)."""
    outs = _reg_outputs() * 2.0 - 1.0  # [128, n_out] as +-1
    n_out = outs.shape[1]
    n_states = 1 << (K - 1)
    steps = len(soft) // n_out
    metric = np.full(n_states, -np.inf)
    metric[0] = 0.0
    ns = np.arange(n_states)
    # Register for new state ns and the bit that left the old state: reg = (ns << 1 | lsb).
    regs = np.stack([(ns << 1) | 0, (ns << 1) | 1], 1)  # [states, 2]
    prev = regs & (n_states - 1)
    choices = np.zeros((steps, n_states), dtype=np.int8)
    for t in range(steps):
        branch = outs[regs] @ soft[n_out * t : n_out * t + n_out]  # [states, 2]
        cand = metric[prev] + branch
        pick = np.argmax(cand, axis=1)
        choices[t] = pick
        metric = cand[ns, pick]
    state = 0  # terminated code: ends in state 0
    bits = np.zeros(steps, dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        bits[t] = state >> (K - 2)  # the newest bit of a state is its top bit
        state = int(prev[state, choices[t, state]])
    return bits[:N_INFO]


def decode_bits(info: np.ndarray) -> tuple[str, bool]:
    """Info bits -> (payload hex, CRC and tag valid)."""
    value = int("".join(str(int(b)) for b in info[:64]), 2)
    crc = int("".join(str(int(b)) for b in info[64:80]), 2)
    ok = crc == _crc16(value.to_bytes(8, "big")) and value >> 48 == TAG
    return f"{value:016x}", ok


# ----------------------------------------------------------------------------- pattern rendering


def _render(values: np.ndarray, height: int, width: int, period: float) -> np.ndarray:
    """The tile pattern for coefficient `values` on a height x width pixel grid with `period` px.

    Pixel (y, x) has its centre at continuous coordinate (y + 0.5, x + 0.5). Separable Fourier
    series: Re([H, n] @ C[n, n] @ [n, W]) with n = 2 * R_MAX + 1 frequencies per axis.
    """
    lay = _layout()
    span = int(R_MAX)
    coef = np.zeros((2 * span + 1, 2 * span + 1), complex)
    c = np.where(lay.part == 0, values, -1j * values)  # Re((a - ib) e^{it}) = a cos t + b sin t
    np.add.at(coef, (lay.ky + span, lay.kx + span), c)
    k = np.arange(-span, span + 1)

    def basis(n: int) -> np.ndarray:
        return np.exp(2j * np.pi * np.outer(np.arange(n) + 0.5, k) / period)

    return np.real(basis(height) @ coef @ basis(width).T).astype(np.float32)


def embed_scale(height: int, width: int) -> float:
    """Tile period factor: 1 from 192 px to 720p, proportional above (so 1080p/4K downscaled to
    720p match) and below (one tile spans the short side of small frames, e.g. 128x128)."""
    short = min(height, width)
    return max(1.0, short / 720.0) if short >= BASE_PERIOD else short / BASE_PERIOD


@dataclass
class Embedder:
    """Adds the watermark for one payload to frames of one size. Build once per video."""

    payload: str
    height: int
    width: int
    psnr_db: float = MIN_PSNR_DB  # each frame gets exactly this PSNR (before rounding/clipping)
    pattern: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = _layout().values(encode_payload(self.payload))
        period = BASE_PERIOD * embed_scale(self.height, self.width)
        pat = _render(values, self.height, self.width, period)
        self.pattern = pat / float(np.sqrt(np.mean(pat**2)))  # unit RMS

    def mask(self, luma: np.ndarray) -> tuple[np.ndarray, float]:
        """Perceptual strength map [H, W] from local luma activity (computed at 1/4 resolution),
        and an SSIM-loss proxy per unit gain: a change of local variance s2 costs about
        s2 / (2 var + C2) of SSIM, a change d of the local mean about d^2 / (2 mean^2 + C1)."""
        h, w = luma.shape
        small = _resize_to(luma, max(1, h // 4), max(1, w // 4))
        mean = _box(small, 2)
        var = np.maximum(_box(small * small, 2) - mean * mean, 0.0)
        m = np.clip(0.5 + np.sqrt(var) / 10.0, 0.5, 2.0)  # local std over ~20 px
        # Dark and near-white areas show changes more / clip them: ease off there.
        m *= np.clip(np.minimum(mean, 255.0 - mean) / 24.0, 0.3, 1.0)
        # Structure/contrast term (only the part of the mark's variance inside an SSIM window
        # counts: SSIM_KAPPA) plus the luminance term (the mark shifts local means 1:1).
        proxy = SSIM_KAPPA * float(np.mean(m * m / (2.0 * var + SSIM_C2)))
        proxy += float(np.mean(m * m / (2.0 * mean * mean + SSIM_C1)))
        return _resize_to(m, h, w), proxy

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Watermark one uint8 RGB frame [H, W, 3] (same size as the embedder)."""
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame size {frame.shape[:2]} != embedder size {(self.height, self.width)}")
        f = frame.astype(np.float32)
        luma = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
        m, proxy = self.mask(luma)
        delta = m * self.pattern
        # The mask only shapes the mark; its energy is set so the frame has PSNR = psnr_db,
        # unless the frame is so flat or dark that the SSIM budget binds first.
        rms = float(np.sqrt(np.mean(delta * delta))) + 1e-12
        gain = (255.0 / 10 ** (self.psnr_db / 20.0)) / rms
        small = min(self.height, self.width) < BASE_PERIOD
        if not small:
            gain = min(gain, math.sqrt(SSIM_LOSS / (proxy + 1e-12)))
        delta *= gain
        if small:
            # Small frames have small tiles, whose short wavelengths the SSIM estimate (tuned
            # for 192-px tiles) misjudges; they are cheap to check, so measure the SSIM loss
            # and scale the mark down if it exceeds SMALL_SSIM_LOSS (loss ~ gain^2).
            loss = 1.0 - _ssim(luma, luma + delta)
            if loss > SMALL_SSIM_LOSS:
                delta *= math.sqrt(SMALL_SSIM_LOSS / loss)
        f += delta[..., None]  # equal change in R, G, B = a pure luma change
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _gauss(img: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur (edge replication), the usual SSIM window."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(img, radius, mode="edge")
    h, w = img.shape
    tmp = sum(k[i] * p[i : i + h, :] for i in range(2 * radius + 1))
    return sum(k[i] * tmp[:, i : i + w] for i in range(2 * radius + 1))


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two luma images (Gaussian window, sigma 1.5, standard constants)."""
    mx, my = _gauss(x), _gauss(y)
    sxx, syy, sxy = _gauss(x * x) - mx * mx, _gauss(y * y) - my * my, _gauss(x * y) - mx * my
    s = ((2 * mx * my + SSIM_C1) * (2 * sxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (sxx + syy + SSIM_C2))
    return float(s.mean())


def _box(img: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge replication (cumulative sums; float32 out)."""
    if r <= 0:
        return img.astype(np.float32)
    p = np.pad(img.astype(np.float64), r, mode="edge")
    c = np.pad(np.cumsum(np.cumsum(p, axis=0), axis=1), ((1, 0), (1, 0)))
    n = 2 * r + 1
    s = c[n:, n:] - c[:-n, n:] - c[n:, :-n] + c[:-n, :-n]
    return (s / (n * n)).astype(np.float32)


def _resize_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased bilinear resize of a float image (PIL, mode F)."""
    from PIL import Image

    out = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def embed_frames(frames: Iterable[np.ndarray] | np.ndarray, payload: str, **kwargs) -> Iterable[np.ndarray]:
    """Lazily watermark uint8 RGB frames [F, H, W, 3] (or an iterable of [H, W, 3])."""
    emb: Embedder | None = None
    for frame in frames:
        if emb is None:
            emb = Embedder(payload, frame.shape[0], frame.shape[1], **kwargs)
        yield emb.apply(frame)


# ----------------------------------------------------------------------------- detection


@dataclass
class Detection:
    """What the detector found. `p_value` is the false-positive probability of the claim."""

    detected: bool
    payload: str | None
    p_value: float
    scale: float | None = None
    shift: tuple[float, float] | None = None
    sync_z: float = 0.0
    bit_errors: int | None = None  # coded-bit disagreements with the re-encoded payload
    tests: int = 0

    def as_dict(self) -> dict:
        return {
            "detected": self.detected,
            "payload": self.payload,
            "p_value": self.p_value,
            "scale": None if self.scale is None else round(self.scale, 4),
            "shift": list(self.shift) if self.shift else None,
            "sync_z": round(self.sync_z, 3),
            "coded_bit_errors": self.bit_errors,
        }


PREFILTER_R = 6  # radius of the local-mean removal in the detection domain (px)
@functools.lru_cache(maxsize=1)
def _constants() -> dict[str, np.ndarray]:
    """Detection-domain constants (built once; they depend only on the public layout)."""
    lay = _layout()
    ref = np.fft.fft2(_render(lay.values(None), DET, DET, float(DET)).astype(np.float64))
    f = np.fft.fftfreq(DET)
    n = 2 * PREFILTER_R + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        d1 = np.where(f == 0, 1.0, np.sin(np.pi * f * n) / (n * np.sin(np.pi * f)))
    hp = 1.0 - np.outer(d1, d1)  # response of "image minus its box mean" on the DET grid
    ky, kx = np.meshgrid(np.fft.fftfreq(DET, 1.0 / DET), np.fft.fftfreq(DET, 1.0 / DET), indexing="ij")
    radius = np.rint(np.sqrt(ky**2 + kx**2)).astype(np.int64)
    # Per-coefficient unit basis in the folded spectrum: the half-pixel centre phase, times
    # 1 (cosine part) or -i (sine part) - see _render.
    iy, ix = lay.ky % DET, lay.kx % DET
    basis = np.exp(1j * np.pi * (lay.ky + lay.kx) / DET) * np.where(lay.part == 0, 1.0, -1j) * hp[iy, ix]
    group = np.minimum(((np.hypot(lay.ky, lay.kx) - R_MIN) / 2.0).astype(int), 3)
    return dict(ref=ref, hp=hp, radius=radius, ky=ky, kx=kx, iy=iy, ix=ix, basis=basis, group=group)


def _prefilter(img: np.ndarray) -> np.ndarray:
    """Remove the local mean and clip outliers (strong edges): a cheap, robust host whitening."""
    hp = img - _box(img, PREFILTER_R)
    lim = 3.0 * float(np.mean(np.abs(hp))) + 1e-6
    return np.clip(hp, -lim, lim)


def _fold(img: np.ndarray) -> np.ndarray:
    """Sum all DET x DET tiles of an image onto one (partial tiles included)."""
    h, w = img.shape
    p = np.pad(img, ((0, -h % DET), (0, -w % DET)))
    return p.reshape(p.shape[0] // DET, DET, p.shape[1] // DET, DET).sum(axis=(0, 2))


@dataclass
class _Scan:
    z: float
    scale: float
    shift: tuple[float, float]  # sub-pixel, detection-domain pixels
    spec: np.ndarray  # folded spectrum
    sigma2: np.ndarray  # its per-bin noise power estimate


def _sync_scan(luma: np.ndarray, scale: float, window: float | None) -> _Scan:
    """Best sync z-score and (sub-pixel) shift at one scale."""
    c = _constants()
    h, w = luma.shape
    if window is not None:  # centre region of about `window` tiles per side (coarse search)
        side = int(window * BASE_PERIOD * scale)
        y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
        luma = luma[y0 : y0 + side, x0 : x0 + side]
    factor = DET / (BASE_PERIOD * scale)
    det = _prefilter(_resize_to(luma, max(1, round(luma.shape[0] * factor)), max(1, round(luma.shape[1] * factor))))
    spec = np.fft.fft2(_fold(det))
    # Noise power per bin: the mean power of its frequency ring (host spectra vary ~ with |f|).
    power = np.abs(spec) ** 2
    rad = c["radius"].ravel()
    ring = np.bincount(rad, power.ravel()) / np.maximum(np.bincount(rad), 1)
    sigma2 = ring[c["radius"]] + 1e-12
    match = np.conj(c["ref"] * c["hp"]) / sigma2  # whitened matched filter (sync bins only)
    corr = np.real(np.fft.ifft2(spec * match))
    # Null (no watermark) standard deviation of corr, computed rather than fitted (a fitted
    # one would be inflated by the watermark's own side lobes).
    null_sd = math.sqrt(float(np.sum(np.abs(match) ** 2 * sigma2))) / DET**2 + 1e-30
    idx = int(np.argmax(corr))
    iy, ix = idx // DET, idx % DET

    def vertex(a: float, b: float, c_: float) -> float:  # parabola peak offset in [-0.5, 0.5]
        den = a - 2 * b + c_
        return 0.0 if den >= 0 else float(np.clip(0.5 * (a - c_) / den, -0.5, 0.5))

    dy = vertex(corr[iy - 1, ix], corr[iy, ix], corr[(iy + 1) % DET, ix])
    dx = vertex(corr[iy, ix - 1], corr[iy, ix], corr[iy, (ix + 1) % DET])
    return _Scan(float(corr[iy, ix] / null_sd), scale, (iy + dy, ix + dx), spec, sigma2)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _scale_grid(h: int, w: int, lo: float, hi: float, step: float) -> np.ndarray:
    hi = min(hi, min(h, w) / (0.75 * BASE_PERIOD))  # most of a tile must fit
    if hi < lo:
        return np.array([])
    n = int(math.floor(math.log(hi / lo) / math.log(1 + step))) + 1
    return lo * (1 + step) ** np.arange(n)


def _soft(scan: _Scan) -> np.ndarray:
    """Whitened matched-filter output per coefficient, aligned by the sub-pixel shift, sign-descrambled."""
    c = _constants()
    lay = _layout()
    phase = np.exp(2j * np.pi * (lay.ky * scan.shift[0] + lay.kx * scan.shift[1]) / DET)
    x = scan.spec[c["iy"], c["ix"]] * phase
    return np.real(x * np.conj(c["basis"])) / scan.sigma2[c["iy"], c["ix"]] * lay.pn


def _decode(scan: _Scan) -> tuple[str, bool, np.ndarray]:
    """Soft-decode the payload at one alignment. LLRs are scaled per frequency group from the
    sync coefficients of that group (compression and resizing hit high frequencies harder)."""
    c = _constants()
    lay = _layout()
    y = _soft(scan)
    llr = np.zeros(lay.size)
    for g in np.unique(c["group"]):
        sel = c["group"] == g
        sync = y[lay.sync_idx][sel[lay.sync_idx]]
        if len(sync) < 4:
            continue
        m, v = float(sync.mean()), float(sync.var()) + 1e-30
        llr[sel] = y[sel] * (2.0 * max(m, 0.0) / v)
    coded = llr[lay.code_idx]
    payload, ok = decode_bits(viterbi_decode(coded))
    return payload, ok, y[lay.code_idx]


def detect_luma(
    luma: np.ndarray,
    *,
    scale_range: tuple[float, float] = (0.2, 2.2),
    coarse_step: float = 0.02,
    fine_span: float = 0.012,
    fine_step: float = 0.003,
    candidates: int = 4,
    threshold: float = DETECTION_P,
) -> Detection:
    """Detect the watermark in a [H, W] luma image (an average over frames works best)."""
    luma = np.asarray(luma, dtype=np.float32)
    h, w = luma.shape
    grid = _scale_grid(h, w, scale_range[0], scale_range[1], coarse_step)
    if len(grid) == 0:
        return Detection(False, None, 1.0)
    tests = 0
    coarse = []
    for s in grid:
        coarse.append(_sync_scan(luma, float(s), window=5.0).z)
        tests += DET * DET
    coarse = np.array(coarse)
    # Local maxima of the coarse z over scale, best first.
    last = len(coarse) - 1
    peaks = [i for i in range(len(coarse)) if coarse[i] >= coarse[max(i - 1, 0)] and coarse[i] >= coarse[min(i + 1, last)]]
    peaks = sorted(peaks, key=lambda i: -coarse[i])[:candidates]
    n_fine = int(round(fine_span / fine_step))
    best_per_peak = []
    for i in peaks:
        scans = []
        for j in range(-n_fine, n_fine + 1):
            s = float(grid[i] * (1 + j * fine_step))
            if 0.75 * s * BASE_PERIOD <= min(h, w):
                scans.append(_sync_scan(luma, s, window=None))
                tests += DET * DET
        if scans:
            best_per_peak.append(max(scans, key=lambda r: r.z))
    best_per_peak.sort(key=lambda r: -r.z)
    best = best_per_peak[0]
    p_sync = min(1.0, tests * _normal_sf(best.z))
    # Decode the best alignment of each candidate peak (distinct scales), strongest first.
    decoded = None
    for n_tried, scan in enumerate(best_per_peak, 1):
        payload, ok, coded = _decode(scan)
        if ok:
            decoded = (payload, scan, coded)
            break
    p_code = min(1.0, n_tried * 2.0**-32) if decoded else 1.0
    p = min(1.0, 2.0 * min(p_sync, p_code))
    shift = (round(best.shift[0], 2), round(best.shift[1], 2))
    if decoded:
        payload, scan, coded = decoded
        errors = int(np.sum((coded > 0) != (encode_payload(payload) > 0.5)))
        shift = (round(scan.shift[0], 2), round(scan.shift[1], 2))
        return Detection(p <= threshold, payload, p, scan.scale, shift, scan.z, errors, tests)
    return Detection(p <= threshold, None, p, best.scale, shift, best.z, None, tests)


def _luma(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame, dtype=np.float32)
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114 if f.ndim == 3 else f


def _global_shift(a: np.ndarray, b: np.ndarray, taper: bool = False) -> tuple[int, int]:
    """Integer translation d with b(x) ~ a(x - d), by phase correlation (`taper`: Hann window
    first, so the frame borders do not pull the estimate to 0 - matters on small frames)."""
    a, b = a - a.mean(), b - b.mean()
    if taper:
        win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
        a, b = a * win, b * win
    fa = np.fft.rfft2(a)
    fb = np.fft.rfft2(b)
    r = fb * np.conj(fa)
    c = np.fft.irfft2(r / (np.abs(r) + 1e-9), s=a.shape)
    i = int(np.argmax(c))
    h, w = a.shape
    dy, dx = i // w, i % w
    return (dy - h if dy > h // 2 else dy), (dx - w if dx > w // 2 else dx)


def _stabilized_mean(lumas: list[np.ndarray]) -> np.ndarray | None:
    """Mean of frames shifted back by their accumulated global motion (None if no motion)."""
    acc = lumas[0].copy()
    pos = np.zeros(2, np.int64)
    prev = _resize_to(lumas[0], max(1, lumas[0].shape[0] // 2), max(1, lumas[0].shape[1] // 2))
    for lum in lumas[1:]:
        small = _resize_to(lum, prev.shape[0], prev.shape[1])
        pos += np.array(_global_shift(prev, small)) * 2
        prev = small
        acc += np.roll(lum, (-int(pos[0]), -int(pos[1])), axis=(0, 1))
    return acc / len(lumas) if pos.any() else None


def _host_removed_mean(lumas: list[np.ndarray]) -> np.ndarray | None:
    """Mean of (frame - moving host) for a global pan (None if no motion).

    The host is estimated as the motion-stabilised mean (the static mark averages out there),
    moved back into each frame and subtracted; only pixels seen by two frames or more count.
    Shifts are found at full resolution: a one-pixel error leaves edges of a high-contrast
    host behind."""
    h, w = lumas[0].shape
    pos = [np.zeros(2, np.int64)]
    for a, b in zip(lumas[:-1], lumas[1:]):
        pos.append(pos[-1] - np.array(_global_shift(a, b, taper=True)))
    if not any(p.any() for p in pos):
        return None
    # Content moving by d means the frame moved by -d over the scene: frame pixel (y, x) sits
    # at canvas (y + py, x + px), shifted so that all canvas coordinates are >= 0.
    pos = [p - np.min(pos, axis=0) for p in pos]
    ch, cw = h + int(max(p[0] for p in pos)), w + int(max(p[1] for p in pos))
    acc, cnt = np.zeros((ch, cw)), np.zeros((ch, cw))
    for lum, (py, px) in zip(lumas, pos):
        acc[py : py + h, px : px + w] += lum
        cnt[py : py + h, px : px + w] += 1
    host = acc / np.maximum(cnt, 1)
    res, n = np.zeros((h, w)), np.zeros((h, w))
    for lum, (py, px) in zip(lumas, pos):
        ok = cnt[py : py + h, px : px + w] >= 2  # host seen in another frame too
        res += np.where(ok, lum - host[py : py + h, px : px + w], 0.0)
        n += ok
    return (res / np.maximum(n, 1)).astype(np.float32)


def luma_views(frames: Iterable[np.ndarray], max_frames: int = 96, fresh: Iterable[np.ndarray] | None = None) -> list[np.ndarray]:
    """Averages of the luma of up to `max_frames` evenly spaced frames, seen four ways (five
    for frames under 192 px: see the end).

    Re-encoders that drop residuals at high CRF let motion compensation carry the static mark
    along with moving content, so besides the plain mean (the mark is static) we also look at
    a mean stabilised against global motion (camera pans) and at the frames right after
    keyframes (`fresh`; default the first frame), where the encoder rebuilt the picture
    and the mark is still in place."""
    frames = list(frames)
    if not frames:
        raise ValueError("no frames")
    step = max(1, math.ceil(len(frames) / max_frames))
    lumas = [_luma(f) for f in frames[::step]]
    views = [np.mean(lumas, axis=0)]
    if len(lumas) >= 2:
        stab = _stabilized_mean(lumas)
        if stab is not None:
            views.append(stab)
    fresh_l = [_luma(f) for f in fresh] if fresh is not None else [_luma(frames[0])]
    if fresh_l and len(fresh_l) < len(frames):
        views.append(np.mean(fresh_l, axis=0))
    if len(lumas) >= 2 and min(lumas[0].shape) < BASE_PERIOD:
        # Small frames hold few tiles, so one sharp moving object dominates the plain mean
        # (its smeared trail); clipping each frame's detail before averaging tames it.
        views.append(np.mean([_frame_detail(x) for x in lumas], axis=0))
    if len(lumas) >= 2:
        # A strong texture panning over the whole frame survives every plain average, and at
        # high CRF the encoder drags the mark along with it; subtracting the moving host
        # leaves the mark of the frames the encoder refreshed (keyframes, intra blocks).
        removed = _host_removed_mean(_at_most(lumas, HOST_MAX_SIDE))
        if removed is not None:
            views.append(removed)
    return views


HOST_MAX_SIDE = 720  # short side the host-removed view is computed at (cost grows with area)


def _at_most(lumas: list[np.ndarray], short: int) -> list[np.ndarray]:
    """The frames downscaled so that their short side is at most `short` (the detector's
    scale search finds the mark at any scale)."""
    h, w = lumas[0].shape
    if min(h, w) <= short:
        return lumas
    f = short / min(h, w)
    return [_resize_to(x, round(h * f), round(w * f)) for x in lumas]


def _frame_detail(luma: np.ndarray, r: int = 4) -> np.ndarray:
    """A frame minus its local mean, clipped at 3 median absolute values (edges of objects)."""
    hp = luma - _box(luma, r)
    lim = 3.0 * float(np.median(np.abs(hp))) + 1e-6
    return np.clip(hp, -lim, lim)


def average_luma(frames: Iterable[np.ndarray], max_frames: int = 96) -> np.ndarray:
    """Mean luma of up to `max_frames` evenly spaced frames (uint8 RGB [H, W, 3] or luma [H, W])."""
    frames = list(frames)
    if not frames:
        raise ValueError("no frames")
    step = max(1, math.ceil(len(frames) / max_frames))
    return np.mean([_luma(f) for f in frames[::step]], axis=0)


def detect_frames(frames: Iterable[np.ndarray] | np.ndarray, *, fresh: Iterable[np.ndarray] | None = None, **kwargs) -> Detection:
    """Detect the watermark in frames [F, H, W, 3] (uint8 RGB) or luma frames [F, H, W].

    Runs the detector on each view of `luma_views`; the p-value is Bonferroni-corrected for
    every view that could have been tested (the motion-based views are made only when the
    frames move, a data-dependent choice, so they are always counted)."""
    frames = list(frames)
    fresh = None if fresh is None else list(fresh)
    views = luma_views(frames, fresh=fresh)
    n_views = len(views)
    if len(frames) >= 2:
        n_fresh = 1 if fresh is None else len(fresh)
        possible = 3 + int(0 < n_fresh < len(frames))  # plain, stabilised, host-removed, fresh
        possible += 1 if min(np.shape(frames[0])[:2]) < BASE_PERIOD else 0  # detail
        n_views = max(n_views, possible)
    threshold = kwargs.pop("threshold", DETECTION_P)
    results = [detect_luma(v, threshold=threshold, **kwargs) for v in views]
    # The first view (in `luma_views` order: least processed first) that decodes a payload
    # wins, so the reported scale/shift come from the plainest view that holds the mark;
    # with no payload anywhere, the smallest p-value.
    decoded = [d for d in results if d.payload is not None]
    best = decoded[0] if decoded else min(results, key=lambda d: d.p_value)
    best.p_value = min(1.0, n_views * best.p_value)
    best.detected = best.p_value <= threshold
    best.tests = sum(d.tests for d in results)
    return best
