"""Error types. Everything a user can cause derives from `KinemaError`; the CLI prints its
message as one line and exits non-zero, without a traceback."""


class KinemaError(Exception):
    """A problem the user can fix (bad input, missing or broken files)."""


class ModelFolderError(KinemaError):
    """A model folder is missing, incomplete, of an unknown layout, or holds corrupt files."""


class CheckpointError(ModelFolderError):
    """A checkpoint file's contents do not match the model (missing/unexpected keys, shapes)."""


class InputError(KinemaError):
    """A generation request that cannot be honoured (size, frames, steps, image, ...)."""


class LoraError(KinemaError):
    """A LoRA file that cannot be applied (not safetensors, nothing matches, shapes that do not fit)."""
