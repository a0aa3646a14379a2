"""CPU time of the VAE's causal 3x3x3 convolution: PyTorch's conv3d against the same
convolution as one conv2d per time tap (what `CausalConv3d` runs on the CPU), and the built-in
model's whole decode.

    python benchmarks/conv3d_cpu_bench.py [--threads 2]

Session 13, 2-core AMD EPYC (AVX2, no AVX-512), torch 2.13.0 CPU, 2 threads:
conv3d 193 ms, per-tap conv2d 43 ms (max difference 1.5e-6) for a 24-channel conv over 4 + 2
frames of 128x128; built-in decode of 17 frames 0.98 s (the same decode at the commit before
the change: 2.72 s against 1.32 s after it, measured back to back, 3 runs each); `kinema
generate` from process start to signed MP4 17.2 s -> 6.8-8.6 s (with the text encoder's
meta-device init fix, `models/t5.py:_embedding`; /usr/bin/time and `kinema eval`'s timed runs).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _bench(fn, runs: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kinema.models.vae import CausalConv3d
    from kinema.pipeline import decode_frames, load

    torch.manual_seed(0)
    conv = CausalConv3d(24, 24, 3, padding=1).eval()
    x = torch.randn(1, 24, 4, 128, 128)
    context = torch.randn(1, 24, 2, 128, 128)
    with torch.no_grad():
        padded = F.pad(torch.cat([context, x], dim=2), (1, 1, 1, 1, 0, 0))
        t3 = _bench(lambda: F.conv3d(padded, conv.weight, conv.bias))
        t2 = _bench(lambda: conv(x, context))
        diff = float((F.conv3d(padded, conv.weight, conv.bias) - conv(x, context)).abs().max())
    print(f"24-channel 3x3x3 conv, 4 frames of 128x128 + 2 cached: conv3d {t3 * 1e3:.0f} ms, "
          f"CausalConv3d (per-tap conv2d) {t2 * 1e3:.0f} ms, max difference {diff:.1e}")

    pipe = load()
    z = torch.randn(pipe.vae.cfg.z_dim, 5, 8, 8)
    with torch.no_grad():
        print(f"built-in model decode, 17 frames of 128x128: {_bench(lambda: decode_frames(pipe.vae, z), 3):.2f} s")


if __name__ == "__main__":
    main()
