"""Architecture configs (frozen dataclasses) and named presets per released checkpoint.

Architecture lives in `DiTConfig`, `VAEConfig` and `T5Config`; how a model is sampled by
default (size, steps, guidance, ...) lives apart in `SamplingDefaults`. A `ModelSpec` ties
one released checkpoint's architecture to its sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

ModelType = Literal["t2v", "i2v", "ti2v"]


@dataclass(frozen=True)
class DiTConfig:
    """The Wan diffusion transformer (official `WanModel` constructor arguments)."""

    model_type: ModelType = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class VAEConfig:
    """A Wan causal video VAE. `version` "2.1" (4x8x8, z 16) or "2.2" (patchified, 4x16x16, z 48)."""

    version: Literal["2.1", "2.2"] = "2.1"
    dim: int = 96
    dec_dim: int | None = None  # Wan2.2 only: decoder base width (None -> same as dim)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling
    latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENT_STD

    @property
    def patch_size(self) -> int:
        """Pixel (un)shuffle factor applied outside the conv stack (Wan2.2 only)."""
        return 2 if self.version == "2.2" else 1

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class T5Config:
    """The umT5 encoder (official `T5Encoder` arguments)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    shared_pos: bool = False
    eps: float = 1e-6
    text_len: int = 512


# The official default negative prompt, applied whenever the user gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is sampled when the user does not say otherwise."""

    size: tuple[int, int] = (1280, 720)  # (width, height)
    frames: int = 81
    fps: int = 16
    steps: int = 40
    # One scale, or (low-noise, high-noise) for two-expert models: the official order.
    guidance: float | tuple[float, float] = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    # Two-expert models: the high-noise expert runs while t >= boundary * 1000.
    boundary: float | None = None
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    supported_sizes: tuple[tuple[int, int], ...] = ()
    # TI2V models: make text-to-video in two passes of the same loop, an image (latent frame 0)
    # from the text first, then image-to-video from it (factorized generation, as in Emu Video).
    image_first: bool = False
    # The image-first pass draws the first frame this many times larger (width and height), then
    # shrinks it to the video size (area average) and encodes it: a model whose objects span
    # few DiT tokens may draw finer outlines with more (the built-in model: 1, see builtin_eval.md).
    image_first_scale: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """One released checkpoint: architecture of each component plus sampling defaults."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config = field(default_factory=T5Config)
    two_experts: bool = False
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    @property
    def task(self) -> str:
        return self.dit.model_type

    @property
    def supports_image(self) -> bool:
        return self.dit.model_type in ("i2v", "ti2v")

    @property
    def supports_text_only(self) -> bool:
        return self.dit.model_type in ("t2v", "ti2v")

    def with_defaults(self, **changes) -> "ModelSpec":
        return replace(self, defaults=replace(self.defaults, **changes))


VAE21 = VAEConfig(version="2.1", dim=96, z_dim=16)
VAE22 = VAEConfig(
    version="2.2", dim=160, dec_dim=256, z_dim=48,
    latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD,
)

_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

PRESETS: dict[str, ModelSpec] = {
    "ti2v-5B": ModelSpec(
        name="ti2v-5B",
        dit=DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336,
                      num_heads=24, num_layers=30),
        vae=VAE22,
        defaults=SamplingDefaults(size=(1280, 704), frames=121, fps=24, steps=50, guidance=5.0,
                                  shift=5.0, supported_sizes=((1280, 704), (704, 1280))),
    ),
    "t2v-A14B": ModelSpec(
        name="t2v-A14B",
        dit=DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae=VAE21,
        two_experts=True,
        defaults=SamplingDefaults(size=(1280, 720), frames=81, fps=16, steps=40,
                                  guidance=(3.0, 4.0), shift=12.0, boundary=0.875,
                                  supported_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832))),
    ),
    "i2v-A14B": ModelSpec(
        name="i2v-A14B",
        dit=DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae=VAE21,
        two_experts=True,
        defaults=SamplingDefaults(size=(1280, 720), frames=81, fps=16, steps=40,
                                  guidance=(3.5, 3.5), shift=5.0, boundary=0.900,
                                  supported_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832))),
    ),
    # Wan2.1 text-to-video models share the architecture (single expert, Wan2.1 VAE).
    "t2v-1.3B": ModelSpec(
        name="t2v-1.3B",
        dit=DiTConfig(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
        vae=VAE21,
        defaults=SamplingDefaults(size=(832, 480), frames=81, fps=16, steps=50, guidance=5.0,
                                  shift=5.0, supported_sizes=((832, 480), (480, 832))),
    ),
    "t2v-14B": ModelSpec(
        name="t2v-14B",
        dit=DiTConfig(model_type="t2v", **_A14B),
        vae=VAE21,
        defaults=SamplingDefaults(size=(1280, 720), frames=81, fps=16, steps=50, guidance=5.0,
                                  shift=5.0,
                                  supported_sizes=((1280, 720), (720, 1280), (832, 480), (480, 832))),
    ),
}


def preset(name: str) -> ModelSpec:
    """Look up a preset by name (e.g. "ti2v-5B", "t2v-A14B")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
