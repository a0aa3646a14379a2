"""WanModel (DiT) and attention: golden parity, full-size structure, invariances, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import golden_files
from kinema.attention import attention, available_backends, register_backend, unregister_backend
from kinema.config import PRESETS, DiTConfig
from kinema.errors import InputError
from kinema.models.dit import WanModel, build_dit, keep_fp32, rope_split
from kinema.testing.golden import run_case

# ---------------------------------------------------------------------------------------------
# golden parity


@pytest.mark.parametrize("path", golden_files("dit_*.safetensors"), ids=lambda p: p.stem)
def test_golden_dit(path):
    result = run_case(path)
    assert "error" not in result, result.get("error")
    assert result["ok"], result["outputs"]


# ---------------------------------------------------------------------------------------------
# full-size structure (meta device: no memory)

_OFFICIAL = {
    "ti2v-5B": ("official_wanmodel_ti2v_5B.json", 4_999_787_712),
    "t2v-A14B": ("official_wanmodel_t2v_A14B_expert.json", 14_288_491_584),
    "i2v-A14B": ("official_wanmodel_i2v_A14B_expert.json", 14_288_901_184),
}


@pytest.mark.parametrize("name", sorted(_OFFICIAL))
def test_full_size_keys_shapes_and_count(name, keys_dir):
    fname, count = _OFFICIAL[name]
    ref = json.loads((keys_dir / fname).read_text())["keys"]
    model = build_dit(PRESETS[name].dit, device="meta")
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(ref)
    assert got == {k: [list(s), d] for k, (s, d) in ref.items()}
    assert model.num_params() == count


def test_every_preset_builds_on_meta():
    for spec in PRESETS.values():
        model = build_dit(spec.dit)
        assert model.patch_embedding.weight.is_meta
        assert model.num_params() > 0


# ---------------------------------------------------------------------------------------------
# tiny model helpers

TINY = DiTConfig(model_type="t2v", text_len=16, in_dim=4, dim=64, ffn_dim=96, freq_dim=32,
                 text_dim=24, out_dim=4, num_heads=2, num_layers=2)


def _tiny(cfg: DiTConfig = TINY, seed: int = 0) -> WanModel:
    """A tiny model with every parameter random (so no path is a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    model = WanModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 and "modulation" not in name else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            if "modulation" in name:
                p.mul_(0.1)
    return model


def _inputs(batch: int = 2, frames: int = 3, h: int = 4, w: int = 6, seed: int = 1, cfg: DiTConfig = TINY):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, frames, h, w, generator=gen)
    ctx = [torch.randn(3 + 2 * i, cfg.text_dim, generator=gen) for i in range(batch)]
    t = torch.tensor([999.0, 417.25, 3.0, 500.0][:batch])
    return x, t, ctx


# ---------------------------------------------------------------------------------------------
# behaviour


@torch.no_grad()
def test_seq_len_padding_does_not_change_output():
    model = _tiny()
    x, t, ctx = _inputs()
    n = 3 * 2 * 3  # F' H' W'
    ref = model(x, t, ctx)
    padded = model(x, t, ctx, seq_len=n + 7)
    assert padded.shape == x.shape
    torch.testing.assert_close(padded, ref, rtol=0, atol=2e-5)
    # per-token t with seq_len columns or with token-count columns: same answer
    t_tok = torch.stack([torch.linspace(0, 900, n), torch.full((n,), 417.0)])
    a = model(x, t_tok, ctx, seq_len=n + 7)
    b = model(x, torch.cat([t_tok, torch.zeros(2, 7)], dim=1), ctx, seq_len=n + 7)
    c = model(x, t_tok, ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=2e-5)


@torch.no_grad()
def test_batch_equals_per_sample_runs():
    model = _tiny()
    x, t, ctx = _inputs(batch=3)
    batched = model(x, t, ctx)
    for i in range(3):
        alone = model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=2e-5)
    # per-token t that is constant per sample, and a padded tensor context, agree too
    n = 3 * 2 * 3
    ctx_tensor = torch.zeros(3, TINY.text_len, TINY.text_dim)
    for i, c in enumerate(ctx):
        ctx_tensor[i, : c.shape[0]] = c
    other = model(x, t[:, None].expand(3, n), ctx_tensor)
    torch.testing.assert_close(other, batched, rtol=0, atol=2e-5)


@torch.no_grad()
def test_per_token_timesteps_are_used_per_token():
    model = _tiny()
    x, t, ctx = _inputs(batch=1)
    n = 3 * 2 * 3
    t_tok = torch.full((1, n), 900.0)
    t_tok[0, :6] = 0.0  # first latent frame at t=0, as in TI2V image-to-video
    mixed = model(x, t_tok, ctx)
    flat = model(x, torch.tensor([900]), ctx)
    assert not torch.allclose(mixed, flat)
    # integer and float timesteps give the same result
    torch.testing.assert_close(model(x, torch.tensor([900], dtype=torch.int64), ctx), flat, rtol=0, atol=0)


@torch.no_grad()
def test_i2v_concatenates_y():
    cfg = DiTConfig(**{**TINY.__dict__, "model_type": "i2v", "in_dim": 9, "out_dim": 4})
    model = _tiny(cfg)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 2, 4, 4, generator=gen)
    y = torch.randn(1, 5, 2, 4, 4, generator=gen)
    ctx = [torch.randn(4, cfg.text_dim, generator=gen)]
    out = model(x, torch.tensor([913]), ctx, y=y)
    assert out.shape == (1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="needs the image conditioning"):
        model(x, torch.tensor([913]), ctx)


@torch.no_grad()
def test_mixed_precision_bf16_close_to_fp32():
    model = _tiny()
    x, t, ctx = _inputs()
    ref = model(x, t, ctx)
    model.to_mixed_precision(torch.bfloat16)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert model.time_projection[1].weight.dtype == torch.float32
    assert model.blocks[0].modulation.dtype == torch.float32
    got = model(x, t, ctx)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_state_dict_has_no_rope_and_survives_dtype_cast():
    model = _tiny()
    assert not any("freq" in k or "rope" in k for k in model.state_dict())
    assert list(model.buffers()) == []  # nothing that .to(dtype) could convert
    x, t, ctx = _inputs(batch=1)
    with torch.no_grad():
        model(x, t, ctx)
    model.to(torch.bfloat16)
    assert [v.dtype for v in model._rope_cache.values()] == [torch.complex128]


def test_meta_build_then_assign_load():
    src = _tiny()
    model = build_dit(TINY, device="meta")
    model.load_state_dict(src.state_dict(), strict=True, assign=True)
    x, t, ctx = _inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), src(x, t, ctx), rtol=0, atol=0)


def test_keep_fp32_and_rope_split():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)
    assert keep_fp32("blocks.3.modulation") and keep_fp32("head.head.weight")
    assert keep_fp32("time_projection.1.weight") and keep_fp32("blocks.0.self_attn.norm_q.weight")
    assert not keep_fp32("blocks.0.self_attn.q.weight") and not keep_fp32("blocks.1.ffn.0.weight")


# ---------------------------------------------------------------------------------------------
# bad input


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="seq_len 10 is smaller than the number of tokens 18"):
        model(x, t, ctx, seq_len=10)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="text contexts for a batch"):
        model(x, t, ctx[:1])
    with pytest.raises(ValueError, match="at most 16"):
        model(x, t, [torch.zeros(17, TINY.text_dim)] * 2)
    with pytest.raises(ValueError, match="timestep shape"):
        model(x, torch.zeros(3), ctx)
    with pytest.raises(ValueError, match="per-token timesteps"):
        model(x, torch.zeros(2, 11), ctx)
    with pytest.raises(ValueError, match="not divisible") as caught:
        model(x[..., :5], t, ctx)
    # internal shape errors keep their traceback: they are not one-line user errors
    assert not isinstance(caught.value, InputError)


# ---------------------------------------------------------------------------------------------
# attention


def _naive(q, k, v, k_lens):
    """float64 restatement: keys >= k_lens[b] excluded, all query rows computed."""
    q, k, v = (a.double() for a in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < torch.as_tensor(k_lens)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("k_lens", [None, [13, 13], [13, 5], [20, 20], [7, 30]])
def test_attention_k_lens_matches_naive(k_lens):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, 3, 16, generator=gen)
    k = torch.randn(2, 20, 3, 16, generator=gen) * 2
    v = torch.randn(2, 20, 3, 16, generator=gen)
    got = attention(q, k, v, k_lens=None if k_lens is None else torch.tensor(k_lens))
    ref = _naive(q, k, v, None if k_lens is None else [min(n, 20) for n in k_lens])
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    if k_lens is not None and min(k_lens) < 20:  # masking is real: it changes the answer
        assert (got.double() - _naive(q, k, v, None)).abs().max() > 1e-3


def test_attention_backend_registry():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    calls = []

    def fake(q, k, v, k_lens):
        calls.append(k_lens)
        return torch.zeros_like(q)

    register_backend("fake", fake, priority=1, supports=lambda q, k, v: q.shape[1] == 4)
    try:
        assert "fake" in available_backends()
        assert attention(q, k, v).abs().max() == 0  # auto picks the higher priority
        assert calls == [None]
        assert attention(q, k, v, backend="sdpa").abs().max() > 0
        # unsupported inputs fall back to sdpa under "auto"
        assert attention(q[:, :3], k, v, k_lens=[2]).abs().max() > 0
        assert len(calls) == 1
        with pytest.raises(ValueError, match="reserved"):
            register_backend("sdpa", fake)
    finally:
        unregister_backend("fake")
    assert "fake" not in available_backends()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="fake")
    with pytest.raises(ValueError, match=">= 1"):
        attention(q, k, v, k_lens=[0])


# ---------------------------------------------------------------------------------------------
# independent oracle: diffusers' port with the same weights (head_dim 64, 2 heads)

_TO_DIFFUSERS = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"\.modulation$", ".scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"self_attn\.([qkv])\.", r"attn1.to_\1."),
    (r"self_attn\.o\.", "attn1.to_out.0."),
    (r"self_attn\.norm_", "attn1.norm_"),
    (r"cross_attn\.([qkv])\.", r"attn2.to_\1."),
    (r"cross_attn\.o\.", "attn2.to_out.0."),
    (r"cross_attn\.norm_", "attn2.norm_"),
    (r"\.norm3\.", ".norm2."),
    (r"ffn\.0\.", "ffn.net.0.proj."),
    (r"ffn\.2\.", "ffn.net.2."),
]


@torch.no_grad()
def test_matches_diffusers_port_other_head_dim():
    import re

    diffusers = pytest.importorskip("diffusers")
    cfg = DiTConfig(model_type="t2v", text_len=16, in_dim=8, dim=128, ffn_dim=160, freq_dim=256,
                    text_dim=32, out_dim=8, num_heads=2, num_layers=2)
    model = _tiny(cfg, seed=5)
    ref_model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=8,
        out_channels=8, text_dim=32, freq_dim=256, ffn_dim=160, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()

    def rename(key):
        for pattern, repl in _TO_DIFFUSERS:
            key = re.sub(pattern, repl, key)
        return key

    ref_model.load_state_dict({rename(k): v for k, v in model.state_dict().items()}, strict=True)
    x, t, ctx = _inputs(batch=2, frames=3, h=6, w=8, seed=2, cfg=cfg)
    padded = torch.zeros(2, cfg.text_len, cfg.text_dim)  # diffusers gets the zero-padded context
    for i, c in enumerate(ctx):
        padded[i, : c.shape[0]] = c
    ours, ref = model(x, t, ctx), ref_model(x, t, padded, return_dict=False)[0]
    # diffusers' float32 sinusoid costs ~1e-5; wrong RoPE splits or orders cost >1e-2
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    n = 3 * 3 * 4
    t_tok = torch.full((1, n), 900.0)
    t_tok[0, :12] = 0.0
    ours, ref = model(x[:1], t_tok, ctx[:1]), ref_model(x[:1], t_tok, padded[:1], return_dict=False)[0]
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
