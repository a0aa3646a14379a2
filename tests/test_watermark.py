"""Watermark: payload coding, embedding quality, detection, robustness, false positives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kinema.provenance import watermark as wm


def _clip(seed: int, n: int = 6, h: int = 288, w: int = 384, kind: str = "pan") -> np.ndarray:
    """Small procedural RGB clip: a smooth random texture that pans (or a flat noisy field)."""
    rng = np.random.default_rng(seed)
    if kind == "flat":
        base = rng.uniform(40, 200, 3)
        return np.clip(base + rng.normal(0, 3, (n, h, w, 1)), 0, 255).astype(np.uint8)
    g = rng.random((h // 24 + 4, w // 24 + 4)).astype(np.float32)
    from PIL import Image

    big = np.asarray(Image.fromarray(g, mode="F").resize((g.shape[1] * 24, g.shape[0] * 24), Image.BICUBIC))
    col = np.clip(big[..., None] * rng.uniform(60, 140, 3) + rng.uniform(20, 60, 3), 0, 255)
    return np.stack([col[4 * t : 4 * t + h, 5 * t : 5 * t + w] for t in range(n)]).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def test_payload_code_roundtrip_with_errors():
    payload = "4b31" + "0123456789ab"
    coded = wm.encode_payload(payload)
    assert coded.shape == (wm.N_CODED,)
    soft = (coded * 2 - 1) * 1.0
    rng = np.random.default_rng(0)
    flips = rng.choice(len(soft), 20, replace=False)  # ~8 % hard errors
    soft[flips] *= -1
    decoded, ok = wm.decode_bits(wm.viterbi_decode(soft))
    assert ok and decoded == payload


def test_payload_crc_and_tag_reject_garbage():
    info = wm.viterbi_decode(wm.encode_payload("4b31aaaaaaaaaaaa") * 2 - 1).copy()
    info[70] ^= 1  # CRC bit
    assert not wm.decode_bits(info)[1]
    other_tag = wm.viterbi_decode(wm.encode_payload("1234aaaaaaaaaaaa") * 2 - 1)
    assert not wm.decode_bits(other_tag)[1]


@pytest.mark.parametrize("bad", ["", "xyz", "4b31", "4b31aaaaaaaaaaaaff"])
def test_bad_payload_rejected(bad):
    with pytest.raises(ValueError):
        wm.encode_payload(bad)


def test_new_payloads_carry_tag_and_differ():
    a, b = wm.new_payload(), wm.new_payload()
    assert a != b and a.startswith("4b31") and len(a) == 16


def test_embedding_quality_and_shape():
    clip = _clip(1)
    marked = np.stack(list(wm.embed_frames(clip, wm.new_payload())))
    assert marked.shape == clip.shape and marked.dtype == np.uint8
    assert 40.0 <= _psnr(marked, clip) < 60.0  # visible budget respected, but a mark is there
    assert not np.array_equal(marked, clip)


def test_detects_and_decodes_marked_clip():
    clip = _clip(2)
    payload = "4b31" + "5eed0000c0de"
    marked = np.stack(list(wm.embed_frames(clip, payload)))
    d = wm.detect_frames(marked)
    assert d.detected and d.payload == payload and d.p_value <= 1e-6
    assert d.scale == pytest.approx(1.0, abs=0.02)


def test_survives_h264_resize_and_crop():
    from PIL import Image

    from kinema.video_io import read_video, write_mp4

    clip = _clip(3, n=8, h=432, w=576)
    payload = "4b31" + "5eed0000c0de"
    marked = np.stack(list(wm.embed_frames(clip, payload)))
    # Off-centre crop (the tile grid shifts) then a 0.8x resize, then H.264 CRF 23.
    cropped = marked[:, 37:37 + 380, 51:51 + 500]
    resized = np.stack([np.asarray(Image.fromarray(f).resize((400, 304), Image.BICUBIC)) for f in cropped])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_mp4(resized, Path(d) / "a.mp4", 24, crf=23)
        attacked = read_video(Path(d) / "a.mp4")[0]
    det = wm.detect_frames(attacked)
    assert det.detected and det.p_value <= 1e-6
    assert det.payload == payload
    assert det.scale == pytest.approx(0.8, rel=0.02)


def test_brightness_and_frame_drop():
    clip = _clip(4, n=8)
    payload = "4b31" + "5eed0000c0de"
    marked = np.stack(list(wm.embed_frames(clip, payload)))
    darker = (marked[::2].astype(np.float32) * 0.7).astype(np.uint8)
    d = wm.detect_frames(darker)
    assert d.detected and d.payload == payload


@pytest.mark.parametrize("seed,kind", [(10, "pan"), (11, "flat"), (12, "pan")])
def test_unmarked_clips_are_not_detected(seed, kind):
    d = wm.detect_frames(_clip(seed, kind=kind))
    assert not d.detected and d.p_value > 1e-6 and d.payload is None


def test_null_statistic_is_calibrated():
    # On an unmarked image the sync z-scores over all shifts should look standard normal.
    luma = wm.average_luma(_clip(20, n=3))
    zs = [wm._sync_scan(luma, s, window=None).z for s in (0.9, 1.0, 1.1, 1.3)]
    assert max(zs) < 5.5  # max of 4 x 4096 N(0,1) draws is ~4 (5.5 has p ~ 3e-4)


def test_tiny_frames_do_not_crash():
    d = wm.detect_frames(np.zeros((2, 32, 32, 3), np.uint8))
    assert not d.detected and d.p_value == 1.0


# ----------------------------------------------------------------------------- small frames


def _disc_clip(n: int = 17, h: int = 128, w: int = 128, seed: int = 0) -> np.ndarray:
    """What the built-in model makes: a coloured disc moving over a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = np.stack([40 + 150 * xx / w, 60 + 120 * yy / h, 180 - 100 * xx / w], -1)
    colour, r = rng.uniform(0, 255, 3), 0.2 * min(h, w)
    frames = []
    for t in range(n):
        f = bg.copy()
        f[(xx - w * (0.2 + 0.6 * t / n)) ** 2 + (yy - h * (0.3 + 0.4 * t / n)) ** 2 < r * r] = colour
        frames.append(f)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    return wm._ssim(a.astype(np.float32) @ luma, b.astype(np.float32) @ luma)


def test_small_clip_finalize_verify_and_crf28(tmp_path, monkeypatch):
    from kinema.provenance import finalize_video, verify_file
    from kinema.video_io import read_video, write_mp4

    monkeypatch.setenv("KINEMA_CONFIG_DIR", str(tmp_path / "config"))
    clip = _disc_clip()
    facts = finalize_video(clip, tmp_path / "v.mp4", 8, model_name="x", video_id="00000000beef")
    payload = facts["watermark"]["payload"]
    assert payload == "4b3100000000beef"
    rep = verify_file(tmp_path / "v.mp4")["watermark"]
    assert rep["detected"] and rep["payload"] == payload and rep["p_value"] <= 1e-6
    frames = read_video(tmp_path / "v.mp4")[0]
    assert frames.shape == clip.shape
    write_mp4(frames, tmp_path / "crf28.mp4", 8, crf=28)
    rep = verify_file(tmp_path / "crf28.mp4")["watermark"]
    assert rep["detected"] and rep["payload"] == payload


def test_small_clip_quality():
    clip = _disc_clip(n=4)
    marked = np.stack(list(wm.embed_frames(clip, wm.new_payload())))
    for m, c in zip(marked, clip):
        assert 40.0 <= _psnr(m, c) < 60.0
        assert _ssim(m, c) >= 0.98


@pytest.mark.parametrize("h,w", [(96, 160), (160, 96)])
def test_small_non_square_clip(h, w):
    clip = _disc_clip(n=9, h=h, w=w, seed=1)
    payload = wm.new_payload("0123456789ab")
    marked = np.stack(list(wm.embed_frames(clip, payload)))
    darker = (marked.astype(np.float32) * 0.7).astype(np.uint8)
    d = wm.detect_frames(darker)
    assert d.detected and d.payload == payload and d.p_value <= 1e-6


def test_small_unmarked_clip_not_detected():
    d = wm.detect_frames(_disc_clip(seed=3))
    assert not d.detected and d.payload is None and d.p_value > 1e-6


def test_video_id_sets_payload():
    assert wm.new_payload("00ABcdef0123") == "4b3100abcdef0123"


@pytest.mark.parametrize("bad", ["", "xyz", "0123456789abc", "0123456789ag", "0x23456789ab"])
def test_bad_video_id_rejected(bad, tmp_path):
    from kinema.errors import InputError
    from kinema.provenance import finalize_video

    with pytest.raises(InputError):
        wm.new_payload(bad)
    with pytest.raises(InputError):
        finalize_video(_disc_clip(n=2), tmp_path / "v.mp4", 8, model_name="x", sign=False, video_id=bad)
    assert not (tmp_path / "v.mp4").exists()


def test_host_removal_cancels_a_pan():
    # A static mark under a panning background: the host-removed mean keeps the mark only.
    rng = np.random.default_rng(5)
    scene = rng.normal(0, 20, (200, 200)).astype(np.float32)
    mark = rng.normal(0, 1, (96, 96)).astype(np.float32)
    lumas = [scene[10 + 2 * t : 106 + 2 * t, 20 + 3 * t : 116 + 3 * t] + mark for t in range(8)]
    removed = wm._host_removed_mean(lumas)
    assert removed is not None
    corr = np.corrcoef(removed.ravel(), mark.ravel())[0, 1]
    assert corr > 0.9
    assert wm._host_removed_mean([lumas[0]] * 3) is None  # no motion: no view


def test_large_frames_get_a_host_removed_view():
    # 288x384 (over 192 px): a panning texture gets the host-removed view too; with the host
    # gone, what is left is tiny next to the texture itself.
    clip = _clip(4, n=6)
    views = wm.luma_views(clip)
    plain = views[0]
    assert min(float(np.std(v)) for v in views[1:]) < 0.2 * float(np.std(plain))
    assert len(wm.luma_views(np.repeat(clip[:1], 6, axis=0))) == 2  # static: plain + first frame


def test_verify_reads_only_keyframes_as_fresh(tmp_path):
    from kinema.provenance import _read_luma
    from kinema.video_io import write_mp4

    write_mp4(_clip(6, n=12, h=96, w=128), tmp_path / "v.mp4", 8, crf=18)
    sampled, fresh = _read_luma(tmp_path / "v.mp4")
    assert len(sampled) == 12
    assert len(fresh) == 1  # one keyframe in a 12-frame clip: the keyframe alone
