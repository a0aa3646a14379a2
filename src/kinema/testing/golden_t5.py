"""Golden runner for kind "t5": the umT5 encoder on padded ids, plus the trimmed contexts."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import T5Config
from ..models.t5 import T5Encoder

if TYPE_CHECKING:  # pragma: no cover
    from .golden import Case


def config_from_ctor(ctor: dict) -> T5Config:
    """T5Config from official `T5Encoder` keyword arguments (unknown ones, e.g. dropout, dropped)."""
    known = {f.name for f in dataclasses.fields(T5Config)}
    return T5Config(**{k: v for k, v in ctor.items() if k in known})


def run(case: "Case") -> dict[str, Tensor]:
    cfg = config_from_ctor(case.params.get("ctor") or case.meta["constructor_kwargs"])
    model = T5Encoder.from_state_dict(case.weights, cfg, dtype=torch.float32)
    ids, mask = case.inputs["ids"], case.inputs["mask"]

    # The official call: the whole padded batch with the mask, then trim each row.
    encoder_out = model(ids, mask)
    lengths = mask.gt(0).sum(dim=1).tolist()
    got: dict[str, Tensor] = {"encoder_out": encoder_out}
    for b, length in enumerate(lengths):
        got[f"context_{b}"] = encoder_out[b, :length]

    # The TextEncoder fast path (each prompt on its true length only) must give the same rows.
    # (Only meaningful for masks of leading ones, which is what a tokenizer produces.)
    for b, length in enumerate(lengths):
        if length == 0 or not bool(mask[b, :length].gt(0).all()):
            continue
        fast = model(ids[b:b + 1, :length], mask[b:b + 1, :length])[0]
        ref = got[f"context_{b}"]
        err = (fast - ref).abs().max().item()
        if not err <= 1e-5 + 1e-5 * ref.abs().max().item():
            raise AssertionError(f"trimmed-length run of row {b} differs from the padded run by {err:.3g}")
    return got
