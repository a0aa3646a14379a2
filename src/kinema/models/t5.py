"""The umT5-XXL text encoder (encoder half only), numerically equal to the official Wan one.

Parameter names equal the official checkpoint keys (`models_t5_umt5-xxl-enc-bf16.pth`), so a
state dict loads with `load_state_dict(strict=True)`. The forward follows the official numerics
(spec section 4.1): unscaled attention logits, a bucketed relative-position bias per layer,
masked keys set to the activation dtype's minimum, float32 softmax, RMS norm with float32
variance, and a gated tanh-GELU FFN. Everything else runs in the weights' dtype (bf16 for the
real checkpoint).

`TextEncoder` couples the encoder with a tokenizer and returns each prompt's trimmed features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import T5Config
from ..errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import UMT5Tokenizer

_HALF = (torch.float16, torch.bfloat16)


def _fp16_clamp(x: Tensor) -> Tensor:
    """The official guard against fp16 overflow after residual adds (no-op in bf16/fp32)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm with a scale only: w * x * rsqrt(mean(x^2) + eps), variance in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(dim=-1, keepdim=True)
        y = x * torch.rsqrt(var + self.eps)  # promotes to float32
        # Half-precision weights: round the normalized value to their dtype before scaling
        # (official rule); float32 weights keep the float32 value.
        if self.weight.dtype in _HALF:
            y = y.to(self.weight.dtype)
        return self.weight * y


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, written out as in the official code (same roundings)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(rel: Tensor, num_buckets: int, max_dist: int) -> Tensor:
    """Bidirectional T5 bucket of `rel` = key index - query index (int64 in, int64 out).

    Half the buckets are for keys after the query. Within a half, the first `exact` offsets get
    their own bucket and larger ones share log-spaced buckets up to `max_dist` (log in float32,
    truncation toward zero, as in the official code).
    """
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # dist == 0 gives log(0) = -inf here, but those entries take the exact branch below.
    large = exact + (
        torch.log(dist.float() / exact) / math.log(max_dist / exact) * (half - exact)
    ).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, large)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """`nn.Embedding(num, dim)` with the same N(0, 1) init, skipped on the meta device: there
    PyTorch's own init runs through torch._refs, which imports torch._dynamo (1.7-3.5 s of
    every `kinema generate` start-up, measured with cProfile)."""
    weight = torch.empty(num, dim)  # on the device of an enclosing `torch.device(...)` block
    if weight.device.type != "meta":
        weight.normal_()
    return nn.Embedding(num, dim, _weight=weight)


class T5RelativeEmbedding(nn.Module):
    """Per-head additive attention bias from a (num_buckets, num_heads) table."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int = 128) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_dist = max_dist
        self.embedding = _embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> Tensor:
        """Bias [1, heads, lq, lk]; it depends only on the key-minus-query offsets."""
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_dist))
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


class T5Attention(nn.Module):
    """Multi-head self-attention without bias terms and without 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None, pos_bias: Tensor) -> Tensor:
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c).transpose(1, 2)  # [B, H, L, c]
        k = self.k(x).view(b, -1, n, c).transpose(1, 2)
        v = self.v(x).view(b, -1, n, c).transpose(1, 2)

        # Bias in the activation dtype: relative bias, then padded keys overwritten with the
        # dtype's most negative finite value (so they get ~zero weight, never NaN).
        bias = pos_bias.to(x.dtype).expand(b, n, q.size(2), k.size(2))
        if mask is not None:
            key_pad = (mask == 0).view(b, 1, 1, -1)
            bias = bias.masked_fill(key_pad, torch.finfo(x.dtype).min)
        logits = q @ k.transpose(-1, -2) + bias  # [B, H, Lq, Lk], no scaling (T5)
        attn = F.softmax(logits.float(), dim=-1).to(x.dtype)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, n * c)
        return self.o(out)


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))): `fc1` is the linear branch, `gate.0` the GELU branch."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Pre-norm self-attention and FFN, each with a residual add."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        # umT5 (shared_pos=False): each layer owns its relative-position table.
        self.pos_embedding = (
            None if cfg.shared_pos
            else T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_dist)
        )

    def forward(self, x: Tensor, mask: Tensor | None, pos_bias: Tensor | None = None) -> Tensor:
        if self.pos_embedding is not None:
            pos_bias = self.pos_embedding(x.size(1), x.size(1))
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask, pos_bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """umT5 encoder: ids [B, L] + mask [B, L] -> features [B, L, dim] (padded rows included)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = _embedding(cfg.vocab, cfg.dim)
        # Only with shared_pos=True (plain T5): one table for all layers, at the top level.
        self.pos_embedding = (
            T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_dist) if cfg.shared_pos else None
        )
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.token_embedding(ids)  # no embedding scaling in T5
        length = x.size(1)
        shared = self.pos_embedding(length, length) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, shared)
        return self.norm(x)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        cfg: T5Config | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "T5Encoder":
        """Build on the meta device and adopt the tensors of an official-key state dict.

        No memory is spent on a random init; the tensors keep their dtype unless `dtype` is
        given. Mismatching keys or shapes raise `CheckpointError`.
        """
        with torch.device("meta"):
            model = cls(cfg or T5Config())
        try:
            model.load_state_dict(dict(state_dict), strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"T5 encoder weights do not match the model: {' '.join(first[:3])[:400]}") from None
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval().requires_grad_(False)


class TextEncoder:
    """Tokenizer + `T5Encoder`: prompts -> one [L_i, dim] feature matrix per prompt.

    Like the official `T5EncoderModel.__call__`, each result keeps the prompt's true tokens
    (EOS included, at most `text_len`) and drops the padding rows.

    Why no padding to `text_len`: padded keys are masked out of every attention row, and the
    relative bias depends only on key-minus-query offsets, so the rows of the real tokens are
    the same (up to float round-off from other matmul shapes) whether the encoder sees L or 512
    positions; the official code computes the padded *query* rows and then throws them away.
    Running on the true length cuts the work by a factor of about 512/L; prompts of equal
    length are batched together.
    """

    def __init__(self, tokenizer: "UMT5Tokenizer", model: T5Encoder, text_len: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len if text_len is not None else model.cfg.text_len

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEncoder":
        """Move the encoder (e.g. keep it on CPU while the DiT uses the GPU); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None) -> list[Tensor]:
        """Features [L_i, dim] per prompt (model dtype), on `device` (default: the model's)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(list(prompts), max_length=self.text_len)
        lengths = mask.gt(0).sum(dim=1).tolist()
        out: list[Tensor | None] = [None] * len(lengths)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            sub_ids = ids[rows, :length].to(self.device)
            sub_mask = mask[rows, :length].to(self.device)
            feats = self.model(sub_ids, sub_mask)
            for j, i in enumerate(rows):
                out[i] = feats[j] if device is None else feats[j].to(device)
        return out  # type: ignore[return-value]

    __call__ = encode
