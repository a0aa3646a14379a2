"""Generation: one denoising loop for every task, and the `Pipeline` a user loads once.

How a video is made (spec §6):

1. `Pipeline.settings` fills in the model's defaults and validates the request (no model
   work happens before the request is known to be good).
2. `plan_task` fixes the geometry from the size or the image: latent shape, token count, the
   preprocessed image and, for TI2V, the per-token timestep mask.
3. `condition` runs the VAE on the image when there is one: the A14B image model gets the
   frame mask + image latent as extra channels (`y`), TI2V gets the image latent as a known
   first latent frame.
4. `denoise_video` is THE loop, shared by every task: noise → sampler (UniPC / DPM++ / Euler)
   driven by a classifier-free-guided denoiser that picks the expert per step.
5. `decode_frames` turns the final latent into uint8 RGB frames, chunk by chunk.

Noise is one float32 `torch.randn` of the latent shape drawn on the CPU from
`torch.Generator("cpu").manual_seed(seed)`, so a seed means the same video on every device.
Placement follows the official memory flags: the text encoder stays on the CPU, each DiT and
the VAE is moved to the compute device only while it is used, and of two experts only the
active one is ever on the device.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import conditioning as cnd
from .config import ModelSpec
from .errors import InputError, KinemaError, ModelFolderError
from .sampling import SAMPLERS, STOCHASTIC_SAMPLERS, Schedule

BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "builtin"
SIDECAR_SUFFIX = ".json"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


# ---------------------------------------------------------------------------------------------
# device / dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The compute device: CUDA when present (None), else CPU; or the one asked for."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The DiT compute dtype: bfloat16 on CUDA, float32 on CPU, unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


# ---------------------------------------------------------------------------------------------
# task geometry and conditioning


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
    t_lat = cnd.latent_frames(frames, tstride)
    area = int(max_area) if max_area is not None else size[0] * size[1]
    image_mode = None
    img_tensor = None
    if image is None:
        if dit.model_type == "i2v":
            raise InputError(f"the model {spec.name} makes videos from an image: pass --image")
        width, height = size
    elif dit.model_type == "ti2v":
        image_mode = "first_frame"
        width, height = cnd.best_output_size(image.width, image.height, stride * pw, stride * ph, area)
        img_tensor = cnd.ti2v_image_tensor(image, (width, height))
    elif dit.model_type == "i2v":
        image_mode = "concat"
        lat_w, lat_h = cnd.i2v_latent_size(image.width, image.height, area, stride, ph)
        width, height = lat_w * stride, lat_h * stride
        img_tensor = cnd.i2v_image_tensor(image, (width, height))
    else:
        raise InputError(f"the model {spec.name} is text-to-video only; it cannot start from an image")
    h, w = height // stride, width // stride
    token_mask = None
    if dit.model_type == "ti2v":
        # TI2V always passes per-token timesteps; frame-0 tokens get 0 when the image is known.
        token_mask = cnd.token_timestep_mask(t_lat, h, w, dit.patch_size, image_mode == "first_frame")
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
    video = cnd.i2v_conditioning_video(plan.image, plan.frames)
    y_lat = vae.encode(video[None].to(device))[0].float()  # [z, T_lat, h, w]
    mask_ch = spec.dit.in_dim - spec.dit.out_dim - y_lat.shape[0]
    if mask_ch < 1:
        raise KinemaError(
            f"model in_dim {spec.dit.in_dim} leaves no room for the image mask "
            f"(latent {spec.dit.out_dim} + image latent {y_lat.shape[0]} channels)"
        )
    _, t_lat, h, w = plan.latent_shape
    mask = cnd.i2v_frame_mask(mask_ch, t_lat, h, w).to(y_lat.device)
    return Conditioning(plan, y=torch.cat([mask, y_lat], dim=0))


def _first_frame_plan(spec: ModelSpec, plan: TaskPlan, frames: Optional[int]) -> TaskPlan:
    """The text-to-video `plan` of a TI2V model as the image-first passes: `frames=1` gives the
    text-to-image pass (one latent frame), `None` the image-to-video pass over the whole plan
    with latent frame 0 known (its tokens get timestep 0)."""
    c, t_lat, h, w = plan.latent_shape
    pt, ph, pw = spec.dit.patch_size
    if frames == 1:
        t_lat = 1
    mask = cnd.token_timestep_mask(t_lat, h, w, spec.dit.patch_size, frames is None)
    return replace(plan, frames=frames or plan.frames, latent_shape=(c, t_lat, h, w),
                   seq_len=(t_lat // pt) * (h // ph) * (w // pw), image_mode="first_frame" if frames is None else None,
                   token_mask=mask)


def encode_keyframe(vae: Any, frame: np.ndarray, size: tuple[int, int], device: torch.device | str) -> Tensor:
    """A uint8 frame [kH, kW, 3] shrunk to size = (W, H) by area averaging (each output pixel is
    the mean of its k x k block, as if drawn at size) and encoded: latent [C, 1, h, w]."""
    from PIL import Image

    small = Image.fromarray(frame).resize(size, Image.BOX)
    x = cnd.ti2v_image_tensor(small, size)  # already at size: only the official [-1, 1] scaling
    return vae.encode(x[None].to(device))[0].float()


def draw_noise(shape: Sequence[int], seed: int) -> Tensor:
    """Initial noise: one float32 randn of `shape` from a CPU generator seeded with `seed`."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def step_noise_generator(seed: int, shape: Sequence[int]) -> torch.Generator:
    """The CPU generator of a stochastic sampler's per-step noise, for a pass over a latent of
    `shape` [C, T, h, w].

    Seeded from a hash of (seed, shape), not from `seed` itself, so it never replays the initial
    noise (nor that of a neighbouring seed); keyed by the shape so that the image pass of
    image-first text-to-video stays exactly the `frames=1` video of the same seed."""
    key = "x".join(str(int(n)) for n in shape)
    digest = hashlib.sha256(f"kinema-step-noise:{int(seed)}:{key}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------
# experts, guidance and the loop


@dataclass
class ModelCall:
    """One step's denoiser evaluation (recorded through `denoise_video(trace=...)`)."""

    step: int
    t: int  # integer model timestep
    expert: int  # 0: the single DiT or the high-noise expert, 1: the low-noise expert
    guidance: float
    latent: Tensor  # [1, C, T, h, w] latent fed to the DiT
    timestep: Tensor  # what the DiT got: [1] int64, or [1, seq_len] float32 per token
    v_cond: Tensor
    v_uncond: Optional[Tensor]  # None when guidance == 1 (no unconditional pass)
    v: Tensor  # guided velocity


@dataclass(frozen=True)
class StepInfo:
    """Progress of one finished sampling step (passed to the user's callback)."""

    step: int  # 1-based
    total: int
    timestep: int
    expert: Optional[str]  # "high" / "low" for two-expert models, else None
    latent: Tensor  # [1, C, T, h, w] solver state after the step
    x0_pred: Tensor  # [1, C, T, h, w] the clean-latent prediction of this step (for previews)


StepCallback = Callable[[StepInfo], object]


class Experts:
    """The DiT(s) of a model, the rule that picks one per step, and where they live.

    models[0] is the single DiT or the high-noise expert, models[1] the low-noise expert; the
    high-noise one runs while t >= boundary·1000. `guidance` follows the official order:
    a float, or (low-noise, high-noise). With `offload`, only the active expert sits on the
    device; the other is moved back to the CPU first.
    """

    def __init__(self, models: Sequence[torch.nn.Module], guidance: float | tuple[float, float],
                 boundary: float | None, device: torch.device, offload: bool = True,
                 num_train_timesteps: int = 1000):
        if not 1 <= len(models) <= 2:
            raise ValueError("one DiT or two experts")
        if len(models) == 2 and boundary is None:
            raise ValueError("two experts need a boundary")
        self.models = list(models)
        low, high = guidance if isinstance(guidance, tuple) else (guidance, guidance)
        self.scales = [float(high), float(low)][: len(self.models)]
        self.boundary_t = None if boundary is None else boundary * num_train_timesteps
        self.device = device
        self.offload = offload

    def pick(self, t: int) -> int:
        if len(self.models) == 1 or t >= self.boundary_t:
            return 0
        return 1

    def name(self, k: int) -> Optional[str]:
        return None if len(self.models) == 1 else ("high", "low")[k]

    def activate(self, k: int) -> torch.nn.Module:
        """Expert k on the device (the other one moved off first, so both never share it)."""
        if self.device.type != "cpu":
            if self.offload:
                for j, m in enumerate(self.models):
                    if j != k:
                        _move(m, torch.device("cpu"))
            _move(self.models[k], self.device)
        return self.models[k]

    def release(self) -> None:
        """After sampling: every DiT back to the CPU (offload) and the device cache freed."""
        if self.device.type != "cpu" and self.offload:
            for m in self.models:
                _move(m, torch.device("cpu"))
            _empty_cache(self.device)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _move(module: Any, device: torch.device) -> None:
    if module is not None and _module_device(module) != device:
        module.to(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _resident(module: Any, device: torch.device, offload: bool) -> Iterator[Any]:
    """Keep `module` on `device` for a block; back to the CPU afterwards when offloading."""
    _move(module, device)
    try:
        yield module
    finally:
        if offload and device.type != "cpu":
            _move(module, torch.device("cpu"))
            _empty_cache(device)


# Both guidance passes run as one batch up to this many tokens per sample: short calls are
# dominated by fixed costs (the built-in model's whole generation, 16- and 80-token calls, is
# ~1.5 -> ~1.25 s on a 2-core CPU: benchmarks/cfg_batch_bench.py), while for long sequences
# batching saves nothing and doubles the activation memory (a 720p TI2V-5B clip has ~27k tokens).
BATCH_CFG_MAX_TOKENS = 4096


def make_denoiser(experts: Experts, context: Tensor, context_null: Optional[Tensor],
                  cond: Conditioning, device: torch.device,
                  trace: Optional[Callable[[ModelCall], object]] = None, batch_cfg: bool = False
                  ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """denoise(x, t, sigma) -> guided velocity, the sampler's view of the model(s).

    Per step: the expert and its guidance scale come from t; both CFG passes use that expert;
    v = v_uncond + g·(v_cond − v_uncond), and g == 1 skips the unconditional pass.
    `batch_cfg` runs both passes as one batch of 2 (the same math; worth it when a call is
    short enough that its fixed cost dominates, as for the built-in model on a CPU).
    """
    plan = cond.plan
    y = None if cond.y is None else cond.y[None].to(device)
    token_mask = None if plan.token_mask is None else plan.token_mask.to(device)
    step = [0]

    def denoise(x: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
        t_int = int(t)
        k = experts.pick(t_int)
        model = experts.activate(k)
        g = experts.scales[k]
        if token_mask is None:
            timestep = t.reshape(1).to(device)  # int64 [1], as the official loop passes it
        else:
            timestep = cnd.token_timesteps(token_mask, t.to(device), plan.seq_len)
        v_uncond = None
        if g != 1.0 and context_null is None:
            raise ValueError("guidance != 1 needs the negative-prompt context")
        if g == 1.0:
            v_cond = v = model(x, timestep, [context], seq_len=plan.seq_len, y=y)
        elif batch_cfg:
            # the timestep ([1] or [1, L]) broadcasts over the batch
            both = model(x.expand(2, *x.shape[1:]), timestep, [context, context_null], seq_len=plan.seq_len,
                         y=None if y is None else y.expand(2, *y.shape[1:]))
            v_cond, v_uncond = both[:1], both[1:]
            v = v_uncond + g * (v_cond - v_uncond)
        else:
            v_cond = model(x, timestep, [context], seq_len=plan.seq_len, y=y)
            v_uncond = model(x, timestep, [context_null], seq_len=plan.seq_len, y=y)
            v = v_uncond + g * (v_cond - v_uncond)
        if trace is not None:
            trace(ModelCall(step[0], t_int, k, g, x, timestep, v_cond, v_uncond, v))
        step[0] += 1
        return v

    return denoise


def _set_first_frame(x: Tensor, z: Tensor) -> Tensor:
    """Latent frame 0 := z (official `(1 − mask)·z + mask·x` with a 0/1 mask, exactly)."""
    out = x.clone()
    out[:, :, :1] = z
    return out


def denoise_video(experts: Experts, noise: Tensor, context: Tensor, context_null: Optional[Tensor],
                  cond: Conditioning, schedule: Schedule, sampler: str, *,
                  device: torch.device | str = "cpu",
                  callback: Optional[StepCallback] = None,
                  trace: Optional[Callable[[ModelCall], object]] = None, batch_cfg: bool = False,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """The sampling loop every task shares: noise [C, T, h, w] -> final latent [C, T, h, w].

    A task only supplies its `Conditioning`: the extra channels `y`, the per-token timestep
    mask, and the known first frame (reset before the loop and after every step, in the
    solver's own state, as the official TI2V image path does). The solver history is kept
    across an expert switch. `generator` feeds the noise of a stochastic sampler (required
    there, unused by the others).
    """
    device = torch.device(device)
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    sample_fn = SAMPLERS[sampler][1]
    extra = {}
    if sampler in STOCHASTIC_SAMPLERS:
        if generator is None:
            raise ValueError(f"the {sampler} sampler draws noise while it runs: pass a torch.Generator")
        extra["generator"] = generator
    x = noise.to(device=device, dtype=torch.float32)[None]
    post_step = None
    if cond.first_frame is not None:
        z = cond.first_frame.to(device=device, dtype=torch.float32)[None]
        x = _set_first_frame(x, z)
        post_step = lambda i, latent: _set_first_frame(latent, z)  # noqa: E731
    context = context.to(device)
    context_null = None if context_null is None else context_null.to(device)
    denoise = make_denoiser(experts, context, context_null, cond, device, trace, batch_cfg)

    def on_step(i: int, latent: Tensor, x0: Tensor) -> None:
        if callback is not None:
            t = int(schedule.timesteps[i])
            callback(StepInfo(i + 1, schedule.steps, t, experts.name(experts.pick(t)), latent, x0))

    try:
        out = sample_fn(denoise, x, schedule, post_step=post_step, callback=on_step, **extra)
    finally:
        experts.release()
    return out[0]


def to_uint8(video: Tensor) -> Tensor:
    """[B, 3, t, H, W] in [-1, 1] -> uint8 [t, H, W, 3] of sample 0: (clamp(x)+1)/2·255, truncated."""
    x = (video[0].clamp(-1.0, 1.0) + 1.0) / 2.0
    return (x * 255.0).to(torch.uint8).permute(1, 2, 3, 0)


def decode_frames(vae: Any, latent: Tensor, device: torch.device | str = "cpu",
                  on_chunk: Optional[Callable[[Tensor], object]] = None) -> np.ndarray:
    """Final latent [C, T, h, w] -> uint8 frames [F, H, W, 3], decoding one latent frame at a
    time so the float32 video never exists whole. `on_chunk` sees each float chunk [1, 3, t, H, W]."""
    frames = []
    for chunk in vae.decode_chunks(latent[None].to(device), clamp=True):
        if on_chunk is not None:
            on_chunk(chunk)
        frames.append(to_uint8(chunk).cpu())
    return torch.cat(frames, dim=0).numpy()


# ---------------------------------------------------------------------------------------------
# request settings


@dataclass(frozen=True)
class Settings:
    """A validated generation request with every default filled in."""

    prompt: str
    negative_prompt: str
    size: tuple[int, int]  # requested (width, height); image tasks use its area
    frames: int
    fps: float
    steps: int
    guidance: float | tuple[float, float]  # a float, or (low-noise, high-noise)
    shift: float
    sampler: str
    seed: int
    boundary: Optional[float]
    plan: TaskPlan
    image: Any = None  # PIL RGB image or None
    image_info: Optional[dict[str, Any]] = None
    max_area: Optional[int] = None
    spec: Optional[ModelSpec] = None  # the model these settings were validated for
    image_first: bool = False  # text-to-video as text-to-image + image-to-video (TI2V only)
    image_first_scale: int = 1  # the image pass draws at this multiple of `size`, then shrinks


def _image_info(source: Any, img: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"width": img.width, "height": img.height,
                            "sha256": hashlib.sha256(img.tobytes()).hexdigest()}
    if isinstance(source, (str, os.PathLike)):
        info["path"] = str(source)
    return info


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_guidance(value: Any, two_experts: bool) -> float | tuple[float, float]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) not in (1, 2) or (len(values) == 2 and not two_experts):
        raise InputError(
            "guidance must be one number" + (" or a (low-noise, high-noise) pair" if two_experts else "")
        )
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"guidance must be a number, got {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise InputError(f"guidance must be >= 0, got {v!r}")
        out.append(f)
    return out[0] if len(out) == 1 else (out[0], out[1])


def parse_size(text: str) -> tuple[int, int]:
    """'1280x704' (or '1280*704') -> (1280, 704)."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"size must be WIDTHxHEIGHT, e.g. 1280x704; got {text!r}") from None
    return w, h


def resolve_settings(spec: ModelSpec, prompt: str, image: Any = None, *,
                     negative_prompt: str | None = None, size: tuple[int, int] | str | None = None,
                     frames: int | None = None, steps: int | None = None,
                     guidance: float | tuple[float, float] | None = None, shift: float | None = None,
                     sampler: str | None = None, seed: int | None = None,
                     max_area: int | None = None, image_first: bool | None = None,
                     image_first_scale: int | None = None) -> Settings:
    """Fill in the model's defaults and validate everything that can be checked without running a
    model (InputError with a one-line message otherwise). Also checks the prompt policy."""
    d = spec.defaults
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
    from .provenance import check_prompt

    check_prompt(prompt)

    frames = d.frames if frames is None else _check_int("frames", frames)
    tstride = spec.vae.temporal_stride
    if frames < 1 or (frames - 1) % tstride:
        raise InputError(f"frames must be {tstride}n+1 (1, {tstride + 1}, {2 * tstride + 1}, ...), got {frames}")

    if size is None:
        size = d.size
    elif isinstance(size, str):
        size = parse_size(size)
    try:
        width, height = (_check_int("size", s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (width, height), got {size!r}") from None
    multiple = spec.vae.spatial_stride * spec.dit.patch_size[1]
    multiple_w = spec.vae.spatial_stride * spec.dit.patch_size[2]
    if width < 1 or height < 1 or width % multiple_w or height % multiple:
        raise InputError(
            f"size {width}x{height} cannot be made by {spec.name}: width and height must be positive "
            f"multiples of {multiple_w if multiple_w == multiple else (multiple_w, multiple)}"
        )

    steps = d.steps if steps is None else _check_int("steps", steps)
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    guidance = _check_guidance(d.guidance if guidance is None else guidance, spec.two_experts)
    shift = d.shift if shift is None else shift
    try:
        shift = float(shift)
    except (TypeError, ValueError):
        raise InputError(f"shift must be a number, got {shift!r}") from None
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"shift must be a number > 0, got {shift!r}")
    sampler = (d.sampler if sampler is None else str(sampler)).lower()
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")

    if seed is None:
        seed = secrets.randbelow(2**63)
    else:
        seed = _check_int("seed", seed)
        if seed < 0:  # the official CLI's convention: a negative seed means "pick one"
            seed = secrets.randbelow(2**63)
        elif seed >= 2**64:
            raise InputError(f"seed must be below 2**64, got {seed}")

    if negative_prompt is None:
        negative_prompt = d.negative_prompt
    elif not isinstance(negative_prompt, str):
        raise InputError("the negative prompt must be text")

    pil = None
    info = None
    if image is not None:
        if not spec.supports_image:
            raise InputError(f"the model {spec.name} is text-to-video only; it cannot start from an image")
        pil = cnd.load_image(image)
        info = _image_info(image, pil)
    elif not spec.supports_text_only:
        raise InputError(f"the model {spec.name} makes videos from an image: pass --image")
    if max_area is not None:
        max_area = _check_int("max_area", max_area)
        if max_area < 1:
            raise InputError(f"max_area must be >= 1, got {max_area}")
    plan = plan_task(spec, (width, height), frames, pil, max_area)
    if image_first is None:
        image_first = d.image_first
    elif not isinstance(image_first, bool):
        raise InputError(f"image_first must be true or false, got {image_first!r}")
    elif image_first and spec.dit.model_type != "ti2v":
        raise InputError(f"image_first needs a TI2V model (an image as latent frame 0); {spec.name} is not one")
    # only meaningful for text-to-video of more than one latent frame
    image_first = bool(image_first and pil is None and spec.dit.model_type == "ti2v" and plan.latent_shape[1] > 1)
    scale = d.image_first_scale if image_first_scale is None else _check_int("image_first_scale", image_first_scale)
    if not 1 <= scale <= 8:
        raise InputError(f"image_first_scale must be 1 to 8, got {scale}")
    return Settings(
        prompt=prompt, negative_prompt=negative_prompt, size=(width, height), frames=frames,
        fps=float(d.fps), steps=steps, guidance=guidance, shift=shift, sampler=sampler, seed=seed,
        boundary=d.boundary if spec.two_experts else None, plan=plan, image=pil, image_info=info,
        max_area=max_area, spec=spec, image_first=image_first, image_first_scale=scale,
    )


# ---------------------------------------------------------------------------------------------
# the result


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
            watermark=watermark, sign=sign, prompt=meta.get("prompt"), include_prompt=include_prompt,
            video_id=self.content_id(), loras=meta.get("loras"),
        )
        sidecar = {**meta, "file": path.name, "provenance": facts}
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
    """InputError unless an MP4 (and its sidecar) can be written at `path`."""
    path = Path(path)
    if path.suffix.lower() == SIDECAR_SUFFIX:
        raise InputError(f"output {path} would collide with its .json sidecar; use a .mp4 name")
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name such as {path / 'video.mp4'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")
    for target in (path, sidecar_path(path)):
        if target.exists() and not os.access(target, os.W_OK):
            raise InputError(f"cannot write {target}: the existing file is read-only")
    return path


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    # A temporary name of our own (not mkstemp, whose 0600 mode would ignore the umask), renamed
    # over the target once complete.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class Hooks:
    """Injection and inspection points (tests and golden parity); all optional."""

    noise: Optional[Tensor] = None  # use this initial noise [C, T, h, w] instead of drawing it
    on_model_call: Optional[Callable[[ModelCall], object]] = None
    on_conditioning: Optional[Callable[[Conditioning], object]] = None
    on_final_latent: Optional[Callable[[Tensor], object]] = None
    on_decoded_chunk: Optional[Callable[[Tensor], object]] = None


class Pipeline:
    """A loaded model: load once, `generate` many times. Nothing of one call leaks into the next
    (each call builds its own generator, schedule, solver state and conditioning)."""

    def __init__(self, spec: ModelSpec, *, transformer: torch.nn.Module,
                 transformer_2: torch.nn.Module | None = None, vae: Any, text_encoder: Any,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 offload: bool = True, source: str | None = None, layout: str | None = None):
        self.spec = spec
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.source = source
        self.layout = layout
        if spec.two_experts and transformer_2 is None:
            raise KinemaError(f"the model {spec.name} needs two experts; the low-noise one is missing")

    # -- requests -----------------------------------------------------------------------------

    def settings(self, prompt: str, image: Any = None, **kwargs: Any) -> Settings:
        """Validate a request and fill in the model's defaults (see `resolve_settings`)."""
        return resolve_settings(self.spec, prompt, image, **kwargs)

    def generate(self, prompt: str, image: Any = None, *, negative_prompt: str | None = None,
                 size: tuple[int, int] | str | None = None, frames: int | None = None,
                 steps: int | None = None, guidance: float | tuple[float, float] | None = None,
                 shift: float | None = None, sampler: str | None = None, seed: int | None = None,
                 image_first: bool | None = None, image_first_scale: int | None = None,
                 callback: StepCallback | None = None) -> Video:
        """Make one video. `image` (a path, PIL image or uint8 array) turns on image-to-video;
        there `size` only sets the pixel area and the aspect ratio follows the image.
        `image_first` (TI2V models) makes text-to-video in two passes: the first frame from the
        text, then image-to-video from it; `image_first_scale` draws that first frame so many
        times larger and shrinks it to `size`. Unset options take the model's defaults;
        `seed=None` picks a random seed (recorded in `video.metadata`). `callback(StepInfo)` runs
        after every sampling step (of both passes with `image_first`)."""
        s = self.settings(prompt, image, negative_prompt=negative_prompt, size=size, frames=frames,
                          steps=steps, guidance=guidance, shift=shift, sampler=sampler, seed=seed,
                          image_first=image_first, image_first_scale=image_first_scale)
        return self.run(s, callback=callback)

    # -- the work -----------------------------------------------------------------------------

    def _encode_text(self, s: Settings) -> tuple[Tensor, Optional[Tensor]]:
        """Prompt and negative-prompt features, computed where the text encoder lives (CPU)."""
        guidance = s.guidance if isinstance(s.guidance, tuple) else (s.guidance,)
        need_null = any(g != 1.0 for g in guidance)
        prompts = [s.prompt, s.negative_prompt] if need_null else [s.prompt]
        feats = self.text_encoder.encode(prompts)
        return feats[0], (feats[1] if need_null else None)

    def run(self, s: Settings, *, callback: StepCallback | None = None, hooks: Hooks | None = None) -> Video:
        """Generate from validated settings (made by `settings` for this model)."""
        if s.spec is not None and s.spec != self.spec:
            raise InputError(f"these settings were made for {s.spec.name}, not for {self.spec.name}")

        hooks = hooks or Hooks()
        start = time.perf_counter()
        plan = s.plan
        with torch.no_grad():
            if hooks.noise is not None:
                noise = hooks.noise.to(torch.float32)
                if tuple(noise.shape) != plan.latent_shape:
                    raise ValueError(f"noise {tuple(noise.shape)} != latent shape {plan.latent_shape}")
            else:
                noise = draw_noise(plan.latent_shape, s.seed)
            context, context_null = self._encode_text(s)
            models = [self.transformer] + ([self.transformer_2] if self.spec.two_experts else [])
            schedule = SAMPLERS[s.sampler][0](s.steps, s.shift)

            def sample(cond: Conditioning, noise: Tensor) -> Tensor:
                if hooks.on_conditioning is not None:
                    hooks.on_conditioning(cond)
                experts = Experts(models, s.guidance, s.boundary, self.device, self.offload)
                return denoise_video(experts, noise, context, context_null, cond, schedule, s.sampler,
                                     device=self.device, callback=callback, trace=hooks.on_model_call,
                                     batch_cfg=cond.plan.seq_len <= BATCH_CFG_MAX_TOKENS,
                                     generator=step_noise_generator(s.seed, noise.shape))

            if s.image_first and s.image_first_scale > 1:
                # pass 1: text-to-image at k x the size, exactly `frames=1, size=k*size` with this
                # seed; its frame shrunk to `size` and encoded is the known frame 0 of pass 2
                w, h = plan.size
                k = s.image_first_scale
                plan1 = _first_frame_plan(self.spec, plan_task(self.spec, (k * w, k * h), 1), 1)
                big = sample(Conditioning(plan1), draw_noise(plan1.latent_shape, s.seed))
                with _resident(self.vae, self.device, self.offload):
                    first = encode_keyframe(self.vae, decode_frames(self.vae, big, self.device)[0], (w, h),
                                            self.device)
                latent = sample(Conditioning(_first_frame_plan(self.spec, plan, None), first_frame=first), noise)
            elif s.image_first:
                # pass 1: the first latent frame alone, exactly `frames=1` with this seed (text-to-image);
                # pass 2: image-to-video with that latent as the known frame 0
                plan1 = _first_frame_plan(self.spec, plan, 1)
                noise1 = noise[:, :1] if hooks.noise is not None else draw_noise(plan1.latent_shape, s.seed)
                first = sample(Conditioning(plan1), noise1)
                latent = sample(Conditioning(_first_frame_plan(self.spec, plan, None), first_frame=first), noise)
            else:
                with _resident(self.vae, self.device, self.offload):
                    cond = condition(plan, self.spec, self.vae, self.device)
                latent = sample(cond, noise)
            if hooks.on_final_latent is not None:
                hooks.on_final_latent(latent)
            with _resident(self.vae, self.device, self.offload):
                frames = decode_frames(self.vae, latent, self.device, hooks.on_decoded_chunk)
        return Video(frames=frames, fps=s.fps, metadata=self._metadata(s, time.perf_counter() - start))

    def _metadata(self, s: Settings, seconds: float) -> dict[str, Any]:
        from . import __version__

        plan = s.plan
        task = "text-to-video" if plan.image_mode is None else "image-to-video"
        if s.image_first:
            task = "text-to-video (image first)"
        return {
            "kinema_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": self.spec.name, "path": self.source, "layout": self.layout,
                      "type": self.spec.dit.model_type, "two_experts": self.spec.two_experts},
            "task": task,
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "image": s.image_info,
            "size": list(plan.size),
            "requested_size": list(s.size),
            "frames": s.frames,
            "fps": s.fps,
            "steps": s.steps,
            "sampler": s.sampler,
            "shift": s.shift,
            "guidance": list(s.guidance) if isinstance(s.guidance, tuple) else s.guidance,
            "image_first_scale": s.image_first_scale if s.image_first else None,
            "boundary": s.boundary,
            "seed": s.seed,
            "noise": "torch.randn float32, torch.Generator('cpu').manual_seed(seed)",
            "step_noise": ("torch.randn float32 per step, kinema.pipeline.step_noise_generator(seed, latent shape)"
                           if s.sampler in STOCHASTIC_SAMPLERS else None),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "seconds": round(seconds, 3),
            "command": self._command(s),
        }

    def _command(self, s: Settings) -> Optional[str]:
        """The `kinema generate` line that makes this video again (None if the CLI cannot)."""
        import shlex

        if s.max_area is not None or (s.image_info is not None and "path" not in s.image_info):
            return None
        args = ["kinema", "generate", s.prompt]
        if s.image_info is not None:
            args += ["--image", s.image_info["path"]]
        if self.source is not None:
            args += ["--model", self.source]
        g = s.guidance
        args += ["--size", f"{s.size[0]}x{s.size[1]}", "--frames", str(s.frames), "--steps", str(s.steps),
                 "--guidance", f"{g[0]:g},{g[1]:g}" if isinstance(g, tuple) else f"{g:g}",
                 "--shift", f"{s.shift:g}", "--sampler", s.sampler, "--seed", str(s.seed)]
        if s.negative_prompt != self.spec.defaults.negative_prompt:
            args += ["--negative-prompt", s.negative_prompt]
        if s.plan.image_mode is None and self.spec.dit.model_type == "ti2v" and s.image_first != self.spec.defaults.image_first:
            args += ["--image-first" if s.image_first else "--joint"]
        if s.image_first and s.image_first_scale != self.spec.defaults.image_first_scale:
            args += ["--image-first-scale", str(s.image_first_scale)]
        return shlex.join(args)


def load(path: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, offload: bool = True) -> Pipeline:
    """Load a model folder (official or diffusers layout; None = the built-in model).

    device: None picks CUDA when present, else CPU. dtype: the DiT compute dtype (default
    bfloat16 on CUDA, float32 on CPU). Models are loaded on the CPU and moved to the device
    while they are used (offload=True, the official single-GPU default).
    """
    from .loading import load_model

    if path is None:
        if not (BUILTIN_DIR.is_dir() and any(BUILTIN_DIR.iterdir())):
            raise KinemaError(
                "the built-in model is not available in this installation; pass --model DIR (a Wan2.2 folder)"
            )
        path = BUILTIN_DIR
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    # float32 is the official in-memory DiT dtype (None keeps the text encoder's stored dtype).
    loaded = load_model(path, dtype=None if dt == torch.float32 else dt, device="cpu")
    if loaded.transformer is None or loaded.vae is None or loaded.text_encoder is None:
        raise ModelFolderError(f"{path} lacks a DiT, a VAE or a text encoder")
    pipe = Pipeline(loaded.spec, transformer=loaded.transformer, transformer_2=loaded.transformer_2,
                    vae=loaded.vae, text_encoder=loaded.text_encoder, device=dev, dtype=dt,
                    offload=offload, source=str(path.resolve()), layout=loaded.layout)
    if not offload and dev.type != "cpu":
        for m in (pipe.transformer, pipe.transformer_2, pipe.vae):
            _move(m, dev)
    return pipe


__all__ = [
    "Conditioning", "Experts", "Hooks", "ModelCall", "Pipeline", "Settings", "StepInfo", "TaskPlan",
    "Video", "check_output_path", "condition", "decode_frames", "denoise_video", "draw_noise",
    "load", "make_denoiser", "parse_size", "plan_task", "resolve_device", "resolve_dtype",
    "resolve_settings", "sidecar_path", "step_noise_generator",
]
