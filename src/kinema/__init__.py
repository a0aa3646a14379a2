"""kinema: text- and image-to-video generation with Wan2.2-class models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline


def load(path: str | None = None, **kwargs: Any) -> "Pipeline":
    """Load a model folder (official or diffusers layout; None = the built-in model)."""
    # Imported here so that `import kinema` stays cheap and free of side effects.
    from .pipeline import load as _load

    return _load(path, **kwargs)
