"""Tiny random model folders for tests, in the official or the diffusers layout.

`make_tiny_model(folder, kind, layout)` writes a complete Wan-style model folder whose modules
are a few hundred kilobytes: a 9-frame 64x64 generation runs on CPU in about a second. The
diffusers layout is written so that diffusers / transformers themselves can load it
(model_index.json, per-component config.json files in their formats, scheduler config).

Weights are random but scaled (roughly unit-variance activations, norms near 1) so outputs are
finite and non-trivial. The same seed gives the same weights in both layouts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kinema import keymaps
from kinema.config import (
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    DiTConfig,
    T5Config,
    VAEConfig,
)

KINDS = ("ti2v", "t2v-moe", "i2v-moe")
LAYOUTS = ("official", "diffusers")
DIFFUSERS_VERSION = "0.42.1"

TINY_T5 = T5Config(vocab=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
TINY_VAE21 = VAEConfig(version="2.1", dim=8, z_dim=16)
TINY_VAE22 = VAEConfig(version="2.2", dim=4, dec_dim=8, z_dim=48,
                       latents_mean=WAN22_LATENT_MEAN, latents_std=WAN22_LATENT_STD)


def tiny_configs(kind: str) -> tuple[DiTConfig, VAEConfig, T5Config, bool]:
    """(dit, vae, t5, two_experts) of a tiny model kind."""
    common = dict(dim=256, num_heads=2, ffn_dim=512, num_layers=2, text_dim=TINY_T5.dim)
    if kind == "ti2v":
        return DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, **common), TINY_VAE22, TINY_T5, False
    if kind == "t2v-moe":
        return DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **common), TINY_VAE21, TINY_T5, True
    if kind == "i2v-moe":
        return DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **common), TINY_VAE21, TINY_T5, True
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(KINDS)}")


def tiny_defaults(kind: str) -> dict[str, Any]:
    """kinema.json defaults small enough for CPU tests."""
    return {
        "size": [64, 64],
        "frames": 9,
        "fps": 8,
        "steps": 4,
        "supported_sizes": [[64, 64], [96, 64], [64, 96]],
    }


def _shapes(module_cls, cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = module_cls(cfg)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_state(shapes: dict[str, tuple[int, ...]], generator: torch.Generator,
                 head_dim: int | None = None) -> dict[str, Tensor]:
    """Random tensors for official keys, scaled by role (see module docstring)."""
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "gamma" or (len(shape) == 1 and "norm" in key and leaf == "weight"):
            value = 1.0 + 0.1 * noise
        elif leaf == "bias":
            value = 0.02 * noise
        elif "modulation" in key:
            value = noise / math.sqrt(shape[-1])
        elif key == "token_embedding.weight":
            value = noise
        elif "pos_embedding" in key:
            value = 0.5 * noise
        else:  # weights of linear / conv layers: unit gain on the fan-in
            value = noise / math.sqrt(max(1, math.prod(shape[1:])))
            if head_dim and key.endswith("attn.q.weight"):
                value = value / math.sqrt(head_dim)  # T5 has no 1/sqrt(d) in its attention
        out[key] = value
    return out


def _save_safetensors(state: dict[str, Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})


def save_sharded(state: dict[str, Tensor], folder: Path, stem: str, shards: int) -> list[Path]:
    """`stem.safetensors`, or `stem-0000k-of-0000n.safetensors` shards + `stem.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        _save_safetensors(state, folder / f"{stem}.safetensors")
        return [folder / f"{stem}.safetensors"]
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    files = []
    for i in range(shards):
        part = keys[i * per:(i + 1) * per]
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        _save_safetensors({k: state[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
        files.append(folder / name)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2), encoding="utf-8")


def official_dit_config(cfg: DiTConfig) -> dict[str, Any]:
    """The fields official `WanModel.from_pretrained` saves (no text_dim / patch_size)."""
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": cfg.model_type,
        "text_len": cfg.text_len, "in_dim": cfg.in_dim, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "out_dim": cfg.out_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "eps": cfg.eps,
    }


def diffusers_dit_config(cfg: DiTConfig) -> dict[str, Any]:
    """`WanTransformer3DModel` config.json."""
    return {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "added_kv_proj_dim": None, "attention_head_dim": cfg.head_dim,
        "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "image_dim": None, "in_channels": cfg.in_dim,
        "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "out_channels": cfg.out_dim, "patch_size": list(cfg.patch_size), "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "rope_max_seq_len": 1024,
        "text_dim": cfg.text_dim,
    }


def diffusers_vae_config(cfg: VAEConfig) -> dict[str, Any]:
    """`AutoencoderKLWan` config.json."""
    v22 = cfg.version == "2.2"
    return {
        "_class_name": "AutoencoderKLWan", "_diffusers_version": DIFFUSERS_VERSION,
        "attn_scales": list(cfg.attn_scales), "base_dim": cfg.dim,
        "decoder_base_dim": cfg.dec_dim if v22 else None, "dim_mult": list(cfg.dim_mult),
        "dropout": 0.0, "in_channels": 12 if v22 else 3, "is_residual": v22,
        "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std),
        "num_res_blocks": cfg.num_res_blocks, "out_channels": 12 if v22 else 3,
        "patch_size": 2 if v22 else None, "scale_factor_spatial": cfg.spatial_stride,
        "scale_factor_temporal": cfg.temporal_stride, "temperal_downsample": list(cfg.temperal_downsample),
        "z_dim": cfg.z_dim,
    }


def transformers_t5_config(cfg: T5Config, dtype: torch.dtype) -> dict[str, Any]:
    """transformers `UMT5EncoderModel` config.json."""
    return {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "classifier_dropout": 0.0,
        "d_ff": cfg.dim_ffn, "d_kv": cfg.dim_attn // cfg.num_heads, "d_model": cfg.dim,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
        "dtype": str(dtype).removeprefix("torch."), "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": False, "is_gated_act": True,
        "layer_norm_epsilon": cfg.eps, "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "pad_token_id": 0,
        "relative_attention_max_distance": cfg.max_dist,
        "relative_attention_num_buckets": cfg.num_buckets, "scale_decoder_outputs": False,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": cfg.vocab,
    }


def scheduler_config(shift: float) -> dict[str, Any]:
    return {
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
        "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": shift,
        "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
        "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
        "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
        "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
        "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
        "use_karras_sigmas": False,
    }


def make_tiny_model(
    folder: Path,
    kind: str = "ti2v",
    layout: str = "official",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    shards: int = 1,
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random model folder and return it.

    kind: "ti2v" (one DiT, Wan2.2 VAE, 48 latent channels), "t2v-moe" / "i2v-moe" (two experts,
    Wan2.1 VAE). layout: "official" or "diffusers". shards > 1 splits every DiT weight file into
    that many shards with an index. defaults: the kinema.json "defaults" (None: `tiny_defaults`;
    {} writes no kinema.json).
    """
    from kinema.models.dit import WanModel
    from kinema.models.t5 import T5Encoder
    from kinema.models.vae import WanVAE
    from kinema.train.tiny_tokenizer import make_tiny_tokenizer

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    dit_cfg, vae_cfg, t5_cfg, two = tiny_configs(kind)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    dit_shapes = _shapes(WanModel, dit_cfg)
    experts = [random_state(dit_shapes, gen) for _ in range(2 if two else 1)]
    vae_state = random_state(_shapes(WanVAE, vae_cfg), gen)
    t5_state = random_state(_shapes(T5Encoder, t5_cfg), gen, head_dim=t5_cfg.dim_attn // t5_cfg.num_heads)

    def cast(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(dtype) for k, v in state.items()}

    experts = [cast(s) for s in experts]
    vae_state, t5_state = cast(vae_state), cast(t5_state)
    shift = 5.0 if kind != "t2v-moe" else 12.0

    if layout == "official":
        dirs = [folder / "high_noise_model", folder / "low_noise_model"] if two else [folder]
        for state, sub in zip(experts, dirs):
            save_sharded(state, sub, "diffusion_pytorch_model", shards)
            _write_json(sub / "config.json", official_dit_config(dit_cfg))
        vae_name = "Wan2.2_VAE.pth" if vae_cfg.version == "2.2" else "Wan2.1_VAE.pth"
        torch.save(vae_state, folder / vae_name)
        torch.save(t5_state, folder / "models_t5_umt5-xxl-enc-bf16.pth")
        make_tiny_tokenizer(folder / "google" / "umt5-xxl", vocab_size=t5_cfg.vocab)
    else:
        names = ["transformer", "transformer_2"] if two else ["transformer"]
        for state, name in zip(experts, names):
            save_sharded(keymaps.dit_state_to_diffusers(state), folder / name,
                         "diffusion_pytorch_model", shards)
            _write_json(folder / name / "config.json", diffusers_dit_config(dit_cfg))
        _save_safetensors(keymaps.vae_state_to_diffusers(vae_state, vae_cfg.version),
                          folder / "vae" / "diffusion_pytorch_model.safetensors")
        _write_json(folder / "vae" / "config.json", diffusers_vae_config(vae_cfg))
        _save_safetensors(keymaps.t5_state_to_transformers(t5_state), folder / "text_encoder" / "model.safetensors")
        _write_json(folder / "text_encoder" / "config.json", transformers_t5_config(t5_cfg, dtype))
        make_tiny_tokenizer(folder / "tokenizer", vocab_size=t5_cfg.vocab)
        _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(shift))
        index: dict[str, Any] = {
            "_class_name": "WanImageToVideoPipeline" if kind == "i2v-moe" else "WanPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "boundary_ratio": {"t2v-moe": 0.875, "i2v-moe": 0.9}.get(kind),
            "expand_timesteps": kind == "ti2v",
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        if kind == "i2v-moe":
            index.update({"image_encoder": [None, None], "image_processor": [None, None]})
        _write_json(folder / "model_index.json", index)

    chosen = tiny_defaults(kind) if defaults is None else defaults
    if chosen:
        _write_json(folder / "kinema.json", {"name": f"tiny-{kind}", "defaults": chosen})
    return folder


__all__ = ["KINDS", "LAYOUTS", "make_tiny_model", "random_state", "save_sharded", "tiny_configs", "tiny_defaults"]
