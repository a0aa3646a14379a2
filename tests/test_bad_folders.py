"""Hostile and careless model folders: every one is a one-line error before anything is built.

Each case edits a copy of a tiny official-layout folder (a config field, a weight header, a file
type) and checks that `inspect_folder` (what `kinema info`, `generate` and `plan` call first)
raises a KinemaError naming the problem, quickly, and that the CLI turns it into one line + exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest

from kinema.errors import KinemaError
from kinema.loading import inspect_folder
from kinema.testing.fixtures import make_tiny_model

DIT = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("clean") / "m", "ti2v", "official", seed=3)


@pytest.fixture()
def folder(clean, tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(clean, dst)
    return dst


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text()) if file.exists() else {}
    data.update(changes)
    file.write_text(json.dumps(data))


def _rewrite_header(file: Path, edit) -> None:
    """Apply `edit(header_dict)` to a safetensors file's JSON header, keeping the data bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _expect_error(folder: Path, pattern: str) -> None:
    start = time.perf_counter()
    with pytest.raises(KinemaError, match=pattern) as info:
        inspect_folder(folder)
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 5.0


CONFIG_CASES = {
    "num_heads zero": ({"num_heads": 0}, "num_heads = 0"),
    "num_heads negative": ({"num_heads": -4}, "num_heads = -4"),
    "num_heads a string": ({"num_heads": "eight"}, "num_heads = 'eight'"),
    "num_heads not dividing dim": ({"num_heads": 7}, "not divisible by 7 heads|heads of even width"),
    "text_len zero": ({"text_len": 0}, "text_len = 0"),
    "text_len huge": ({"text_len": 1e9}, "text_len = 1000000000"),
    "text_len a string": ({"text_len": "long"}, "text_len = 'long'"),
    "eps NaN": ({"eps": float("nan")}, "eps = nan"),
    "eps negative": ({"eps": -1.0}, "eps = -1.0"),
    "num_layers contradicting": ({"num_layers": 100000}, "num_layers"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_dit_config(folder, case):
    changes, pattern = CONFIG_CASES[case]
    _edit_json(folder / "config.json", **changes)
    _expect_error(folder, pattern)


DEFAULT_CASES = {
    "fps zero": ({"fps": 0}, "fps = 0"),
    "fps negative": ({"fps": -24}, "fps"),
    "frames absurd": ({"frames": 400001}, "frames = 400001"),
    "size absurd": ({"size": [32768, 32768]}, "size width = 32768"),
    "steps zero": ({"steps": 0}, "steps = 0"),
    "shift NaN": ({"shift": float("nan")}, "shift = nan"),
    "guidance infinite": ({"guidance": float("inf")}, "guidance = inf"),
}


@pytest.mark.parametrize("case", list(DEFAULT_CASES))
def test_bad_sampling_defaults(folder, case):
    changes, pattern = DEFAULT_CASES[case]
    _edit_json(folder / "kinema.json", defaults=changes)
    _expect_error(folder, pattern)


def _set_shape(shape):
    def edit(h):
        h[_first_tensor(h)]["shape"] = shape
    return edit


def _set_offsets(offsets):
    def edit(h):
        h[_first_tensor(h)]["data_offsets"] = offsets
    return edit


def _many_blocks(h):
    # one extra key claiming to be block 99999: a 100,000-block model
    name = _first_tensor(h)
    entry = dict(h[name])
    h["blocks.99999.modulation"] = entry


HEADER_CASES = {
    "negative shape": (_set_shape([-4, 4]), "whole numbers >= 0"),
    "float shape": (_set_shape([4.5, 2]), "whole numbers >= 0"),
    "huge shape": (_set_shape([1000000, 1000000]), "implausibly large"),
    "string shape": (_set_shape("big"), "must be lists"),
    "inverted offsets": (_set_offsets([64, 0]), "inverted|do not hold"),
    "negative offsets": (_set_offsets([-8, 0]), "whole numbers >= 0"),
    "offsets not matching the shape": (_set_offsets([0, 4]), "do not hold"),
    "100000 blocks": (_many_blocks, "num_layers"),
    "unknown dtype": (lambda h: h[_first_tensor(h)].update(dtype="F128"), "unknown dtype"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_header(folder, case):
    edit, pattern = HEADER_CASES[case]
    _rewrite_header(folder / DIT, edit)
    _expect_error(folder, pattern)


def test_deeply_nested_header(folder):
    payload = b"[" * 200_000 + b"]" * 200_000
    (folder / DIT).write_bytes(struct.pack("<Q", len(payload)) + payload)
    _expect_error(folder, "nested too deeply|not a JSON object")


def test_deeply_nested_config(folder):
    (folder / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _expect_error(folder, "nested too deeply")


def test_fifo_as_weight_file_does_not_hang(folder):
    (folder / DIT).unlink()
    os.mkfifo(folder / DIT)
    result: list[BaseException | None] = []

    def run():
        try:
            inspect_folder(folder)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5.0)
    if thread.is_alive():  # unblock the reader so the test process can end
        with open(folder / DIT, "wb"):
            pass
        pytest.fail("inspecting a folder whose weight file is a FIFO hangs")
    assert isinstance(result[0], KinemaError) and "not a regular file" in str(result[0])


def test_fifo_as_config(folder):
    (folder / "kinema.json").unlink(missing_ok=True)
    os.mkfifo(folder / "kinema.json")
    _expect_error(folder, "not a regular file")


def test_cli_reports_one_line(folder, capsys):
    from kinema.cli import main

    _edit_json(folder / "config.json", num_heads=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "num_heads = 0" in err


def test_clean_folder_still_loads(clean):
    spec = inspect_folder(clean).spec
    assert spec.dit.num_layers >= 1


def test_limits_admit_every_released_model():
    from kinema import limits
    from kinema.config import PRESETS
    from kinema.pipeline import BUILTIN_DIR

    for name, spec in PRESETS.items():
        limits.check_dit(spec.dit, name)
        limits.check_vae(spec.vae, name)
        limits.check_t5(spec.t5, name)
        limits.check_defaults(spec.defaults, name)
    assert inspect_folder(BUILTIN_DIR).spec.defaults.frames == 17
