"""A small LoRA file for a (tiny) model folder, in the ComfyUI / lightx2v layout, for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_lora(model: str | Path, path: str | Path, *, rank: int = 2, alpha: float = 2.0,
                   seed: int = 0, scale: float = 0.5) -> Path:
    """Write a rank-`rank` LoRA on every block's self-attention q and k of the DiT in the model
    folder `model` (its dimensions read from the file headers) to `path`; returns `path`."""
    from safetensors.torch import save_file

    from ..loading import infer_dit_config, inspect_folder

    cfg = infer_dit_config(inspect_folder(Path(model)).components["transformer"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for m in ("self_attn.q", "self_attn.k"):
            key = f"diffusion_model.blocks.{i}.{m}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, cfg.dim, generator=gen) * scale
            tensors[f"{key}.lora_up.weight"] = torch.randn(cfg.dim, rank, generator=gen) * scale
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    path = Path(path)
    save_file(tensors, str(path))
    return path


__all__ = ["make_tiny_lora"]
