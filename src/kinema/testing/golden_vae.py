"""Golden runner for the `vae21` / `vae22` cases: encode a video, decode the latent."""

from __future__ import annotations

import torch
from torch import Tensor

from kinema.config import VAEConfig
from kinema.models.vae import WanVAE

_VERSIONS = {"vae21": "2.1", "vae22": "2.2"}
# Official `WanVAE_` constructor defaults, used for any argument a case leaves out.
_DEFAULTS = {
    "vae21": dict(dim=128, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[True, True, False]),
    "vae22": dict(dim=160, dec_dim=256, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  attn_scales=[], temperal_downsample=[True, True, False]),
}


def build(case) -> WanVAE:
    """The case's VAE, built on meta from `params.ctor` and assign-loaded with its weights (strict)."""
    ctor = {**_DEFAULTS[case.kind], **case.params.get("ctor", case.meta.get("constructor_kwargs", {}))}
    cfg = VAEConfig(
        version=_VERSIONS[case.kind],
        dim=int(ctor["dim"]),
        dec_dim=int(ctor["dec_dim"]) if ctor.get("dec_dim") is not None else None,
        z_dim=int(ctor["z_dim"]),
        dim_mult=tuple(int(m) for m in ctor["dim_mult"]),
        num_res_blocks=int(ctor["num_res_blocks"]),
        attn_scales=tuple(float(s) for s in ctor.get("attn_scales", ())),
        temperal_downsample=tuple(bool(f) for f in ctor["temperal_downsample"]),
        latents_mean=tuple(case.inputs["latents_mean"].tolist()),
        latents_std=tuple(case.inputs["latents_std"].tolist()),
    )
    with torch.device("meta"):
        model = WanVAE(cfg)
    weights = case.weights_under("vae") or case.weights
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def run(case) -> dict[str, Tensor]:
    model = build(case)
    # The official call encodes video[0] only (wrapper takes a list of [3, T, H, W]).
    mu = model.encode(case.inputs["video"][:1])
    return {
        "mu": mu,
        "decoded_raw": model.decode(mu, clamp=False),
        "decoded": model.decode(mu, clamp=True),
    }
