"""Golden runner for the DiT cases (kinds dit_t2v, dit_ti2v, dit_i2v).

Rebuilds `WanModel` from the case's constructor params, loads its weights strictly and
replays the calls described in the case's "call" metadata. Shapes, dims and seq_len all come
from the case.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from kinema.config import DiTConfig
from kinema.models.dit import WanModel, build_dit


def config_from_ctor(ctor: dict[str, Any]) -> DiTConfig:
    """Map official WanModel constructor kwargs onto DiTConfig (window_size must be global)."""
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    kw: dict[str, Any] = {}
    for key, value in ctor.items():
        if key == "window_size":
            if tuple(value) != (-1, -1):
                raise ValueError(f"local attention window {value} is not supported")
            continue
        if key not in fields:
            raise ValueError(f"unknown WanModel constructor argument {key!r}")
        kw[key] = tuple(value) if key == "patch_size" else value
    return DiTConfig(**kw)


def load_dit(ctor: dict[str, Any], weights: dict[str, Tensor]) -> WanModel:
    """WanModel from official constructor kwargs, built on meta and assign-loaded (strict)."""
    model = build_dit(config_from_ctor(ctor), device="meta")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def build_model(case) -> WanModel:
    return load_dit(case.params["ctor"], case.weights)


def _contexts(inputs: dict[str, Tensor]) -> list[Tensor]:
    """context_0, context_1, ... in index order."""
    names = sorted((k for k in inputs if k.startswith("context_")), key=lambda k: int(k.split("_")[1]))
    return [inputs[k] for k in names]


def run(case) -> dict[str, Tensor]:
    model = build_model(case)
    p, inp = case.params, case.inputs
    seq_len = p.get("seq_len")
    out: dict[str, Tensor] = {}
    if case.kind == "dit_t2v":
        x, ctx = inp["x"], _contexts(inp)
        out["x"] = model(x, inp["t_tokens"], ctx, seq_len=seq_len)
        out["x_seqlen_padded"] = model(x, inp["t_tokens_padded"], ctx, seq_len=p["seq_len_padded"])
        out["x_sample0_alone_1d_t"] = model(x[:1], inp["t_sample0"], ctx[:1], seq_len=seq_len)[0]
    elif case.kind == "dit_ti2v":
        x, ctx = inp["x"][None], [inp["context"]]
        out["x_per_token_t"] = model(x, inp["t_tokens"], ctx, seq_len=seq_len)[0]
        out["x_scalar_t"] = model(x, inp["t_scalar"], ctx, seq_len=seq_len)[0]
    elif case.kind == "dit_i2v":
        x, y, ctx = inp["x"][None], inp["y"][None], [inp["context"]]
        out["x"] = model(x, inp["t"], ctx, seq_len=seq_len, y=y)[0]
    else:
        raise ValueError(f"golden_dit cannot run case kind {case.kind!r}")
    return out
