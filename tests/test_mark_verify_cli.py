"""End to end: finalize_video (the pipeline's hook), `kinema mark` and `kinema verify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kinema.cli import main
from kinema.provenance import finalize_video
from kinema.video_io import read_video, write_mp4


@pytest.fixture(autouse=True)
def _own_config(config) -> Path:
    return config


def _clip(seed: int, n: int = 8, h: int = 288, w: int = 384) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    g = rng.random((h // 24 + 4, w // 24 + 4)).astype(np.float32)
    big = np.asarray(Image.fromarray(g, mode="F").resize((g.shape[1] * 24, g.shape[0] * 24), Image.BICUBIC))
    col = np.clip(big[..., None] * rng.uniform(60, 140, 3) + rng.uniform(20, 60, 3), 0, 255)
    return np.stack([col[4 * t : 4 * t + h, 5 * t : 5 * t + w] for t in range(n)]).astype(np.uint8)


def _verify(path: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    main(["verify", str(path), "--json", *extra])
    return json.loads(capsys.readouterr().out)


def _check_schema(rep: dict) -> None:
    wm = rep["watermark"]
    assert isinstance(wm["detected"], bool)
    assert wm["payload"] is None or isinstance(wm["payload"], str)
    assert isinstance(wm["p_value"], float) and 0.0 <= wm["p_value"] <= 1.0
    assert rep["c2pa"]["state"] in ("trusted", "valid", "invalid", "absent")


def test_generated_video_verifies(tmp_path, capsys):
    out = tmp_path / "gen.mp4"
    facts = finalize_video(_clip(1), out, 24.0, model_name="wan2.2-ti2v-5b", prompt="secret prompt")
    assert facts["watermark"]["bits"] >= 48 and len(facts["watermark"]["payload"]) == 16
    assert facts["c2pa"]["signed"]
    assert b"secret prompt" not in out.read_bytes()
    rep = _verify(out, capsys)
    _check_schema(rep)
    assert rep["watermark"]["detected"] and rep["watermark"]["payload"] == facts["watermark"]["payload"]
    assert rep["watermark"]["p_value"] <= 1e-6
    assert rep["c2pa"]["state"] == "trusted"
    assert rep["soft_binding_matches_watermark"] is True


def test_finalize_can_skip_watermark_and_signing(tmp_path, capsys):
    out = tmp_path / "bare.mp4"
    facts = finalize_video(_clip(2, n=4), out, 24.0, model_name="m", watermark=False, sign=False)
    assert facts == {"watermark": None, "c2pa": None}
    rep = _verify(out, capsys)
    assert not rep["watermark"]["detected"] and rep["c2pa"]["state"] == "absent"


def test_unmarked_video_reports_nothing(tmp_path, capsys):
    plain = write_mp4(_clip(3), tmp_path / "plain.mp4", 24.0)
    rep = _verify(plain, capsys)
    _check_schema(rep)
    assert rep["watermark"] == {**rep["watermark"], "detected": False, "payload": None}
    assert rep["watermark"]["p_value"] > 1e-6
    assert rep["c2pa"]["state"] == "absent"


def test_mark_existing_video_then_tamper(tmp_path, capsys):
    plain = write_mp4(_clip(4), tmp_path / "plain.mp4", 24.0)
    marked = tmp_path / "marked.mp4"
    main(["mark", str(plain), "-o", str(marked), "--model-name", "other-model", "--json"])
    facts = json.loads(capsys.readouterr().out)
    rep = _verify(marked, capsys)
    assert rep["watermark"]["payload"] == facts["watermark"]["payload"]
    assert rep["c2pa"]["state"] == "trusted"
    assert [a["action"] for a in rep["c2pa"]["actions"]] == ["c2pa.created", "c2pa.watermarked"]
    # Change bytes of the video data after signing: credentials become invalid, the mark stays.
    data = bytearray(marked.read_bytes())
    i = data.find(b"mdat")
    data[i + 200 : i + 204] = b"\x00\x00\x00\x00"
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    rep = _verify(tampered, capsys)
    assert rep["c2pa"]["state"] == "invalid"


def test_mark_with_own_certificate(tmp_path, capsys):
    from kinema.provenance.credentials import local_identity

    local_identity(tmp_path / "mine")
    folder = tmp_path / "mine" / "c2pa"
    src = write_mp4(_clip(5, n=4), tmp_path / "in.mp4", 24.0)
    out = tmp_path / "out.mp4"
    main(["mark", str(src), "-o", str(out), "--cert", str(folder / "signer.pem"), "--key", str(folder / "signer.key"), "--no-watermark"])
    rep = _verify(out, capsys, "--trust", str(folder / "root-ca.pem"))
    assert rep["c2pa"]["state"] == "trusted"
    assert _verify(out, capsys)["c2pa"]["state"] == "valid"  # that root is not our own anchor


def test_human_readable_verify(tmp_path, capsys):
    out = tmp_path / "gen.mp4"
    finalize_video(_clip(6), out, 24.0, model_name="wan2.2-ti2v-5b")
    capsys.readouterr()
    main(["verify", str(out)])
    text = capsys.readouterr().out
    assert "watermark: DETECTED" in text and "content credentials: valid and signed by a trusted identity" in text


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(tmp_path / "missing.mp4")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["mark", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4")])
    with pytest.raises(SystemExit):
        main(["mark", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4"), "--cert", "x.pem"])


def test_mark_roundtrip_keeps_frames_close(tmp_path):
    clip = _clip(7, n=4)
    src = write_mp4(clip, tmp_path / "in.mp4", 24.0, crf=12)
    out = tmp_path / "out.mp4"
    main(["mark", str(src), "-o", str(out), "--no-sign"])
    a, _ = read_video(src)
    b, fps = read_video(out)
    assert b.shape == a.shape and fps == pytest.approx(24.0)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 36  # watermark (41 dB) + one more H.264 pass
