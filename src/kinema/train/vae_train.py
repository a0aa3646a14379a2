"""Training of the small Wan2.2-style VAE (reconstruction objective on the mean latent).

The forward used for training runs the very modules and chunk schedule of `WanVAE.encode` /
`WanVAE.decode` (patchify, chunks 1, 4, 4, ... through one `CausalCache`, one latent frame at a
time on the way back), only with gradients enabled, so gradients flow through the chunk caches
and training sees exactly what inference computes (tests check the equality).

After training, the latent statistics are folded into `conv1`/`conv2` (`fold_latent_stats`), so
the model normalizes its latents with the standard Wan2.2 constants that every loader applies
to a 48-channel VAE, and the DiT sees roughly unit-variance latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WAN22_LATENT_MEAN, WAN22_LATENT_STD, VAEConfig
from ..models.vae import WanVAE
from .data import LAYOUT, Layout, make_clip, train_combos


@dataclass(frozen=True)
class VAETrainSpec:
    """Architecture and data of the VAE step."""

    dim: int = 12
    dec_dim: int = 24
    z_dim: int = 48
    batch: int = 8
    frames: int = 9  # 1 + 4 + 4: covers the first-chunk rules and the steady state
    crop: int = 32  # small crops: many cheap steps early on
    # From this step on, whole frames (`full_batch` clips a step): a VAE trained only on small
    # crops learns to lean on the nearby zero padding and fills the interior of a full frame
    # with garbage (measured at step 800: grid-like artifacts over every background).
    full_from: int | None = 900
    full_batch: int = 1
    latent_noise: float = 0.1  # std of the noise added to the mean latent while training
    l2_weight: float = 1e-3  # keeps the latent scale in check (so the noise stays meaningful)
    fg_weight: float = 4.0  # extra weight on pixels that differ from the frame's median (the object)
    # Weight of an L1 loss on spatial image gradients. Edges are ~1% of the pixels, so the
    # per-pixel loss barely notices a rounded corner. Tried at 5 (benchmarks/builtin_eval.md,
    # session 7): corners stayed soft; 0 keeps the shipped recipe's loss.
    grad_weight: float = 0.0

    def vae_config(self) -> VAEConfig:
        return VAEConfig(version="2.2", dim=self.dim, dec_dim=self.dec_dim, z_dim=self.z_dim,
                         latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD)


def encode_raw(vae: WanVAE, video: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, log_var) before normalization: the very chunked path of `WanVAE.encode`, with grads."""
    return vae.encode_moments(video)


def decode_raw(vae: WanVAE, z_raw: Tensor) -> Tensor:
    """Un-normalized latent -> unclamped video: the very chunked path of `WanVAE.decode`, with grads."""
    return torch.cat(list(vae.decode_raw_chunks(z_raw)), dim=2)


def init_for_training(vae: WanVAE) -> WanVAE:
    """Zero the last conv of every residual block, so each block starts as the identity.

    At small widths a randomly initialized residual stack drowns the input signal, and the
    VAE spends hundreds of steps predicting a mean colour; starting from identity blocks, the
    parameter-free AvgDown/DupUp shortcuts carry the image through from step 0.
    """
    from ..models.vae import ResidualBlock

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResidualBlock):
                module.residual[6].weight.zero_()
                module.residual[6].bias.zero_()
    return vae


def clips_to_tensor(clips: list[np.ndarray]) -> Tensor:
    """uint8 [T, H, W, 3] clips -> float [B, 3, T, H, W] in [-1, 1]."""
    arr = np.stack(clips).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 4, 1, 2, 3).contiguous()


def vae_batch(spec: VAETrainSpec, seed: int, step: int, layout: Layout = LAYOUT) -> Tensor:
    """Training batch of `step`: random windows of procedural clips, cropped around the object."""
    rng = np.random.default_rng([seed, 7, step])
    full = spec.full_from is not None and step >= spec.full_from
    batch = spec.full_batch if full else spec.batch
    clips = []
    for j in range(batch):
        video, _, clip = make_clip(seed + 1000, step * spec.batch + j, combos=train_combos(), layout=layout)
        t0 = int(rng.integers(0, video.shape[0] - spec.frames + 1))
        video = video[t0:t0 + spec.frames]
        size = video.shape[1]
        c = size if full else spec.crop
        if c < size:
            if rng.random() < 0.8:  # usually keep the object inside the crop
                f = (t0 + spec.frames / 2) / 16.0
                from .data import DIRECTION_VECTORS

                dx, dy = DIRECTION_VECTORS[clip.direction]
                cx = (clip.start[0] + dx * clip.distance * f) * size
                cy = (clip.start[1] + dy * clip.distance * f) * size
                x0 = int(np.clip(cx - c / 2 + rng.integers(-12, 13), 0, size - c))
                y0 = int(np.clip(cy - c / 2 + rng.integers(-12, 13), 0, size - c))
            else:
                x0, y0 = (int(v) for v in rng.integers(0, size - c + 1, size=2))
            video = video[:, y0:y0 + c, x0:x0 + c]
        clips.append(np.ascontiguousarray(video))
    return clips_to_tensor(clips)


def weighted_recon_loss(recon: Tensor, video: Tensor, fg_weight: float) -> Tensor:
    """L1 + L2 of [B, 3, T, H, W] videos; object pixels are few, so pixels far from the frame's
    median colour weigh `1 + fg_weight`."""
    median = video.flatten(3).median(dim=3).values[..., None, None]
    weight = 1.0 + fg_weight * ((video - median).abs().amax(dim=1, keepdim=True) > 0.15).float()
    err = recon - video
    return (weight * (err.abs() + err.square())).mean()


def edge_loss(recon: Tensor, video: Tensor) -> Tensor:
    """L1 between the horizontal and vertical pixel differences of two [B, 3, T, H, W] videos."""
    err = recon - video  # the difference of gradients is the gradient of the difference
    return (err.diff(dim=4).abs().mean() + err.diff(dim=3).abs().mean()) / 2


def reconstruction_loss(recon: Tensor, video: Tensor, fg_weight: float,
                        grad_weight: float) -> tuple[Tensor, dict[str, float]]:
    """The pixel loss shared by VAE training and decoder tuning: weighted L1 + L2, plus the edge
    term when `grad_weight` is set."""
    rec = weighted_recon_loss(recon, video, fg_weight)
    stats = {"rec": float(rec.detach())}
    if not grad_weight:
        return rec, stats
    edge = edge_loss(recon, video)
    return rec + grad_weight * edge, {**stats, "edge": float(edge.detach())}


def vae_loss(vae: WanVAE, spec: VAETrainSpec, video: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    # Inference only ever uses the mean latent, so train on it directly (a sampled posterior
    # with a learned variance starts out as pure noise and slows learning down a lot); a little
    # fixed noise keeps the decoder tolerant of the DiT's imperfect latents.
    mu, _ = encode_raw(vae, video)
    z = mu + spec.latent_noise * torch.randn(mu.shape, generator=gen)
    recon = decode_raw(vae, z).float()  # float32 loss under bf16 autocast
    rec, stats = reconstruction_loss(recon, video, spec.fg_weight, spec.grad_weight)
    l2 = mu.float().square().mean()
    return rec + spec.l2_weight * l2, {**stats, "l2": float(l2.detach())}


def make_vae_loss_fn(vae: WanVAE, spec: VAETrainSpec, seed: int, layout: Layout = LAYOUT):
    def loss_fn(step: int, gen: torch.Generator):
        return vae_loss(vae, spec, vae_batch(spec, seed, step, layout), gen)
    return loss_fn


@torch.no_grad()
def latent_stats(vae: WanVAE, videos: Tensor, batch: int = 4) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the raw mean latent over `videos` [N, 3, T, H, W]."""
    mus = [encode_raw(vae, videos[i:i + batch])[0] for i in range(0, videos.shape[0], batch)]
    mu = torch.cat(mus).transpose(0, 1).flatten(1)  # [z, N*T*h*w]
    return mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-3)


@torch.no_grad()
def fold_latent_stats(vae: WanVAE, mean: Tensor, std: Tensor) -> None:
    """Rewrite conv1/conv2 so that `vae.encode` (normalizing with vae.cfg's constants) yields
    (mu - mean) / std, and `vae.decode` inverts it. Both convs are 1x1x1, i.e. affine maps."""
    z = vae.cfg.z_dim
    m_ref = torch.tensor(vae.cfg.latents_mean, dtype=torch.float32)
    s_ref = torch.tensor(vae.cfg.latents_std, dtype=torch.float32)
    mean, std = mean.float(), std.float()
    # encoder: mu' = a * mu + b with a = s_ref / std, b = m_ref - a * mean
    a = s_ref / std
    b = m_ref - a * mean
    w1, b1 = vae.conv1.weight, vae.conv1.bias  # [2z, 2z, 1, 1, 1], [2z]
    w1[:z] *= a.view(z, 1, 1, 1, 1).to(w1.dtype)
    b1[:z] = (a * b1[:z].float() + b).to(b1.dtype)
    # decoder: conv2 sees x' = z_n * s_ref + m_ref but was trained on x = z_n * std + mean
    # = x' * c + d with c = std / s_ref, d = mean - m_ref * c
    c = std / s_ref
    d = mean - m_ref * c
    w2, b2 = vae.conv2.weight, vae.conv2.bias  # [z, z, 1, 1, 1]
    b2.copy_((b2.float() + w2.float()[:, :, 0, 0, 0] @ d).to(b2.dtype))
    w2.mul_(c.view(1, z, 1, 1, 1).to(w2.dtype))


@dataclass(frozen=True)
class DecoderTuneSpec:
    """Decoder fine-tuning on the stored latents of whole clips (the DiT trains on the same
    frozen encoder's latents), so every latent frame position of inference is trained."""

    batch: int = 1
    latent_crop: int = 4  # latent cells per side of a training crop (x16 pixels)
    full_frame_prob: float = 1.0  # whole frames: crops teach the decoder border habits
    latent_noise: float = 0.1  # in normalized latent units: tolerance to the DiT's errors
    fg_weight: float = 4.0
    grad_weight: float = 0.0  # edge term, as in VAETrainSpec


def decoder_batch(spec: DecoderTuneSpec, latents: Tensor, seed: int, clip_seed: int, step: int,
                  size: int, frames: int, stride: int, layout: Layout = LAYOUT) -> tuple[Tensor, Tensor]:
    """(normalized latent crop, matching video crop) from the stored training latents: the
    clips are re-rendered (they are a pure function of their index) instead of re-encoded."""
    rng = np.random.default_rng([seed, 13, step])
    idx = rng.integers(0, latents.shape[0], size=spec.batch)
    clips = [make_clip(clip_seed, int(i), size, frames, combos=train_combos(), layout=layout)[0] for i in idx]
    video = clips_to_tensor(clips)
    z = latents[torch.from_numpy(idx)].float()
    n = z.shape[-1]
    if rng.random() >= spec.full_frame_prob and spec.latent_crop < n:
        c = spec.latent_crop
        y0, x0 = (int(v) for v in rng.integers(0, n - c + 1, size=2))
        z = z[..., y0:y0 + c, x0:x0 + c]
        video = video[..., y0 * stride:(y0 + c) * stride, x0 * stride:(x0 + c) * stride]
    return z, video


def decode_normalized(vae: WanVAE, z: Tensor) -> Tensor:
    """`WanVAE.decode` with gradients (no clamp): denormalize with the config constants, then
    the same per-latent-frame schedule."""
    mean, inv_std = vae._scale(z.device)
    return decode_raw(vae, z / inv_std + mean)


def make_decoder_loss_fn(vae: WanVAE, spec: DecoderTuneSpec, latents: Tensor, seed: int, clip_seed: int,
                         size: int, frames: int, cycle: int = 1, layout: Layout = LAYOUT):
    def loss_fn(step: int, gen: torch.Generator):
        # every cycle draws its own batches; cycle 1 keeps the stream of the original run
        batch_seed = seed if cycle == 1 else seed + 7919 * cycle
        z, video = decoder_batch(spec, latents, batch_seed, clip_seed, step, size, frames, vae.cfg.spatial_stride,
                                 layout)
        z = z + spec.latent_noise * torch.randn(z.shape, generator=gen)
        recon = decode_normalized(vae, z).float()  # float32 loss under bf16 autocast
        return reconstruction_loss(recon, video, spec.fg_weight, spec.grad_weight)
    return loss_fn


def _out_index(old: int, new: int, groups: int) -> Tensor:
    """Where the `old` output channels of a layer land among its `new` ones. Layers whose output
    is `groups` stacked blocks (time_conv: 2 frames, to_qkv: q, k, v) keep each block's prefix."""
    c_old, c_new = old // groups, new // groups
    i = torch.arange(old)
    return (i // c_old) * c_new + i % c_old


@torch.no_grad()
def widen_decoder(old: WanVAE, new: WanVAE, eps: float = 1e-2, seed: int = 0) -> WanVAE:
    """Copy `old` into `new`, whose decoder is wider (larger `dec_dim`), so that `new` decodes
    like `old` (to ~1e-5) yet its extra channels can learn (net2net-style widening).

    Each old channel keeps its index (the first channels of every layer: the parameter-free
    DupUp3D shortcuts then still route old channels to old channels). Extra output channels
    start small and random (eps x the layer's init scale), extra input channels start at zero
    weight, so at first they barely touch the old function, yet get gradients at once. The
    RMS norms scale by sqrt(C), and the attention by 1/sqrt(C): both are rescaled to match.
    """
    from ..models.vae import AttentionBlock, RMS_norm

    old_width, new_width = (v.cfg.dec_dim or v.cfg.dim for v in (old, new))
    if new_width < old_width:
        raise ValueError(f"cannot widen a decoder of dec_dim {old_width} to a narrower {new_width}")
    gen = torch.Generator().manual_seed(seed)
    new.load_state_dict({k: v for k, v in old.state_dict().items() if not k.startswith("decoder.")},
                        strict=False)
    old_modules = dict(old.decoder.named_modules())
    for name, m in new.decoder.named_modules():
        o = old_modules[name]
        if isinstance(m, RMS_norm):
            c_old, c_new = o.gamma.shape[0], m.gamma.shape[0]
            gamma = o.gamma * (c_old / c_new) ** 0.5
            m.gamma.fill_(float(gamma.mean()))
            m.gamma[:c_old] = gamma
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            groups = 2 if name.endswith("time_conv") else 3 if name.endswith("to_qkv") else 1
            rows = _out_index(o.weight.shape[0], m.weight.shape[0], groups)
            cols = torch.arange(o.weight.shape[1])
            w = torch.randn(m.weight.shape, generator=gen) * float(m.weight.std()) * eps
            w[:, cols.numel():] = 0.0
            w[rows[:, None], cols[None, :]] = o.weight
            extra_rows = torch.ones(m.weight.shape[0], dtype=torch.bool)
            extra_rows[rows] = False
            w[extra_rows, cols.numel():] = torch.randn(w[extra_rows, cols.numel():].shape, generator=gen) \
                * float(m.weight.std()) * eps
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
                m.bias[rows] = o.bias
    for name, m in new.decoder.named_modules():  # after the copies above
        if isinstance(m, AttentionBlock):
            # logits are q.k / sqrt(C): scale q so the wider block attends as before
            c = m.proj.weight.shape[0]
            ratio = (c / old_modules[name].proj.weight.shape[0]) ** 0.5
            m.to_qkv.weight[:c] *= ratio
            m.to_qkv.bias[:c] *= ratio
    return new
