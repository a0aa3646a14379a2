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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import InputError
from .video_io import clean_stale_parts, part_path

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
             include_prompt: bool = False, overwrite: bool = False) -> Path:
        """Write the MP4 (H.264, yuv420p, faststart) and its JSON sidecar, as a pair.

        The sidecar goes next to the video with the suffix replaced by `.json`
        (`clip.mp4` -> `clip.json`), holds everything needed to reproduce the clip and the
        MP4's sha256. An existing video or sidecar is replaced only with `overwrite=True`.
        Both files are finished in a hidden staging folder beside the target first, so a failed
        run leaves the old pair untouched; then the sidecar is renamed into place before the
        video, so a crash between the two renames leaves at worst a new sidecar whose sha256
        does not match the old video (which `kinema verify` reports), never an old sidecar
        describing a new video. The watermark's per-video id is derived from the frames, so the
        same seed and settings give bit-identical frames, watermark included. The prompt goes into
        the signed credentials only with `include_prompt`. Returns the video path.
        """
        path = Path(path)
        check_output_path(path, overwrite=overwrite)
        from .provenance import finalize_video

        meta = self.metadata
        stage = part_path(path, "stage")
        stage.mkdir()
        try:
            staged = stage / path.name  # the final name: the C2PA title says clip.mp4
            facts = finalize_video(
                self.frames, staged, self.fps, model_name=str(meta.get("model", {}).get("name", "unknown")),
                watermark=watermark, sign=sign, prompt=meta.get("settings", {}).get("prompt"),
                include_prompt=include_prompt, video_id=self.content_id(), loras=meta.get("loras"),
            )
            # the output options as this file was really written (Request's "output" group)
            written = {"output": str(path), "watermark": watermark, "sign": sign,
                       "include_prompt": include_prompt, "overwrite": overwrite}
            sidecar = {**meta, "file": path.name, "sha256": file_sha256(staged), "provenance": facts}
            if "settings" in meta:
                sidecar["settings"] = {**meta["settings"], **written}
            staged_json = stage / sidecar_path(path).name
            _write_json(staged_json, sidecar)
            if not overwrite:  # another process may have written there since the check
                for target in (path, sidecar_path(path)):
                    if os.path.lexists(target):
                        raise InputError(f"{target} exists; pass overwrite=True to replace it")
            os.replace(staged_json, sidecar_path(path))
            os.replace(staged, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (recorded in the sidecar, checked by `kinema verify`)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_matches(video_path: str | os.PathLike) -> Optional[bool]:
    """Whether the sidecar next to a video describes it: None when there is no sidecar (or it
    records no sha256), else whether its sha256 equals the video's."""
    side = sidecar_path(video_path)
    try:
        recorded = json.loads(side.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str):
        return None
    return recorded == file_sha256(video_path)


def sidecar_path(video_path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of a video lives: the same name with the suffix `.json`."""
    return Path(video_path).with_suffix(SIDECAR_SUFFIX)


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """InputError unless an MP4 and its sidecar can be written at `path`: an .mp4 name in an
    existing folder where a temporary file can really be created (a write check alone passes
    in places such as /sys as root), not replacing an existing file unless `overwrite`.
    Also removes stale temporary files that killed kinema runs left in that folder."""
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
    side = sidecar_path(path)
    if side.is_dir():
        raise InputError(f"cannot write the sidecar {side}: it is a folder")
    for target in (path, side):
        if os.path.lexists(target):
            if not overwrite:
                raise InputError(f"{target} exists; pass overwrite=True to replace it")
            if not os.access(target, os.W_OK):
                raise InputError(f"cannot write {target}: the existing file is read-only")
    clean_stale_parts(folder)
    probe = part_path(path, "probe")
    try:
        with open(probe, "x"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    probe.unlink(missing_ok=True)
    return path


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "x", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


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


__all__ = ["SIDECAR_SUFFIX", "VIDEO_SUFFIX", "Video", "check_output_path", "file_sha256", "sidecar_matches",
           "sidecar_metadata", "sidecar_path"]
