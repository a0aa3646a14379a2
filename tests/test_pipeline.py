"""The generation pipeline: golden parity of the official loops, task conditioning, the shared
denoising loop (experts, guidance, first-frame reset, placement) and the Python API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import kinema
from kinema import pipeline as pl
from kinema import placement
from kinema import tasks as cnd
from kinema.request import Request
from kinema.validate import resolve
from kinema.video import sidecar_path
from kinema.config import PRESETS
from kinema.errors import InputError, KinemaError
from kinema.sampling import unipc_schedule

from conftest import golden_files

PIPE_CASES = golden_files("pipe_*.safetensors")



# ------------------------------------------------------------------------------ golden parity


@pytest.mark.parametrize("path", PIPE_CASES, ids=lambda p: p.stem)
def test_golden_pipeline(path):
    from kinema.testing.golden import run_case

    result = run_case(path)
    assert "error" not in result, result.get("error")
    bad = {k: v for k, v in result["outputs"].items() if not v["ok"]}
    assert result["ok"] and not bad, bad


@pytest.mark.parametrize("path", PIPE_CASES, ids=lambda p: p.stem)
def test_golden_noise_is_the_cpu_generator_draw(path):
    """The stored noise is what `draw_noise` gives for the stored seed: a seed means one thing."""
    from kinema.testing.golden import load_case

    case = load_case(path)
    p = case.params
    pairs = [("noise", "seed")] if case.kind == "pipe_t2v_moe" else [("noise_t2v", "seed_t2v"), ("noise_i2v", "seed_i2v")]
    for name, seed in pairs:
        ref = case.inputs[name]
        assert torch.equal(pl.draw_noise(ref.shape, p[seed]), ref)


# ------------------------------------------------------------------------------ conditioning


@pytest.mark.parametrize("wh, expected", [
    ((1920, 1080), (1248, 704)),
    ((1280, 720), (1248, 704)),
    ((1080, 1920), (704, 1248)),
    ((1024, 1024), (960, 928)),
])
def test_best_output_size_spec_examples(wh, expected):
    assert cnd.best_output_size(*wh, 32, 32, 704 * 1280) == expected


@pytest.mark.parametrize("wh, area, expected_wh", [
    ((1920, 1080), 1280 * 720, (1280, 720)),
    ((1920, 1080), 832 * 480, (832, 464)),
    ((1000, 1000), 1280 * 720, (960, 960)),
])
def test_i2v_max_area_spec_examples(wh, area, expected_wh):
    lat_w, lat_h = cnd.i2v_latent_size(*wh, area, 8, 2)
    assert (lat_w * 8, lat_h * 8) == expected_wh


def test_best_output_size_rejects_impossible_area():
    with pytest.raises(InputError):
        cnd.best_output_size(1000, 1, 32, 32, 64 * 64)


def test_ti2v_image_tensor_resizes_and_centre_crops():
    from PIL import Image

    # 100x50 image: left half black, right half white; a 32x32 crop of the 64x32 resize is
    # centred on the edge, so it holds both colours in equal parts.
    arr = np.zeros((50, 100, 3), dtype=np.uint8)
    arr[:, 50:] = 255
    x = cnd.ti2v_image_tensor(Image.fromarray(arr), (32, 32))
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, :, 2].mean() < -0.9 and x[0, 0, :, -3].mean() > 0.9


def test_i2v_frame_mask_and_video():
    mask = cnd.i2v_frame_mask(4, 3, 2, 5)
    assert mask.shape == (4, 3, 2, 5)
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)
    img = torch.rand(3, 8, 8)
    video = cnd.i2v_conditioning_video(img, 9)
    assert video.shape == (3, 9, 8, 8)
    assert torch.equal(video[:, 0], img) and not video[:, 1:].any()


def test_token_timesteps_zero_on_first_frame_tokens():
    mask = cnd.token_timestep_mask(3, 4, 6, (1, 2, 2), first_frame_known=True)
    assert mask.shape == (3 * 2 * 3,)
    t = cnd.token_timesteps(mask, torch.tensor(937), seq_len=20)
    assert t.shape == (1, 20) and t.dtype == torch.float32
    assert torch.all(t[0, :6] == 0) and torch.all(t[0, 6:] == 937)  # padding gets t too
    ones = cnd.token_timestep_mask(3, 4, 6, (1, 2, 2), first_frame_known=False)
    assert torch.all(ones == 1)


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        cnd.load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        cnd.load_image(bad)
    with pytest.raises(InputError):
        cnd.load_image(np.zeros((4, 4), dtype=np.uint8))


def test_plan_task_geometry_full_size_models():
    t2v = cnd.plan_task(PRESETS["t2v-A14B"], (1280, 720), 81)
    assert t2v.latent_shape == (16, 21, 90, 160) and t2v.seq_len == 75600 and t2v.token_mask is None
    ti2v = cnd.plan_task(PRESETS["ti2v-5B"], (1280, 704), 121)
    assert ti2v.latent_shape == (48, 31, 44, 80) and ti2v.seq_len == 27280
    assert ti2v.token_mask is not None and torch.all(ti2v.token_mask == 1)


# ------------------------------------------------------------------------------ validation


def resolve_settings(spec, prompt, image=None, **kw):
    return resolve(spec, Request.from_options(prompt, image, **kw))


def _settings(name="ti2v-5B", **kw):
    return resolve_settings(PRESETS[name], "a cat", **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(frames=8), "4n\\+1"),
    (dict(frames=0), "4n\\+1"),
    (dict(size=(1280, 720)), "multiples of 32"),
    (dict(size="64x"), "WIDTHxHEIGHT"),
    (dict(steps=0), "steps"),
    (dict(guidance=-0.5), "guidance"),
    (dict(guidance=(1.0, 2.0)), "guidance"),
    (dict(shift=0), "shift"),
    (dict(sampler="ddim"), "sampler"),
])
def test_settings_reject_bad_input(kw, match):
    with pytest.raises(InputError, match=match):
        _settings(**kw)


def test_settings_defaults_and_size_multiples():
    s = _settings()
    d = PRESETS["ti2v-5B"].defaults
    assert (s.size, s.frames, s.steps, s.guidance, s.shift, s.sampler) == (
        d.size, d.frames, d.steps, d.guidance, d.shift, "unipc")
    assert 0 <= s.seed < 2**63
    # Wan2.1-VAE models take multiples of 16, Wan2.2 ones multiples of 32
    assert _settings("t2v-A14B", size=(848, 480)).size == (848, 480)
    with pytest.raises(InputError):
        _settings("ti2v-5B", size=(848, 480))
    moe = _settings("t2v-A14B")
    assert moe.guidance == (3.0, 4.0) and moe.boundary == 0.875
    assert _settings("t2v-A14B", guidance=2.0).guidance == 2.0


def test_settings_task_and_image_checks(tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(img)
    with pytest.raises(InputError, match="text-to-video only"):
        _settings("t2v-A14B", image=img)
    with pytest.raises(InputError, match="image="):
        _settings("i2v-A14B")
    s = _settings("i2v-A14B", image=img, size=(832, 480))
    assert s.plan.image_mode == "concat" and s.image_info["sha256"]
    w, h = s.plan.size
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 1.5) < 0.1


# ------------------------------------------------------------------------------ the loop


class FakeDiT(nn.Module):
    """Velocity = scale·x + context offset; records every call (expert id, context, t)."""

    def __init__(self, ident: int, calls: list, scale: float = 0.1):
        super().__init__()
        self.ident = ident
        self.calls = calls
        self.w = nn.Parameter(torch.tensor(scale))

    def forward(self, x, t, context, seq_len=None, y=None):
        self.calls.append((self.ident, float(context[0].sum()), t.clone(), None if y is None else y.shape))
        return self.w * x + context[0].mean()


def _cond(shape=(4, 3, 2, 2), **kw):
    plan = cnd.TaskPlan(size=(32, 32), frames=9, latent_shape=shape, seq_len=shape[1] * shape[2] * shape[3] // 4,
                       token_mask=kw.pop("token_mask", None))
    return cnd.Conditioning(plan, **kw)


def test_moe_expert_choice_guidance_order_and_shared_expert():
    calls: list = []
    high, low = FakeDiT(0, calls), FakeDiT(1, calls)
    experts = placement.Experts([high, low], (3.0, 4.0), 0.875, torch.device("cpu"))
    assert experts.scales == [4.0, 3.0]  # expert 0 = high noise gets guidance[1]
    sched = unipc_schedule(8, 12.0)
    trace: list = []
    ctx, ctx_null = torch.ones(2, 8), torch.zeros(3, 8)
    pl.denoise_video(experts, torch.randn(4, 3, 2, 2), ctx, ctx_null, _cond(), sched, "unipc", trace=trace.append)
    ts = sched.timesteps.tolist()
    assert [c.expert for c in trace] == [0 if t >= 875 else 1 for t in ts]
    assert [c.guidance for c in trace] == [4.0 if t >= 875 else 3.0 for t in ts]
    # two passes per step, both with that step's expert, cond first
    assert len(calls) == 2 * len(ts)
    for i, t in enumerate(ts):
        (e1, c1, _, _), (e2, c2, _, _) = calls[2 * i: 2 * i + 2]
        assert e1 == e2 == trace[i].expert and c1 == 16.0 and c2 == 0.0
        v = trace[i]
        assert torch.allclose(v.v, v.v_uncond + v.guidance * (v.v_cond - v.v_uncond))


def test_guidance_one_skips_unconditional_pass():
    calls: list = []
    experts = placement.Experts([FakeDiT(0, calls)], 1.0, None, torch.device("cpu"))
    trace: list = []
    pl.denoise_video(experts, torch.randn(4, 3, 2, 2), torch.ones(2, 8), None, _cond(), unipc_schedule(3, 5.0),
                     "euler", trace=trace.append)
    assert len(calls) == 3 and all(c.v_uncond is None for c in trace)


@pytest.mark.parametrize("first_frame", [False, True])
def test_batched_guidance_passes_equal_two_calls(first_frame):
    from kinema.config import DiTConfig
    from kinema.models.dit import WanModel

    torch.manual_seed(0)
    dit = WanModel(DiTConfig(model_type="ti2v", in_dim=4, out_dim=4, dim=32, ffn_dim=64, num_heads=2,
                             num_layers=2, text_len=8, text_dim=8)).eval()
    with torch.no_grad():  # a trained-looking model: the zero-initialised rows too
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    kw = {}
    if first_frame:
        kw = dict(first_frame=torch.randn(4, 1, 4, 4),
                  token_mask=cnd.token_timestep_mask(3, 4, 4, (1, 2, 2), first_frame_known=True))
    ctx, ctx_null = torch.randn(3, 8), torch.randn(1, 8)
    runs, batches = {}, []
    dit.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    for batched in (False, True):
        trace: list = []
        batches.clear()
        out = pl.denoise_video(placement.Experts([dit], 4.0, None, torch.device("cpu")), torch.randn(4, 3, 4, 4,
                               generator=torch.Generator().manual_seed(1)), ctx, ctx_null,
                               _cond((4, 3, 4, 4), **kw), unipc_schedule(3, 5.0), "unipc",
                               trace=trace.append, batch_cfg=batched)
        runs[batched] = (out, trace)
        # two calls of batch 1 per step, or one call of batch 2
        assert batches == ([2] * len(trace) if batched else [1] * (2 * len(trace)))
    (a, trace_a), (b, trace_b) = runs[False], runs[True]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for ca, cb in zip(trace_a, trace_b):
        assert cb.v_cond.shape == cb.v_uncond.shape == ca.v_cond.shape
        torch.testing.assert_close(cb.v_uncond, ca.v_uncond, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cb.v_cond, cb.v_uncond)  # the two halves got different prompts


def test_first_frame_reset_before_and_after_every_step():
    calls: list = []
    experts = placement.Experts([FakeDiT(0, calls, scale=0.7)], 2.0, None, torch.device("cpu"))
    z = torch.randn(4, 1, 2, 2)
    mask = cnd.token_timestep_mask(3, 2, 2, (1, 2, 2), first_frame_known=True)
    trace, steps = [], []
    out = pl.denoise_video(experts, torch.randn(4, 3, 2, 2), torch.ones(2, 8), torch.zeros(2, 8),
                           _cond(first_frame=z, token_mask=mask), unipc_schedule(4, 5.0), "unipc",
                           trace=trace.append, callback=steps.append)
    assert torch.equal(out[:, :1], z)
    for c in trace:
        assert torch.equal(c.latent[0, :, :1], z)
        assert c.timestep.shape == (1, 3) and c.timestep[0, 0] == 0 and c.timestep[0, 1] == c.t
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(s.total == 4 for s in steps)
    assert all(torch.equal(s.latent[0, :, :1], z) for s in steps)


def test_two_experts_never_share_the_device(monkeypatch):
    """With offload, activating one expert moves the other off the device first."""
    where: dict[int, str] = {}
    log: list = []

    class Placed(FakeDiT):
        def to(self, device):
            where[self.ident] = torch.device(device).type
            log.append(dict(where))
            return self

    monkeypatch.setattr(placement, "module_device", lambda m: torch.device(where.get(m.ident, "cpu")))
    calls: list = []
    high, low = Placed(0, calls), Placed(1, calls)
    experts = placement.Experts([high, low], 2.0, 0.875, torch.device("cuda"), offload=True)
    for t in (999, 900, 800, 700, 990):
        assert experts.activate(experts.pick(t)) is (high if t >= 875 else low)
    experts.release()
    assert log and all(list(state.values()).count("cuda") <= 1 for state in log)
    assert where == {0: "cpu", 1: "cpu"}


def test_to_uint8_truncates():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 1, 6).expand(1, 3, 1, 1, 6)
    got = pl.to_uint8(x)[0, 0, :, 0].tolist()
    expected = [0, 0, 127, int((0.999 + 1) / 2 * 255), 255, 255]
    assert got == expected


# ------------------------------------------------------------------------------ Python API


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory):
    from kinema.testing.fixtures import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("models") / "ti2v", kind="ti2v", layout="official")
    return kinema.load(folder, device="cpu")


def test_api_same_seed_same_video_and_no_leak(ti2v_pipe):
    kw = dict(frames=5, steps=2, size=(64, 64))
    a = ti2v_pipe.generate("a red fox", seed=7, **kw)
    b = ti2v_pipe.generate("a red fox", seed=8, **kw)
    a2 = ti2v_pipe.generate("a red fox", seed=7, **kw)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (5, 64, 64, 3)
    assert np.array_equal(a.frames, a2.frames)
    assert not np.array_equal(a.frames, b.frames)
    assert a.fps == ti2v_pipe.spec.defaults.fps and a.metadata["settings"]["seed"] == 7


def test_api_batches_the_guidance_passes_of_short_sequences(ti2v_pipe, monkeypatch):
    batches: list = []
    hook = ti2v_pipe.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        kw = dict(frames=5, steps=2, size=(64, 64), guidance=4.0)
        a = ti2v_pipe.generate("a red fox", seed=3, **kw)
        assert batches == [2, 2]  # a few tokens: both passes in one call per step
        batches.clear()
        monkeypatch.setattr(pl, "BATCH_CFG_MAX_TOKENS", 0)  # as for a long sequence
        b = ti2v_pipe.generate("a red fox", seed=3, **kw)
        assert batches == [1, 1, 1, 1]
    finally:
        hook.remove()
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1  # the same video


def test_api_image_to_video_and_save(ti2v_pipe, tmp_path):
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    seen = []
    video = ti2v_pipe.generate("a red fox", img, frames=5, steps=2, size=(64, 64), seed=1, callback=seen.append)
    assert [s.step for s in seen] == [1, 2]
    w, h = cnd.best_output_size(70, 50, 32, 32, 64 * 64)
    assert video.frames.shape == (5, h, w, 3) and video.metadata["task"] == "image-to-video"
    out = video.save(tmp_path / "fox.mp4")
    from kinema.video_io import read_video

    frames, fps = read_video(out)
    assert frames.shape == video.frames.shape and math.isclose(fps, video.fps)
    side = json.loads(sidecar_path(out).read_text())
    for key in ("model", "size", "frames", "kinema_version", "image", "fps", "settings", "command"):
        assert key in side
    for key in ("prompt", "negative_prompt", "size", "frames", "steps", "sampler", "shift", "guidance", "seed"):
        assert key in side["settings"]
    assert side["settings"]["seed"] == 1 and side["kinema_version"] == kinema.__version__
    assert side["image"]["width"] == 70


def test_api_guidance_one_needs_no_negative_prompt(ti2v_pipe, monkeypatch):
    seen: list = []
    real = ti2v_pipe.text_encoder.encode
    monkeypatch.setattr(ti2v_pipe.text_encoder, "encode", lambda prompts: seen.append(list(prompts)) or real(prompts))
    ti2v_pipe.generate("a red fox", frames=1, steps=1, size=(32, 32), guidance=1.0, seed=0)
    assert seen == [["a red fox"]]


def test_image_first_is_text_to_image_then_image_to_video(ti2v_pipe):
    kw = dict(steps=2, size=(64, 64), seed=3)
    seen = []
    two = ti2v_pipe.generate("a red fox", frames=9, image_first=True, callback=seen.append, **kw)
    assert [(s.step, s.pass_index) for s in seen] == [(1, 1), (2, 1), (3, 2), (4, 2)]  # two passes of the same loop
    assert two.metadata["task"] == "text-to-video (image first)"
    assert "--image-first" in two.metadata["command"]  # not the tiny model's default
    # pass 1 is exactly the one-frame video of this seed (the causal VAE decodes frame 0 alone)
    still = ti2v_pipe.generate("a red fox", frames=1, **kw)
    assert np.abs(two.frames[0].astype(int) - still.frames[0]).max() <= 1
    # pass 2 is image-to-video from that latent: it differs from joint sampling
    joint = ti2v_pipe.generate("a red fox", frames=9, image_first=False, **kw)
    assert joint.metadata["task"] == "text-to-video"
    assert not np.array_equal(joint.frames, two.frames)
    again = ti2v_pipe.generate("a red fox", frames=9, image_first=True, **kw)
    assert np.array_equal(again.frames, two.frames)


def test_ddpm_image_first_pass_is_the_one_frame_video(ti2v_pipe):
    """The stochastic sampler keeps the image-first contract: pass 1 draws the same step noise as
    `frames=1` with this seed, and a seed gives one video."""
    kw = dict(steps=3, size=(64, 64), seed=4, sampler="ddpm")
    two = ti2v_pipe.generate("a red fox", frames=9, image_first=True, **kw)
    still = ti2v_pipe.generate("a red fox", frames=1, **kw)
    assert np.abs(two.frames[0].astype(int) - still.frames[0]).max() <= 1
    assert np.array_equal(two.frames, ti2v_pipe.generate("a red fox", frames=9, image_first=True, **kw).frames)
    euler = ti2v_pipe.generate("a red fox", frames=1, **{**kw, "sampler": "euler"})
    assert not np.array_equal(still.frames, euler.frames)
    assert "--sampler ddpm" in two.metadata["command"]
    # one stream per (seed, latent shape), none of them the initial noise's
    shape = (4, 1, 4, 4)
    a = torch.randn(shape, generator=pl.step_noise_generator(4, shape))
    assert torch.equal(a, torch.randn(shape, generator=pl.step_noise_generator(4, shape)))
    assert not torch.equal(a, pl.draw_noise(shape, 4))
    assert not torch.equal(a, torch.randn(shape, generator=pl.step_noise_generator(5, shape)))
    assert not torch.equal(a, torch.randn(shape, generator=pl.step_noise_generator(4, (4, 2, 4, 4)))[:, :1])


def test_stochastic_sampler_needs_a_generator():
    experts = placement.Experts([FakeDiT(0, [])], 1.0, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="Generator"):
        pl.denoise_video(experts, torch.randn(4, 3, 2, 2), torch.ones(2, 8), None, _cond(), unipc_schedule(3, 5.0),
                         "ddpm")


def test_image_first_scale_draws_the_first_frame_larger_then_shrinks_it(ti2v_pipe):
    kw = dict(steps=2, seed=3)
    seen: list = []
    s = ti2v_pipe.settings("a red fox", frames=9, size=(64, 64), image_first=True, image_first_scale=2, **kw)
    video = ti2v_pipe.run(s, hooks=pl.Hooks(on_conditioning=seen.append))
    assert video.frames.shape == (9, 64, 64, 3)
    # pass 1 is exactly the one-frame video of this seed at twice the size ...
    assert seen[0].plan.latent_shape[2:] == tuple(2 * n for n in s.plan.latent_shape[2:])
    still = ti2v_pipe.generate("a red fox", frames=1, size=(128, 128), **kw)
    # ... and pass 2 starts from that frame, shrunk to 64x64 and encoded
    torch.testing.assert_close(seen[1].first_frame, cnd.encode_keyframe(ti2v_pipe.vae, still.frames[0], (64, 64), "cpu"))
    assert video.metadata["settings"]["image_first_scale"] == 2
    assert "--image-first-scale 2" in video.metadata["command"]  # not the tiny model's default
    one = ti2v_pipe.generate("a red fox", frames=9, size=(64, 64), image_first=True, **kw)
    assert one.metadata["settings"]["image_first_scale"] == 1 and "--image-first-scale" not in one.metadata["command"]


def test_encode_keyframe_averages_blocks(ti2v_pipe):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(small, 3, axis=0), 3, axis=1)  # each pixel a 3x3 block
    direct = ti2v_pipe.vae.encode(torch.from_numpy(small).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1)[0]
    torch.testing.assert_close(cnd.encode_keyframe(ti2v_pipe.vae, big, (48, 32), "cpu"), direct,
                               rtol=1e-4, atol=1e-4)


def test_image_first_settings():
    ti2v, t2v = PRESETS["ti2v-5B"], PRESETS["t2v-A14B"]
    assert not resolve_settings(ti2v, "x", frames=81).image_first  # the official default
    assert resolve_settings(ti2v, "x", frames=81, image_first=True).image_first
    assert not resolve_settings(ti2v, "x", frames=1, image_first=True).image_first  # one frame: one pass
    with pytest.raises(InputError, match="image_first= needs a TI2V model"):
        resolve_settings(t2v, "x", image_first=True)
    with pytest.raises(InputError, match="true or false"):
        resolve_settings(ti2v, "x", image_first="yes")
    assert resolve_settings(ti2v, "x", image_first=True).image_first_scale == 1  # the model's default
    assert resolve_settings(ti2v, "x", image_first=True, image_first_scale=2).image_first_scale == 2
    for bad in (0, 9, "2", 1.5):
        with pytest.raises(InputError, match="image_first_scale"):
            resolve_settings(ti2v, "x", image_first=True, image_first_scale=bad)


def test_load_builtin_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(pl, "BUILTIN_DIR", tmp_path / "nope")
    with pytest.raises(KinemaError, match="built-in model is not available"):
        kinema.load()


def test_resolve_device_and_dtype():
    assert placement.resolve_device("cpu").type == "cpu"
    assert placement.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert placement.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert placement.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError):
        placement.resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(InputError):
        placement.resolve_device("tpu")


def test_bf16_weights_track_fp32(ti2v_pipe):
    """dtype="bf16" converts the DiT (small parts stay fp32) and still makes nearly the same video."""
    p16 = kinema.load(ti2v_pipe.source, device="cpu", dtype="bf16")
    assert p16.transformer.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert p16.transformer.head.head.weight.dtype == torch.float32 and p16.vae.dtype == torch.float32
    kw = dict(frames=5, steps=3, size=(64, 64), seed=4)
    a = ti2v_pipe.generate("a red fox", **kw).frames.astype(np.int16)
    b = p16.generate("a red fox", **kw)
    assert np.abs(a - b.frames).mean() < 3 and b.metadata["settings"]["dtype"] == "bfloat16"
