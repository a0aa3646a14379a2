"""`kinema generate`: validate the request, load the model, sample with a progress bar, save.

Every check a user can fail (model folder, sizes, frames, steps, guidance, image, output path,
prompt policy) runs before the model weights are loaded, so a bad request fails in well under a
second with one line and leaves no file behind.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .errors import KinemaError

_SLUG_MAX = 40


def default_output_name(prompt: str, seed: int) -> Path:
    """kinema_<prompt-slug>_<seed>.mp4 in the current folder."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:_SLUG_MAX].rstrip("-") or "video"
    return Path(f"kinema_{slug}_{seed}.mp4")


def _model_path(model: Optional[Path]) -> Path:
    from .pipeline import BUILTIN_DIR

    if model is not None:
        return Path(model).expanduser()
    if not (BUILTIN_DIR.is_dir() and any(BUILTIN_DIR.iterdir())):
        raise KinemaError(
            "the built-in model is not available in this installation; pass --model DIR (a Wan2.2 folder)"
        )
    return BUILTIN_DIR


class _Progress:
    """A step progress bar on stderr (step n/N, it/s, ETA) that prints 'decoding' when done."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, leave=True,
                        bar_format="{desc}: step {n_fmt}/{total_fmt} |{bar}| {rate_fmt} ETA {remaining}")

    def __call__(self, info: Any) -> None:
        self.bar.update(1)
        if info.step == info.total:
            self.bar.close()
            print("decoding ...", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def run_generate(
    prompt: str,
    image: Optional[Path] = None,
    model: Optional[Path] = None,
    size: Optional[str] = None,
    frames: Optional[int] = None,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    shift: Optional[float] = None,
    sampler: Optional[str] = None,
    negative_prompt: Optional[str] = None,
    seed: Optional[int] = None,
    output: Optional[Path] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    no_watermark: bool = False,
    no_sign: bool = False,
    progress: bool = True,
    **_: Any,
) -> Path:
    """Generate one video from the CLI options; returns the written path."""
    from .loading import inspect_folder
    from .pipeline import check_output_path, load, resolve_device, resolve_dtype, resolve_settings

    start = time.perf_counter()
    path = _model_path(model)
    spec = inspect_folder(path).spec  # headers only: cheap, and it catches incomplete folders
    settings = resolve_settings(spec, prompt, image, negative_prompt=negative_prompt, size=size,
                                frames=frames, steps=steps, guidance=guidance, shift=shift,
                                sampler=sampler, seed=seed)
    out = Path(output) if output is not None else default_output_name(prompt, settings.seed)
    check_output_path(out)
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)

    print(f"loading {path} on {dev} ...", file=sys.stderr, flush=True)
    pipe = load(path, device=dev, dtype=dtype)
    if pipe.spec != spec:  # the folder changed between inspection and loading
        settings = pipe.settings(prompt, image, negative_prompt=negative_prompt, size=size, frames=frames,
                                 steps=steps, guidance=guidance, shift=shift, sampler=sampler,
                                 seed=settings.seed)
    w, h = settings.plan.size
    print(f"generating {settings.frames} frames at {w}x{h}, {settings.steps} steps "
          f"({settings.sampler}), seed {settings.seed}", file=sys.stderr, flush=True)
    bar = _Progress(settings.steps, enabled=progress)
    try:
        video = pipe.run(settings, callback=bar)
    finally:
        bar.close()
    video.save(out, watermark=not no_watermark, sign=not no_sign)
    seconds = time.perf_counter() - start
    fps = f"{video.fps:g}"
    print(f"saved {out} ({video.num_frames} frames, {w}x{h}, {fps} fps) in {seconds:.1f} s")
    return out


__all__ = ["default_output_name", "run_generate"]
