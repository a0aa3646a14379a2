"""`resolve(spec, request) -> Settings`: every check of a request that needs no weights, once.

The model's defaults fill every unset field, each value is checked (one-line `InputError`
naming the Python argument, e.g. `image=`; the CLI turns those names into its flags) and the
task geometry is planned. Nothing here loads weights, so the CLI and the server reject a bad
request in well under a second.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from . import limits
from .config import ModelSpec
from .errors import InputError
from .request import Request, parse_guidance, parse_size
from .sampling import SAMPLERS
from .tasks import TaskPlan, load_image, plan_task


class SizeWarning(UserWarning):
    """A size far from what the model was trained on: it runs, but slowly and badly."""


# How far (in pixel area, either way) a requested size may stray from the model's default size
# before `resolve` warns: A14B's 480p is 0.43x its 720p default, 4x is already a long CPU run.
SIZE_WARN_FACTOR = 4.0


@dataclass(frozen=True)
class Settings:
    """A validated request (`request`, every field resolved) and what follows from it.

    Request fields read through: `settings.steps` is `settings.request.steps`. Runtime fields
    stay None when not given: the pipeline that runs the settings decides (and the sidecar
    records what it used).
    """

    request: Request  # every field filled in and normalised (see `resolve`)
    spec: ModelSpec  # the model these settings were validated for
    plan: TaskPlan
    fps: float
    boundary: Optional[float]  # two-expert models: the switch at t >= boundary * 1000
    image: Any = None  # PIL RGB image or None (request.image keeps what was passed)
    image_info: Optional[dict[str, Any]] = None
    lora_specs: tuple[Any, ...] = ()  # kinema.lora.LoraSpec of request.loras + lora_high + lora_low

    def __getattr__(self, name: str) -> Any:
        # only for names that are not fields of Settings itself; never during unpickling
        if name.startswith("_") or name == "request":
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "request"), name)

    def sidecar(self) -> dict[str, Any]:
        """The sidecar's `settings` block: every field, as JSON values (`Video.save` sets the
        output group to how the file was really written)."""
        out = {}
        for name, opt in Request.options():
            value = getattr(self.request, name)
            if name == "image":
                value = None if self.image_info is None else self.image_info.get("path", "<in-memory image>")
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def command(self, model: Optional[str] = None) -> Optional[str]:
        """The `kinema generate` line that makes these frames again (None when the CLI cannot:
        an in-memory image). Derived from the sampling fields: each resolved value is written
        out, except options marked `command="changed"` that equal the model's default."""
        import shlex

        if self.image_info is not None and "path" not in self.image_info:
            return None
        args = ["kinema", "generate", self.request.prompt]
        if model is not None:
            args += ["--model", model]
        defaults = self.spec.defaults
        for name, opt in Request.options("sampling"):
            value = getattr(self.request, name)
            if opt.argument or value is None:
                continue
            if name == "image":
                value = self.image_info["path"]
            if opt.command == "changed" and value == getattr(defaults, name, None):
                continue
            flag, off = opt.flags(name)
            if opt.multiple:
                for item in value:
                    args += [flag, opt.show(item) if opt.show else str(item)]
            elif isinstance(value, bool):
                args.append(flag if value else off)
            else:
                args += [flag, opt.show(value) if opt.show else str(value)]
        return shlex.join(args)


# ------------------------------------------------------------------------------ the checks


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{name}= must be an integer, got {value!r}")
    return int(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name}= must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")  # the sidecar, the manifest and the tokenizer all need UTF-8
    except UnicodeEncodeError:
        raise InputError(f"{name}= holds bytes that are not valid UTF-8 (check the terminal's encoding)") from None
    if "\x00" in value:
        raise InputError(f"{name}= holds a NUL character")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}= must be true or false, got {value!r}")
    return value


def _guidance(value: Any, two_experts: bool) -> float | tuple[float, float]:
    value = parse_guidance(value)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) not in (1, 2) or (len(values) == 2 and not two_experts):
        raise InputError(
            "guidance= must be one number" + (" or a (low-noise, high-noise) pair" if two_experts else "")
        )
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"guidance= must be a number, got {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise InputError(f"guidance= must be >= 0, got {v!r}")
        out.append(f)
    return out[0] if len(out) == 1 else (out[0], out[1])


def _size(spec: ModelSpec, size: Any) -> tuple[int, int]:
    size = parse_size(size)
    try:
        width, height = (_int("size", s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"size= must be (width, height), got {size!r}") from None
    multiple = spec.vae.spatial_stride * spec.dit.patch_size[1]
    multiple_w = spec.vae.spatial_stride * spec.dit.patch_size[2]
    if width > limits.MAX_SIDE or height > limits.MAX_SIDE:
        raise InputError(f"size {width}x{height} is too large: at most {limits.MAX_SIDE} pixels a side")
    if width < 1 or height < 1 or width % multiple_w or height % multiple:
        raise InputError(
            f"size {width}x{height} cannot be made by {spec.name}: width and height must be positive "
            f"multiples of {multiple_w if multiple_w == multiple else (multiple_w, multiple)}"
        )
    return width, height


def _seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbelow(2**63)
    seed = _int("seed", seed)
    if seed < 0:  # the official CLI's convention: a negative seed means "pick one"
        return secrets.randbelow(2**63)
    if seed >= 2**64:
        raise InputError(f"seed= must be below 2**64, got {seed}")
    return seed


def _image_info(source: Any, img: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"width": img.width, "height": img.height,
                            "sha256": hashlib.sha256(img.tobytes()).hexdigest()}
    if isinstance(source, (str, os.PathLike)):
        info["path"] = str(source)
    return info


def _warn_far_size(spec: ModelSpec, area: int) -> None:
    w0, h0 = spec.defaults.size
    ratio = area / (w0 * h0)
    if not 1 / SIZE_WARN_FACTOR <= ratio <= SIZE_WARN_FACTOR:
        warnings.warn(f"{spec.name} was made for about {w0}x{h0} pixels; {ratio:.2g}x that area will be "
                      f"{'slow and ' if ratio > 1 else ''}poor", SizeWarning, stacklevel=3)


def check_lora_mode(value: Any) -> str:
    """"merge" or "side" (the `lora_mode=` of a request and of `kinema.load`)."""
    from .lora.apply import MODES

    mode = _text("lora_mode", value).lower()
    if mode not in MODES:
        raise InputError(f"lora_mode= must be one of {', '.join(MODES)}, got {value!r}")
    return mode


def _lora_text(spec: Any) -> str:
    """A LoraSpec as the CLI writes it: FILE:STRENGTH or FILE:HIGH,LOW."""
    s = spec.strength
    strength = ",".join(f"{float(v):g}" for v in s) if isinstance(s, (tuple, list)) else f"{float(s):g}"
    return f"{spec.path}:{strength}"


def _loras(spec: ModelSpec, r: Request) -> tuple[tuple[Any, ...], dict[str, tuple[str, ...]]]:
    """The request's LoRAs checked without reading weights (`kinema.lora.resolve_loras`): the
    specs, and loras / lora_high / lora_low normalised to FILE:STRENGTH text by target."""
    from .lora import resolve_loras

    specs = resolve_loras(r.loras, r.lora_high, r.lora_low, experts=2 if spec.two_experts else 1)
    text = {name: tuple(_lora_text(s) for s in specs if s.target == target)
            for name, target in (("loras", "both"), ("lora_high", "high"), ("lora_low", "low"))}
    return specs, text


def resolve(spec: ModelSpec, request: Request) -> Settings:
    """Fill in the model's defaults and check everything that can be checked without weights
    (one-line InputError otherwise), including the prompt policy and the output path."""
    from .placement import resolve_device, resolve_dtype
    from .provenance import check_prompt

    if not isinstance(request, Request):
        raise TypeError(f"resolve() takes a Request, got {type(request).__name__}")
    d = spec.defaults
    r = request
    preset = None
    if r.preset is not None:  # the recipe's values fill what the user left unset
        from .presets import get_preset

        chosen = get_preset(_text("preset", r.preset))
        preset = chosen.name
        r = replace(r, **{k: v for k, v in chosen.settings().items() if getattr(r, k) is None})
    prompt = _text("prompt", r.prompt)
    if not prompt.strip():
        raise InputError("the prompt is empty; say what the video should show")
    check_prompt(prompt)
    negative_prompt = d.negative_prompt if r.negative_prompt is None else _text("negative_prompt", r.negative_prompt)

    frames = d.frames if r.frames is None else _int("frames", r.frames)
    tstride = spec.vae.temporal_stride
    if frames < 1 or (frames - 1) % tstride:
        raise InputError(f"frames= must be {tstride}n+1 (1, {tstride + 1}, {2 * tstride + 1}, ...), got {frames}")
    if frames > limits.MAX_FRAMES:
        raise InputError(f"frames= {frames} is too many: at most {limits.MAX_FRAMES}")
    width, height = _size(spec, d.size if r.size is None else r.size)

    steps = d.steps if r.steps is None else _int("steps", r.steps)
    if not 1 <= steps <= limits.MAX_STEPS:
        raise InputError(f"steps= must be 1 to {limits.MAX_STEPS}, got {steps}")
    guidance = _guidance(d.guidance if r.guidance is None else r.guidance, spec.two_experts)
    try:
        shift = float(d.shift if r.shift is None else r.shift)
    except (TypeError, ValueError):
        raise InputError(f"shift= must be a number, got {r.shift!r}") from None
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"shift= must be a number > 0, got {r.shift!r}")
    sampler = (d.sampler if r.sampler is None else _text("sampler", r.sampler)).lower()
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler= {sampler!r}; choose from {', '.join(SAMPLERS)}")
    seed = _seed(r.seed)
    lora_specs, lora_text = _loras(spec, r)

    pil = info = None
    if r.image is not None:
        if not spec.supports_image:
            raise InputError(f"the model {spec.name} is text-to-video only; it cannot start from an image=")
        pil = load_image(r.image)
        info = _image_info(r.image, pil)
    elif not spec.supports_text_only:
        raise InputError(f"the model {spec.name} makes videos from an image: pass image=")
    max_area = None
    if r.max_area is not None:
        max_area = _int("max_area", r.max_area)
        if max_area < 1:
            raise InputError(f"max_area= must be >= 1, got {max_area}")
    _warn_far_size(spec, max_area or width * height)
    plan = plan_task(spec, (width, height), frames, pil, max_area)

    image_first = d.image_first if r.image_first is None else _bool("image_first", r.image_first)
    if r.image_first and spec.dit.model_type != "ti2v":
        raise InputError(f"image_first= needs a TI2V model (an image as latent frame 0); {spec.name} is not one")
    # only meaningful for text-to-video of more than one latent frame
    image_first = bool(image_first and pil is None and spec.dit.model_type == "ti2v" and plan.latent_shape[1] > 1)
    scale = d.image_first_scale if r.image_first_scale is None else _int("image_first_scale", r.image_first_scale)
    if not 1 <= scale <= 8:
        raise InputError(f"image_first_scale= must be 1 to 8, got {scale}")

    # runtime options: checked here, but left None when not given (= what the pipeline has)
    device = resolve_device(r.device)
    dtype = None if r.dtype is None else str(resolve_dtype(r.dtype, device)).replace("torch.", "")
    lora_mode = None if r.lora_mode is None else check_lora_mode(r.lora_mode)

    overwrite = False if r.overwrite is None else _bool("overwrite", r.overwrite)
    output = None
    if r.output is not None:
        from .video import check_output_path

        output = str(check_output_path(r.output, overwrite=overwrite))
    sign = True if r.sign is None else _bool("sign", r.sign)
    if sign:  # a broken or uncreatable signing identity fails now, not after the generation
        from .provenance.credentials import check_identity

        check_identity()
    resolved = replace(
        r, prompt=prompt, negative_prompt=negative_prompt, size=(width, height), max_area=max_area,
        frames=frames, steps=steps, guidance=guidance, shift=shift, sampler=sampler, seed=seed,
        image_first=image_first, image_first_scale=scale, preset=preset, **lora_text,
        device=None if r.device is None else str(device), dtype=dtype, lora_mode=lora_mode,
        output=output, watermark=True if r.watermark is None else _bool("watermark", r.watermark),
        sign=sign, overwrite=overwrite,
        include_prompt=False if r.include_prompt is None else _bool("include_prompt", r.include_prompt),
    )
    return Settings(request=resolved, spec=spec, plan=plan, fps=float(d.fps),
                    boundary=d.boundary if spec.two_experts else None, image=pil, image_info=info,
                    lora_specs=lora_specs)


__all__ = ["SIZE_WARN_FACTOR", "Settings", "SizeWarning", "check_lora_mode", "resolve"]
