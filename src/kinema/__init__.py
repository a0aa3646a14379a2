"""kinema: text- and image-to-video generation with Wan2.2-class models.

    settings = kinema.prepare(model, "a red fox", steps=20)   # headers only: fails fast
    pipe = kinema.load(model)                                  # the weights
    video = pipe.run(settings)                                 # or pipe.generate("...", ...)
    video.save("fox.mp4")

`kinema.generate(...)` does all of it in one call. The options are the fields of
`kinema.Request` (diffusers-style aliases accepted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .request import Request

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline
    from .validate import Settings
    from .video import Video

# The heavy modules (torch) are imported inside these functions, so `import kinema` stays cheap
# and free of side effects.


def load(path: Any = None, **kwargs: Any) -> "Pipeline":
    """Load a model folder (official or diffusers layout; None = the built-in model)."""
    from .pipeline import load as _load

    return _load(path, **kwargs)


def prepare(model: Any = None, prompt: str | None = None, image: Any = None, **options: Any) -> "Settings":
    """Validate a request against a model folder without loading weights (see `Request`)."""
    from .pipeline import prepare as _prepare

    return _prepare(model, prompt, image, **options)


def generate(prompt: str | None = None, image: Any = None, **options: Any) -> "Video":
    """Validate, load, generate (and save with `output=`) in one call; `model=` picks the folder."""
    from .pipeline import generate as _generate

    return _generate(prompt, image, **options)


__all__ = ["Request", "__version__", "generate", "load", "prepare"]
