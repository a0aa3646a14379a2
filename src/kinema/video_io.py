"""MP4 reading and writing through PyAV.

Writing is atomic: frames go to a temporary file beside the target, which is renamed over
the target only once the file is complete, so a failed or interrupted write loses nothing.
Temporary names come from `part_path` and are created with `open`, not `mkstemp`, so the
file ends up with the mode the umask gives (mkstemp's 0600 would survive the rename).
"""

from __future__ import annotations

import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputError


def part_path(path: str | os.PathLike, tag: str) -> Path:
    """A fresh hidden name beside `path` for a temporary file: `.NAME.PID.RANDOM.TAG`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


def write_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike,
    fps: float,
    *,
    crf: int = 18,
    preset: str = "medium",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 RGB frames `[F, H, W, 3]` as browser-playable H.264 (yuv420p, faststart)."""
    import av

    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = str(part_path(path, "part.mp4"))
    try:
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            for key, value in (metadata or {}).items():
                container.metadata[key] = value
            stream = None
            for frame in frames:
                frame = np.ascontiguousarray(frame)
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise ValueError(f"frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
                if stream is None:
                    h, w = frame.shape[:2]
                    if h % 2 or w % 2:
                        raise InputError(f"H.264 yuv420p needs even width and height, got {w}x{h}")
                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                    stream.options = {"crf": str(crf), "preset": preset}
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            if stream is None:
                raise ValueError("no frames to write")
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode a video file to uint8 RGB frames `[F, H, W, 3]` and its frame rate."""
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError) as exc:
        raise InputError(f"cannot read video {path}: {exc}") from None
    if not frames:
        raise InputError(f"video has no frames: {path}")
    return np.stack(frames), fps
