"""Seconds per training step of the built-in model, float32 vs bf16 autocast.

`--part decoder` (default): the decoder tune, with the shipped VAE (`src/kinema/assets/builtin`)
and procedural clips. `--part dit`: the flow-matching loss of the final 8-block DiT and its
text encoder on one batch of random latents (the video half of a recipe step; the image half
is the same at one latent frame). Nothing is downloaded and no training work folder is
needed. The recipe's `OptimConfig.bf16` runs this autocast; `kinema train --precision auto`
keeps it only on CPUs with AVX512-BF16 or AMX, because elsewhere it is emulated.

    python benchmarks/train_step_bench.py [--part decoder|dit] [--steps 4] [--threads 2] [--batch 48]
        [--patch 2|1] [--latent-frames 5|1]

`--patch 1` measures the same DiT with 1x1 spatial patches (4x the tokens); `--latent-frames 1`
the image half of a recipe step.
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
    parser.add_argument("--part", choices=("decoder", "dit"), default="decoder")
    parser.add_argument("--batch", type=int, default=48, help="clips per DiT step (--part dit)")
    parser.add_argument("--patch", type=int, choices=(1, 2), default=2, help="DiT spatial patch (--part dit)")
    parser.add_argument("--latent-frames", type=int, default=None,
                        help="latent frames per sample (--part dit; default: the recipe's clips, 1 = images)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kinema.train.run import native_bf16

    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, bf16 in hardware (AVX512-BF16 or AMX): {native_bf16()}")
    step, model = dit_step(args) if args.part == "dit" else decoder_step(args)
    for bf16 in (False, True):
        times = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = step(i)
            model.zero_grad(set_to_none=True)
            loss.backward()
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - start)
        print(f"  {'bf16 autocast' if bf16 else 'float32':14s} median {statistics.median(times):.2f} s/step "
              f"({', '.join(f'{t:.2f}' for t in times)})")


def dit_step(args):
    from dataclasses import replace

    from kinema.models.dit import WanModel
    from kinema.train.dit_train import DiTWithText, flow_loss
    from kinema.train.recipe import Recipe, final_dit_spec
    from kinema.train.steps import build_dit_and_text

    recipe = Recipe()
    spec = final_dit_spec(recipe)
    model = build_dit_and_text(recipe, recipe.vocab_size, final=True)
    if args.patch != 2:
        model = DiTWithText(WanModel(replace(model.dit.cfg, patch_size=(1, args.patch, args.patch))), model.t5)
    frames = (recipe.frames - 1) // 4 + 1 if args.latent_frames is None else args.latent_frames
    cells = recipe.size // 16  # the Wan2.2 VAE's 16x spatial stride
    latents = torch.randn(args.batch, recipe.vae.z_dim, frames, cells, cells, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, recipe.vocab_size, (args.batch, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    params = sum(p.numel() for p in model.dit.parameters()) / 1e6
    print(f"DiT step: {spec.num_layers} blocks, {args.patch}x{args.patch} patches ({params:.2f} M parameters), "
          f"{args.batch} samples of {tuple(latents.shape[1:])} latents, {args.threads} threads")
    return (lambda i: flow_loss(model, spec, latents, ids, mask, torch.Generator().manual_seed(i))[0]), model


def decoder_step(args):
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
    return (lambda i: loss_fn(i, torch.Generator().manual_seed(i))[0]), vae


if __name__ == "__main__":
    main()
