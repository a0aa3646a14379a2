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

from .errors import InputError, KinemaError

_SLUG_MAX = 40


def default_output_name(prompt: str, seed: int) -> Path:
    """kinema_<prompt-slug>_<seed>.mp4 in the current folder."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:_SLUG_MAX].rstrip("-") or "video"
    return Path(f"kinema_{slug}_{seed}.mp4")


def parse_guidance(text: str | float | None) -> float | tuple[float, float] | None:
    """'5' -> 5.0; '3,4' -> (3.0, 4.0) = (low-noise, high-noise), the official order."""
    if text is None or isinstance(text, (int, float)):
        return text
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"guidance must be a number or LOW,HIGH; got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise InputError(f"guidance must be a number or LOW,HIGH; got {text!r}")


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
        if self.bar.n >= self.bar.total:
            self.bar.close()
            print("decoding ...", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _load_and_run(path: Path, device: Any, dtype: Optional[str], settings: Any, progress: bool,
                  image: Any, request: dict[str, Any]) -> Any:
    """Load the model, re-validate if the folder changed since inspection, sample, decode."""
    from .pipeline import load

    print(f"loading {path} on {device} ...", file=sys.stderr, flush=True)
    pipe = load(path, device=device, dtype=dtype)
    if pipe.spec != settings.spec:
        settings = pipe.settings(settings.prompt, image, seed=settings.seed, **request)
    w, h = settings.plan.size
    passes = 2 if settings.image_first else 1
    print(f"generating {settings.frames} frames at {w}x{h}, {settings.steps} steps "
          f"({settings.sampler}), seed {settings.seed}"
          + (" (first frame, then the video: 2 passes)" if passes == 2 else ""), file=sys.stderr, flush=True)
    bar = _Progress(passes * settings.steps, enabled=progress)
    try:
        return pipe.run(settings, callback=bar)
    finally:
        bar.close()


def run_generate(
    prompt: str,
    image: Optional[Path] = None,
    model: Optional[Path] = None,
    size: Optional[str] = None,
    frames: Optional[int] = None,
    steps: Optional[int] = None,
    guidance: Optional[str | float] = None,
    shift: Optional[float] = None,
    sampler: Optional[str] = None,
    image_first: Optional[bool] = None,
    image_first_scale: Optional[int] = None,
    negative_prompt: Optional[str] = None,
    seed: Optional[int] = None,
    output: Optional[Path] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    no_watermark: bool = False,
    no_sign: bool = False,
    include_prompt: bool = False,
    progress: bool = True,
    **_: Any,
) -> Path:
    """Generate one video from the CLI options; returns the written path."""
    from .loading import inspect_folder
    from .pipeline import check_output_path, resolve_device, resolve_dtype, resolve_settings

    start = time.perf_counter()
    request = dict(negative_prompt=negative_prompt, size=size, frames=frames, steps=steps,
                   guidance=parse_guidance(guidance), shift=shift, sampler=sampler, image_first=image_first,
                   image_first_scale=image_first_scale)
    path = _model_path(model)
    spec = inspect_folder(path).spec  # headers only: cheap, and it catches incomplete folders
    settings = resolve_settings(spec, prompt, image, seed=seed, **request)
    out = Path(output) if output is not None else default_output_name(prompt, settings.seed)
    check_output_path(out)
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)

    try:
        video = _load_and_run(path, dev, dtype, settings, progress, image, request)
        video.save(out, watermark=not no_watermark, sign=not no_sign, include_prompt=include_prompt)
    except KeyboardInterrupt:
        import typer

        raise typer.Abort() from None  # "aborted", exit 130, no traceback; no partial file stays
    seconds = time.perf_counter() - start
    w, h = video.size
    print(f"saved {out} ({video.num_frames} frames, {w}x{h}, {video.fps:g} fps) in {seconds:.1f} s")
    return out


__all__ = ["default_output_name", "run_generate"]
