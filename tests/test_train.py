"""The training recipe of the built-in model: procedural data, the VAE training path, the
trainer (loss goes down, checkpoint/resume is exact) and a tiny end-to-end recipe run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kinema.config import WAN22_LATENT_MEAN, WAN22_LATENT_STD, VAEConfig
from kinema.train.evaluate import analyse_video
from kinema.models.dit import WanModel
from kinema.models.vae import WanVAE
from kinema.train.data import (
    DIRECTION_VECTORS, HELD_OUT, all_combos, canonical_caption, caption_for, make_clip, render_clip, sample_spec,
    train_combos,
)
from kinema.train.dit_train import DiTTrainSpec
from kinema.train.trainer import OptimConfig, Trainer
from kinema.train.vae_train import decode_raw, encode_raw, fold_latent_stats, widen_decoder


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- data -------------------------------------------------------------------------------------


def test_clips_are_deterministic_and_distinct():
    a, cap_a, spec_a = make_clip(3, 7)
    b, cap_b, spec_b = make_clip(3, 7)
    c, _, _ = make_clip(3, 8)
    assert a.dtype == np.uint8 and a.shape == (17, 128, 128, 3)
    assert np.array_equal(a, b) and cap_a == cap_b and spec_a == spec_b
    assert not np.array_equal(a, c)


def test_held_out_combinations_never_in_training():
    held = set(HELD_OUT)
    assert len(held) == len(HELD_OUT) >= 10
    assert held.isdisjoint(train_combos())
    assert len(train_combos()) + len(held) == len(all_combos())
    rng = np.random.default_rng(0)
    drawn = {(s.colour, s.shape, s.direction) for s in (sample_spec(rng) for _ in range(2000))}
    assert drawn.isdisjoint(held)
    assert drawn == set(train_combos())  # every training combination is used
    for colour, shape, direction in HELD_OUT:  # each attribute value still occurs in training
        assert any(c == colour for c, _, _ in train_combos())
        assert any((c, s) == (colour, shape) for c, s, _ in train_combos())
        assert any(d == direction for _, _, d in train_combos())


def test_captions_canonical_and_paraphrased():
    rng = np.random.default_rng(1)
    spec = sample_spec(rng, combo=("orange", "square", "up"))
    caps = [caption_for(spec, rng) for _ in range(300)]
    canonical = canonical_caption("orange", "square", "up")
    assert canonical == "a orange square moving up"
    assert 0.2 < caps.count(canonical) / len(caps) < 0.5
    assert len(set(caps)) > 30  # many paraphrases
    assert all("orange" in c.lower() for c in caps)


def test_layouts_draw_the_same_clip_at_another_size():
    from kinema.train.data import LAYOUT, SMALL_OBJECTS

    for i in range(50):
        small = sample_spec(np.random.default_rng(i), layout=SMALL_OBJECTS)
        large = sample_spec(np.random.default_rng(i), layout=LAYOUT)
        # the same random draws: only the size, the travel and the start they imply differ
        assert (small.colour, small.shape, small.direction, small.background, small.speed, small.rgb, small.bg) == \
            (large.colour, large.shape, large.direction, large.background, large.speed, large.rgb, large.bg)
        assert 16 <= small.radius <= 23 and 28 <= large.radius <= 34
        assert large.distance == pytest.approx(small.distance * LAYOUT.travel)
        # the larger object's path starts and ends inside the frame
        dx, dy = DIRECTION_VECTORS[large.direction]
        for f in (0.0, 1.0):
            cx = (large.start[0] + dx * large.distance * f) * 128
            cy = (large.start[1] + dy * large.distance * f) * 128
            assert large.radius < min(cx, cy) and max(cx, cy) + large.radius < 128


def test_aligned_layout_snaps_the_start_and_widens_squares():
    from kinema.train.data import ALIGNED, LAYOUT
    from kinema.train.steps import _layout_tag

    starts = set()
    for i in range(200):
        free = sample_spec(np.random.default_rng(i), layout=LAYOUT)
        snapped = sample_spec(np.random.default_rng(i), layout=ALIGNED)
        # the same random draws; the start moves by at most half a grid step
        assert (free.colour, free.shape, free.direction, free.background, free.speed, free.rgb) == \
            (snapped.colour, snapped.shape, snapped.direction, snapped.background, snapped.speed, snapped.rgb)
        px = np.array(snapped.start) * 128
        assert np.allclose(px, np.round(px / 8) * 8) and snapped.radius == 31 and snapped.square == 1.0
        assert free.square == 0.88
        starts.add(tuple(px))
    assert len(starts) > 10  # a few positions, not one
    assert len({_layout_tag(x) for x in (LAYOUT, ALIGNED, replace(ALIGNED, square=0.88))}) == 3
    # a square as wide as the circle: its box is 2 r; at 0.88 it has the circle's area instead
    spec = sample_spec(np.random.default_rng(3), combo=("red", "square", "left"), layout=ALIGNED)
    plain = ((20, 20, 20), (20, 20, 20), False)
    frame = render_clip(replace(spec, start=(0.5, 0.5), bg=plain), frames=1)[0].astype(int)
    cols = np.flatnonzero((frame - 20).sum(-1).max(0) > 100)
    assert cols[-1] - cols[0] + 1 == 62
    det = analyse_video(render_clip(spec))
    assert (det.shape, det.shape_template) == ("square", "square")


@pytest.mark.parametrize("combo", [("red", "circle", "left"), ("blue", "square", "down"),
                                   ("white", "triangle", "up"), ("purple", "triangle", "right")])
def test_rendered_clip_matches_its_description(combo):
    spec = sample_spec(np.random.default_rng(5), combo=combo)
    det = analyse_video(render_clip(spec))
    assert (det.colour, det.shape, det.direction) == combo


# -- VAE training path ------------------------------------------------------------------------


def _tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(version="2.2", dim=4, dec_dim=4, z_dim=48, latents_mean=WAN22_LATENT_MEAN,
                    latents_std=WAN22_LATENT_STD)
    return WanVAE(cfg).eval()


def test_vae_training_path_equals_inference():
    vae = _tiny_vae()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mean = torch.tensor(WAN22_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN22_LATENT_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mu, _ = encode_raw(vae, video)
        z = vae.encode(video)
        torch.testing.assert_close((mu - mean) / std, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_raw(vae, mu).clamp(-1, 1), vae.decode(z), rtol=1e-4, atol=1e-5)
    # gradients reach the encoder through the decoder's and encoder's chunk caches
    mu, _ = encode_raw(vae, video)
    decode_raw(vae, mu).square().mean().backward()
    assert vae.encoder.conv1.weight.grad.abs().sum() > 0


def test_vae_batches_switch_from_crops_to_whole_frames():
    from kinema.train.vae_train import VAETrainSpec, vae_batch

    spec = VAETrainSpec(batch=3, frames=5, crop=32, full_from=2, full_batch=1)
    early, late = vae_batch(spec, 0, 1), vae_batch(spec, 0, 2)
    assert early.shape == (3, 3, 5, 32, 32)
    assert late.shape == (1, 3, 5, 128, 128)
    assert vae_batch(replace(spec, full_from=None), 0, 50).shape == (3, 3, 5, 32, 32)


def test_fold_latent_stats_normalizes_and_keeps_reconstruction():
    vae = _tiny_vae()
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        mu, _ = encode_raw(vae, video)
        before = decode_raw(vae, mu)
        flat = mu.transpose(0, 1).flatten(1)
        mean, std = flat.mean(1), flat.std(1)
        fold_latent_stats(vae, mean, std)
        z = vae.encode(video)
        torch.testing.assert_close(z, (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(z, clamp=False), before, rtol=1e-4, atol=1e-4)


# -- trainer: loss goes down, resume is exact -------------------------------------------------


def _tiny_dit_setup():
    from kinema.train.dit_train import DiTTrainSpec, DiTWithText, flow_loss
    from kinema.models.dit import WanModel
    from kinema.models.t5 import T5Encoder

    spec = DiTTrainSpec(dim=32, ffn_dim=64, num_heads=1, num_layers=1, text_len=16, t5_dim=16, t5_ffn=32,
                        t5_heads=2, t5_layers=1, batch=4)
    torch.manual_seed(0)
    model = DiTWithText(WanModel(spec.dit_config(8)), T5Encoder(spec.t5_config(20)))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 8, 2, 4, 4, generator=g)
    ids = torch.randint(3, 20, (4, 5), generator=g)
    mask = torch.ones(4, 5, dtype=torch.long)

    def loss_fn(step, gen):
        return flow_loss(model, spec, latents, ids, mask, gen)

    def eval_loss():
        with torch.no_grad():
            return float(sum(flow_loss(model, spec, latents, ids, mask, torch.Generator().manual_seed(100 + i))[0]
                             for i in range(8)))
    return model, loss_fn, eval_loss


def test_short_training_reduces_the_flow_loss():
    model, loss_fn, eval_loss = _tiny_dit_setup()
    before = eval_loss()
    Trainer(model, loss_fn, OptimConfig(steps=60, lr=3e-3, warmup=5)).run(progress=False)
    after = eval_loss()
    assert after < 0.8 * before


def test_shape_pairs_share_noise_and_weight_their_difference():
    from kinema.train.dit_train import DiTTrainSpec, pair_loss

    class Zero(torch.nn.Module):  # predicts 0 everywhere, so the loss terms are the targets'
        cfg = type("Cfg", (), {"patch_size": (1, 2, 2)})

        def forward(self, x, t, context):
            return torch.zeros_like(x)

    model = type("M", (), {"dit": Zero(), "encode_text": lambda self, ids, mask: []})()
    spec = DiTTrainSpec(pair_weight=3.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 1, 4, 4, generator=g)
    ids, mask = torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)
    loss, logs = pair_loss(model, spec, a, b, ids, mask, torch.Generator().manual_seed(1))
    # the same noise: the two targets differ by the clean latents only
    assert logs["pair_diff"] == pytest.approx(float((a - b).square().mean()), rel=1e-5)
    assert float(loss) == pytest.approx(logs["pair_fit"] + 3.0 * logs["pair_diff"], rel=1e-5)
    same, logs = pair_loss(model, spec, a, a, ids, mask, torch.Generator().manual_seed(1))
    assert logs["pair_diff"] == 0.0 and float(same) == pytest.approx(logs["pair_fit"])


def test_checkpoint_resume_reproduces_the_same_run(tmp_path):
    cfg = OptimConfig(steps=6, lr=1e-3, warmup=2, checkpoint_every=3, ema_decay=0.9)
    model, loss_fn, _ = _tiny_dit_setup()
    full = Trainer(model, loss_fn, cfg, checkpoint=tmp_path / "a.pt")
    full.run(until=3, progress=False)
    shutil.copy(tmp_path / "a.pt", tmp_path / "b.pt")
    full.run(progress=False)

    model2, loss_fn2, _ = _tiny_dit_setup()
    torch.manual_seed(123)  # a different init is fully replaced by the checkpoint
    for p in model2.parameters():
        p.data.normal_()
    resumed = Trainer(model2, loss_fn2, cfg, checkpoint=tmp_path / "b.pt")
    assert resumed.maybe_resume() and resumed.step == 3
    resumed.run(progress=False)
    assert resumed.history == full.history  # same next losses
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for k in full.ema:
        assert torch.equal(full.ema[k], resumed.ema[k]), k


def test_recent_loss_is_the_history_mean_and_says_when_there_is_none(tmp_path):
    cfg = OptimConfig(steps=4, lr=1e-3, warmup=1, checkpoint_every=2)
    model, loss_fn, _ = _tiny_dit_setup()
    trained = Trainer(model, loss_fn, cfg, checkpoint=tmp_path / "a.pt")
    trained.run(progress=False)
    assert trained.recent_loss(2) == f"{np.mean(trained.history[-2:]):.5f}"
    assert trained.recent_loss(100) == f"{np.mean(trained.history):.5f}"
    # a checkpoint written without training (as when a run starts from given weights) holds no
    # history: the log says so instead of printing nan
    blank = Trainer(model, loss_fn, cfg, checkpoint=tmp_path / "b.pt")
    blank.step = cfg.steps
    blank.save()
    resumed = Trainer(model, loss_fn, cfg, checkpoint=tmp_path / "b.pt")
    assert resumed.maybe_resume() and resumed.recent_loss(100) == "none logged"


def test_warm_start_continues_from_the_weights_with_a_new_schedule():
    model, loss_fn, eval_loss = _tiny_dit_setup()
    first = Trainer(model, loss_fn, OptimConfig(steps=40, lr=3e-3, warmup=5))
    first.run(progress=False)
    trained = eval_loss()
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    model2, loss_fn2, eval_loss2 = _tiny_dit_setup()
    cfg = OptimConfig(steps=5, lr=1e-3, warmup=2, bf16=True, seed=1)
    second = Trainer(model2, loss_fn2, cfg)
    second.warm_start(first.state_dict())
    assert second.step == 0 and second.history == []
    for k, v in model2.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(g["lr"] == cfg.lr for g in second.optimizer.param_groups)
    # the optimizer moments carry over (a fresh AdamW would have an empty state)
    assert len(second.optimizer.state) == len(first.optimizer.state) > 0
    second.run(progress=False)
    assert second.step == 5 and all(np.isfinite(second.history))
    assert eval_loss2() < 1.2 * trained  # continues near the trained loss, not from scratch


def test_widened_decoder_decodes_like_the_narrow_one_and_its_new_channels_learn():
    cfg = VAEConfig(version="2.2", dim=4, dec_dim=4, z_dim=48, latents_mean=WAN22_LATENT_MEAN,
                    latents_std=WAN22_LATENT_STD)
    torch.manual_seed(0)
    narrow = WanVAE(cfg).eval()
    with torch.no_grad():  # a trained-looking decoder: no zero or unit parameters left
        for p in narrow.decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    wide = widen_decoder(narrow, WanVAE(replace(cfg, dec_dim=8)).eval())
    assert wide.decoder.head[0].gamma.shape[0] == 8
    z = torch.randn(1, 48, 3, 2, 2)  # 3 latent frames: the first chunk and two cached ones
    with torch.no_grad():
        a, b = narrow.decode(z), wide.decode(z)
    assert a.shape == b.shape == (1, 3, 9, 32, 32)
    assert (a - b).abs().max() < 1e-3 and (a - b).abs().max() > 0  # near-identical, not a copy
    # the zero-initialised weights from new channels into old ones get gradients at once
    wide.requires_grad_(True)
    (decode_raw(wide, z).square().mean()).backward()
    conv = wide.decoder.upsamples[0].upsamples[0].residual[2]
    assert conv.weight.grad[:conv.weight.shape[0] // 2, conv.weight.shape[1] // 2:].abs().sum() > 0
    # widening to the same width is exact
    same = widen_decoder(narrow, WanVAE(cfg).eval())
    with torch.no_grad():
        torch.testing.assert_close(same.decode(z), a)
    with pytest.raises(ValueError, match="narrower"):
        widen_decoder(wide, WanVAE(cfg))


def test_deepened_dit_computes_the_same_and_its_new_blocks_learn():
    from kinema.train.dit_train import deepen_dit

    spec = DiTTrainSpec(dim=32, ffn_dim=64, num_heads=1, num_layers=3, t5_dim=16)
    torch.manual_seed(0)
    old = WanModel(spec.dit_config(8))
    with torch.no_grad():  # a trained-looking model: no zero parameters left
        for p in old.parameters():
            p.normal_(0, 0.2)
    deep = deepen_dit(old, 7)
    assert deep.cfg.num_layers == 7 and len(deep.blocks) == 7
    x, t = torch.randn(2, 8, 3, 4, 4), torch.tensor([300.0, 700.0])
    context = [torch.randn(5, 16), torch.randn(3, 16)]
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, context), old(x, t, context), rtol=0, atol=0)
    # the old blocks keep their order (block j at j * 7 // 3: 0, 2, 4); the new ones start as identities
    assert torch.equal(deep.blocks[2].ffn[2].weight, old.blocks[1].ffn[2].weight)
    assert torch.equal(deep.blocks[4].self_attn.q.weight, old.blocks[2].self_attn.q.weight)
    assert deep.blocks[1].self_attn.o.weight.abs().sum() == 0
    # ... whose zero output layers get gradients at once
    deep(x, t, context).square().mean().backward()
    for part in (deep.blocks[1].self_attn.o, deep.blocks[1].cross_attn.o, deep.blocks[1].ffn[2]):
        assert part.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot deepen"):
        deepen_dit(deep, 2)


# -- decoder adaptation -------------------------------------------------------------------------


class _DrawsTarget(torch.nn.Module):
    """A stand-in DiT whose velocity leads every token to `target` exactly: v = (x - target) / sigma
    with sigma = t / 1000 per token, and 0 where t == 0 (a known frame)."""

    cfg = type("Cfg", (), {"patch_size": (1, 2, 2)})

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target

    def forward(self, x, t, context):
        b, _, f, h, w = x.shape
        assert len(context) == b == 2 * self.target.shape[0]  # conditional and unconditional halves
        sigma = (t / 1000.0).view(b, 1, f, h // 2, w // 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
        target = self.target[:, :, :f].repeat(2, 1, 1, 1, 1)  # the image pass sees frame 0 only
        return torch.where(sigma > 0, (x - target) / sigma.clamp_min(1e-6), torch.zeros_like(x))


def _stand_in(target: torch.Tensor):
    model = type("M", (), {"dit": _DrawsTarget(target),
                           "encode_text": lambda self, ids, mask: [torch.zeros(3, 4)] * ids.shape[0]})()

    def tokenizer(texts, max_length=8):
        return torch.ones(len(texts), 3, dtype=torch.long), torch.ones(len(texts), 3, dtype=torch.long)
    return model, tokenizer


def test_regenerate_samples_from_the_noised_latent_and_keeps_or_redraws_frame_0():
    from kinema.train.adapt import AdaptSpec, regenerate

    g = torch.Generator().manual_seed(0)
    latents, drawn = torch.randn(2, 4, 8, 3, 4, 4, generator=g)
    specs = [["red", "circle", "left", "dark", "normal"], ["blue", "square", "up", "light", "fast"]] * 2
    model, tokenizer = _stand_in(drawn)
    kw = dict(steps=8, shift=3.0, guidance=5.0, seed=3)
    # the model draws `drawn`: every frame becomes it, frame 0 only when it is not the true one
    out = regenerate(model, tokenizer, latents, specs, AdaptSpec(p_true_first=0.0, batch=4), **kw).float()
    torch.testing.assert_close(out, drawn, atol=2e-2, rtol=0)
    out = regenerate(model, tokenizer, latents, specs, AdaptSpec(p_true_first=1.0, batch=4), **kw).float()
    torch.testing.assert_close(out[:, :, 1:], drawn[:, :, 1:], atol=2e-2, rtol=0)
    torch.testing.assert_close(out[:, :, :1], latents[:, :, :1], atol=2e-3, rtol=0)  # fp16 storage
    # a model that redraws the clip itself gives it back; the result depends on the seed only
    model, tokenizer = _stand_in(latents)
    same = regenerate(model, tokenizer, latents, specs, AdaptSpec(batch=4), **kw)
    torch.testing.assert_close(same.float(), latents, atol=2e-2, rtol=0)
    assert torch.equal(same, regenerate(model, tokenizer, latents, specs, AdaptSpec(batch=4), **kw))


def test_adapt_loss_uses_the_regenerated_latents_at_their_share():
    from kinema.train.adapt import AdaptSpec, make_adapt_loss_fn
    from kinema.train.data import ALIGNED
    from kinema.train.vae_train import DecoderTuneSpec

    vae = _tiny_vae()
    g = torch.Generator().manual_seed(0)
    latents, other = torch.randn(2, 3, 48, 2, 2, 2, generator=g)

    def loss(p_adapted: float, adapted: torch.Tensor) -> float:
        spec = AdaptSpec(p_adapted=p_adapted, tune=DecoderTuneSpec(batch=2, latent_noise=0.0))
        fn = make_adapt_loss_fn(vae, spec, latents, adapted, 0, 1, 32, 5, ALIGNED)
        with torch.no_grad():
            return float(fn(0, torch.Generator().manual_seed(0))[0])
    assert loss(0.0, other) == loss(0.0, latents) == loss(1.0, latents)
    assert loss(1.0, other) != loss(1.0, latents)


# -- the whole recipe on a tiny configuration -------------------------------------------------


def test_tiny_recipe_exports_a_loadable_model(tmp_path):
    from kinema.pipeline import load
    from kinema.train.recipe import tiny_recipe
    from kinema.train.run import run_recipe

    out = run_recipe(tmp_path / "work", tiny_recipe(), progress=False, threads=None)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "Wan2.2_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model", "kinema.json"):
        assert (out / name).is_file(), name
    pipe = load(out)
    video = pipe.generate("a red circle moving left", seed=0, steps=2)
    assert video.frames.shape == (9, 64, 64, 3)
    # a second run finds every step done and changes nothing
    log = (tmp_path / "work" / "train.log")
    run_recipe(tmp_path / "work", tiny_recipe(), steps=("tokenizer", "vae", "dit"), progress=False, threads=None)
    text = log.read_text()
    assert "vae exists, skipped" in text
    # the second cosine cycle ran, warm-started from the first
    assert "[dit2] step 2/2" in text and "dit: cycle 2 stopped at step 2" in text
    assert "[dit3] step 2/2" in text and "dit: cycle 3 stopped at step 2" in text
    # the last cycle trains on its own latent set (larger objects), encoded by the latents step
    assert "[dit4] step 2/2" in text and "8 clips from latents_r28-34_t0.7.pt" in text.split("[dit4]")[0]
    assert (tmp_path / "work" / "latents.pt").is_file() and (tmp_path / "work" / "latents_r28-34_t0.7.pt").is_file()
    assert "8 clips from latents_r28-34_t0.7.pt" in text.split("[decoder3]")[0]  # the decoder's too
    # the shape-pair cycle: frame 0 of the same clips as every shape, held-out captions masked
    assert "[dit5] step 2/2" in text and "8 scenes x 3 shapes from shapes_r28-34_t0.7.pt" in text
    # the log lines carry the loss's named parts
    assert "[dit5] step 2/2 loss" in text and "pair_diff" in text.split("[dit5] step 2/2")[1].splitlines()[0]
    shapes = torch.load(tmp_path / "work" / "shapes_r28-34_t0.7.pt", weights_only=True)
    clips = torch.load(tmp_path / "work" / "latents_r28-34_t0.7.pt", weights_only=True)
    assert shapes["specs"] == clips["specs"]
    held = set(HELD_OUT)
    for i, (colour, shape, direction, _, _) in enumerate(shapes["specs"]):
        k = shapes["shapes"].index(shape)
        torch.testing.assert_close(shapes["latents"][i, k].float(), clips["latents"][i, :, :1].float(),
                                   rtol=0, atol=2e-3)  # fp16 storage of one encoding
        assert [bool(v) for v in shapes["valid"][i]] == [(colour, s, direction) not in held
                                                         for s in shapes["shapes"]]
    # the keyframe cycle: the same scenes drawn twice as large, for an image pass at 2x
    assert "8 scenes x 3 shapes from shapes_r28-34_t0.7_x2.pt" in text
    assert "keyframe" in text.split("[dit6] step 2/2 loss")[1].splitlines()[0]
    big = torch.load(tmp_path / "work" / "shapes_r28-34_t0.7_x2.pt", weights_only=True)
    assert big["specs"] == shapes["specs"] and torch.equal(big["valid"], shapes["valid"])
    assert big["latents"].shape[-2:] == tuple(2 * n for n in shapes["latents"].shape[-2:])
    assert json.loads((out / "kinema.json").read_text())["defaults"]["image_first_scale"] == 2
    assert pipe.spec.defaults.image_first_scale == 2 and video.metadata["settings"]["image_first_scale"] == 2
    # the aligned cycle: its own latent set (one size, frame 0 on the 8-px grid, wide squares)
    assert "[dit7] step 2/2" in text and "8 clips from latents_r31-31_t0.7_g8_s1.pt" in text.split("[dit7]")[0]
    aligned = torch.load(tmp_path / "work" / "latents_r31-31_t0.7_g8_s1.pt", weights_only=True)
    assert aligned["latents"].shape == clips["latents"].shape and aligned["specs"] == clips["specs"]
    # the last cycle deepened the DiT (1 -> 2 blocks); the export and the adapt step use that depth
    assert "dit: deepened to 2 blocks" in text.split("[dit8]")[0] and "[dit8] step 2/2" in text
    assert json.loads((out / "config.json").read_text())["num_layers"] == 2 and len(pipe.transformer.blocks) == 2
    # resuming finished cycles loads no latent set
    (tmp_path / "work" / "dit.pt").unlink()
    before = len(log.read_text())
    run_recipe(tmp_path / "work", tiny_recipe(), steps=("dit",), progress=False, threads=None)
    rerun = log.read_text()[before:]
    assert "[dit8] resumed at step 2" in rerun and "clips from" not in rerun and "scenes x" not in rerun
    assert (tmp_path / "work" / "dit.pt").is_file()
    # the decoder's second cycle ran, warm-started from its first; the third widened it
    assert "[decoder2] step 2/2" in text and (tmp_path / "work" / "decoder_ckpt2.pt").is_file()
    assert "decoder: widened to dec_dim 8" in text and "[decoder3] step 2/2" in text
    assert pipe.vae.cfg.dec_dim == 8 and pipe.vae.cfg.dim == 4
    # the adapt step: the first clips of the aligned set regenerated by the final DiT, then the
    # widened decoder tuned on them; the export ships that decoder
    assert "adapted_r31-31_t0.7_g8_s1.pt: (4, 48, 3, 4, 4)" in text and "[adapt] step 2/2" in text
    adapted = torch.load(tmp_path / "work" / "vae_adapted.pt", weights_only=True)
    tuned = torch.load(tmp_path / "work" / "vae_tuned.pt", weights_only=True)
    shipped = torch.load(out / "Wan2.2_VAE.pth", weights_only=True)
    assert all(torch.equal(shipped[k], v.half()) for k, v in adapted.items())
    assert not torch.equal(adapted["decoder.head.2.weight"], tuned["decoder.head.2.weight"])
    assert torch.equal(adapted["encoder.conv1.weight"], tuned["encoder.conv1.weight"])  # latents unchanged


def test_train_cli_rejects_an_unknown_step(capsys, tmp_path):
    from kinema.cli import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--work", str(work), "--tiny", "--steps", "tokenizer,exprot"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'exprot'" in err[0] and "decoder" in err[0], err
    assert not work.exists()  # nothing ran, not even the tokenizer step


def _bf16_flags(value) -> list[bool]:
    """Every OptimConfig.bf16 in a recipe (as its recipe.json would show them)."""
    if isinstance(value, dict):
        return ([value["bf16"]] if "bf16" in value else []) + [f for v in value.values() for f in _bf16_flags(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _bf16_flags(v)]
    return []


def test_precision_turns_bf16_cycles_off_where_the_cpu_would_emulate_them(monkeypatch):
    from dataclasses import asdict

    import kinema.train.recipe as recipes
    import kinema.train.run as rc
    from kinema.errors import InputError

    recipe = recipes.Recipe()
    flags = _bf16_flags(asdict(recipe))
    assert any(flags) and not all(flags)  # the shipped recipe mixes float32 and bf16 cycles
    fp32 = rc.with_precision(recipe, "fp32")
    assert not any(_bf16_flags(asdict(fp32)))
    # nothing else changes: switching the flags back restores the recipe
    assert fp32.dit_more[-1].optim == replace(recipe.dit_more[-1].optim, bf16=False)
    assert replace(fp32, dit=recipe.dit) == fp32 and fp32.dit_more[-1].num_layers == recipe.dit_more[-1].num_layers
    assert rc.with_precision(recipe, "bf16") is recipe
    monkeypatch.setattr(rc, "native_bf16", lambda: True)
    assert rc.with_precision(recipe, "auto") is recipe
    monkeypatch.setattr(rc, "native_bf16", lambda: False)
    assert rc.with_precision(recipe, "auto") == fp32
    with pytest.raises(InputError, match="'fp16'.*auto, bf16, fp32"):
        rc.with_precision(recipe, "fp16")


def test_train_cli_precision_is_logged_and_recorded(capsys, tmp_path):
    from kinema.cli import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--work", str(work), "--tiny", "--steps", "tokenizer", "--precision", "half"])
    assert exc.value.code != 0 and "'half'" in capsys.readouterr().err and not work.exists()
    main(["train", "--work", str(work), "--tiny", "--steps", "tokenizer", "--precision", "fp32"])
    assert "bf16 autocast off (--precision fp32)" in (work / "train.log").read_text()
    assert not any(_bf16_flags(json.loads((work / "recipe.json").read_text())))
    main(["train", "--work", str(work), "--tiny", "--steps", "tokenizer", "--precision", "bf16"])
    assert any(_bf16_flags(json.loads((work / "recipe.json").read_text())))


def test_edge_loss_term_is_added_and_sees_blur():
    from kinema.train.vae_train import VAETrainSpec, edge_loss, vae_loss

    # a sharp square and the same square box-blurred: the edge term grows with the blur
    video = -torch.ones(1, 3, 1, 32, 32)
    video[..., 8:24, 8:24] = 1.0
    blurred = F.avg_pool3d(F.pad(video, (2, 2, 2, 2, 0, 0), mode="replicate"), (1, 5, 5), stride=1)
    more = F.avg_pool3d(F.pad(video, (4, 4, 4, 4, 0, 0), mode="replicate"), (1, 9, 9), stride=1)
    assert edge_loss(video, video) == 0
    assert 0 < edge_loss(blurred, video) < edge_loss(more, video)

    vae = _tiny_vae()
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    spec = VAETrainSpec(dim=4, dec_dim=4, latent_noise=0.0, grad_weight=0.0)
    plain, stats = vae_loss(vae, spec, clip, torch.Generator().manual_seed(0))
    assert "edge" not in stats
    with_edges, stats = vae_loss(vae, replace(spec, grad_weight=2.0), clip, torch.Generator().manual_seed(0))
    assert stats["edge"] > 0
    torch.testing.assert_close(with_edges, plain + 2.0 * stats["edge"], rtol=1e-5, atol=1e-6)
