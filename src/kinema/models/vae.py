"""The Wan causal video VAEs (Wan2.1: stride 4x8x8, z 16; Wan2.2: patchified, 4x16x16, z 48).

Parameter names equal the official `WanVAE_` state-dict keys (`Wan2.1_VAE.pth`,
`Wan2.2_VAE.pth`). Both models run causally in chunks: the encoder sees frame 0 alone, then
4 frames at a time; the decoder one latent frame at a time. Every cached causal conv keeps the
tail of its previous input in a `CausalCache` slot, which makes chunked execution equal to a
causal conv over the whole clip, except in the temporal resamplers whose first-chunk rules the
official code defines (reproduced here, see `Resample`).

This module holds the shared blocks, the Wan2.1 encoder/decoder and the `WanVAE` wrapper;
the Wan2.2 residual stages live in `vae22.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kinema.config import VAEConfig

CACHE_T = 2  # frames of context a 3-tap causal conv needs from the previous chunk
ENCODE_CHUNK = 4  # frames per encoder chunk after the first (official schedule 1, 4, 4, ...)


class CausalCache:
    """Per-call state of chunked causal processing.

    Holds one slot per cached conv, claimed in forward order; the counter is reset at the start
    of every chunk so each conv finds its own slot again. Create a fresh one per encode/decode.
    """

    def __init__(self) -> None:
        self.slots: list[Tensor | None] = []
        self.index = 0

    def begin_chunk(self) -> None:
        self.index = 0

    def peek(self) -> Tensor | None:
        """What the next slot holds, without claiming it (None on the first chunk)."""
        return self.slots[self.index] if self.index < len(self.slots) else None

    def swap(self, value: Tensor) -> Tensor | None:
        """Claim the next slot: store `value` there and return what it held before."""
        idx = self.index
        self.index += 1
        if idx == len(self.slots):
            self.slots.append(None)
        old, self.slots[idx] = self.slots[idx], value
        return old

    def exchange(self, x: Tensor) -> Tensor | None:
        """Generic conv rule: remember the last CACHE_T frames of `x`, return the old context.

        A 1-frame chunk is completed with the last frame of the old context, so the stored
        context always holds the real preceding frames.
        """
        old = self.peek()
        new = x[:, :, -CACHE_T:]
        if new.shape[2] < CACHE_T and old is not None:
            new = torch.cat([old[:, :, -1:], new], dim=2)
        else:
            new = new.clone()  # a view would keep the whole chunk alive
        return self.swap(new)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: `2*p_t` zero frames in front (or cached frames), none behind."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        p_t, p_h, p_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * p_t
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self.space_pad = (p_w, p_w, p_h, p_h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        front = self.time_pad
        if context is not None and front > 0:
            x = torch.cat([context, x], dim=2)
            front -= context.shape[2]
        if front or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, front, 0))
        if x.device.type == "cpu" and self.groups == 1 and self.dilation == (1, 1, 1):
            return self._as_conv2d(x)
        return super().forward(x)

    def _as_conv2d(self, x: Tensor) -> Tensor:
        """The same convolution as one conv2d per time tap, summed. PyTorch's CPU conv3d is
        4-5x slower than its conv2d on AVX2 machines (193 vs 43 ms for a 24-channel 3x3x3 conv
        over 4 frames of 128x128, `benchmarks/conv3d_cpu_bench.py`), and the VAE is mostly such
        convs; the frames of a chunk become the conv2d batch."""
        b, c, t, h, w = x.shape
        kt, st = self.kernel_size[0], self.stride[0]
        t_out = (t - kt) // st + 1
        out = None
        for k in range(kt):
            frames = x[:, :, k: k + st * (t_out - 1) + 1: st]  # [B, C, t_out, H, W]
            frames = frames.transpose(1, 2).reshape(b * t_out, c, h, w)
            y = F.conv2d(frames, self.weight[:, :, k], self.bias if k == 0 else None, stride=self.stride[1:])
            out = y if out is None else out + y
        return out.reshape(b, t_out, *out.shape[1:]).transpose(1, 2)


def cached_conv(conv: CausalConv3d, x: Tensor, cache: CausalCache) -> Tensor:
    """Run a cached causal conv: its context is the tail of the previous chunk's input."""
    return conv(x, cache.exchange(x))


class RMS_norm(nn.Module):
    """L2-normalize over channels (eps 1e-12), times sqrt(C) and a per-channel `gamma`."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """[norm, SiLU, conv3, norm, SiLU, dropout, conv3] + (1x1 conv shortcut when widths differ)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (frames folded into batch)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        # [bt, 3c, h, w] -> [bt, 1, hw, 3c] -> q, k, v each [bt, 1, hw, c]
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class _NearestUp2x(nn.Module):
    """Nearest(-exact) x2 spatial upsampling; for a factor of 2 it is an exact copy per pixel."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class Resample(nn.Module):
    """Spatial (and optionally temporal) down/upsampling of a [B, C, T, H, W] tensor.

    `out_dim` is the spatial conv's output width for upsampling (Wan2.1 halves it, Wan2.2 keeps it).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            # pad right/bottom by one, then 3x3 stride-2 conv without padding
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: Tensor, cache: CausalCache) -> Tensor:
        if cache.peek() is None:
            # First chunk: no temporal step (1 frame stays 1 frame). The official code leaves a
            # marker that makes the second chunk use zero padding and keep [zeros, its frame] as
            # context; a one-frame zero context gives exactly that through the generic rule.
            cache.swap(torch.zeros_like(x[:, :, -1:]))
            return x
        x = self.time_conv(x, cache.exchange(x))
        b, c2, t, h, w = x.shape
        # channel halves [c0 | c1] become consecutive frames: frame 2k <- c0[k], 2k+1 <- c1[k]
        x = x.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)
        return x.reshape(b, c2 // 2, t * 2, h, w)

    def _time_downsample(self, x: Tensor, cache: CausalCache) -> Tensor:
        old = cache.swap(x[:, :, -1:].clone())
        if old is None:
            return x  # first chunk: the single frame passes through untouched
        # stride-2 temporal conv over [previous chunk's last frame, this chunk]
        return self.time_conv(torch.cat([old, x], dim=2))


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel index c*p*p + w_off*p + h_off."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)  # dims: b c t h q w r (q = h_off, r = w_off)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Exact inverse of `patchify`."""
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)  # dims: b c r q t h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


def run_head(head: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    for layer in head:
        x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


def middle_blocks(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_blocks(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(RMS_norm(dim), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))


class Encoder3d(nn.Module):
    """Wan2.1 encoder: flat `downsamples` list of residual/attention blocks and resamplers."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales,
                 temperal_downsample) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = middle_blocks(dims[-1])
        self.head = head_blocks(dims[-1], z_dim)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """Wan2.1 decoder: flat `upsamples` list; each upsampler halves the width."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales,
                 temperal_upsample) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
                layers.append(Resample(out_dim, mode, out_dim=out_dim // 2))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = head_blocks(dims[-1], 3)

    def forward(self, x: Tensor, cache: CausalCache, first_chunk: bool = False) -> Tensor:
        x = cached_conv(self.conv1, x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return run_head(self.head, x, cache)


class WanVAE(nn.Module):
    """A Wan video VAE (official `WanVAE_` keys) with normalized-latent encode/decode.

    The latent mean/std are not parameters: they are rebuilt from `cfg` on each call, so the
    model can be created on the meta device and loaded with `assign=True`.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.version not in ("2.1", "2.2"):
            raise ValueError(f"unknown VAE version {cfg.version!r}")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError("latents_mean/latents_std must have z_dim entries")
        self.cfg = cfg
        args = (cfg.z_dim * 2, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales)
        up = tuple(cfg.temperal_downsample[::-1])
        if cfg.version == "2.1":
            self.encoder = Encoder3d(cfg.dim, *args, cfg.temperal_downsample)
            self.decoder = Decoder3d(cfg.dim, cfg.z_dim, *args[1:], up)
        else:
            # Imported here: vae22 builds on the blocks defined in this module.
            from kinema.models.vae22 import Decoder3d22, Encoder3d22

            self.encoder = Encoder3d22(cfg.dim, *args, cfg.temperal_downsample)
            self.decoder = Decoder3d22(cfg.dec_dim or cfg.dim, cfg.z_dim, *args[1:], up)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _scale(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] float32, like the official wrapper's `scale`."""
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def _check_video(self, video: Tensor) -> None:
        s = self.cfg.spatial_stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE encode expects a video [B, 3, T, H, W], got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % ENCODE_CHUNK != 0:
            raise ValueError(f"VAE encode needs 1 + 4n frames, got {t}")
        if h == 0 or w == 0 or h % s or w % s:
            raise ValueError(f"VAE encode needs height and width multiples of {s}, got {h}x{w}")

    def encode_moments(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var) [B, z, 1+(T-1)/4, H/s, W/s] before normalization, in the module dtype.

        Differentiable (training goes through it); `encode` is the inference wrapper.
        """
        self._check_video(video)
        x = video.to(device=self.device, dtype=self.dtype)
        if self.cfg.patch_size > 1:
            x = patchify(x, self.cfg.patch_size)
        cache = CausalCache()
        # chunks [0:1], [1:5], [5:9], ...: each yields one latent frame
        bounds = [0, *range(1, x.shape[2] + 1, ENCODE_CHUNK)]
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            cache.begin_chunk()
            outs.append(self.encoder(x[:, :, lo:hi], cache))
        h = self.conv1(torch.cat(outs, dim=2))
        return h[:, : self.cfg.z_dim], h[:, self.cfg.z_dim:]

    def encode(self, video: Tensor) -> Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalized mean latent [B, z, 1+(T-1)/4, H/s, W/s]."""
        with torch.no_grad():
            mu = self.encode_moments(video)[0].float()
            mean, inv_std = self._scale(mu.device)
            return (mu - mean) * inv_std

    def decode_chunks(self, z: Tensor, clamp: bool = True) -> Iterator[Tensor]:
        """Decode a normalized latent one latent frame at a time, yielding float32 video pieces
        [B, 3, t, H, W] (t = 1 for latent frame 0, then 4 each)."""
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"VAE decode expects a latent [B, {self.cfg.z_dim}, T, H, W], got {tuple(z.shape)}")
        return self._decode_iter(z, clamp)

    def decode_raw_chunks(self, z_raw: Tensor) -> Iterator[Tensor]:
        """Un-normalized latent -> unclamped float32 video pieces, one latent frame at a time.

        Differentiable (training goes through it); `decode_chunks` is the inference wrapper.
        """
        x = self.conv2(z_raw.to(device=self.device, dtype=self.dtype))
        cache = CausalCache()
        for i in range(x.shape[2]):
            cache.begin_chunk()
            out = self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0)
            if self.cfg.patch_size > 1:
                out = unpatchify(out, self.cfg.patch_size)
            yield out.float()

    def _decode_iter(self, z: Tensor, clamp: bool) -> Iterator[Tensor]:
        with torch.no_grad():
            z = z.to(device=self.device, dtype=torch.float32)
            mean, inv_std = self._scale(z.device)
            # official denormalization: divide by the stored reciprocal, then add the mean
            chunks = self.decode_raw_chunks(z / inv_std + mean)
        while True:
            # no_grad per chunk only: grad mode must not leak to the caller across yields
            with torch.no_grad():
                out = next(chunks, None)
                if out is None:
                    return
                if clamp:
                    out = out.clamp_(-1.0, 1.0)
            yield out

    def decode(self, z: Tensor, clamp: bool = True) -> Tensor:
        """Normalized latent [B, z, T', H', W'] -> float32 video [B, 3, 1+4(T'-1), H, W]."""
        return torch.cat(list(self.decode_chunks(z, clamp)), dim=2)
