"""Sane ranges for everything a model folder or a request can set, checked before anything is built.

A config file or a weight header is untrusted input: `num_layers: 100000` builds 5 GB of meta
modules before failing, `text_len: 1e9` asks for a terabyte, `num_heads: 0` divides by zero and an
`fps` of 0 writes a file that plays at another rate than its sidecar says. Every bound here is far
outside what any released Wan model uses (the largest: 40 layers of width 5120, 512 text tokens,
1280x720, 121 frames), so a real checkpoint never meets one; each check names the file and field.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import CheckpointError, ModelFolderError

# Requests and sampling defaults.
MAX_SIDE = 8192  # pixels per side (8K); the 24 GiB planner figures stop far below
MAX_FRAMES = 1025
MAX_STEPS = 1000
MAX_FPS = 240.0
MAX_GUIDANCE = 100.0
MAX_SHIFT = 1000.0

# Architectures (DiT, umT5, VAE).
MAX_WIDTH = 32768  # model width, text width, FFN width
MAX_FFN = 131072
MAX_HEADS = 1024
MAX_LAYERS = 256
MAX_TEXT_LEN = 4096
MAX_CHANNELS = 1024
MAX_PATCH = 16
MAX_VOCAB = 1 << 20
MAX_VAE_DIM = 4096


def _fail(error: type[Exception], source: str, name: str, value: Any, rule: str) -> None:
    raise error(f"{source}: {name} = {value!r} is not {rule}")


def whole(value: Any, source: str, name: str, low: int, high: int,
          error: type[Exception] = ModelFolderError) -> int:
    """`value` as an int in [low, high] (bools and fractional numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        _fail(error, source, name, value, f"a whole number from {low} to {high}")
    if not low <= value <= high:
        _fail(error, source, name, value, f"from {low} to {high}")
    return int(value)


def real(value: Any, source: str, name: str, low: float, high: float, *, low_open: bool = False,
         error: type[Exception] = ModelFolderError) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with low_open)."""
    rule = (f"a finite number above {low:g} and at most {high:g}" if low_open
            else f"a finite number from {low:g} to {high:g}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(error, source, name, value, rule)
    if not ((value > low if low_open else value >= low) and value <= high):
        _fail(error, source, name, value, rule)
    return float(value)


def check_dit(cfg: Any, source: str) -> None:
    """A DiTConfig inferred from `source` (config.json + weight shapes)."""
    e = CheckpointError
    whole(cfg.dim, source, "dim", 1, MAX_WIDTH, e)
    whole(cfg.num_heads, source, "num_heads", 1, MAX_HEADS, e)
    if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
        raise e(f"{source}: dim {cfg.dim} does not split into {cfg.num_heads} heads of even width")
    whole(cfg.num_layers, source, "num_layers", 0, MAX_LAYERS, e)
    whole(cfg.ffn_dim, source, "ffn_dim", 1, MAX_FFN, e)
    whole(cfg.text_dim, source, "text_dim", 1, MAX_WIDTH, e)
    whole(cfg.text_len, source, "text_len", 1, MAX_TEXT_LEN, e)
    whole(cfg.in_dim, source, "in_dim", 1, MAX_CHANNELS, e)
    whole(cfg.out_dim, source, "out_dim", 1, MAX_CHANNELS, e)
    whole(cfg.freq_dim, source, "freq_dim", 2, MAX_WIDTH, e)
    if cfg.freq_dim % 2:
        raise e(f"{source}: freq_dim {cfg.freq_dim} must be even")
    for p in cfg.patch_size:
        whole(p, source, "patch_size", 1, MAX_PATCH, e)
    real(cfg.eps, source, "eps", 0.0, 0.1, low_open=True, error=e)


def check_t5(cfg: Any, source: str) -> None:
    e = CheckpointError
    whole(cfg.vocab, source, "vocab", 1, MAX_VOCAB, e)
    whole(cfg.dim, source, "dim", 1, MAX_WIDTH, e)
    whole(cfg.dim_attn, source, "dim_attn", 1, MAX_WIDTH, e)
    whole(cfg.dim_ffn, source, "dim_ffn", 1, MAX_FFN, e)
    whole(cfg.num_heads, source, "num_heads", 1, MAX_HEADS, e)
    if cfg.dim_attn % cfg.num_heads:
        raise e(f"{source}: dim_attn {cfg.dim_attn} is not divisible by {cfg.num_heads} heads")
    whole(cfg.num_layers, source, "num_layers", 1, MAX_LAYERS, e)
    whole(cfg.num_buckets, source, "num_buckets", 1, 4096, e)
    whole(cfg.max_dist, source, "relative_attention_max_distance", 1, 1 << 20, e)
    whole(cfg.text_len, source, "text_len", 1, MAX_TEXT_LEN, e)
    real(cfg.eps, source, "layer_norm_epsilon", 0.0, 0.1, low_open=True, error=e)


def check_vae(cfg: Any, source: str) -> None:
    e = CheckpointError
    whole(cfg.dim, source, "dim", 1, MAX_VAE_DIM, e)
    if cfg.dec_dim is not None:
        whole(cfg.dec_dim, source, "dec_dim", 1, MAX_VAE_DIM, e)
    whole(cfg.z_dim, source, "z_dim", 1, MAX_CHANNELS, e)
    whole(cfg.num_res_blocks, source, "num_res_blocks", 1, 16, e)
    if not 1 <= len(cfg.dim_mult) <= 8:
        raise e(f"{source}: dim_mult has {len(cfg.dim_mult)} entries, expected 1 to 8")
    for m in cfg.dim_mult:
        whole(m, source, "dim_mult", 1, 64, e)
    if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
        raise e(f"{source}: temperal_downsample needs {len(cfg.dim_mult) - 1} entries, "
                f"has {len(cfg.temperal_downsample)}")
    for m in cfg.latents_mean:
        real(m, source, "latents_mean", -1e4, 1e4, error=e)
    for s in cfg.latents_std:
        real(s, source, "latents_std", 0.0, 1e4, low_open=True, error=e)


def check_defaults(d: Any, source: str) -> None:
    """SamplingDefaults from a preset or a folder's kinema.json (fps 0 would play at 24 fps while
    the sidecar says 0; a NaN shift would sample garbage for minutes)."""
    width, height = d.size
    whole(width, source, "size width", 1, MAX_SIDE)
    whole(height, source, "size height", 1, MAX_SIDE)
    whole(d.frames, source, "frames", 1, MAX_FRAMES)
    real(d.fps, source, "fps", 0.0, MAX_FPS, low_open=True)
    whole(d.steps, source, "steps", 1, MAX_STEPS)
    for g in d.guidance if isinstance(d.guidance, tuple) else (d.guidance,):
        real(g, source, "guidance", 0.0, MAX_GUIDANCE)
    real(d.shift, source, "shift", 0.0, MAX_SHIFT, low_open=True)
    if d.boundary is not None:
        real(d.boundary, source, "boundary", 0.0, 1.0, low_open=True)
    whole(d.image_first_scale, source, "image_first_scale", 1, 8)
    for w, h in d.supported_sizes:
        whole(w, source, "supported_sizes width", 1, MAX_SIDE)
        whole(h, source, "supported_sizes height", 1, MAX_SIDE)
