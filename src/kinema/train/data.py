"""Procedural video clips with captions: one coloured shape moving over a simple background.

A clip is described by a `ClipSpec` (colour, shape, direction, background, speed, size, start)
drawn from a seeded numpy Generator (object size and travel from a `Layout`), and rendered by
`render_clip` to uint8 [T, H, W, 3] with anti-aliased edges (signed-distance coverage).
Captions come from `caption_for`: the canonical form "a {colour} {shape} moving {direction}"
or one of several paraphrases.

`HELD_OUT` lists the (colour, shape, direction) combinations that never appear in training;
they are the evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Prototype RGB of each colour word (the renderer jitters them slightly).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "orange": (250, 135, 15),
    "purple": (150, 45, 205),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("dark", "light", "gradient")
SPEEDS = ("slow", "normal", "fast")


# Half side of a square / its radius by default: 0.88 gives the square about the circle's area.
SQUARE = 0.88


@dataclass(frozen=True)
class Layout:
    """How large the object is and how far it travels (both at 128x128; they scale with the size).

    At 16 pixels per latent cell an outline is drawn by the few cells it crosses: with radius
    16-23 (2-3 cells across) the small VAE's round trip keeps so little of the corners that
    squares and triangles read as blobs; at 28-34 (4 cells) the same VAE keeps them. The travel
    shrinks so that the bigger object's whole path stays inside the frame.
    """

    radius: tuple[float, float] = (28.0, 34.0)  # pixels at 128x128
    travel: float = 0.7  # scales each speed's travel distance (fraction of the frame side)
    # > 0: frame 0's centre snaps to the nearest multiple of `grid` pixels (at 128x128). With
    # a 16-px latent cell, an object then starts at one of a few offsets against the cell grid,
    # so the first latent frame of every clip is one of a few patterns per (colour, shape,
    # background) instead of a continuum: far less for a small DiT's image pass to learn.
    grid: float = 0.0
    square: float = SQUARE  # half side of a square / radius (1.0: the circle's bounding box)


# The default everywhere (evaluation first frames included) and what DiT cycle 5 and decoder
# cycle 3 trained on, and the smaller objects the first recipe stages (VAE, decoder, DiT cycles
# 1-4) were trained on.
LAYOUT = Layout()
SMALL_OBJECTS = Layout(radius=(16.0, 23.0), travel=1.0)
# Session 11: one object size, frame 0 on an 8-px grid (two phases against the 16-px latent
# cell), and squares as wide as the circle (the circle's bounding box), so that a square and a
# circle differ by 1.5x more area than at equal areas.
ALIGNED = Layout(radius=(31.0, 31.0), travel=0.7, grid=8.0, square=1.0)

# Unit motion vectors in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# Never used for training: each colour appears at least once, each shape four times,
# each direction three times, and every (colour, shape) pair keeps other directions in training.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("green", "square", "up"),
    ("blue", "triangle", "right"),
    ("yellow", "circle", "down"),
    ("white", "square", "left"),
    ("orange", "triangle", "up"),
    ("purple", "circle", "right"),
    ("red", "triangle", "down"),
    ("green", "circle", "right"),
    ("blue", "square", "down"),
    ("yellow", "triangle", "left"),
    ("purple", "square", "up"),
)


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def train_combos() -> list[tuple[str, str, str]]:
    held = set(HELD_OUT)
    return [c for c in all_combos() if c not in held]


def canonical_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    background: str
    speed: str
    rgb: tuple[int, int, int]  # jittered object colour
    bg: tuple[tuple[int, int, int], tuple[int, int, int], bool]  # (colour a, colour b, vertical)
    radius: float  # pixels at 128x128
    start: tuple[float, float]  # centre at frame 0, fraction of width/height
    distance: float  # total travel over the clip, fraction of the frame side
    square: float = SQUARE  # half side of a square / radius (`Layout.square`)


# ---------------------------------------------------------------------------------------------
# sampling


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)  # type: ignore[return-value]


def _background(kind: str, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
    if kind == "dark":
        g = int(rng.integers(0, 45))
        a = _jitter((g, g, g), rng, 8)
        return a, a, False
    if kind == "light":
        g = int(rng.integers(185, 225))
        a = _jitter((g, g, g), rng, 8)
        return a, a, False
    # gradient between two muted colours (low saturation, so the object's colour stays clear)
    def muted() -> tuple[int, int, int]:
        base = int(rng.integers(20, 130))
        return _jitter((base, base, base), rng, 20)
    return muted(), muted(), bool(rng.integers(0, 2))


def sample_spec(rng: np.random.Generator, combo: tuple[str, str, str] | None = None,
                combos: list[tuple[str, str, str]] | None = None, layout: Layout = LAYOUT) -> ClipSpec:
    """Draw a clip description; `combo` fixes (colour, shape, direction), else one of `combos`.
    Every layout draws the same random numbers in the same order."""
    if combo is None:
        pool = combos if combos is not None else train_combos()
        combo = pool[int(rng.integers(0, len(pool)))]
    colour, shape, direction = combo
    # white is invisible on a light background: keep every caption renderable
    kinds = [b for b in BACKGROUNDS if not (colour == "white" and b == "light")]
    background = kinds[int(rng.integers(0, len(kinds)))]
    speed = SPEEDS[int(rng.choice(3, p=[0.2, 0.6, 0.2]))]
    distance = {"slow": (0.2, 0.26), "normal": (0.3, 0.4), "fast": (0.42, 0.48)}[speed]
    dist = float(rng.uniform(*distance)) * layout.travel
    radius = float(rng.uniform(*layout.radius))
    margin = (1.3 * radius + 2.0) / 128.0  # the triangle reaches 1.35 r above its centre
    dx, dy = DIRECTION_VECTORS[direction]
    # along the motion axis the whole path must stay inside the frame
    lo, hi = margin, 1.0 - margin - dist
    along = float(rng.uniform(lo, max(lo, hi)))
    across = float(rng.uniform(margin + 0.05, 1.0 - margin - 0.05))
    if dx != 0:
        x0 = along if dx > 0 else 1.0 - along
        start = (x0, across)
    else:
        y0 = along if dy > 0 else 1.0 - along
        start = (across, y0)
    if layout.grid > 0:
        # rounding (no random draw, so the stream stays the same) moves the start by at most
        # grid / 2 pixels, which the margin's 2 px and the shapes' slack below 1.3 r absorb
        step = layout.grid / 128.0
        start = (round(start[0] / step) * step, round(start[1] / step) * step)
    return ClipSpec(colour, shape, direction, background, speed, _jitter(COLOURS[colour], rng, 12),
                    _background(background, rng), radius, start, dist, layout.square)


# ---------------------------------------------------------------------------------------------
# rendering


def shape_coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float,
                   square: float = SQUARE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (negative inside), 1 px ramp;
    a square has half side `square` x r."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        h = square * r
        sd = np.maximum(np.abs(dx), np.abs(dy)) - h
    elif shape == "triangle":
        # upward equilateral triangle with circumradius R: three half-planes
        big = 1.35 * r
        half = big * 0.5  # inradius
        n1 = dy - half  # bottom edge
        n2 = -0.8660254 * dx - 0.5 * dy - half
        n3 = 0.8660254 * dx - 0.5 * dy - half
        sd = np.maximum(n1, np.maximum(n2, n3))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sd, 0.0, 1.0)


def render_clip(spec: ClipSpec, size: int = 128, frames: int = 17) -> np.ndarray:
    """uint8 [frames, size, size, 3] video of `spec` (constant velocity along its direction)."""
    s = size / 128.0
    grid = (np.arange(size, dtype=np.float32) + 0.5)
    xs, ys = grid[None, :], grid[:, None]
    a, b, vertical = spec.bg
    ramp = (ys if vertical else xs) / size  # [H,1] or [1,W]
    a_ = np.asarray(a, np.float32)
    b_ = np.asarray(b, np.float32)
    bg = a_ + (b_ - a_) * ramp[..., None]
    bg = np.broadcast_to(bg, (size, size, 3))
    obj = np.asarray(spec.rgb, np.float32)
    dx, dy = DIRECTION_VECTORS[spec.direction]
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        f = i / max(frames - 1, 1)
        cx = (spec.start[0] + dx * spec.distance * f) * size
        cy = (spec.start[1] + dy * spec.distance * f) * size
        cov = shape_coverage(spec.shape, xs, ys, cx, cy, spec.radius * s, spec.square)[..., None]
        out[i] = np.clip(bg * (1 - cov) + obj * cov + 0.5, 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# captions

_SHAPE_WORDS = {
    "circle": ("circle", "circle", "circle", "ball", "disc", "dot", "round shape"),
    "square": ("square", "square", "square", "box", "block", "square shape"),
    "triangle": ("triangle", "triangle", "triangle", "triangle shape", "triangular shape"),
}
_COLOUR_WORDS = {"purple": ("purple", "purple", "violet"), "white": ("white", "white", "bright white")}
_DIRECTION_PHRASES = {
    "left": ("left", "to the left", "leftward", "leftwards", "towards the left"),
    "right": ("right", "to the right", "rightward", "rightwards", "towards the right"),
    "up": ("up", "upward", "upwards", "to the top", "towards the top"),
    "down": ("down", "downward", "downwards", "to the bottom", "towards the bottom"),
}
_VERBS = ("moving", "going", "sliding", "gliding", "drifting", "travelling", "traveling", "heading")
_VERBS_3RD = ("moves", "goes", "slides", "glides", "drifts", "travels", "heads")
_VERTICAL_VERBS = {"up": ("rising", "rises", "floating up"), "down": ("falling", "falls", "sinking")}
_SPEED_WORDS = {"slow": ("slowly",), "fast": ("quickly", "fast", "rapidly"), "normal": ("",)}
_BG_PHRASES = {
    "dark": ("on a dark background", "on a black background", "against a dark background"),
    "light": ("on a light background", "on a white background", "against a light background"),
    "gradient": ("on a gradient background", "over a gradient", "against a gradient background"),
}


def caption_for(spec: ClipSpec, rng: np.random.Generator, canonical_prob: float = 0.35) -> str:
    """The canonical caption with probability `canonical_prob`, else a random paraphrase."""
    if rng.random() < canonical_prob:
        return canonical_caption(spec.colour, spec.shape, spec.direction)
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    colour = pick(_COLOUR_WORDS.get(spec.colour, (spec.colour,)))
    shape = pick(_SHAPE_WORDS[spec.shape])
    dir_phrase = pick(_DIRECTION_PHRASES[spec.direction])
    speed = pick(_SPEED_WORDS[spec.speed]) if rng.random() < 0.6 else ""
    verb = pick(_VERBS)
    motion = f"{verb} {dir_phrase}"
    if spec.direction in _VERTICAL_VERBS and rng.random() < 0.2:
        motion = pick(_VERTICAL_VERBS[spec.direction])
    if speed:
        motion = f"{motion} {speed}" if rng.random() < 0.5 else f"{speed} {motion}"
    article = "an" if colour[0] in "aeiou" else "a"
    form = int(rng.integers(0, 7))
    if form == 0:
        text = f"{article} {colour} {shape} {motion}"
    elif form == 1:
        text = f"the {colour} {shape} {pick(_VERBS_3RD)} {dir_phrase}"
    elif form == 2:
        text = f"{colour} {shape} {motion}"
    elif form == 3:
        text = f"a {shape} that is {colour}, {motion}"
    elif form == 4:
        text = f"{article} {colour} {shape}, {motion}"
    elif form == 5:
        text = f"{article} {colour} {shape} {motion} {pick(_BG_PHRASES[spec.background])}"
    else:
        text = f"{pick(_BG_PHRASES[spec.background])}, {article} {colour} {shape} {motion}"
    text = " ".join(text.split())
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        text += "."
    return text



def caption_for_row(row: list[str], rng: np.random.Generator, shape: str | None = None) -> str:
    """`caption_for` of a clip stored as a latent-set row [colour, shape, direction, background,
    speed], optionally as another `shape`."""
    colour, own_shape, direction, background, speed = row
    # captions read only the words; the drawing fields are placeholders
    clip = ClipSpec(colour, shape or own_shape, direction, background, speed, (0, 0, 0),
                    ((0, 0, 0), (0, 0, 0), False), 0.0, (0.0, 0.0), 0.0)
    return caption_for(clip, rng)

def caption_corpus(seed: int = 0, n: int = 20000) -> list[str]:
    """Captions for tokenizer training: every canonical caption (held-out ones included, since
    the words themselves are all seen in training) plus `n` random paraphrases."""
    rng = np.random.default_rng(seed)
    lines = [canonical_caption(*c) for c in all_combos()]
    for _ in range(n):
        lines.append(caption_for(sample_spec(rng, combos=all_combos()), rng, canonical_prob=0.0))
    return lines


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """Independent, reproducible random stream of clip `index` of a dataset with `seed`."""
    return np.random.default_rng([seed, index])


def make_clip(seed: int, index: int, size: int = 128, frames: int = 17,
              combos: list[tuple[str, str, str]] | None = None,
              layout: Layout = LAYOUT) -> tuple[np.ndarray, str, ClipSpec]:
    """Clip `index` of the dataset `seed`: (video uint8 [T,H,W,3], caption, spec)."""
    rng = clip_rng(seed, index)
    spec = sample_spec(rng, combos=combos, layout=layout)
    return render_clip(spec, size, frames), caption_for(spec, rng), spec
