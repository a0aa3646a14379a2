"""LoRAs and presets end to end: `kinema generate --lora/--lora-high/--lora-low/--preset` on the
built-in model and a tiny two-expert one, the sidecar and C2PA records, the reproduce command,
the Python keywords, switching LoRAs on one loaded pipeline, and bad input before loading."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

import kinema
from kinema.cli import main
from kinema.errors import InputError
from kinema.pipeline import BUILTIN_DIR
from kinema.testing.loras import make_tiny_lora

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "diffusion_pytorch_model.safetensors").is_file(),
                                reason="the built-in model is not installed")

SMALL = ["--frames", "5", "--steps", "2", "--seed", "7"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_tiny_lora(BUILTIN_DIR, tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture
def written(monkeypatch):
    """The exact frames handed to the MP4 writer, in order."""
    import kinema.provenance as prov

    frames: list[np.ndarray] = []
    real = prov.finalize_video
    monkeypatch.setattr(prov, "finalize_video", lambda f, *a, **kw: frames.append(f.copy()) or real(f, *a, **kw))
    return frames


def test_lora_is_recorded_and_the_command_reproduces_it(capsys, lora, tmp_path, written):
    code, _, err = cli(capsys, "generate", "a red ball", *SMALL, "-o", str(tmp_path / "base.mp4"))
    assert code == 0, err
    first = tmp_path / "first.mp4"
    code, _, err = cli(capsys, "generate", "a red ball", *SMALL, "--lora", f"{lora}:0.5", "-o", str(first))
    assert code == 0, err
    assert not np.array_equal(written[0], written[1])  # the LoRA changes the frames
    side = json.loads(first.with_suffix(".json").read_text())
    assert side["settings"]["loras"] == [f"{lora}:0.5"] and side["settings"]["lora_mode"] == "merge"
    (record,) = side["loras"]
    assert record["file"] == lora.name and record["strength"] == 0.5 and record["format"]
    assert len(record["sha256"]) == 64 and record["matched"] > 0 and record["unmatched"] == 0
    assert "loras" not in json.loads((tmp_path / "base.json").read_text())

    args = shlex.split(side["command"])
    assert args[args.index("--lora") + 1] == f"{lora}:0.5"
    code, _, err = cli(capsys, "generate", *args[2:], "-o", str(tmp_path / "again.mp4"))
    assert code == 0, err
    assert np.array_equal(written[1], written[2])

    code, out, err = cli(capsys, "verify", str(first), "--json")  # the signed manifest names it too
    assert code == 0, err
    assert record["sha256"] in out


def test_preset_fills_what_is_not_given(capsys, tmp_path):
    out = tmp_path / "fast.mp4"
    code, _, err = cli(capsys, "generate", "a red ball", "--preset", "lightning-4step", "--frames", "5",
                       "--seed", "1", "-o", str(out), "--no-sign")
    assert code == 0, err
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (settings["preset"], settings["sampler"], settings["steps"], settings["guidance"], settings["shift"]) \
        == ("lightning-4step", "lightning", 4, 1.0, 5.0)
    s = kinema.prepare(None, "a red ball", preset="Lightning-4step", steps=2, guidance=3.0)
    assert (s.preset, s.sampler, s.steps, s.guidance, s.shift) == ("lightning-4step", "lightning", 2, 3.0, 5.0)


def test_python_keywords_and_switching_on_one_pipeline(lora, tmp_path):
    pipe = kinema.load(None, device="cpu")
    opts = dict(frames=5, steps=2, seed=7, watermark=False)
    base = pipe.generate("a red ball", **opts)
    with_lora = pipe.generate("a red ball", loras=[(lora, 0.5)], **opts)
    assert with_lora.metadata["loras"][0]["strength"] == 0.5
    assert with_lora.metadata["settings"]["loras"] == [f"{lora}:0.5"]
    assert not np.array_equal(base.frames, with_lora.frames)
    assert np.array_equal(pipe.generate("a red ball", loras=f"{lora}:0.5", **opts).frames, with_lora.frames)
    again = pipe.generate("a red ball", **opts)  # no LoRAs: the base weights, bit-exact
    assert np.array_equal(again.frames, base.frames) and "loras" not in again.metadata

    side = kinema.load(None, device="cpu", lora_mode="side")
    branch = side.generate("a red ball", loras=[f"{lora}:0.5"], **opts)
    assert branch.metadata["loras"][0]["mode"] == "side" and branch.metadata["settings"]["lora_mode"] == "side"
    assert np.abs(branch.frames.astype(int) - with_lora.frames.astype(int)).max() <= 2  # rounding only
    with pytest.raises(InputError, match="loaded with lora_mode='side'"):
        side.run(kinema.prepare(None, "a red ball", lora_mode="merge", **opts))


def test_per_expert_loras_on_a_two_expert_model(capsys, tmp_path):
    from kinema.testing.fixtures import make_tiny_model

    model = make_tiny_model(tmp_path / "moe", kind="t2v-moe", layout="official")
    lora = make_tiny_lora(model, tmp_path / "moe.safetensors")
    out = tmp_path / "moe.mp4"
    code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "--frames", "5", "--steps", "2",
                       "--lora", f"{lora}:0.5,0.25", "--lora-high", f"{lora}:0.7", "--lora-low", str(lora),
                       "-o", str(out), "--no-sign")
    assert code == 0, err
    side = json.loads(out.with_suffix(".json").read_text())
    assert [(r["target"], r["strength"]) for r in side["loras"]] == \
        [("both", {"high": 0.5, "low": 0.25}), ("high", 0.7), ("low", 1.0)]
    assert (side["settings"]["lora_high"], side["settings"]["lora_low"]) == ([f"{lora}:0.7"], [f"{lora}:1"])


@pytest.mark.parametrize("extra, match", [
    (["--lora", "{tmp}/missing.safetensors"], "missing.safetensors"),
    (["--lora", "{lora}:strong"], "strong does not exist"),  # not a number: part of the path
    (["--lora-high", "{lora}"], "two-expert model"),
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--lora-mode", "fuse"], "--lora-mode must be one of merge, side"),
])
def test_bad_input_is_refused_before_loading(capsys, lora, tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr("kinema.loading.load_model", lambda *a, **k: pytest.fail("loaded"))
    args = [a.format(tmp=tmp_path, lora=lora) for a in extra]
    code, _, err = cli(capsys, "generate", "a red ball", *args, "-o", str(tmp_path / "x.mp4"))
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_keys_without_a_place_are_one_warning_line(capsys, lora, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora))
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = tensors[
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight"].clone()
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = tensors[
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight"].clone()
    extra = tmp_path / "wan21.safetensors"
    save_file(tensors, str(extra))
    code, _, err = cli(capsys, "generate", "a red ball", "--frames", "1", "--steps", "1", "--lora", str(extra),
                       "-o", str(tmp_path / "w.mp4"), "--no-sign")
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if "wan21.safetensors" in x]
    assert line.startswith("warning: LoRA wan21.safetensors: 2 of") and "k_img" in line


def test_the_cli_keeps_no_copy_of_the_merged_weights(capsys, lora, tmp_path, monkeypatch):
    import kinema.pipeline as pipeline

    pipes = []
    real = pipeline.load
    monkeypatch.setattr(pipeline, "load", lambda *a, **kw: pipes.append(real(*a, **kw)) or pipes[-1])
    code, _, err = cli(capsys, "generate", "a red ball", "--frames", "1", "--steps", "1", "--lora", str(lora),
                       "-o", str(tmp_path / "c.mp4"), "--no-sign")
    assert code == 0, err
    (pipe,) = pipes
    assert pipe.restore_loras is False and pipe._lora_manager.originals_bytes() == 0
    with pytest.raises(RuntimeError, match="reload the model"):  # one set per such pipeline
        pipe.generate("a red ball", frames=1, steps=1)
