"""Generation: THE denoising loop every task shares, and the `Pipeline` a user loads once.

How a video is made (spec §6); each step lives in the module named:

1. `kinema.validate.resolve` fills in the model's defaults and checks the `kinema.request.Request`
   (no model work happens before the request is known to be good); `kinema.tasks.plan_task`
   fixes the geometry (latent shape, tokens, preprocessed image, per-token timestep mask).
2. `kinema.tasks.condition` runs the VAE on the image when there is one: the A14B image model
   gets the frame mask + image latent as extra channels (`y`), TI2V the image latent as a known
   first latent frame.
3. `denoise_video` (here) is the loop: noise -> sampler (`kinema.sampling`) driven by a
   classifier-free-guided denoiser that picks the expert per step; `kinema.placement` moves the
   models on and off the device.
4. `decode_frames` (here) turns the final latent into uint8 RGB frames, chunk by chunk, and
   `kinema.video.Video` holds them and writes the MP4 and its sidecar.

Noise is one float32 `torch.randn` of the latent shape drawn on the CPU from
`torch.Generator("cpu").manual_seed(seed)`, so a seed means the same video on every device.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import ModelSpec
from .errors import InputError, KinemaError, ModelFolderError
from .placement import Experts, move, resident, resolve_device, resolve_dtype
from .request import Request
from .sampling import SAMPLERS, STOCHASTIC_SAMPLERS, Schedule
from .tasks import (Conditioning, condition, encode_keyframe, first_frame_plan, plan_task,
                    token_timesteps)
from .validate import Settings, check_lora_mode, resolve
from .video import Video, sidecar_metadata

BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "builtin"


# ---------------------------------------------------------------------------------------------
# noise


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

    step: int  # 1-based, counted over all passes
    total: int  # steps of all passes (image-first text-to-video: 2 x steps)
    timestep: int
    expert: Optional[str]  # "high" / "low" for two-expert models, else None
    latent: Tensor  # [1, C, T, h, w] solver state after the step
    x0_pred: Tensor  # [1, C, T, h, w] the clean-latent prediction of this step (for previews)
    pass_index: int = 1  # image-first: 1 = the first frame from the text, 2 = the video from it
    passes: int = 1


StepCallback = Callable[[StepInfo], object]


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
            timestep = token_timesteps(token_mask, t.to(device), plan.seq_len)
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
    """A loaded model: load once, `run` (or `generate`) many times. Nothing of one call leaks
    into the next (each call builds its own generator, schedule, solver state and conditioning).

    `runtime` holds the values of the "runtime" `Request` fields this pipeline was loaded with;
    `run` refuses settings that ask for other ones (load the model again for those); settings
    that leave them unset run with the pipeline's.
    """

    def __init__(self, spec: ModelSpec, *, transformer: torch.nn.Module,
                 transformer_2: torch.nn.Module | None = None, vae: Any, text_encoder: Any,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 offload: bool = True, source: str | None = None, layout: str | None = None,
                 lora_mode: str | None = None, restore_loras: bool = True):
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
        self.lora_mode = lora_mode or "merge"
        # False: merged LoRAs keep no copy of the weights they change (26 GiB in bf16 for a LoRA
        # on every block Linear of an A14B expert), so they cannot be switched: a one-set process
        self.restore_loras = restore_loras
        self._lora_manager: Any = None  # kinema.lora.LoraManager, made on the first LoRA request
        if spec.two_experts and transformer_2 is None:
            raise ValueError(f"the model {spec.name} needs two experts; the low-noise one is missing")

    @property
    def runtime(self) -> dict[str, Any]:
        """The load-time "runtime" options, as `resolve` spells them in `Settings`."""
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "lora_mode": self.lora_mode}

    def apply_loras(self, specs: Sequence[Any]) -> list[dict[str, Any]]:
        """Make `specs` (kinema.lora.LoraSpec) the LoRAs on the DiT(s); an empty list puts the
        base weights back (bit-exact). Returns the sidecar / C2PA records of what is applied."""
        if not specs and self._lora_manager is None:
            return []
        if self._lora_manager is None:
            from .lora import LoraManager

            self._lora_manager = LoraManager([self.transformer, self.transformer_2], restorable=self.restore_loras,
                                             compute_device=self.device)
        return self._lora_manager.apply(list(specs), mode=self.lora_mode).records()

    # -- requests -----------------------------------------------------------------------------

    def settings(self, prompt: str | None = None, image: Any = None, **options: Any) -> Settings:
        """Validate a request for this model (see `kinema.request.Request` for the options and
        their aliases)."""
        return resolve(self.spec, Request.from_options(prompt, image, **options))

    def generate(self, prompt: str | Sequence[str] | None = None, image: Any = None, *,
                 callback: StepCallback | None = None, num_videos_per_prompt: int = 1,
                 output_type: str = "np", **options: Any) -> Any:
        """Make a video: `settings(prompt, image, **options)` then `run`. `image` (a path, PIL
        image or uint8 array) turns on image-to-video; there `size` only sets the pixel area and
        the aspect ratio follows the image. With `output=` the video is also saved there
        (`watermark=`, `sign=`, `include_prompt=` as in `Video.save`). `callback(StepInfo)` runs
        after every sampling step (of both passes with `image_first`).

        diffusers-style batches (`Request.batch`): a list of prompts and/or
        `num_videos_per_prompt` > 1 give a list of videos; `generator=` seeds them.
        `output_type="latent"` returns the final latent [C, T, h, w] instead (not decoded, not
        saved)."""
        many = isinstance(prompt, (list, tuple)) or num_videos_per_prompt != 1
        requests = Request.batch(prompt, image, num_videos_per_prompt, **options)
        settings = [resolve(self.spec, r) for r in requests]  # all checked before any work
        out = [self._generate_one(s, callback, output_type) for s in settings]
        return out if many else out[0]

    def _generate_one(self, s: Settings, callback: StepCallback | None, output_type: str) -> Any:
        if output_type not in ("np", "latent"):
            raise InputError(f"output_type= must be 'np' or 'latent', got {output_type!r}")
        if output_type == "latent":
            latent: list[Tensor] = []
            self.run(s, callback=callback, hooks=Hooks(on_final_latent=latent.append), decode=False)
            return latent[0]
        video = self.run(s, callback=callback)
        if s.output is not None:
            video.save(s.output, watermark=s.watermark, sign=s.sign, include_prompt=s.include_prompt,
                       overwrite=s.overwrite)
        return video

    # -- the work -----------------------------------------------------------------------------

    def _encode_text(self, s: Settings) -> tuple[Tensor, Optional[Tensor]]:
        """Prompt and negative-prompt features, computed where the text encoder lives (CPU)."""
        guidance = s.guidance if isinstance(s.guidance, tuple) else (s.guidance,)
        need_null = any(g != 1.0 for g in guidance)
        prompts = [s.prompt, s.negative_prompt] if need_null else [s.prompt]
        feats = self.text_encoder.encode(prompts)
        return feats[0], (feats[1] if need_null else None)

    def run(self, s: Settings, *, callback: StepCallback | None = None, hooks: Hooks | None = None,
            decode: bool = True) -> Optional[Video]:
        """Generate from validated settings (`settings`, or `kinema.prepare` for this model).
        `decode=False` stops after sampling (the latent reaches `hooks.on_final_latent`) and
        returns None."""
        if s.spec != self.spec:
            raise InputError(f"these settings were made for {s.spec.name}, not for {self.spec.name}")
        for name, value in self.runtime.items():
            if getattr(s.request, name) not in (None, value):
                raise InputError(f"this pipeline was loaded with {name}={value!r}, the settings ask for "
                                 f"{getattr(s.request, name)!r}: kinema.load the model with {name}= for that")

        hooks = hooks or Hooks()
        start = time.perf_counter()
        plan = s.plan
        loras = self.apply_loras(s.lora_specs)  # before any work: a bad file changes nothing
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

            passes = 2 if s.image_first else 1
            done = [0]  # passes finished

            def report(info: StepInfo) -> None:  # the step counted over all passes
                callback(replace(info, step=done[0] * s.steps + info.step, total=passes * s.steps,
                                 pass_index=done[0] + 1, passes=passes))

            def sample(cond: Conditioning, noise: Tensor) -> Tensor:
                if hooks.on_conditioning is not None:
                    hooks.on_conditioning(cond)
                experts = Experts(models, s.guidance, s.boundary, self.device, self.offload)
                latent = denoise_video(experts, noise, context, context_null, cond, schedule, s.sampler,
                                       device=self.device, callback=None if callback is None else report,
                                       trace=hooks.on_model_call,
                                       batch_cfg=cond.plan.seq_len <= BATCH_CFG_MAX_TOKENS,
                                       generator=step_noise_generator(s.seed, noise.shape))
                done[0] += 1
                return latent

            if s.image_first and s.image_first_scale > 1:
                # pass 1: text-to-image at k x the size, exactly `frames=1, size=k*size` with this
                # seed; its frame shrunk to `size` and encoded is the known frame 0 of pass 2
                w, h = plan.size
                k = s.image_first_scale
                plan1 = first_frame_plan(self.spec, plan_task(self.spec, (k * w, k * h), 1), 1)
                big = sample(Conditioning(plan1), draw_noise(plan1.latent_shape, s.seed))
                with resident(self.vae, self.device, self.offload):
                    first = encode_keyframe(self.vae, decode_frames(self.vae, big, self.device)[0], (w, h),
                                            self.device)
                latent = sample(Conditioning(first_frame_plan(self.spec, plan, None), first_frame=first), noise)
            elif s.image_first:
                # pass 1: the first latent frame alone, exactly `frames=1` with this seed (text-to-image);
                # pass 2: image-to-video with that latent as the known frame 0
                plan1 = first_frame_plan(self.spec, plan, 1)
                noise1 = noise[:, :1] if hooks.noise is not None else draw_noise(plan1.latent_shape, s.seed)
                first = sample(Conditioning(plan1), noise1)
                latent = sample(Conditioning(first_frame_plan(self.spec, plan, None), first_frame=first), noise)
            else:
                with resident(self.vae, self.device, self.offload):
                    cond = condition(plan, self.spec, self.vae, self.device)
                latent = sample(cond, noise)
            if hooks.on_final_latent is not None:
                hooks.on_final_latent(latent)
            if not decode:
                return None
            with resident(self.vae, self.device, self.offload):
                frames = decode_frames(self.vae, latent, self.device, hooks.on_decoded_chunk)
        meta = sidecar_metadata(s, source=self.source, layout=self.layout, runtime=self.runtime,
                                seconds=time.perf_counter() - start)
        if loras:
            meta["loras"] = loras
        return Video(frames=frames, fps=s.fps, metadata=meta)


# ---------------------------------------------------------------------------------------------
# the entry points: prepare -> load -> run, or generate in one call


def model_path(path: str | os.PathLike | None) -> Path:
    """The model folder to use: `path`, or the built-in model when None."""
    if path is not None:
        return Path(path).expanduser()
    if not (BUILTIN_DIR.is_dir() and any(BUILTIN_DIR.iterdir())):
        raise KinemaError("the built-in model is not available in this installation; pass a Wan2.2 model folder")
    return BUILTIN_DIR


def prepare(model: str | os.PathLike | None = None, prompt: str | Request | None = None, image: Any = None,
            **options: Any) -> Settings:
    """Validate a request against a model folder reading only its headers (no weights): the
    settings `Pipeline.run` takes, or a one-line InputError. `model=None`: the built-in model.
    `prompt` may also be a whole `Request` (then without further options)."""
    from .loading import inspect_folder

    if isinstance(prompt, Request):
        if image is not None or options:
            raise TypeError("prepare(model, Request) takes no further options")
        request = prompt
    else:
        request = Request.from_options(prompt, image, **options)
    spec = inspect_folder(model_path(model)).spec  # headers only: cheap, and it catches incomplete folders
    return resolve(spec, request)


def load(path: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, offload: bool = True, lora_mode: str | None = None,
         restore_loras: bool = True) -> Pipeline:
    """Load a model folder (official or diffusers layout; None = the built-in model).

    device: None picks CUDA when present, else CPU. dtype: the DiT compute dtype (default
    bfloat16 on CUDA, float32 on CPU). Models are loaded on the CPU and moved to the device
    while they are used (offload=True, the official single-GPU default). lora_mode: how a
    request's LoRAs are applied, "merge" (default) or "side" (see `kinema.lora.apply`).
    restore_loras=False: merged LoRAs keep no copy of the weights they change, so this pipeline
    runs only one set of LoRAs (asking for another is a RuntimeError: load again).
    """
    from .loading import load_model

    path = model_path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    mode = None if lora_mode is None else check_lora_mode(lora_mode)
    # float32 is the official in-memory DiT dtype (None keeps the text encoder's stored dtype).
    loaded = load_model(path, dtype=None if dt == torch.float32 else dt, device="cpu")
    if loaded.transformer is None or loaded.vae is None or loaded.text_encoder is None:
        raise ModelFolderError(f"{path} lacks a DiT, a VAE or a text encoder")
    pipe = Pipeline(loaded.spec, transformer=loaded.transformer, transformer_2=loaded.transformer_2,
                    vae=loaded.vae, text_encoder=loaded.text_encoder, device=dev, dtype=dt,
                    offload=offload, source=str(path.resolve()), layout=loaded.layout,
                    lora_mode=mode, restore_loras=restore_loras)
    if not offload and dev.type != "cpu":
        for m in (pipe.transformer, pipe.transformer_2, pipe.vae):
            move(m, dev)
    return pipe


def generate(prompt: str | Sequence[str] | None = None, image: Any = None, *,
             model: str | os.PathLike | None = None, callback: StepCallback | None = None,
             num_videos_per_prompt: int = 1, output_type: str = "np", **options: Any) -> Any:
    """One call: validate every request (headers only), `load` the model with the runtime
    options, generate (as `Pipeline.generate`: lists, `num_videos_per_prompt`, `generator`,
    `output_type`), and save when `output=` is given."""
    from .loading import inspect_folder

    requests = Request.batch(prompt, image, num_videos_per_prompt, **options)
    spec = inspect_folder(model_path(model)).spec
    for r in requests:
        resolve(spec, r)  # fail before loading
    pipe = load(model, **requests[0].given("runtime"))
    return pipe.generate(prompt, image, callback=callback, num_videos_per_prompt=num_videos_per_prompt,
                         output_type=output_type, **options)


__all__ = [
    "BATCH_CFG_MAX_TOKENS", "BUILTIN_DIR", "Hooks", "ModelCall", "Pipeline", "StepCallback", "StepInfo",
    "decode_frames", "denoise_video", "draw_noise", "generate", "load", "make_denoiser", "model_path",
    "prepare", "step_noise_generator", "to_uint8",
]
