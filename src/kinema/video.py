"""The result of a generation: `Video` (uint8 frames, fps, sidecar metadata) and its writing.

`Video.save` writes the MP4 (watermarked and signed, through `kinema.provenance`) and next to it
the JSON sidecar: the facts of the run (model, task, output size, noise, time), the
resolved request (`settings`, one entry per `Request` field) and the `command` that makes the
same frames again. Files are written under a temporary name and renamed, and follow the umask.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import InputError
from .video_io import part_path

SIDECAR_SUFFIX = ".json"
VIDEO_SUFFIX = ".mp4"


@dataclass
class Video:
    """A generated clip: uint8 RGB `frames` [F, H, W, 3], its `fps` and the sidecar `metadata`."""

    frames: np.ndarray
    fps: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def content_id(self) -> str:
        """48-bit id (12 hex digits) of these exact frames: the watermark's per-video id."""
        return hashlib.sha256(np.ascontiguousarray(self.frames).data).hexdigest()[:12]

    def save(self, path: str | os.PathLike, *, watermark: bool = True, sign: bool = True,
             include_prompt: bool = False) -> Path:
        """Write the MP4 (H.264, yuv420p, faststart; atomically) and its JSON sidecar.

        The sidecar goes next to the video with the suffix replaced by `.json`
        (`clip.mp4` -> `clip.json`) and holds everything needed to reproduce the clip.
        The watermark's per-video id is derived from the frames themselves, so the same seed
        and settings give bit-identical frames, watermark included. The prompt goes into the
        signed credentials only with `include_prompt`. Returns the video path.
        """
        path = Path(path)
        check_output_path(path)
        from .provenance import finalize_video

        meta = self.metadata
        facts = finalize_video(
            self.frames, path, self.fps, model_name=str(meta.get("model", {}).get("name", "unknown")),
            watermark=watermark, sign=sign, prompt=meta.get("settings", {}).get("prompt"),
            include_prompt=include_prompt,
            video_id=self.content_id(), loras=meta.get("loras"),
        )
        # the output options as this file was really written (Request's "output" group)
        written = {"output": str(path), "watermark": watermark, "sign": sign, "include_prompt": include_prompt}
        sidecar = {**meta, "file": path.name, "provenance": facts}
        if "settings" in meta:
            sidecar["settings"] = {**meta["settings"], **written}
        try:
            _write_json_atomic(sidecar_path(path), sidecar)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def sidecar_path(video_path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of a video lives: the same name with the suffix `.json`."""
    return Path(video_path).with_suffix(SIDECAR_SUFFIX)


def check_output_path(path: str | os.PathLike) -> Path:
    """InputError unless an MP4 and its sidecar can be written at `path`: an .mp4 name in an
    existing folder where a temporary file can really be created (a write check alone passes
    in places such as /sys as root)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name such as {path / 'video.mp4'}")
    if path.suffix.lower() != VIDEO_SUFFIX:
        raise InputError(f"output {path} must be an .mp4 file (kinema writes H.264 MP4)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")
    for target in (path, sidecar_path(path)):
        if target.exists() and not os.access(target, os.W_OK):
            raise InputError(f"cannot write {target}: the existing file is read-only")
    probe = part_path(path, "probe")
    try:
        with open(probe, "x"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    probe.unlink(missing_ok=True)
    return path


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    # A temporary name of our own (not mkstemp, whose 0600 mode would ignore the umask), renamed
    # over the target once complete.
    tmp = part_path(path, "part")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sidecar_metadata(settings: Any, *, source: Optional[str], layout: Optional[str], runtime: dict[str, Any],
                     seconds: float) -> dict[str, Any]:
    """The sidecar of a video made from `settings` (a `kinema.validate.Settings`) by a model
    loaded from `source` with the `runtime` options (`Pipeline.runtime`): the facts of the
    run, the resolved request and the reproduce command."""
    from . import __version__
    from .sampling import STOCHASTIC_SAMPLERS

    spec, plan = settings.spec, settings.plan
    task = "text-to-video" if plan.image_mode is None else "image-to-video"
    if settings.image_first:
        task = "text-to-video (image first)"
    return {
        "kinema_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": spec.name, "path": source, "layout": layout, "type": spec.dit.model_type,
                  "two_experts": spec.two_experts},
        "task": task,
        "size": list(plan.size),  # the output size (image tasks: from the image within the area)
        "frames": plan.frames,
        "fps": settings.fps,
        "image": settings.image_info,
        "boundary": settings.boundary,
        "noise": "torch.randn float32, torch.Generator('cpu').manual_seed(seed)",
        "step_noise": ("torch.randn float32 per step, kinema.pipeline.step_noise_generator(seed, latent shape)"
                       if settings.sampler in STOCHASTIC_SAMPLERS else None),
        "seconds": round(seconds, 3),
        "settings": {**settings.sidecar(), **runtime},
        "command": settings.command(source),
    }


__all__ = ["SIDECAR_SUFFIX", "VIDEO_SUFFIX", "Video", "check_output_path", "sidecar_metadata", "sidecar_path"]
