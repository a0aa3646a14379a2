"""Multi-head attention on [B, L, H, D] tensors, with optional key lengths.

`attention()` is the single entry point the models use. The kernel behind it is a *backend*:
PyTorch's `scaled_dot_product_attention` ("sdpa") is built in and works everywhere (CPU
included). Faster kernels (flash-attn, sage, ...) are plugged in with `register_backend`; this
module never imports optional packages itself, and the registry only changes through explicit
calls.

Semantics (those of the official varlen flash-attention call): softmax scale 1/sqrt(D),
non-causal, and with `k_lens` the keys at index >= k_lens[b] of sample b are ignored while every
query row is still computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# fn(q, k, v, k_lens) -> out. q [B, Lq, H, D], k/v [B, Lk, H, D], same dtype and device;
# k_lens is None (all keys valid) or an int64 CPU tensor [B] with 1 <= k_lens[b] <= Lk and at
# least one entry < Lk. Returns [B, Lq, H, D] in the dtype of v.
AttentionBackend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]
# supports(q, k, v) -> whether the backend can run these tensors (device, dtype, head size).
SupportsFn = Callable[[Tensor, Tensor, Tensor], bool]


@dataclass(frozen=True)
class _Backend:
    fn: AttentionBackend
    priority: int
    supports: Optional[SupportsFn]


def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, k_lens: Optional[Tensor]) -> Tensor:
    """Reference backend on torch.nn.functional.scaled_dot_product_attention."""
    mask = None
    if k_lens is not None:
        lens = k_lens.tolist()
        if all(n == lens[0] for n in lens):
            # Same valid length for every sample (the usual case: one shared grid): drop the
            # masked keys instead of masking them, so SDPA keeps its fastest (mask-free) kernel.
            k, v = k[:, : lens[0]], v[:, : lens[0]]
        else:
            idx = torch.arange(k.shape[1], device=k.device)
            # [B, 1, 1, Lk], True = attend; broadcast over heads and query rows.
            mask = (idx[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    # SDPA wants [B, H, L, D]; the transposes are views.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


_BUILTIN: dict[str, _Backend] = {"sdpa": _Backend(sdpa_backend, 0, None)}
# Backends added with register_backend(); empty until a caller registers one.
_REGISTRY: dict[str, _Backend] = {}


def register_backend(
    name: str,
    fn: AttentionBackend,
    *,
    priority: int = 0,
    supports: SupportsFn | None = None,
) -> None:
    """Make `fn` selectable as `backend=name`.

    With `backend="auto"`, the registered backend of highest `priority` (> 0 to beat "sdpa")
    whose `supports(q, k, v)` is true (or that has no `supports`) runs each call.
    """
    if name in _BUILTIN or name == "auto":
        raise ValueError(f"attention backend name {name!r} is reserved")
    if not callable(fn):
        raise TypeError(f"attention backend {name!r} is not callable")
    _REGISTRY[name] = _Backend(fn, int(priority), supports)


def unregister_backend(name: str) -> None:
    """Remove a backend added with `register_backend` (no-op if absent)."""
    _REGISTRY.pop(name, None)


def available_backends() -> list[str]:
    """Names accepted by `attention(..., backend=...)` besides "auto"."""
    return [*_BUILTIN, *_REGISTRY]


def _choose(name: str, q: Tensor, k: Tensor, v: Tensor) -> AttentionBackend:
    if name != "auto":
        entry = _REGISTRY.get(name) or _BUILTIN.get(name)
        if entry is None:
            raise ValueError(
                f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
            )
        return entry.fn
    best = _BUILTIN["sdpa"]
    for entry in _REGISTRY.values():
        if entry.priority > best.priority and (entry.supports is None or entry.supports(q, k, v)):
            best = entry
    return best.fn


def _normalize_lens(k_lens: Tensor | Sequence[int] | None, batch: int, lk: int) -> Tensor | None:
    """int64 CPU tensor [B] clamped to Lk, or None when every key is valid."""
    if k_lens is None:
        return None
    lens = torch.as_tensor(k_lens, dtype=torch.int64).to("cpu").reshape(-1)
    if lens.numel() == 1 and batch > 1:
        lens = lens.expand(batch)
    if lens.numel() != batch:
        raise ValueError(f"k_lens has {lens.numel()} entries for a batch of {batch}")
    if bool((lens < 1).any()):
        raise ValueError("k_lens entries must be >= 1 (a query needs at least one key)")
    lens = lens.clamp(max=lk)
    if bool((lens == lk).all()):
        return None  # nothing masked: let the backend take its fast path
    return lens


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_lens: Tensor | Sequence[int] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    `k_lens` [B] (tensor or ints; best on the CPU since it is read on the host): keys at index
    >= k_lens[b] are ignored for sample b. `backend` is "auto", "sdpa" or a registered name.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape [B, L, H, D]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    lens = _normalize_lens(k_lens, k.shape[0], k.shape[1])
    return _choose(backend, q, k, v)(q, k, v, lens)
