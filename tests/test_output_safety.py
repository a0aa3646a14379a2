"""Nothing lost, nothing mismatched: failed or interrupted writes leave the old video and sidecar
as they were, overwrites are asked for, and every bad output or signing setup fails before the
generation."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kinema.errors import KinemaError
from kinema.video import Video, check_output_path, sidecar_matches, sidecar_path

ROOT = Path(__file__).resolve().parents[1]


def _video(seed: int = 0) -> Video:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    return Video(frames=frames, fps=8.0, metadata={"model": {"name": "test"}, "settings": {"prompt": "x"}})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _kinema(*args, env=None, **kw):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kinema", *args], capture_output=True, text=True,
                          env=e, timeout=300, **kw)


def test_sidecar_records_the_videos_sha256(tmp_path):
    out = _video().save(tmp_path / "a.mp4", sign=False)
    side = json.loads(sidecar_path(out).read_text())
    assert side["sha256"] == _digest(out)
    assert sidecar_matches(out) is True
    assert _hidden(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = _video(0).save(tmp_path / "a.mp4", sign=False)
    before = _digest(out), _digest(sidecar_path(out))
    with pytest.raises(KinemaError, match="exists; pass overwrite=True"):
        _video(1).save(out, sign=False)
    assert (_digest(out), _digest(sidecar_path(out))) == before
    _video(1).save(out, sign=False, overwrite=True)
    assert _digest(out) != before[0] and sidecar_matches(out) is True


def test_a_lone_old_sidecar_also_needs_overwrite(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(KinemaError, match="a.json exists"):
        check_output_path(tmp_path / "a.mp4")


def test_failed_overwrite_keeps_the_old_pair(tmp_path, monkeypatch):
    out = _video(0).save(tmp_path / "a.mp4", sign=False)
    before = _digest(out), _digest(sidecar_path(out))
    import kinema.video as kv

    def broken_dump(*a, **k):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(kv.json, "dump", broken_dump)
    with pytest.raises(UnicodeEncodeError):
        _video(1).save(out, sign=False, overwrite=True)
    assert (_digest(out), _digest(sidecar_path(out))) == before
    assert _hidden(tmp_path) == []  # the staging folder is gone too


def test_crash_between_the_renames_never_pairs_an_old_sidecar_with_a_new_video(tmp_path, monkeypatch):
    out = _video(0).save(tmp_path / "a.mp4", sign=False)
    old_video = _digest(out)
    import kinema.video as kv

    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        if Path(dst).parent == tmp_path:  # the final renames (not those inside the staging folder)
            calls.append(dst)
            if len(calls) == 2:  # the process "dies" after the first one
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(kv.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _video(1).save(out, sign=False, overwrite=True)
    assert Path(calls[0]) == sidecar_path(out)  # the sidecar moves first
    assert _digest(out) == old_video  # the old video is still there...
    assert sidecar_matches(out) is False  # ...and its new sidecar says it does not describe it


def test_stale_temp_files_of_dead_runs_are_cleaned(tmp_path):
    dead = 2**22 + 12345  # above pid_max: no such process
    stale = [tmp_path / f".a.mp4.{dead}.deadbeef.unsigned.mp4", tmp_path / f".a.json.{dead}.0badf00d.part"]
    for p in stale:
        p.write_bytes(b"x")
    (tmp_path / f".a.mp4.{dead}.c0ffee00.stage").mkdir()
    live = tmp_path / f".a.mp4.{os.getpid()}.12345678.part"
    live.write_bytes(b"x")
    mine = tmp_path / ".notes.part"
    mine.write_bytes(b"x")
    check_output_path(tmp_path / "b.mp4")
    assert _hidden(tmp_path) == sorted([live.name, mine.name])


def test_sidecar_name_that_is_a_folder_fails_first(tmp_path):
    (tmp_path / "a.json").mkdir()
    with pytest.raises(KinemaError, match="sidecar .* is a folder"):
        check_output_path(tmp_path / "a.mp4")


def test_prompt_that_is_not_utf8_is_refused_up_front(tmp_path):
    out = tmp_path / "over.mp4"
    out.write_bytes(b"old video")
    sidecar_path(out).write_text('{"old": true}')
    bad = os.fsdecode(b"a red \xff circle")  # what Python makes of such argv bytes
    r = _kinema("generate", bad, "-o", str(out), "--overwrite")
    assert r.returncode == 2, r.stderr
    assert "not valid UTF-8" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"old video" and sidecar_path(out).read_text() == '{"old": true}'


@pytest.mark.parametrize("setup", ["config folder not writable", "garbage key", "empty key",
                                   "key of another certificate"])
def test_broken_signing_identity_fails_before_loading(tmp_path, setup):
    from kinema.provenance.credentials import local_identity

    env = {}
    if setup == "config folder not writable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        env["KINEMA_CONFIG_DIR"] = str(blocker / "kinema")  # a folder under a regular file
    else:
        cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
        other = local_identity(tmp_path / "other")
        cert.write_bytes(other.cert_chain_pem)
        key.write_bytes({"garbage key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                         "empty key": b""}.get(setup, local_identity(tmp_path / "third").key_pem))
        env.update(KINEMA_C2PA_CERT=str(cert), KINEMA_C2PA_KEY=str(key))
    start = time.perf_counter()
    r = _kinema("generate", "a red circle moving left", "-o", str(tmp_path / "o.mp4"), env=env)
    assert r.returncode == 2, r.stderr
    assert "loading" not in r.stderr  # refused before any weight was read
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert not (tmp_path / "o.mp4").exists()
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig, code):
    out = tmp_path / "t.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "kinema", "generate", "a red circle moving left",
                             "-o", str(out), "--steps", "300", "--seed", "1"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stderr:  # wait until it is sampling
        if "generating" in line:
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code, rest
    assert "Traceback" not in rest
    assert not out.exists() and _hidden(tmp_path) == []
