"""Seconds per training step of the built-in model's decoder tune, float32 vs bf16 autocast.

Uses the shipped VAE (`src/kinema/assets/builtin`) and procedural clips; nothing is downloaded
and no training work folder is needed. The recipe's `OptimConfig.bf16` runs this autocast.

    python benchmarks/train_step_bench.py [--steps 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kinema.pipeline import BUILTIN_DIR
    from kinema.models.vae import WanVAE
    from kinema.train.data import make_clip, train_combos
    from kinema.train.recipe import Recipe
    from kinema.train.vae_train import clips_to_tensor, make_decoder_loss_fn

    recipe = Recipe()
    vae = WanVAE(recipe.vae.vae_config())
    state = torch.load(BUILTIN_DIR / "Wan2.2_VAE.pth", map_location="cpu", weights_only=True)
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    vae.eval()
    clips = [make_clip(0, i, recipe.size, recipe.frames, combos=train_combos())[0] for i in range(4)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(clips_to_tensor([c])) for c in clips])
    vae.requires_grad_(False)
    vae.conv2.requires_grad_(True)
    vae.decoder.requires_grad_(True)
    # the clip seed must match the latents: decoder_batch re-renders clip i of seed 0
    loss_fn = make_decoder_loss_fn(vae, recipe.decoder, latents, 0, 0, recipe.size, recipe.frames)
    print(f"decoder tune step: 1 clip of {recipe.frames} frames at {recipe.size}x{recipe.size}, "
          f"{args.threads} threads")
    for bf16 in (False, True):
        times = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = loss_fn(step, torch.Generator().manual_seed(step))
            vae.zero_grad(set_to_none=True)
            loss.backward()
            if step:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - start)
        print(f"  {'bf16 autocast' if bf16 else 'float32':14s} median {statistics.median(times):.2f} s/step "
              f"({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
