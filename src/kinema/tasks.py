"""Tasks: the geometry of a generation (`TaskPlan`, `plan_task`) and what a task adds to the
shared denoising loop (`Conditioning`, `condition`).

- `plan_task` fixes the latent shape, token count, preprocessed image and per-token timestep
  mask from the size or the image; `first_frame_plan` makes the two passes of image-first
  text-to-video; `condition` runs the VAE encoder on the image (the only model call here).

- TI2V-5B image path (spec §6.4): `best_output_size` picks an output size near a target area
  with the image's aspect ratio, `ti2v_image_tensor` resizes (PIL LANCZOS) and centre-crops.
- I2V-A14B (spec §6.3): `i2v_latent_size` follows the image's aspect ratio inside a maximum
  area, `i2v_image_tensor` resizes with bicubic interpolation (no crop), `i2v_frame_mask`
  marks latent frame 0 as known.
- `token_timestep_mask`: per-token multipliers of the timestep (0 on tokens of frame 0 in the
  TI2V image path, 1 elsewhere).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelSpec
from .errors import InputError

ImageLike = Union[str, "os.PathLike[str]", "PIL.Image.Image", np.ndarray]  # noqa: F821


# Largest first frame accepted: 16,384 px a side and 64 MP (an 8K frame is 33 MP). Larger is a
# decompression bomb or a mistake; either way it would be shrunk to ~1 MP at once.
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 64_000_000


def _check_image_size(width: int, height: int, where: str) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{where} is {width}x{height}: larger than the limit of {MAX_IMAGE_SIDE} px a side and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} MP"
        )


def _to_rgb(img: "PIL.Image.Image") -> "PIL.Image.Image":  # noqa: F821
    """RGB, scaling high-bit-depth grey (PIL's "I;16*"/"I"/"F" modes) to 8 bits instead of
    clipping it (`convert("RGB")` would turn a 16-bit scan almost white)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
            top = 65535.0
        else:
            top = 255.0
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(image: ImageLike) -> "PIL.Image.Image":  # noqa: F821
    """An RGB PIL image from a path, a PIL image or a uint8 array [H, W, 3]; InputError if unusable
    (unreadable, truncated, empty, or over `MAX_IMAGE_SIDE` / `MAX_IMAGE_PIXELS`)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        _check_image_size(image.width, image.height, "the image")
        img = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        _check_image_size(image.shape[1], image.shape[0], "the image array")
        img = Image.fromarray(image)
    else:
        path = Path(image)
        if not path.exists():
            raise InputError(f"image not found: {path}")
        if not path.is_file():
            raise InputError(f"image is not a file: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
                opened = Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(f"image {path} is larger than the limit of {MAX_IMAGE_SIDE} px a side and "
                             f"{MAX_IMAGE_PIXELS // 1_000_000} MP") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot read image {path}: {reason}") from None
        try:
            with opened:
                # the header gives the size: refuse a bomb before decoding a single pixel
                _check_image_size(opened.width, opened.height, f"image {path}")
                opened.load()  # decode now: a truncated file fails here, not later
                img = _to_rgb(opened)
        except (OSError, ValueError, SyntaxError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot read image {path}: {reason}") from None
    img = _to_rgb(img)
    if img.width < 1 or img.height < 1:
        raise InputError("the image is empty")
    return img


def _to_unit_range(img: "PIL.Image.Image") -> Tensor:  # noqa: F821
    """PIL RGB -> float32 [3, H, W] in [-1, 1]: x/255 then (x - 0.5)/0.5 (official order)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3]
    x = arr.permute(2, 0, 1).to(torch.float32) / 255.0
    return (x - 0.5) / 0.5


# ----------------------------------------------------------------------------- TI2V-5B


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: float) -> tuple[int, int]:
    """(width, height), multiples of (dw, dh), of area about `expected_area` and the ratio w/h.

    Two candidates: round the width down first, or the height down first; the one whose aspect
    ratio is closer to the image's wins (ties go to the height-first candidate).
    """
    ratio = w / h
    ow = math.sqrt(expected_area * ratio)
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh) if ow1 > 0 else 0
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw) if oh2 > 0 else 0
    if min(ow1, oh1) <= 0 and min(ow2, oh2) <= 0:
        raise InputError(
            f"a {w}x{h} image cannot fit an output of about {expected_area:g} pixels in multiples of {dw}x{dh}"
        )
    if min(ow1, oh1) <= 0:
        return ow2, oh2
    if min(ow2, oh2) <= 0:
        return ow1, oh1
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return ow1, oh1
    return ow2, oh2


def ti2v_image_tensor(img: "PIL.Image.Image", size: tuple[int, int]) -> Tensor:  # noqa: F821
    """Resize (LANCZOS, covering `size`) and centre-crop to size = (ow, oh) -> [3, 1, oh, ow] in [-1, 1]."""
    from PIL import Image

    ow, oh = size
    w0, h0 = img.size
    scale = max(ow / w0, oh / h0)
    resized = img.resize((round(w0 * scale), round(h0 * scale)), Image.LANCZOS)
    x0 = (resized.width - ow) // 2
    y0 = (resized.height - oh) // 2
    cropped = resized.crop((x0, y0, x0 + ow, y0 + oh))
    return _to_unit_range(cropped).unsqueeze(1)


# ----------------------------------------------------------------------------- I2V-A14B


def i2v_latent_size(w0: int, h0: int, max_area: float, stride: int, patch: int) -> tuple[int, int]:
    """Latent (width, height) following the image's aspect ratio within `max_area` pixels.

    lat_h = ⌊⌊sqrt(A·h0/w0) / stride⌋ / patch⌋·patch (same for the width with w0/h0), so the
    pixel size (stride·lat) is a multiple of stride·patch; no cropping happens.
    """
    aspect = h0 / w0
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(
            f"a {w0}x{h0} image cannot fit an output of about {max_area:g} pixels "
            f"in multiples of {stride * patch}"
        )
    return lat_w, lat_h


def i2v_image_tensor(img: "PIL.Image.Image", size: tuple[int, int]) -> Tensor:  # noqa: F821
    """Bicubic resize (float32, no antialias, no clamp) of the [-1, 1] image to size = (w, h) -> [3, h, w]."""
    w, h = size
    x = _to_unit_range(img)[None]
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)[0]


def i2v_conditioning_video(image: Tensor, frames: int) -> Tensor:
    """[3, h, w] image followed by frames-1 zero (mid-grey) frames -> [3, frames, h, w]."""
    rest = image.new_zeros(image.shape[0], frames - 1, *image.shape[1:])
    return torch.cat([image[:, None], rest], dim=1)


def i2v_frame_mask(channels: int, latent_frames: int, lat_h: int, lat_w: int) -> Tensor:
    """[channels, T_lat, h, w] float32: 1 on latent frame 0 (the known image), 0 elsewhere.

    The official mask marks pixel frame 0 only, repeats it `temporal stride` times and folds
    groups of that many pixel frames into channels, which leaves every channel 1 exactly on
    latent frame 0.
    """
    mask = torch.zeros(channels, latent_frames, lat_h, lat_w, dtype=torch.float32)
    mask[:, 0] = 1.0
    return mask


# ----------------------------------------------------------------------------- per-token t


def token_timestep_mask(latent_frames: int, lat_h: int, lat_w: int, patch: tuple[int, int, int],
                        first_frame_known: bool) -> Tensor:
    """One multiplier per DiT token [T'·H'·W'] in (f, h, w) order: 0 on tokens of latent frame 0
    when the first frame is known (TI2V image path), 1 elsewhere."""
    pt, ph, pw = patch
    mask = torch.ones(latent_frames, lat_h, lat_w, dtype=torch.float32)
    if first_frame_known:
        mask[0] = 0.0
    # one value per patch (the mask is constant within a patch along h and w)
    return mask[::pt, ::ph, ::pw].flatten()


def token_timesteps(mask: Tensor, t: Tensor, seq_len: int) -> Tensor:
    """Per-token timesteps [1, seq_len] float32: mask·t on real tokens, t on padding."""
    t = t.to(torch.float32).reshape(())
    tokens = mask.to(torch.float32) * t
    if seq_len > tokens.numel():
        tokens = torch.cat([tokens, tokens.new_full((seq_len - tokens.numel(),), t.item())])
    return tokens[None]


def latent_frames(frames: int, temporal_stride: int) -> int:
    return (frames - 1) // temporal_stride + 1


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TaskPlan:
    """The geometry of one generation, fixed before any model runs.

    image_mode: None (text-to-video), "concat" (A14B image model: mask + image latent as extra
    DiT channels) or "first_frame" (TI2V: the image latent is latent frame 0).
    """

    size: tuple[int, int]  # output (width, height)
    frames: int
    latent_shape: tuple[int, int, int, int]  # (C, T_lat, h, w)
    seq_len: int
    image_mode: Optional[str] = None
    image: Optional[Tensor] = None  # concat: [3, h, w]; first_frame: [3, 1, h, w]; in [-1, 1]
    token_mask: Optional[Tensor] = None  # [tokens] per-token multiplier of t (TI2V), else None


@dataclass(frozen=True)
class Conditioning:
    """What a task adds to the shared loop: a plan plus the image-derived latents."""

    plan: TaskPlan
    y: Optional[Tensor] = None  # [C_y, T_lat, h, w], concatenated after the latent on channels
    first_frame: Optional[Tensor] = None  # [C, 1, h, w]: latent frame 0, reset after every step


def plan_task(spec: ModelSpec, size: tuple[int, int], frames: int, image: Any = None,
              max_area: int | None = None) -> TaskPlan:
    """Geometry for text-to-video at `size`, or image-to-video with the output size derived from
    the image within `max_area` pixels (default width·height of `size`)."""
    dit, vae = spec.dit, spec.vae
    stride, tstride = vae.spatial_stride, vae.temporal_stride
    pt, ph, pw = dit.patch_size
    t_lat = latent_frames(frames, tstride)
    area = int(max_area) if max_area is not None else size[0] * size[1]
    image_mode = None
    img_tensor = None
    if image is None:
        if dit.model_type == "i2v":
            raise ValueError(f"{spec.name} is an image-to-video model: plan_task needs an image")
        width, height = size
    elif dit.model_type == "ti2v":
        image_mode = "first_frame"
        width, height = best_output_size(image.width, image.height, stride * pw, stride * ph, area)
        img_tensor = ti2v_image_tensor(image, (width, height))
    elif dit.model_type == "i2v":
        image_mode = "concat"
        lat_w, lat_h = i2v_latent_size(image.width, image.height, area, stride, ph)
        width, height = lat_w * stride, lat_h * stride
        img_tensor = i2v_image_tensor(image, (width, height))
    else:
        raise ValueError(f"{spec.name} is text-to-video only: plan_task got an image")
    h, w = height // stride, width // stride
    token_mask = None
    if dit.model_type == "ti2v":
        # TI2V always passes per-token timesteps; frame-0 tokens get 0 when the image is known.
        token_mask = token_timestep_mask(t_lat, h, w, dit.patch_size, image_mode == "first_frame")
    seq_len = math.ceil((t_lat // pt) * (h // ph) * (w // pw))
    return TaskPlan(size=(width, height), frames=frames, latent_shape=(vae.z_dim, t_lat, h, w),
                    seq_len=seq_len, image_mode=image_mode, image=img_tensor, token_mask=token_mask)


def condition(plan: TaskPlan, spec: ModelSpec, vae: Any, device: torch.device) -> Conditioning:
    """Run the VAE encoder on the plan's image (if any) and build the task's conditioning."""
    if plan.image_mode is None:
        return Conditioning(plan)
    if plan.image_mode == "first_frame":
        z = vae.encode(plan.image[None].to(device))[0]  # [C, 1, h, w] normalized
        return Conditioning(plan, first_frame=z.float())
    # concat (A14B image model): the image then frames-1 zero frames through the VAE, and a
    # mask that is 1 on latent frame 0; channel order [latent, mask, image latent].
    video = i2v_conditioning_video(plan.image, plan.frames)
    y_lat = vae.encode(video[None].to(device))[0].float()  # [z, T_lat, h, w]
    mask_ch = spec.dit.in_dim - spec.dit.out_dim - y_lat.shape[0]
    if mask_ch < 1:
        raise ValueError(
            f"model in_dim {spec.dit.in_dim} leaves no room for the image mask "
            f"(latent {spec.dit.out_dim} + image latent {y_lat.shape[0]} channels)"
        )
    _, t_lat, h, w = plan.latent_shape
    mask = i2v_frame_mask(mask_ch, t_lat, h, w).to(y_lat.device)
    return Conditioning(plan, y=torch.cat([mask, y_lat], dim=0))


def first_frame_plan(spec: ModelSpec, plan: TaskPlan, frames: Optional[int]) -> TaskPlan:
    """The text-to-video `plan` of a TI2V model as the image-first passes: `frames=1` gives the
    text-to-image pass (one latent frame), `None` the image-to-video pass over the whole plan
    with latent frame 0 known (its tokens get timestep 0)."""
    c, t_lat, h, w = plan.latent_shape
    pt, ph, pw = spec.dit.patch_size
    if frames == 1:
        t_lat = 1
    mask = token_timestep_mask(t_lat, h, w, spec.dit.patch_size, frames is None)
    return replace(plan, frames=frames or plan.frames, latent_shape=(c, t_lat, h, w),
                   seq_len=(t_lat // pt) * (h // ph) * (w // pw), image_mode="first_frame" if frames is None else None,
                   token_mask=mask)


def encode_keyframe(vae: Any, frame: np.ndarray, size: tuple[int, int], device: torch.device | str) -> Tensor:
    """A uint8 frame [kH, kW, 3] shrunk to size = (W, H) by area averaging (each output pixel is
    the mean of its k x k block, as if drawn at size) and encoded: latent [C, 1, h, w]."""
    from PIL import Image

    small = Image.fromarray(frame).resize(size, Image.BOX)
    x = ti2v_image_tensor(small, size)  # already at size: only the official [-1, 1] scaling
    return vae.encode(x[None].to(device))[0].float()



__all__ = [
    "Conditioning", "TaskPlan", "best_output_size", "condition", "encode_keyframe", "first_frame_plan",
    "plan_task", "i2v_conditioning_video", "i2v_frame_mask", "i2v_image_tensor",
    "i2v_latent_size", "latent_frames", "load_image", "ti2v_image_tensor", "token_timestep_mask",
    "token_timesteps",
]
