"""LoRA cost on one full-width DiT block (random weights): merge and restore time, the CPU copy
kept for a bit-exact restore, and the forward time merged vs as a side branch.

    python benchmarks/lora_bench.py [--dim 3072 --ffn 14336 --heads 24] [--rank 64] [--tokens 1024]

Defaults are one TI2V-5B block (A14B: --dim 5120 --ffn 13824 --heads 40). float32 on the CPU
(bf16 matmuls are emulated on CPUs without AVX512-BF16/AMX, which would time the emulation).
Session of issue 28, 2-core Intel Xeon (shared, load average ~5), torch 2.13.0 CPU, 2 threads,
best of 3, `--tokens 512` (one TI2V-5B block, 164 M params, rank 64 on its 10 Linears): apply
(read + merge) 2.2 s, restore 0.29 s, originals kept 624 MiB; forward base 2.10 s, merged
2.08 s, side branch 2.21 s (+5.2 %). An earlier run at 1024 tokens under load ~10 gave apply
6.4 s and forward times 25 % apart between identical merged and base weights: not usable.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kinema.config import DiTConfig
from kinema.lora import LoraManager
from kinema.models.dit import WanAttentionBlock, WanModel

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


class OneBlock(torch.nn.Module):
    """A single block under the name `blocks.0` (so LoRA keys read as in a full model)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.blocks = torch.nn.ModuleList([WanAttentionBlock(cfg)])


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DiTConfig(dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads, num_layers=1, text_dim=args.dim)
    model = OneBlock(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    tensors = {}
    for m in LINEARS:
        w = model.get_parameter(f"blocks.0.{m}.weight")
        tensors[f"diffusion_model.blocks.0.{m}.lora_down.weight"] = torch.randn(args.rank, w.shape[1], generator=gen) * 0.01
        tensors[f"diffusion_model.blocks.0.{m}.lora_up.weight"] = torch.randn(w.shape[0], args.rank, generator=gen) * 0.01
        tensors[f"diffusion_model.blocks.0.{m}.alpha"] = torch.tensor(float(args.rank))
    block = model.blocks[0]
    dummy = WanModel(DiTConfig(dim=args.dim, ffn_dim=8, num_heads=args.heads, num_layers=0, text_dim=8, freq_dim=8))
    x = torch.randn(1, args.tokens, args.dim, generator=gen)
    ctx = torch.randn(1, 512, args.dim, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        tc = dummy.embed_time(t, 1, args.tokens, args.tokens)
        tc.e0 = torch.randn(1, 6, args.dim, generator=gen) * 0.02
        rope = dummy._rope((1, 1, args.tokens), args.tokens, x.device, torch.float32)

    def forward():
        with torch.no_grad():
            block(x.clone(), tc, ctx, rope, None)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(tensors, str(path))
        mgr = LoraManager([model])
        forward()
        base = best(forward, args.runs)
        start = time.perf_counter()
        mgr.apply([path])
        merge = time.perf_counter() - start
        kept = mgr.originals_bytes()
        merged = best(forward, args.runs)
        start = time.perf_counter()
        mgr.apply([])
        restore = time.perf_counter() - start
        mgr.apply([path], mode="side")
        forward()
        side = best(forward, args.runs)
        mgr.apply([])
    params = sum(p.numel() for p in model.parameters())
    print(f"block dim {args.dim} ffn {args.ffn}: {params / 1e6:.0f} M params, rank {args.rank}, "
          f"{args.tokens} tokens, {args.threads} threads, float32")
    print(f"apply (read + merge) {merge:.3f} s, restore {restore:.3f} s, originals kept {kept / 2**20:.0f} MiB")
    print(f"forward: base {base:.3f} s, merged {merged:.3f} s, side branch {side:.3f} s "
          f"(+{100 * (side / base - 1):.1f} %)")


if __name__ == "__main__":
    main()
