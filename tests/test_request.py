"""The `Request` is the one source of the generation options: every field is a `kinema generate`
flag, an entry of the sidecar's settings block and (sampling fields) part of a reproduce
command that gives the same frames; aliases and unknown keywords; and the usage defects of
issue 25 (typer's usage errors, file modes, output suffix, empty prompt, far sizes, temp files)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import kinema
from kinema.cli import main
from kinema.config import PRESETS
from kinema.errors import InputError
from kinema.request import Request
from kinema.validate import SizeWarning, resolve


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kinema.testing.fixtures import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "ti2v", kind="ti2v", layout="official")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "start.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(path)
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def written(monkeypatch):
    """The exact frames handed to the MP4 writer, in order."""
    import kinema.provenance as prov

    frames: list[np.ndarray] = []
    real = prov.finalize_video
    monkeypatch.setattr(prov, "finalize_video", lambda f, *a, **kw: frames.append(f.copy()) or real(f, *a, **kw))
    return frames


# ------------------------------------------------------------------------------ one source


def test_options_are_well_formed():
    from kinema.request import GROUPS

    for name, opt in Request.options():
        assert opt.group in GROUPS and opt.command in ("always", "changed"), name
        assert opt.help.strip() and "\n" not in opt.help, name
        assert getattr(Request(), name) is None  # None = the model's default


def test_every_field_is_a_generate_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    code, out, _ = cli(capsys, "generate", "--help")
    assert code == 0
    for name, opt in Request.options():
        if opt.argument:
            assert name.upper() in out
            continue
        flag, off = opt.flags(name)
        assert flag in out, name
        if opt.short:
            assert opt.short in out
        if typing.get_type_hints(Request)[name] == typing.Optional[bool]:
            assert off in out, name
        assert opt.help.split()[0] in out


# Every sampling field set to a value that is not the tiny model's default, over two runs (an
# image cannot go with image-first text-to-video). A new sampling field must be added here.
ROUND_TRIPS = {
    "text": dict(prompt="a fox", negative_prompt="blurry", size="96x64", frames="5", steps="2",
                 guidance="3.5", shift="4", sampler="dpm++", seed="3", image_first=True, image_first_scale="2"),
    "image": dict(prompt="it moves", image="{image}", max_area="4096", frames="5", steps="2", sampler="euler",
                  seed="4"),
    "lora": dict(prompt="a fox", loras="{lora}:0.5", preset="lightning-4step", frames="5", seed="5"),
    "moe": dict(prompt="a fox", lora_high="{lora}:0.7", lora_low="{lora}", frames="5", steps="2", seed="6"),
}
MODEL_OF = {"moe": "t2v-moe"}  # the cases that need another tiny model than TI2V


@pytest.fixture(scope="module")
def models(tmp_path_factory, model):
    from kinema.testing.fixtures import make_tiny_model
    from kinema.testing.loras import make_tiny_lora

    base = tmp_path_factory.mktemp("models")
    out = {"ti2v": model, "t2v-moe": make_tiny_model(base / "moe", kind="t2v-moe", layout="official")}
    return {k: (m, make_tiny_lora(m, base / f"{k}.safetensors")) for k, m in out.items()}


def _args(values: dict, image: Path, lora: Path | None = None) -> list[str]:
    from kinema.generate_cmd import flag_of

    args = [values["prompt"]]
    for name, value in values.items():
        if name == "prompt":
            continue
        flag = flag_of(name)
        args += [flag] if value is True else [flag, str(value).format(image=image, lora=lora)]
    return args


def test_round_trips_cover_every_sampling_field():
    covered = set().union(*ROUND_TRIPS.values())
    assert covered == {n for n, _ in Request.options("sampling")}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_sidecar_command_gives_the_same_frames(capsys, models, image, tmp_path, written, case):
    from kinema.generate_cmd import flag_of

    model, lora = models[MODEL_OF.get(case, "ti2v")]
    first = tmp_path / "first.mp4"
    code, _, err = cli(capsys, "generate", *_args(ROUND_TRIPS[case], image, lora), "--model", str(model),
                       "-o", str(first), "--no-sign")
    assert code == 0, err
    side = json.loads(first.with_suffix(".json").read_text())
    assert set(side["settings"]) == {f.name for f in fields(Request)}  # every field, resolved
    assert side["settings"]["output"] == str(first) and side["settings"]["sign"] is False
    assert side["settings"]["device"] == "cpu" and side["settings"]["dtype"] == "float32"
    args = shlex.split(side["command"])
    for name in ROUND_TRIPS[case]:
        if name != "prompt":
            assert flag_of(name) in args, name
    assert "--device" not in args and "--output" not in args  # runtime / output: not in the command
    code, _, err = cli(capsys, "generate", *args[2:], "-o", str(tmp_path / "again.mp4"), "--no-sign")
    assert code == 0, err
    assert len(written) == 2 and np.array_equal(written[0], written[1])
    again = json.loads((tmp_path / "again.json").read_text())["settings"]
    assert {k: v for k, v in again.items() if k != "output"} == {k: v for k, v in side["settings"].items()
                                                                  if k != "output"}


def test_request_types_give_a_json_schema():
    pydantic = pytest.importorskip("pydantic")
    schema = pydantic.TypeAdapter(Request).json_schema()
    assert set(schema["properties"]) == {f.name for f in fields(Request)}


# ------------------------------------------------------------------------------ Python keywords


def test_aliases_resolve_like_kinema_names():
    moe = PRESETS["t2v-A14B"]
    own = resolve(moe, Request(prompt="a cat", size=(832, 480), frames=17, steps=7, guidance=(2.0, 3.5),
                               shift=8.0, seed=1))
    alias = resolve(moe, Request.from_options("a cat", width=832, height=480, num_frames=17,
                                              num_inference_steps=7, guidance_scale=3.5, guidance_scale_2=2.0,
                                              flow_shift=8.0, seed=1))
    assert alias.request == own.request
    assert alias.guidance == (2.0, 3.5)  # guidance_scale is the high-noise expert's: kinema's (low, high)
    one = Request.from_options("a cat", guidance_scale=4.0)
    assert one.guidance == 4.0


@pytest.mark.parametrize("kw, match", [
    (dict(stepz=3), "unknown option stepz=; did you mean steps=\\?"),
    (dict(sample_steps=3), "unknown option sample_steps="),
    (dict(height=480), "height= and width= go together"),
    (dict(frames=5, num_frames=5), "frames= or num_frames="),
    (dict(guidance_scale_2=3.0), "needs guidance_scale="),
])
def test_bad_keywords_name_the_argument(kw, match):
    with pytest.raises(InputError, match=match) as err:
        Request.from_options("a cat", **kw)
    assert "\n" not in str(err.value)


def test_prepare_reads_headers_and_rejects_unknown_options(model, monkeypatch):
    import kinema.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("prepare loaded weights"))
    s = kinema.prepare(model, "a fox", num_inference_steps=3, seed=2)
    assert (s.steps, s.seed, s.spec.dit.model_type) == (3, 2, "ti2v")
    with pytest.raises(InputError, match="stepz="):
        kinema.prepare(model, "a fox", stepz=3)


# ------------------------------------------------------------------------------ defects (issue 25)


@pytest.mark.parametrize("args, match", [
    (["generate", "x", "--frames", "abc"], "--frames"),
    (["generate", "x", "--sample_steps", "10"], "No such option: --sample_steps"),
    (["generate"], "give a PROMPT or --prompts-file"),
    (["genrate", "x"], "No such command"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, args, match):
    code, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in out + err


def test_files_follow_the_umask(capsys, model, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "clip.mp4"
        code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "--frames", "1", "--steps", "1",
                           "--seed", "1", "-o", str(out))
        assert code == 0, err
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
        assert mode(out) == mode(out.with_suffix(".json")) == 0o644
        code, _, err = cli(capsys, "mark", str(out), "-o", str(out), "--no-sign")
        assert code == 0, err
        assert mode(out) == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]  # no temporary files


@pytest.mark.parametrize("prompt, extra, match", [
    ("", [], "the prompt is empty"),
    ("  \t ", [], "the prompt is empty"),
    ("a fox", ["-o", "{tmp}/clip.gif"], "must be an .mp4 file"),
])
def test_refused_before_loading(capsys, model, tmp_path, monkeypatch, prompt, extra, match):
    import kinema.pipeline as pl

    monkeypatch.setattr(pl, "load", lambda *a, **k: pytest.fail("loaded the model for a bad request"))
    monkeypatch.chdir(tmp_path)
    extra = [a.format(tmp=tmp_path) for a in extra]
    code, _, err = cli(capsys, "generate", prompt, "--model", str(model), *extra)
    assert code == 2 and err.strip().count("\n") == 0 and match in err, err
    assert not any(tmp_path.iterdir())


def test_temp_file_is_created_before_sampling(capsys, model, tmp_path, monkeypatch):
    """A folder that passes the write check but where no file can be created (as /sys for
    root) fails before the model is loaded, with one line."""
    import kinema.pipeline as pl
    import kinema.video as video

    monkeypatch.setattr(pl, "load", lambda *a, **k: pytest.fail("loaded the model for an unwritable output"))
    monkeypatch.setattr(video, "part_path", lambda path, tag: tmp_path / "no-such-dir" / "x.part")
    code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "-o", str(tmp_path / "x.mp4"))
    assert code == 2 and err.strip().count("\n") == 0 and "cannot write" in err, err


def test_far_size_warns_but_runs(capsys, model, tmp_path):
    with pytest.warns(SizeWarning, match="64x64"):
        resolve(kinema.pipeline.prepare(model, "a fox").spec, Request(prompt="a fox", size=(320, 320)))
    code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "--size", "320x320", "--frames", "1",
                       "--steps", "1", "--no-sign", "--no-watermark", "-o", str(tmp_path / "big.mp4"))
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "64x64" in warned[0]
    code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "--size", "96x64", "--frames", "1",
                       "--steps", "1", "--no-sign", "--no-watermark", "-o", str(tmp_path / "ok.mp4"))
    assert code == 0 and "warning" not in err


def test_runtime_options_belong_to_the_loaded_pipeline(model, tmp_path):
    pipe = kinema.load(model, device="cpu")
    s = kinema.prepare(model, "a fox", frames=1, steps=1, seed=0)
    assert s.device is None and s.dtype is None  # unset: the pipeline's
    video = pipe.run(s)
    assert (video.metadata["settings"]["device"], video.metadata["settings"]["dtype"]) == ("cpu", "float32")
    with pytest.raises(InputError, match="loaded with dtype='float32'"):
        pipe.run(kinema.prepare(model, "a fox", frames=1, steps=1, dtype="bf16"))
    out = tmp_path / "fox.mp4"
    pipe.generate("a fox", frames=1, steps=1, seed=0, output=str(out), sign=False)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["provenance"]["c2pa"] is None and side["settings"]["sign"] is False


def test_library_names_arguments_the_cli_names_flags(capsys, model, tmp_path):
    with pytest.raises(InputError, match="frames= must be 4n\\+1"):
        kinema.prepare(model, "a fox", frames=6)
    with pytest.raises(InputError, match="device="):
        kinema.prepare(model, "a fox", device="tpu")
    code, _, err = cli(capsys, "generate", "a fox", "--model", str(model), "--frames", "6",
                       "-o", str(tmp_path / "x.mp4"))
    assert code == 2 and "--frames must be 4n+1" in err and "frames=" not in err


# ------------------------------------------------------------------------------ diffusers-style API


@pytest.fixture(scope="module")
def pipe(model):
    return kinema.load(model, device="cpu")


def test_diffusers_keywords_give_the_same_frames(pipe):
    import torch

    own = pipe.generate("a fox", size=(96, 64), frames=5, steps=2, guidance=3.0, shift=4.0, seed=3)
    theirs = pipe.generate("a fox", height=64, width=96, num_frames=5, num_inference_steps=2, guidance_scale=3.0,
                           flow_shift=4.0, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(own.frames, theirs.frames) and theirs.metadata["settings"]["seed"] == 3


def test_batches_of_prompts_and_videos(pipe, tmp_path):
    kw = dict(frames=1, steps=1, size=(64, 64))
    videos = pipe.generate(["a fox", "a cat"], num_videos_per_prompt=2, seed=5, **kw)
    assert [(v.metadata["settings"]["prompt"], v.metadata["settings"]["seed"]) for v in videos] == [
        ("a fox", 5), ("a fox", 6), ("a cat", 5), ("a cat", 6)]
    assert np.array_equal(videos[1].frames, pipe.generate("a fox", seed=6, **kw).frames)
    assert not np.array_equal(videos[0].frames, videos[1].frames)
    one = pipe.generate(["a fox"], seed=5, **kw)
    assert isinstance(one, list) and np.array_equal(one[0].frames, videos[0].frames)
    pipe.generate("a fox", num_videos_per_prompt=2, seed=1, output=str(tmp_path / "fox.mp4"), sign=False, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["fox_1.mp4", "fox_2.mp4"]
    with pytest.raises(InputError, match="seed= or generator="):
        pipe.generate("a fox", seed=1, generator=object(), **kw)


def test_output_type_latent(pipe):
    latent = pipe.generate("a fox", frames=5, steps=2, size=(64, 64), seed=2, output_type="latent")
    s = pipe.settings("a fox", frames=5, steps=2, size=(64, 64), seed=2)
    assert tuple(latent.shape) == s.plan.latent_shape
    final: list = []
    pipe.run(s, hooks=kinema.pipeline.Hooks(on_final_latent=final.append))
    assert torch_equal(latent, final[0])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_callback_reports_the_pass_and_the_true_total(pipe):
    seen: list = []
    pipe.generate("a fox", frames=9, steps=2, size=(64, 64), seed=3, image_first=True, callback=seen.append)
    assert [(i.step, i.total, i.pass_index, i.passes) for i in seen] == [
        (1, 4, 1, 2), (2, 4, 1, 2), (3, 4, 2, 2), (4, 4, 2, 2)]


def test_prompts_file_loads_the_model_once(capsys, model, tmp_path, monkeypatch, written):
    import kinema.pipeline as pl

    loads: list = []
    real = pl.load
    monkeypatch.setattr(pl, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a blue cat  \n", encoding="utf-8")
    code, out, err = cli(capsys, "generate", "--prompts-file", str(prompts), "--model", str(model), "--frames", "1",
                         "--steps", "1", "--seed", "2", "-o", str(tmp_path / "clip.mp4"), "--no-sign")
    assert code == 0, err
    assert len(loads) == 1 and len(written) == 2
    sides = [json.loads((tmp_path / f"clip_{k}.json").read_text())["settings"] for k in (1, 2)]
    assert [(s["prompt"], s["seed"]) for s in sides] == [("a red fox", 2), ("a blue cat", 2)]
    assert out.count("saved ") == 2
    code, _, err = cli(capsys, "generate", "x", "--prompts-file", str(prompts), "--model", str(model))
    assert code == 2 and "not both" in err
