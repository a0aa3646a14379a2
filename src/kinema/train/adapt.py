"""Decoder adaptation: tune the decoder on the DiT's own latents.

The DiT's samples are not quite latents the encoder would give: a moving square comes out with
softer corners. Session 12 measured it on aligned square clips: the VAE round trip keeps a
square's fill (blob area / bounding box) at 0.935 in every frame, but image-to-video from the
true first frame decodes to 0.91 at frame 1, falling to 0.83 at frame 16. The decoder has only
ever seen encoder latents, so it draws what such a latent would mean: a rounded blob.

This step regenerates part of each training clip with the trained DiT (SDEdit: noise the
clip's latent to a level sigma_0, then sample back to 0 with the clip's caption at the model's
own sampling settings) and tunes the decoder to draw the *original* clip from the regenerated
latent. From sigma_0 <= 0.8 the layout (where the object is, how fast it moves) survives, so
the pair is consistent; the fine shape is what the DiT redraws, and that is what the decoder
learns to read. A share of the decoder's samples (`1 - p_adapted`) stays on encoder latents so
that the round trip is not forgotten.

Session 13 ran it on the shipped model (240 steps): squares' fill in image-to-video from an
ideal first frame 0.886 -> 0.894, too little to ship; the step stays for longer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..sampling import SAMPLERS, Schedule
from .data import Layout, caption_for_row, make_clip, train_combos
from .vae_train import DecoderTuneSpec, clips_to_tensor, decode_normalized, reconstruction_loss


@dataclass(frozen=True)
class AdaptSpec:
    """How many clips are regenerated and how the decoder learns from them."""

    clips: int = 1024  # the first `clips` clips of the latent set are regenerated
    strength: tuple[float, float] = (0.4, 0.85)  # sigma_0, drawn uniformly per batch
    p_true_first: float = 0.5  # share keeping the true first frame (image-to-video); the rest
    # regenerate frame 0 too, by the image pass first (image-first text-to-video)
    batch: int = 16  # clips regenerated per DiT call
    p_adapted: float = 0.7  # share of decoder samples that use a regenerated latent
    tune: DecoderTuneSpec = field(default_factory=lambda: DecoderTuneSpec(latent_noise=0.0))


def _start(schedule: Schedule, sigma0: float) -> Schedule:
    """The tail of `schedule` from its first sigma <= sigma0 (an SDEdit schedule)."""
    below = torch.nonzero(schedule.sigmas[:-1] <= sigma0)
    k = int(below[0, 0]) if below.numel() else schedule.steps - 1  # at least the last step
    return Schedule(sigmas=schedule.sigmas[k:], timesteps=schedule.timesteps[k:])


@torch.no_grad()
def regenerate(model, tokenizer, latents: Tensor, specs: list[list[str]], spec: AdaptSpec, *,
               steps: int, shift: float, guidance: float, sampler: str = "unipc", seed: int = 0,
               text_len: int = 128, progress: Callable[[int], object] | None = None) -> Tensor:
    """SDEdit copies of `latents` [N, z, F, h, w] (normalized) by `model` (a `DiTWithText`):
    fp16 [N, z, F, h, w]. Deterministic in `seed`; batches are independent of N."""
    schedule_fn, sample_fn = SAMPLERS[sampler]
    full = schedule_fn(steps, shift)
    null_ids, null_mask = tokenizer([""], max_length=text_len)
    null = model.encode_text(null_ids, null_mask)[0]
    p = model.dit.cfg.patch_size
    out = torch.empty(latents.shape, dtype=torch.float16)
    for start in range(0, latents.shape[0], spec.batch):
        stop = min(start + spec.batch, latents.shape[0])
        rng = np.random.default_rng([seed, 23, start])
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        z0 = latents[start:stop].float()
        b, _, f, h, w = z0.shape
        per_frame = (h // p[1]) * (w // p[2])
        captions = [caption_for_row(row, rng) for row in specs[start:stop]]
        ids, mask = tokenizer(captions, max_length=text_len)
        context = model.encode_text(ids, mask)
        sched = _start(full, float(rng.uniform(*spec.strength)))
        s0 = float(sched.sigmas[0])
        true_first = torch.from_numpy(rng.random(b) < spec.p_true_first)

        both = context + [null] * b  # CFG in one DiT call: the captions, then the empty prompts

        def denoise_fn(first_known: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
            def denoise(x: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
                tokens = (x.shape[2] // p[0]) * per_frame
                t_tok = t.float().expand(2 * b, tokens).clone()
                if first_known:
                    t_tok[:, :per_frame] = 0.0
                v = model.dit(torch.cat([x, x]), t_tok, both)
                v_cond, v_uncond = v.float().chunk(2)
                return v_uncond + guidance * (v_cond - v_uncond)
            return denoise

        noise = torch.randn(z0.shape, generator=gen)
        # pass 1 (skipped when every sample keeps its true frame 0): frame 0 regenerated as an
        # image, kept for the samples that redraw it
        first = z0[:, :, :1]
        if not bool(true_first.all()):
            x1 = (1 - s0) * z0[:, :, :1] + s0 * noise[:, :, :1]
            drawn = sample_fn(denoise_fn(False), x1, sched)
            first = torch.where(true_first.view(b, 1, 1, 1, 1), first, drawn)
        # pass 2: the clip from its (true or regenerated) frame 0, as image-to-video samples
        x = (1 - s0) * z0 + s0 * noise
        x[:, :, :1] = first

        def keep_first(i: int, latent: Tensor) -> Tensor:
            latent = latent.clone()
            latent[:, :, :1] = first
            return latent

        out[start:stop] = sample_fn(denoise_fn(True), x, sched, post_step=keep_first).half()
        if progress is not None:
            progress(stop - start)
    return out


def make_adapt_loss_fn(vae, spec: AdaptSpec, latents: Tensor, adapted: Tensor, seed: int, clip_seed: int,
                       size: int, frames: int, layout: Layout):
    """Decoder loss on (latent, clip) pairs: the latent is the regenerated one with chance
    `spec.p_adapted`, else the encoder's; the clip is re-rendered from its index."""
    tune = spec.tune
    n = adapted.shape[0]

    def loss_fn(step: int, gen: torch.Generator):
        rng = np.random.default_rng([seed, 29, step])
        idx = rng.integers(0, n, size=tune.batch)
        use = torch.from_numpy(rng.random(tune.batch) < spec.p_adapted).view(-1, 1, 1, 1, 1)
        rows = torch.from_numpy(idx)
        z = torch.where(use, adapted[rows], latents[rows]).float()
        clips = [make_clip(clip_seed, int(i), size, frames, combos=train_combos(), layout=layout)[0] for i in idx]
        video = clips_to_tensor(clips)
        if tune.latent_noise:
            z = z + tune.latent_noise * torch.randn(z.shape, generator=gen)
        recon = decode_normalized(vae, z).float()
        return reconstruction_loss(recon, video, tune.fg_weight, tune.grad_weight)
    return loss_fn
