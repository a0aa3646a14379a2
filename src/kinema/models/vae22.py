"""Wan2.2 VAE parts: residual down/up stages with parameter-free shortcuts.

Official key layout: `encoder.downsamples.{i}.downsamples.{j}` and
`decoder.upsamples.{i}.upsamples.{j}`; the shortcuts (`avg_shortcut`) hold no parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kinema.models.vae import (
    CausalCache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    head_blocks,
    middle_blocks,
    run_head,
    cached_conv,
)


class AvgDown3D(nn.Module):
    """Space/time-to-channel regrouping followed by averaging groups of channels (no params)."""

    def __init__(self, in_ch: int, out_ch: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        assert in_ch * factor % out_ch == 0
        self.group = in_ch * factor // out_ch

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        pad_t = (ft - x.shape[2] % ft) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))  # zero frames in front
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        # flat channel index ((c*ft + i_t)*fs + i_h)*fs + i_w
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_ch, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Channel-to-space/time expansion of repeated channels (no params); inverse layout of AvgDown3D."""

    def __init__(self, in_ch: int, out_ch: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        assert out_ch * factor % in_ch == 0
        self.repeats = out_ch * factor // in_ch

    def forward(self, x: Tensor, first_chunk: bool = False) -> Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.reshape(b, self.out_ch, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_ch, t * ft, h * fs, w * fs)
        if first_chunk:
            x = x[:, :, ft - 1:]  # the first latent frame yields one frame, not ft
        return x


class Down_ResidualBlock(nn.Module):
    """Encoder stage: res blocks (+ Resample) plus an AvgDown3D shortcut of the stage input."""

    def __init__(self, in_dim: int, out_dim: int, mult: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(mult):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.avg_shortcut(x)


class Up_ResidualBlock(nn.Module):
    """Decoder stage: res blocks (+ Resample keeping the width) plus a DupUp3D shortcut when upsampling."""

    def __init__(self, in_dim: int, out_dim: int, mult: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(mult):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache, first_chunk: bool = False) -> Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        if self.avg_shortcut is None:
            return h
        return h + self.avg_shortcut(x, first_chunk)


class Encoder3d22(nn.Module):
    """Wan2.2 encoder on patchified input (3*2*2 = 12 channels)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales,
                 temperal_downsample) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        stages = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = bool(temperal_downsample[i]) if i < len(temperal_downsample) else False
            stages.append(Down_ResidualBlock(in_dim, out_dim, num_res_blocks, temporal,
                                             down=i != len(dim_mult) - 1))
        self.downsamples = nn.Sequential(*stages)
        self.middle = middle_blocks(dims[-1])
        self.head = head_blocks(dims[-1], z_dim)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return run_head(self.head, x, cache)


class Decoder3d22(nn.Module):
    """Wan2.2 decoder emitting 12 patchified channels."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales,
                 temperal_upsample) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        stages = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = bool(temperal_upsample[i]) if i < len(temperal_upsample) else False
            stages.append(Up_ResidualBlock(in_dim, out_dim, num_res_blocks + 1, temporal,
                                           up=i != len(dim_mult) - 1))
        self.upsamples = nn.Sequential(*stages)
        self.head = head_blocks(dims[-1], 12)

    def forward(self, x: Tensor, cache: CausalCache, first_chunk: bool = False) -> Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk)
        return run_head(self.head, x, cache)
