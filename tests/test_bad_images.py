"""First-frame images a careless user or a hostile file would give: one-line errors, and
high-bit-depth images scaled rather than clipped."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kinema.tasks import load_image
from kinema.errors import InputError


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a decompression-bomb header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 9000), (17000, 10)])
def test_oversized_image_names_the_limit(tmp_path, size):
    path = _png_header_only(tmp_path / "big.png", *size)
    with pytest.raises(InputError, match=r"limit of 16384 px a side and 64 MP") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 8, 3)
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1  # clipping would give 255


def test_8bit_images_unchanged(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    path = tmp_path / "c.png"
    Image.fromarray(arr).save(path)
    assert np.array_equal(np.asarray(load_image(path)), arr)
    grey = arr[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "l.png"))[..., 1], grey)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_unreadable_image(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read image") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_truncated_image(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.png"
    Image.fromarray(arr).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:-200])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(cut)


def test_fifo_and_folder_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)
