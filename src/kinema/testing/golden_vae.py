"""Golden runner for the `vae21` / `vae22` cases: encode a video, decode the latent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kinema.config import VAEConfig
from kinema.models.vae import WanVAE

_VERSIONS = {"vae21": "2.1", "vae22": "2.2"}
# Official `WanVAE_` constructor defaults, used for any argument a case leaves out.
_DEFAULTS = {
    "2.1": dict(dim=128, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[True, True, False]),
    "2.2": dict(dim=160, dec_dim=256, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                attn_scales=[], temperal_downsample=[True, True, False]),
}


def vae_config(version: str, ctor: dict[str, Any], mean: Tensor, std: Tensor) -> VAEConfig:
    """VAEConfig from official `WanVAE_` constructor kwargs plus the case's latent statistics."""
    c = {**_DEFAULTS[version], **ctor}
    return VAEConfig(
        version=version,
        dim=int(c["dim"]),
        dec_dim=int(c["dec_dim"]) if c.get("dec_dim") is not None else None,
        z_dim=int(c["z_dim"]),
        dim_mult=tuple(int(m) for m in c["dim_mult"]),
        num_res_blocks=int(c["num_res_blocks"]),
        attn_scales=tuple(float(s) for s in c.get("attn_scales", ())),
        temperal_downsample=tuple(bool(f) for f in c["temperal_downsample"]),
        latents_mean=tuple(mean.tolist()),
        latents_std=tuple(std.tolist()),
    )


def build_vae(cfg: VAEConfig, weights: dict[str, Tensor]) -> WanVAE:
    """Build on meta and assign-load the weights (strict)."""
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def build(case) -> WanVAE:
    """The case's VAE from `params.ctor` and its weights."""
    ctor = case.params.get("ctor", case.meta.get("constructor_kwargs", {}))
    cfg = vae_config(_VERSIONS[case.kind], ctor, case.inputs["latents_mean"], case.inputs["latents_std"])
    return build_vae(cfg, case.weights_under("vae") or case.weights)


def run(case) -> dict[str, Tensor]:
    model = build(case)
    # The official call encodes video[0] only (wrapper takes a list of [3, T, H, W]).
    mu = model.encode(case.inputs["video"][:1])
    return {
        "mu": mu,
        "decoded_raw": model.decode(mu, clamp=False),
        "decoded": model.decode(mu, clamp=True),
    }
