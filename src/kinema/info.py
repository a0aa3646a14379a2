"""`kinema info`: what a model folder holds and how much memory a generation needs.

Everything comes from `loading.inspect_folder` (file headers only): no weights are loaded.

Memory estimate (stated in the output too). Components are loaded one at a time on the
accelerator (text encoder, then the DiT(s), then the VAE), so the peak is the largest of:
- text encoder: its weights in the compute dtype + activations of one 512-token prompt;
- DiT: the weights of one expert in the compute dtype (+ the other expert's when both are kept
  resident) + activations ~ ACT_BYTES_PER_TOKEN_DIM x tokens x dim (hidden states, q/k/v,
  the FFN intermediate and the attention output of one block at a time, for the conditional
  and unconditional passes run one after the other) + the latents;
- VAE decode: its weights in float32 + the activations of one chunk (one latent frame ->
  4 video frames) at the largest decoder level, ~ VAE_ACT_FACTOR x 4 frames x pixels x width
  x 4 bytes, plus the decoded video in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .loading import FolderInfo, inspect_folder

# Bytes per (token x dim) of DiT activations live at the peak of one block in half precision:
# residual stream (fp32) + norm output + q, k, v, attention output + the FFN intermediate
# (ffn_dim ~ 3-5 x dim) + RoPE'd q/k copies; ~40 bytes covers the 14B and 5B shapes.
ACT_BYTES_PER_TOKEN_DIM = 40
# Live feature maps at the largest VAE decoder level (block input, norm and conv outputs, causal
# caches, shortcut), each of one 4-frame chunk.
VAE_ACT_FACTOR = 6

GiB = 1024**3


def _compute_bytes(info: FolderInfo, name: str, itemsize: int) -> int:
    return info.components[name].params * itemsize


def _vae_widest_map(vae, height: int, width: int) -> int:
    """Elements (per frame) of the largest decoder feature map: channels x pixels per level.

    Level r runs at 1/2^r of the (patchified) output size. Wan2.1 upsamplers halve the width,
    so level r holds base*mult[r] channels; Wan2.2 upsamplers keep it, so level r also sees
    the wider output of level r+1 (base*mult[r+1]).
    """
    base = vae.dec_dim or vae.dim
    mult = vae.dim_mult
    pixels = height * width // (vae.patch_size**2)
    best = 0
    for r in range(len(mult)):
        width_r = base * mult[min(r + 1, len(mult) - 1)] if vae.version == "2.2" else base * mult[r]
        best = max(best, pixels // 4**r * width_r)
    return best


def estimate_memory(info: FolderInfo, compute_itemsize: int = 2) -> dict[str, Any]:
    """Peak accelerator memory (bytes) for one generation at the model's default size/frames."""
    spec = info.spec
    width, height = spec.defaults.size
    frames = spec.defaults.frames
    vae = spec.vae
    lat_f = (frames - 1) // vae.temporal_stride + 1
    lat_h, lat_w = height // vae.spatial_stride, width // vae.spatial_stride
    pt, ph, pw = spec.dit.patch_size
    tokens = (lat_f // pt) * (lat_h // ph) * (lat_w // pw)

    t5_weights = _compute_bytes(info, "text_encoder", compute_itemsize)
    t5_act = 512 * (spec.t5.dim_ffn * 3 + spec.t5.dim * 6) * compute_itemsize
    text_peak = t5_weights + t5_act

    expert_weights = _compute_bytes(info, "transformer", compute_itemsize)
    both_experts = expert_weights + (
        _compute_bytes(info, "transformer_2", compute_itemsize) if "transformer_2" in info.components else 0
    )
    dit_act = ACT_BYTES_PER_TOKEN_DIM * tokens * spec.dit.dim
    latents = spec.dit.out_dim * lat_f * lat_h * lat_w * 4 * 4  # x, noise, velocity, solver history
    dit_peak = expert_weights + dit_act + latents
    dit_peak_resident = both_experts + dit_act + latents

    vae_weights = info.components["vae"].params * 4  # decoded in float32
    vae_act = VAE_ACT_FACTOR * 4 * 4 * _vae_widest_map(vae, height, width)  # 4 frames, float32
    video = 3 * frames * height * width * 4
    vae_peak = vae_weights + vae_act + video

    peaks = {"text_encoder": text_peak, "transformer": dit_peak, "vae": vae_peak}
    stage = max(peaks, key=peaks.get)
    return {
        "size": [width, height],
        "frames": frames,
        "dit_tokens": tokens,
        "compute_dtype_bytes": compute_itemsize,
        "weights_bytes": {name: c.params * compute_itemsize for name, c in info.components.items()},
        "stage_peak_bytes": peaks,
        "peak_bytes": peaks[stage],
        "peak_gib": round(peaks[stage] / GiB, 2),
        "peak_stage": stage,
        "peak_bytes_experts_resident": max(dit_peak_resident, text_peak, vae_peak),
        "method": (
            "components are loaded one at a time; peak = max over stages of weights in the compute "
            f"dtype ({compute_itemsize} bytes/param; VAE float32) + activations: DiT "
            f"{ACT_BYTES_PER_TOKEN_DIM} bytes x tokens x dim (+ latents), VAE decode "
            f"{VAE_ACT_FACTOR} live maps of one 4-frame chunk (+ decoded video), text encoder one "
            "512-token prompt. 'peak_bytes_experts_resident' keeps both experts loaded. A rough "
            "estimate: attention kernels and allocator overhead can add 10-20%."
        ),
    }


def summarize(info: FolderInfo) -> dict[str, Any]:
    """The JSON document `kinema info --json` prints."""
    spec = info.spec
    d = spec.defaults
    components = {
        name: {
            "params": comp.params,
            "dtype": comp.dtype,
            "dtypes": comp.dtypes,
            "bytes": comp.nbytes,
            "files": [str(f.relative_to(info.path)) if f.is_relative_to(info.path) else str(f) for f in comp.files],
        }
        for name, comp in info.components.items()
    }
    return {
        "path": str(info.path),
        "layout": info.layout,
        "components": components,
        "model": {
            "type": spec.dit.model_type,
            "name": spec.name,
            "preset": info.preset,
            "two_experts": spec.two_experts,
            "dit": {"dim": spec.dit.dim, "num_layers": spec.dit.num_layers, "num_heads": spec.dit.num_heads,
                    "ffn_dim": spec.dit.ffn_dim, "in_dim": spec.dit.in_dim, "out_dim": spec.dit.out_dim,
                    "text_dim": spec.dit.text_dim},
            "vae": {"version": spec.vae.version, "z_dim": spec.vae.z_dim, "dim": spec.vae.dim,
                    "stride": [spec.vae.temporal_stride, spec.vae.spatial_stride, spec.vae.spatial_stride]},
            "text_encoder": {"dim": spec.t5.dim, "num_layers": spec.t5.num_layers, "vocab": spec.t5.vocab},
            "tokenizer": str(info.tokenizer_dir) if info.tokenizer_dir else None,
        },
        "defaults": {
            "size": list(d.size), "frames": d.frames, "fps": d.fps, "steps": d.steps,
            "guidance": list(d.guidance) if isinstance(d.guidance, tuple) else d.guidance,
            "shift": d.shift, "sampler": d.sampler, "boundary": d.boundary,
            "supported_sizes": [list(s) for s in d.supported_sizes],
        },
        "memory": estimate_memory(info),
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.2f}T"


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model = doc["model"]
    console.print(f"[bold]{doc['path']}[/bold]  layout: {doc['layout']}  model: {model['name']} "
                  f"(type {model['type']}, preset {model['preset']}"
                  f"{', two experts' if model['two_experts'] else ''})")
    table = Table(show_header=True, header_style="bold")
    for col in ("component", "params", "stored dtype", "size", "files"):
        table.add_column(col)
    for name, comp in doc["components"].items():
        files = comp["files"]
        shown = files[0] + (f" (+{len(files) - 1})" if len(files) > 1 else "")
        table.add_row(name, f"{comp['params']:,} ({_human(comp['params'])})", comp["dtype"],
                      f"{comp['bytes'] / GiB:.2f} GiB", shown)
    console.print(table)
    d = doc["defaults"]
    console.print(f"defaults: {d['size'][0]}x{d['size'][1]}, {d['frames']} frames @ {d['fps']} fps, "
                  f"{d['steps']} steps, guidance {d['guidance']}, shift {d['shift']}, {d['sampler']}"
                  + (f", boundary {d['boundary']}" if d["boundary"] is not None else ""))
    mem = doc["memory"]
    console.print(f"estimated peak memory: {mem['peak_gib']} GiB (stage: {mem['peak_stage']}, "
                  f"{mem['dit_tokens']} DiT tokens)")
    console.print(f"[dim]how: {mem['method']}[/dim]")


def run_info(model: Path, json_out: bool) -> None:
    """Print a summary of the model folder (JSON with `json_out`); ModelFolderError if it has none."""
    info = inspect_folder(model)
    doc = summarize(info)
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)


__all__ = ["run_info", "summarize", "estimate_memory"]
