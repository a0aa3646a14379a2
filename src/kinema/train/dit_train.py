"""Flow-matching training of the ti2v DiT jointly with the umT5-style text encoder.

Convention (identical to the sampler, `kinema.sampling`): x_s = (1 - s) x0 + s eps, the model
predicts v = eps - x0 from timestep t = 1000 s. s is drawn as S_shift(u) with u ~ U(0, 1) and
the sampler's shift map S_s(u) = s u / (1 + (s - 1) u), i.e. the training noise levels follow the
same warped grid the sampler walks.

TI2V: with probability `p_image` latent frame 0 is the clean latent, its tokens get timestep 0
and are left out of the loss (what `Pipeline.generate(image=...)` does at inference). Captions
are dropped (empty prompt) with probability `p_uncond` for classifier-free guidance.

Shape pairs (`pair_loss`): the same image scene drawn as two different shapes, noised with the
same noise at the same level. Besides the usual loss, the difference of the two predictions must
match the difference of the two targets, which is the shape and nothing else.

Text-to-image: `image_batch` more samples per step are single latent frames, the clips' first
latent frame (the causal VAE encodes frame 0 alone, so it is exactly an image latent). Like
Wan2.2's joint image/video training; the built-in model makes text-to-video in two passes, an
image first and then image-to-video (`Pipeline.generate`, `image_first`), and the image pass
is this task. Keyframes (`keyframe_batch`): the same task on frames drawn `keyframe_scale`
times larger (objects too), for an image pass that draws the first frame at that scale and
shrinks it (`SamplingDefaults.image_first_scale`): each object then spans that many times more
tokens per side (tried for the built-in model in session 10, not shipped: benchmarks/builtin_eval.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..config import DiTConfig, T5Config


@dataclass(frozen=True)
class DiTTrainSpec:
    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4  # head dim 64: more attention patterns for the same compute
    num_layers: int = 4
    text_len: int = 128
    t5_dim: int = 128
    t5_ffn: int = 256
    t5_heads: int = 2
    t5_layers: int = 2
    batch: int = 32
    shift: float = 3.0
    p_image: float = 0.5
    p_uncond: float = 0.1
    image_batch: int = 0  # text-to-image samples per step (single latent frames)
    pair_batch: int = 0  # shape pairs per step (`pair_loss`): one scene as two shapes
    pair_weight: float = 2.0
    # text-to-image samples drawn keyframe_scale x larger than the clips (the image-first pass's
    # keyframe, `SamplingDefaults.image_first_scale`), from a shape set at that scale
    keyframe_batch: int = 0
    keyframe_scale: int = 2

    def dit_config(self, z_dim: int) -> DiTConfig:
        return DiTConfig(model_type="ti2v", in_dim=z_dim, out_dim=z_dim, dim=self.dim, ffn_dim=self.ffn_dim,
                         num_heads=self.num_heads, num_layers=self.num_layers, text_len=self.text_len,
                         text_dim=self.t5_dim)

    def t5_config(self, vocab: int) -> T5Config:
        return T5Config(vocab=vocab, dim=self.t5_dim, dim_attn=self.t5_dim, dim_ffn=self.t5_ffn,
                        num_heads=self.t5_heads, num_layers=self.t5_layers)


def deepen_dit(old: nn.Module, num_layers: int) -> nn.Module:
    """A `WanModel` with `num_layers` blocks that computes exactly what `old` computes.

    The old blocks keep their order, spread evenly among the new ones (old block j lands at
    j * num_layers // old_layers). Each new block starts as the identity: its self-attention
    and cross-attention output projections and its second FFN layer are zero, so it adds
    nothing to the residual stream until training moves those weights (their gradients are not
    zero: they see the block's attention and FFN activations). Everything outside the blocks
    (embeddings, time projection, head) is copied unchanged.
    """
    from ..models.dit import WanModel

    old_layers = old.cfg.num_layers
    if num_layers < old_layers:
        raise ValueError(f"cannot deepen {old_layers} blocks to {num_layers}")
    new = WanModel(replace(old.cfg, num_layers=num_layers))
    position = [j * num_layers // old_layers for j in range(old_layers)]  # of old block j
    state = new.state_dict()
    for key, value in old.state_dict().items():
        if key.startswith("blocks."):
            _, j, rest = key.split(".", 2)
            key = f"blocks.{position[int(j)]}.{rest}"
        state[key] = value.clone()
    for i in range(num_layers):
        if i not in position:
            for part in ("self_attn.o", "cross_attn.o", "ffn.2"):
                state[f"blocks.{i}.{part}.weight"].zero_()
                state[f"blocks.{i}.{part}.bias"].zero_()
    new.load_state_dict(state)
    return new


def shift_sigma(u: Tensor, shift: float) -> Tensor:
    """The sampler's shift map S_s(u) = s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


class DiTWithText(nn.Module):
    """The DiT and the text encoder as one module, so they train (and checkpoint) together."""

    def __init__(self, dit: nn.Module, t5: nn.Module) -> None:
        super().__init__()
        self.dit = dit
        self.t5 = t5

    def encode_text(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """Token ids/mask [B, L] -> per prompt [L_i, dim] features of its true tokens (like
        `TextEncoder.encode`; padded keys are masked, so padding does not change them)."""
        feats = self.t5(ids, mask)
        lengths = mask.sum(dim=1).tolist()
        return [feats[i, : int(n)] for i, n in enumerate(lengths)]


def flow_loss(model: DiTWithText, spec: DiTTrainSpec, latents: Tensor, ids: Tensor, mask: Tensor,
              gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss on a batch of clean latents [B, z, F, h, w] with their token ids."""
    b, _, f, h, w = latents.shape
    p = model.dit.cfg.patch_size
    grid = (f // p[0], h // p[1], w // p[2])
    per_frame = grid[1] * grid[2]
    u = torch.rand(b, generator=gen)
    sigma = shift_sigma(u, spec.shift)  # [B]
    noise = torch.randn(latents.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1, 1)
    x = (1 - s) * latents + s * noise
    target = noise - latents
    # TI2V: some samples keep latent frame 0 clean (timestep 0 there, no loss there)
    image = torch.rand(b, generator=gen) < spec.p_image
    frame_mask = torch.ones(b, 1, f, 1, 1)
    frame_mask[image, :, 0] = 0.0
    x = frame_mask * x + (1 - frame_mask) * latents
    t_tok = (1000.0 * sigma)[:, None].expand(b, grid[0] * per_frame).clone()
    t_tok[image, :per_frame] = 0.0
    # classifier-free guidance: some captions become the empty prompt (EOS only)
    drop = torch.rand(b, generator=gen) < spec.p_uncond
    ids = ids.clone()
    mask = mask.clone()
    if drop.any():
        eos = ids[drop].gather(1, (mask[drop].sum(1, keepdim=True) - 1).clamp_min(0))
        ids[drop] = 0
        mask[drop] = 0
        ids[drop, 0] = eos[:, 0]
        mask[drop, 0] = 1
    context = model.encode_text(ids, mask)
    pred = model.dit(x, t_tok, context)
    err = (pred - target).square() * frame_mask
    loss = err.sum() / (frame_mask.sum() * latents.shape[1] * h * w)
    return loss, {}


def pair_loss(model: DiTWithText, spec: DiTTrainSpec, latents_a: Tensor, latents_b: Tensor, ids: Tensor,
              mask: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss on shape pairs: image latents [P, z, 1, h, w] of P scenes, each drawn
    as shape a and as shape b, with the captions ids/mask [2P, L] (the a's, then the b's).

    Both images of a pair get the same noise and noise level, so their targets differ exactly
    by the shape (eps - x0a) - (eps - x0b) = x0b - x0a. A circle and a square of the same area
    differ in a few corner cells only, so in the plain loss that difference is a small share of
    the error and a model can draw both the same (as the built-in model did); the extra term,
    `spec.pair_weight` x the squared error of the predicted difference, weights that share up.
    """
    n, _, f, h, w = latents_a.shape
    p = model.dit.cfg.patch_size
    tokens = (f // p[0]) * (h // p[1]) * (w // p[2])
    sigma = shift_sigma(torch.rand(n, generator=gen), spec.shift).repeat(2)  # [2P]
    noise = torch.randn(latents_a.shape, generator=gen).repeat(2, 1, 1, 1, 1)
    x0 = torch.cat([latents_a, latents_b])
    s = sigma.view(2 * n, 1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    target = noise - x0
    t_tok = (1000.0 * sigma)[:, None].expand(2 * n, tokens)
    pred = model.dit(x, t_tok, model.encode_text(ids, mask))
    fit = (pred - target).square().mean()
    diff = ((pred[:n] - pred[n:]) - (target[:n] - target[n:])).square().mean()
    return fit + spec.pair_weight * diff, {"pair_fit": float(fit.detach()), "pair_diff": float(diff.detach())}
