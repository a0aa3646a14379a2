"""Wan2.1 / Wan2.2 video VAEs: golden parity, full-size structure, chunked decode, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import golden_files
from kinema.config import VAE21, VAE22, VAEConfig
from kinema.models.vae import CausalCache, CausalConv3d, WanVAE, cached_conv, patchify, unpatchify
from kinema.models.vae22 import AvgDown3D, DupUp3D
from kinema.testing.golden import run_case

TINY21 = VAEConfig(version="2.1", dim=4, z_dim=4, latents_mean=(0.1, -0.2, 0.3, 0.0),
                   latents_std=(1.5, 0.5, 2.0, 1.0))
TINY22 = VAEConfig(version="2.2", dim=4, dec_dim=6, z_dim=8, latents_mean=(0.1,) * 8,
                   latents_std=(0.7,) * 8)



def tiny_vae(cfg: VAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanVAE:
    """A VAE with seeded random weights (gammas near 1), built on meta and assign-loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = WanVAE(cfg)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("gamma"):
            sd[name] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):
            sd[name] = 0.05 * torch.randn(p.shape, generator=g)
        else:
            fan_in = p[0].numel()
            sd[name] = torch.randn(p.shape, generator=g) / fan_in ** 0.5
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def rand_video(t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("path", golden_files("vae2*.safetensors"), ids=lambda p: p.stem)
def test_golden(path):
    result = run_case(path)
    assert result["ok"], result


@pytest.mark.parametrize("cfg,manifest,count", [
    (VAE21, "official_vae_wan2_1.json", 126_892_531),
    (VAE22, "official_vae_wan2_2.json", 704_688_668),
])
def test_full_size_structure(keys_dir, cfg, manifest, count):
    with torch.device("meta"):
        model = WanVAE(cfg)
    ref = json.loads((keys_dir / manifest).read_text())["keys"]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(ref)
    assert got == {k: v[0] for k, v in ref.items()}
    assert sum(p.numel() for p in model.parameters()) == count
    # latent statistics are not part of the checkpoint
    assert not any("mean" in k or "std" in k or "scale" in k for k in got)


@pytest.mark.parametrize("cfg", [TINY21, TINY22], ids=["2.1", "2.2"])
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_round_trip_shapes(cfg, frames):
    model = tiny_vae(cfg)
    s = cfg.spatial_stride
    z = model.encode(rand_video(frames, 2 * s, 3 * s))
    assert z.shape == (1, cfg.z_dim, 1 + (frames - 1) // 4, 2, 3) and z.dtype == torch.float32
    video = model.decode(z)
    assert video.shape == (1, 3, frames, 2 * s, 3 * s) and video.dtype == torch.float32
    assert video.abs().max() <= 1.0 and torch.isfinite(video).all()


@pytest.mark.parametrize("cfg", [TINY21, TINY22], ids=["2.1", "2.2"])
def test_decode_chunks_equal_decode(cfg):
    model = tiny_vae(cfg)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, cfg.z_dim, 3, 2, 2, generator=g)
    chunks = list(model.decode_chunks(z, clamp=False))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    full = model.decode(z, clamp=False)
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, rtol=0, atol=0)
    assert full.abs().max() > 1.0  # so the clamp below is exercised
    torch.testing.assert_close(model.decode(z), full.clamp(-1, 1), rtol=0, atol=0)


def test_decode_is_causal_in_latent_frames():
    # Changing the last latent frame must leave all earlier decoded frames untouched.
    model = tiny_vae(TINY21)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 3, 2, 2, generator=g)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    a, b = model.decode(z, clamp=False), model.decode(z2, clamp=False)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max() > 1e-3


def test_batch_matches_single():
    model = tiny_vae(TINY22)
    v = torch.cat([rand_video(5, 32, 32, seed=5), rand_video(5, 32, 32, seed=6)])
    z = model.encode(v)
    torch.testing.assert_close(z[1:], model.encode(v[1:]), rtol=1e-5, atol=1e-5)


def test_bf16_module_takes_float32_input():
    model = tiny_vae(TINY21, dtype=torch.bfloat16)
    ref = tiny_vae(TINY21)
    v = rand_video(5, 16, 16)
    z = model.encode(v)
    assert z.dtype == torch.float32
    assert (z - ref.encode(v)).abs().max() < 0.25
    assert model.decode(z).dtype == torch.float32


@pytest.mark.parametrize("cfg", [TINY21, TINY22], ids=["2.1", "2.2"])
@pytest.mark.parametrize("shape", [
    lambda s: (1, 3, 4, s, s),           # frames not 1 + 4n
    lambda s: (1, 3, 6, s, s),
    lambda s: (1, 3, 5, 2 * s - 4, s),   # height not a multiple of the spatial stride
    lambda s: (1, 3, 5, s, s + 4),       # width
    lambda s: (1, 4, 5, s, s),           # not RGB
    lambda s: (3, 5, s, s),              # no batch dim
], ids=["t4", "t6", "h", "w", "rgb", "dims"])
def test_encode_rejects_bad_input(cfg, shape):
    model = tiny_vae(cfg)
    with pytest.raises(ValueError):
        model.encode(torch.zeros(shape(cfg.spatial_stride)))


def test_decode_rejects_bad_latent():
    model = tiny_vae(TINY21)
    with pytest.raises(ValueError):
        model.decode(torch.zeros(1, 5, 2, 2, 2))
    with pytest.raises(ValueError):
        model.decode_chunks(torch.zeros(4, 2, 2, 2))


def test_cached_conv_equals_full_causal_conv():
    # Generic cache rule: chunks 1, 4, 1, 3 frames give the same as one causal conv over all.
    g = torch.Generator().manual_seed(7)
    conv = CausalConv3d(3, 5, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 3, 9, 4, 4, generator=g)
    full = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    cache, outs, start = CausalCache(), [], 0
    for n in (1, 4, 1, 3):
        cache.begin_chunk()
        outs.append(cached_conv(conv, x[:, :, start:start + n], cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full.detach(), rtol=1e-5, atol=1e-5)


def test_patchify_channel_order():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(1, 2, 1, 4, 4)
    p = patchify(x, 2)
    # channel c*4 + w_off*2 + h_off at (h, w) holds pixel (2h + h_off, 2w + w_off)
    for c in range(2):
        for w_off in range(2):
            for h_off in range(2):
                assert torch.equal(p[0, c * 4 + w_off * 2 + h_off, 0], x[0, c, 0, h_off::2, w_off::2])
    assert torch.equal(unpatchify(p, 2), x)


def test_avgdown_dupup_layout():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 1, 4, 4, generator=g)
    down = AvgDown3D(2, 4, factor_t=2, factor_s=2)(x)
    # one frame front-padded with zeros: groups on the padded time offset are exactly zero
    assert down.shape == (1, 4, 1, 2, 2)
    assert torch.equal(down[:, 0::2], torch.zeros_like(down[:, 0::2]))
    # output channel o averages input channel o // 2 at time offset o % 2 over each 2x2 cell
    torch.testing.assert_close(down[:, 1::2], F.avg_pool2d(x[:, :, 0], 2)[:, :, None])
    up = DupUp3D(4, 2, factor_t=2, factor_s=2)
    y = torch.randn(1, 4, 2, 2, 2, generator=g)
    out = up(y)
    assert out.shape == (1, 2, 4, 4, 4)
    # output channel o, sub-position (i_t, i_h, i_w) copies input channel (o*8 + i_t*4 + i_h*2 + i_w) // R
    r = 2 * 8 // 4
    assert torch.equal(out[0, 1, 1, 0, 1], y[0, (8 + 4 + 0 + 1) // r, 0, 0, 0])
    assert torch.equal(up(y, first_chunk=True), out[:, :, 1:])


@pytest.mark.parametrize("cfg,frames,h,w", [
    (VAEConfig(version="2.1", dim=8, z_dim=4, latents_mean=(0.2,) * 4, latents_std=(1.5,) * 4), 13, 24, 40),
    (VAEConfig(version="2.2", dim=6, dec_dim=10, z_dim=8, latents_mean=(0.1,) * 8,
               latents_std=(0.5,) * 8), 13, 48, 32),
], ids=["2.1", "2.2"])
def test_matches_diffusers_oracle(cfg, frames, h, w):
    # Other widths, sizes and frame counts than the golden files; diffusers' AutoencoderKLWan
    # ports the official chunked algorithm, so it must agree to float32 round-off.
    diffusers = pytest.importorskip("diffusers")
    from kinema.keymaps import vae_state_to_diffusers

    model = tiny_vae(cfg, seed=11)
    kw = dict(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample))
    if cfg.version == "2.2":
        kw.update(decoder_base_dim=cfg.dec_dim, is_residual=True, in_channels=12, out_channels=12,
                  patch_size=2, scale_factor_spatial=16)
    oracle = diffusers.AutoencoderKLWan(**kw).eval()
    oracle.load_state_dict(vae_state_to_diffusers(model.state_dict(), cfg.version), strict=True)
    video = rand_video(frames, h, w, seed=12)
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = model.encode(video)
        mu = oracle.encode(video).latent_dist.mode()
        torch.testing.assert_close(z, (mu - mean) * (1 / std), rtol=1e-5, atol=1e-5)
        ref = oracle.decode(z * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(model.decode(z), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, stride, padding", [
    (3, 1, 1), (1, 1, 0), ((3, 1, 1), 1, (1, 0, 0)), ((3, 1, 1), (2, 1, 1), 0), (3, 2, 1),
])
def test_causal_conv_on_cpu_equals_conv3d(kernel, stride, padding):
    # on the CPU CausalConv3d runs one conv2d per time tap (faster there); it must be the same
    # convolution as conv3d, with and without cached context frames, forwards and backwards
    torch.manual_seed(0)
    conv = CausalConv3d(5, 7, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 5, 6, 9, 10, requires_grad=True)
    context = torch.randn(2, 5, 2, 9, 10)
    for ctx in (None, context):
        used = ctx is not None and conv.time_pad > 0  # a conv without time padding needs no context
        full = torch.cat([ctx, x], dim=2) if used else x
        ref_in = F.pad(full, (*conv.space_pad, conv.time_pad - (ctx.shape[2] if used else 0), 0))
        ref = F.conv3d(ref_in, conv.weight, conv.bias, stride=conv.stride)
        out = conv(x, ctx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g_out, = torch.autograd.grad(out.square().sum(), x)
        g_ref, = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)
