"""Built-in model: one `generate` with the two guidance passes as two calls per step against
one batch of 2 (`pipeline.BATCH_CFG_MAX_TOKENS`), in a warm process.

    python benchmarks/cfg_batch_bench.py [--model DIR] [--threads 2] [--runs 3]

Session 14, 2-core Intel Xeon (AVX-512, AMX), torch 2.13.0 CPU, 2 threads, best of 3 (default
settings: 12 + 12 UniPC steps, guidance 5, 17 frames of 128x128, decode included), over three
runs of this script (and a first scratch run of the same loop): 8-block DiT (shipped) two calls
1.42-1.59 s, batched 1.18-1.35 s; the 4-block DiT shipped before session 14 two calls
1.02-1.20 s, batched 0.91-1.05 s.
"""

from __future__ import annotations

import argparse
import time

import torch

import kinema
from kinema import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = kinema.load(args.model)
    default = pipeline.BATCH_CFG_MAX_TOKENS
    for name, limit in (("two calls", 0), ("batched", default)):
        pipeline.BATCH_CFG_MAX_TOKENS = limit  # read by `Pipeline.run` at every generation
        pipe.generate("a red circle moving left", seed=0)  # warm-up
        times = []
        for seed in range(args.runs):
            start = time.perf_counter()
            pipe.generate("a red circle moving left", seed=seed)
            times.append(time.perf_counter() - start)
        print(f"{name:9s} best {min(times):.2f} s, mean {sum(times) / len(times):.2f} s")
    pipeline.BATCH_CFG_MAX_TOKENS = default


if __name__ == "__main__":
    main()
