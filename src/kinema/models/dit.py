"""The Wan diffusion transformer (official `WanModel`), written from the Wan2.2 spec (§2).

Parameter names equal the official checkpoint keys, so a checkpoint loads with
`load_state_dict(sd, strict=True)`. The RoPE table is computed on the fly from float64 angles
and cached as a plain attribute: neither a parameter nor a buffer, so `.to(dtype)` leaves it be.

Precision: the time MLP, the modulation sums, every LayerNorm, the head and the residual stream
are float32 whatever the weight dtype (as in the official code); the other Linear layers and
the patch embedding compute in their weight dtype, and attention runs in the dtype of v. With
float32 weights everything is float32 and RoPE/sinusoid are float64: the official numerics.
With half-precision attention (weights or autocast) the rotation itself runs in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kinema.attention import attention
from kinema.config import DiTConfig


# Parameters that stay float32 in `WanModel.to_mixed_precision` (they are tiny or feed fp32 math).
_FP32_PARTS = ("time_embedding.", "time_projection.", "head.", "modulation", "norm")


def keep_fp32(key: str) -> bool:
    """Whether a state-dict key belongs to a part computed in float32 (see module docstring)."""
    return any(part in key for part in _FP32_PARTS)


# ---------------------------------------------------------------------------------------------
# small numeric helpers


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear in the weight dtype (the input is cast to it)."""
    return layer(x.to(layer.weight.dtype))


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """Linear computed in float32 whatever the weight dtype (no copy when already float32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _layer_norm(x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dim computed in float32, result float32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[N] timesteps -> [N, dim] float32: float64 [cos(t*w_k), sin(t*w_k)], w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    pos = t.reshape(-1).to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angle = pos[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (time, height, width): 44/42/42 for head_dim 128."""
    d = head_dim
    return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


def rope_table(grid: tuple[int, int, int], head_dim: int, length: int, device: torch.device) -> Tensor:
    """complex128 [length, head_dim/2]: per-token rotations for a (F', H', W') grid.

    Token n = (f*H' + h)*W' + w gets pairs [exp(i f w_t), exp(i h w_h), exp(i w w_w)] where each
    axis of real size d_a has frequencies theta^(-2j/d_a), theta = 10000. Rows >= F'H'W'
    (padding tokens) are 1, i.e. left unrotated.
    """
    f, h, w = grid
    parts = []
    for size, d_a in zip(grid, rope_split(head_dim)):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, d_a, 2, dtype=torch.float64, device=device).div(d_a))
        ang = torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv[None, :]
        parts.append(torch.polar(torch.ones_like(ang), ang))  # [size, d_a/2]
    c_t, c_h, c_w = (p.shape[1] for p in parts)
    table = torch.cat(
        [
            parts[0][:, None, None, :].expand(f, h, w, c_t),
            parts[1][None, :, None, :].expand(f, h, w, c_h),
            parts[2][None, None, :, :].expand(f, h, w, c_w),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    if length > f * h * w:
        pad = torch.ones(length - f * h * w, head_dim // 2, dtype=table.dtype, device=device)
        table = torch.cat([table, pad])
    return table


def apply_rope(x: Tensor, table: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Rotate interleaved channel pairs (2m, 2m+1) of x [B, L, H, D] by table [L, D/2] (complex)."""
    b, l, n, d = x.shape
    real = torch.float64 if table.dtype == torch.complex128 else torch.float32
    # One fresh contiguous copy in the rotation dtype, rotated in place (saves a temporary).
    xr = x.to(real, memory_format=torch.contiguous_format, copy=True)
    xc = torch.view_as_complex(xr.reshape(b, l, n, d // 2, 2))
    xc.mul_(table[None, :, None, :])
    return torch.view_as_real(xc).reshape(b, l, n, d).to(out_dtype)


def _modulate(h: Tensor, scale1p: Tensor, shift: Tensor) -> Tensor:
    """h * (1 + scale) + shift; in place on the fresh LayerNorm output unless autograd records."""
    if torch.is_grad_enabled():
        return torch.addcmul(shift, h, scale1p)
    return h.mul_(scale1p).add_(shift)


def _residual(x: Tensor, y: Tensor, gate: Tensor | None = None) -> Tensor:
    """x + y * gate in float32 (x is the float32 residual stream; in place when not recording)."""
    if torch.is_grad_enabled():
        return x + (y if gate is None else y * gate)
    return x.add_(y) if gate is None else x.addcmul_(y, gate)


# ---------------------------------------------------------------------------------------------
# time conditioning


@dataclass
class TimeCond:
    """Time-MLP outputs for U distinct timesteps, and how tokens pick their row.

    e [U, dim] (time_embedding output, feeds the head) and e0 [U, 6, dim] (time_projection
    output, feeds the blocks), float32. With `index` None, U == B and row b serves every token
    of sample b (broadcast [B, 1, dim]); otherwise index [B, L] picks the row of each token.
    """

    e: Tensor
    e0: Tensor
    index: Tensor | None

    def rows(self, table: Tensor) -> Tensor:
        """[U, dim] -> [B, 1, dim] (per sample) or [B, L, dim] (per token)."""
        return table[:, None, :] if self.index is None else table[self.index]


# ---------------------------------------------------------------------------------------------
# modules (attribute names = official keys)


class WanRMSNorm(nn.Module):
    """RMS normalization over the whole last dim (all heads jointly), official `WanRMSNorm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32, round to the input dtype, then scale (official order).
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return normed.to(x.dtype) * self.weight


class WanLayerNormAffine(nn.LayerNorm):
    """Affine LayerNorm (`norm3`) computed in float32, result float32."""

    def forward(self, x: Tensor) -> Tensor:
        return _layer_norm(x, self.eps, self.weight, self.bias)


class WanSelfAttention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm; used for self- (RoPE, key lengths) and cross-attention."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))  # [B, L, dim] -> [B, L, H, D]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: Tensor | None = None,
        k_lens: Tensor | None = None,
    ) -> Tensor:
        """x [B, L, dim]; context [B, Lc, dim] (cross-attention) or None (self-attention)."""
        x = x.to(self.q.weight.dtype)  # cast once for q/k/v (a no-op for float32 weights)
        kv_src = x if context is None else context
        v = self._heads(_linear(self.v, kv_src))
        q = self._heads(self.norm_q(_linear(self.q, x)))
        k = self._heads(self.norm_k(_linear(self.k, kv_src)))
        if rope is not None:
            q = apply_rope(q, rope, v.dtype)
            k = apply_rope(k, rope, v.dtype)
        else:
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = attention(q, k, v, k_lens=k_lens)
        return _linear(self.o, out.flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention: same parameters, no RoPE, no key mask."""


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNormAffine(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: Tensor, tc: TimeCond, context: Tensor, rope: Tensor, k_lens: Tensor | None) -> Tensor:
        """x [B, L, dim] float32 residual stream (updated in place and returned)."""
        # [U, 6, dim]: chunks shift/scale/gate for self-attention, then shift/scale/gate for FFN.
        m = self.modulation.float()[0] + tc.e0

        h = _modulate(_layer_norm(x, self.eps), tc.rows(1 + m[:, 1]), tc.rows(m[:, 0]))  # norm1
        x = _residual(x, self.self_attn(h, rope=rope, k_lens=k_lens), tc.rows(m[:, 2]))

        x = _residual(x, self.cross_attn(self.norm3(x), context=context))  # no modulation, no gate

        h = _modulate(_layer_norm(x, self.eps), tc.rows(1 + m[:, 4]), tc.rows(m[:, 3]))  # norm2
        y = _linear(self.ffn[2], self.ffn[1](_linear(self.ffn[0], h)))
        return _residual(x, y, tc.rows(m[:, 5]))


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: Tensor, tc: TimeCond) -> Tensor:
        """x [B, L, dim] -> [B, L, prod(patch)*out_dim] float32; modulated by e (not e0)."""
        m = self.modulation.float()[0] + tc.e[:, None, :]  # [U, 2, dim]: shift, scale
        h = _modulate(_layer_norm(x, self.eps), tc.rows(1 + m[:, 1]), tc.rows(m[:, 0]))
        return _linear_fp32(self.head, h)


# ---------------------------------------------------------------------------------------------
# the model


class WanModel(nn.Module):
    """Wan DiT. `forward(x, t, context, seq_len=None, y=None)`; see `forward` for shapes."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.num_heads} heads of even size")
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(dim, math.prod(cfg.patch_size) * cfg.out_dim, cfg.eps)
        # RoPE tables keyed by (grid, length, device, dtype); a plain attribute, so it is not in
        # the state dict and `.to(dtype)` leaves its float64/complex precision alone.
        self._rope_cache: dict[tuple, Tensor] = {}

    # -- helpers ----------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_mixed_precision(self, dtype: torch.dtype = torch.bfloat16) -> "WanModel":
        """Cast the compute-heavy weights to `dtype`, keeping `keep_fp32` parts in float32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keep_fp32(name) else dtype)
        return self

    def _rope(self, grid: tuple[int, int, int], length: int, device: torch.device, attn_dtype: torch.dtype) -> Tensor:
        # float64 rotation when attention runs in float32 (official numerics); complex64 for
        # half-precision attention, whose inputs are rounded to 8-11 mantissa bits anyway.
        cdtype = torch.complex128 if attn_dtype in (torch.float32, torch.float64) else torch.complex64
        key = (grid, length, str(device), cdtype)
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_table(grid, self.cfg.head_dim, length, device).to(cdtype)
            self._rope_cache.clear()  # keep one entry: shapes rarely change within a run
            self._rope_cache[key] = table
        return table

    def embed_time(self, t: Tensor, batch: int, num_tokens: int, seq_len: int) -> TimeCond:
        """Timesteps [B], [1], [B, 1] or [B, L] (L = seq_len or num_tokens) -> TimeCond."""
        t = torch.as_tensor(t, device=self.time_projection[1].weight.device)
        if t.dim() == 0:
            t = t.reshape(1)
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() > 2 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep shape {tuple(t.shape)} does not fit a batch of {batch}")
        if t.dim() == 2:
            if t.shape[1] not in (num_tokens, seq_len):
                raise ValueError(
                    f"per-token timesteps have {t.shape[1]} columns; expected {num_tokens} (tokens)"
                    f" or {seq_len} (seq_len)"
                )
            # Columns past the real tokens belong to padding, whose outputs are dropped.
            t = t[:, :num_tokens].expand(batch, -1)
            if bool((t == t[:, :1]).all()):
                t = t[:, 0]  # one value per sample: per-sample path, identical rows
        else:
            t = t.expand(batch)
        index = None
        if t.dim() == 2:
            # Per token: run the MLP on the few distinct values only, then index.
            t, index = torch.unique(t, return_inverse=True)
            if seq_len > num_tokens:
                # Padding tokens: any row will do (their outputs are dropped, keys masked).
                pad = index[:, -1:].expand(-1, seq_len - num_tokens)
                index = torch.cat([index, pad], dim=1)
        with torch.autocast(t.device.type, enabled=False):
            emb = sinusoidal_embedding(t, self.cfg.freq_dim)
            e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], emb)))
            e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return TimeCond(e, e0, index)

    def embed_text(self, context: Tensor | list[Tensor], batch: int) -> Tensor:
        """Text features (list of [L_i, text_dim] or [B, L, text_dim]) -> [B, text_len, dim].

        Rows are zero-padded to text_len BEFORE the MLP, so padded slots become a constant
        vector that cross-attention attends to (no text mask), as in the official model.
        """
        cfg = self.cfg
        w = self.text_embedding[0].weight
        if isinstance(context, Tensor):
            if context.dim() != 3:
                raise ValueError(f"context tensor must be [B, L, {cfg.text_dim}], got {tuple(context.shape)}")
            rows = list(context.unbind(0))
        else:
            rows = list(context)
        if len(rows) != batch:
            raise ValueError(f"got {len(rows)} text contexts for a batch of {batch}")
        ctx = torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=w.dtype, device=w.device)
        for i, c in enumerate(rows):
            if c.dim() != 2 or c.shape[1] != cfg.text_dim:
                raise ValueError(f"text context {i} must be [L, {cfg.text_dim}], got {tuple(c.shape)}")
            if c.shape[0] > cfg.text_len:
                raise ValueError(f"text context {i} has {c.shape[0]} rows; at most {cfg.text_len} allowed")
            ctx[i, : c.shape[0]] = c
        return _linear(self.text_embedding[2], self.text_embedding[1](_linear(self.text_embedding[0], ctx)))

    def patchify(self, x: Tensor, seq_len: int | None) -> tuple[Tensor, tuple[int, int, int], int]:
        """[B, C, F, H, W] -> float32 tokens [B, L, dim] zero-padded to L, grid (F', H', W'), N."""
        p = self.cfg.patch_size
        if any(s % q for s, q in zip(x.shape[2:], p)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size {p}")
        w = self.patch_embedding.weight
        tok = self.patch_embedding(x.to(w.dtype))  # [B, dim, F', H', W']
        grid = tuple(tok.shape[2:])
        n = math.prod(grid)
        length = n if seq_len is None else int(seq_len)
        if length < n:
            raise ValueError(f"seq_len {length} is smaller than the number of tokens {n} for grid {grid}")
        out = torch.zeros(x.shape[0], length, self.cfg.dim, dtype=torch.float32, device=tok.device)
        out[:, :n] = tok.flatten(2).transpose(1, 2)  # padding rows stay zero (no conv bias)
        return out, grid, n

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int], n: int) -> Tensor:
        """[B, L, prod(p)*C] (channel fastest) -> [B, C, F'pt, H'ph, W'pw] float32."""
        (pt, ph, pw), c = self.cfg.patch_size, self.cfg.out_dim
        f, h, w = grid
        u = out[:, :n].reshape(out.shape[0], f, h, w, pt, ph, pw, c)
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
        return u.reshape(out.shape[0], c, f * pt, h * ph, w * pw).float()

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | list[Tensor],
        seq_len: int | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity.

        x [B, C_x, F, H, W] noisy latents; y [B, C_y, F, H, W] conditioning concatenated after x
        on channels (i2v; C_x + C_y = in_dim); t [B] / [1] (one timestep per sample) or [B, L]
        per token (L = seq_len or the token count); context: list of B [L_i, text_dim] or
        [B, L_txt, text_dim]; seq_len: pad the F'H'W' tokens to this length (keys masked).
        Returns [B, out_dim, F, H, W] float32.
        """
        cfg = self.cfg
        if x.dim() != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
        if y is not None:
            if y.dim() != 5 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"conditioning y {tuple(y.shape)} does not match latents {tuple(x.shape)}")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif cfg.model_type == "i2v":
            raise ValueError("an i2v model needs the image conditioning y")
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents (+ y) have {x.shape[1]} channels; the model expects {cfg.in_dim}")
        batch = x.shape[0]
        state = self.prepare(x, t, context, seq_len)
        h = self.run_blocks(state.h, state)
        return self.finish(h, state)

    # The forward pass in three stages, so that step caching (skip `run_blocks`), block offload
    # (stream blocks in `run_blocks`) and sequence parallelism (shard `state` between stages)
    # each hook into one place without a second copy of the forward.

    def prepare(self, x: Tensor, t: Tensor, context: Tensor | list[Tensor], seq_len: int | None) -> "DiTState":
        """Patch, time and text embeddings for x [B, in_dim, F, H, W] (y already concatenated)."""
        batch = x.shape[0]
        h, grid, n = self.patchify(x, seq_len)
        length = h.shape[1]
        tc = self.embed_time(t, batch, n, length)
        ctx = self.embed_text(context, batch)
        # The dtype attention will run in: v's weight dtype, or the autocast dtype if one is active.
        attn_dtype = self.blocks[0].self_attn.v.weight.dtype if len(self.blocks) else torch.float32
        if torch.is_autocast_enabled(h.device.type):
            attn_dtype = torch.get_autocast_dtype(h.device.type)
        rope = self._rope(grid, length, h.device, attn_dtype)
        # Every sample has the same grid, so one key length for all; None when nothing is padded.
        k_lens = None if length == n else torch.full((batch,), n, dtype=torch.int64)
        return DiTState(h=h, tc=tc, ctx=ctx, rope=rope, k_lens=k_lens, grid=grid, n=n)

    def run_blocks(self, h: Tensor, state: "DiTState") -> Tensor:
        """The transformer blocks over the residual stream h [B, L, dim] float32."""
        for block in self.blocks:
            h = block(h, state.tc, state.ctx, state.rope, state.k_lens)
        return h

    def finish(self, h: Tensor, state: "DiTState") -> Tensor:
        """Head and unpatchify: h [B, L, dim] -> velocity [B, out_dim, F, H, W] float32."""
        with torch.autocast(h.device.type, enabled=False):
            out = self.head(h, state.tc)
        return self.unpatchify(out, state.grid, state.n)


@dataclass
class DiTState:
    """What `WanModel.prepare` hands to the blocks and the head (shapes for B samples, L tokens)."""

    h: Tensor  # [B, L, dim] float32 residual stream after the patch embedding
    tc: TimeCond
    ctx: Tensor  # [B, L_txt, dim] embedded text
    rope: Tensor  # [L, head_dim / 2] complex rotation table
    k_lens: Tensor | None  # [B] valid key count when L is padded, else None
    grid: tuple[int, int, int]  # (F', H', W') token grid
    n: int  # real (unpadded) token count


def build_dit(cfg: DiTConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> WanModel:
    """Construct a WanModel on `device` (default "meta": no memory; load with assign=True)."""
    with torch.device(device):
        model = WanModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
