"""Golden runner for the pipeline cases (kinds pipe_t2v_moe, pipe_ti2v).

Builds the case's DiT(s) and VAE from its params and weights, wraps them in a real
`kinema.pipeline.Pipeline` whose text encoder is a lookup (prompt -> stored context,
negative prompt -> stored context_null), and runs `Pipeline.run` with the stored noise and
every setting from params. Intermediates are captured through the pipeline's own hooks, so
the code under test is exactly the code that makes videos.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinema.config import ModelSpec, SamplingDefaults
from kinema.pipeline import Hooks, ModelCall, Pipeline
from kinema.tasks import Conditioning
from kinema.testing.golden_dit import load_dit
from kinema.testing.golden_vae import build_vae, vae_config

PROMPT = "golden prompt"
NEGATIVE = "golden negative prompt"


class LookupEncoder:
    """Stands in for the umT5 encoder: returns the stored context of each known prompt."""

    def __init__(self, table: dict[str, Tensor]):
        self.table = table

    def encode(self, prompts: list[str]) -> list[Tensor]:
        return [self.table[p] for p in prompts]


def _check_geometry(spec: ModelSpec, p: dict[str, Any]) -> None:
    """The case's strides must be what kinema derives from the architecture."""
    strides = (spec.vae.temporal_stride, spec.vae.spatial_stride, spec.vae.spatial_stride)
    if tuple(p.get("vae_stride", strides)) != strides:
        raise ValueError(f"case vae_stride {p['vae_stride']} != VAE strides {strides}")
    if tuple(p.get("patch_size", spec.dit.patch_size)) != tuple(spec.dit.patch_size):
        raise ValueError(f"case patch_size {p['patch_size']} != DiT patch {spec.dit.patch_size}")
    if int(p.get("num_train_timesteps", 1000)) != 1000:
        raise ValueError("only num_train_timesteps = 1000 is supported")


class _Recorder:
    """Collects what the hooks see during one `Pipeline.run`."""

    def __init__(self, noise: Tensor):
        self.calls: list[ModelCall] = []
        self.cond: Conditioning | None = None
        self.final: Tensor | None = None
        self.chunks: list[Tensor] = []
        self.hooks = Hooks(noise=noise, on_model_call=self.calls.append, on_conditioning=self._cond,
                           on_final_latent=self._final, on_decoded_chunk=self.chunks.append)

    def _cond(self, c: Conditioning) -> None:
        self.cond = c

    def _final(self, z: Tensor) -> None:
        self.final = z

    def video(self) -> Tensor:
        return torch.cat(self.chunks, dim=2)[0]  # [3, F, H, W]

    def latents(self) -> Tensor:
        return torch.stack([c.latent[0] for c in self.calls])


def _guidance(value: Any) -> float | tuple[float, float]:
    if isinstance(value, (list, tuple)):
        return (float(value[0]), float(value[1]))
    return float(value)


def _pipeline(case, spec: ModelSpec, transformer, transformer_2, vae) -> Pipeline:
    encoder = LookupEncoder({PROMPT: case.inputs["context"], NEGATIVE: case.inputs["context_null"]})
    return Pipeline(spec, transformer=transformer, transformer_2=transformer_2, vae=vae,
                    text_encoder=encoder, device="cpu", dtype=torch.float32, source=str(case.path))


def _run_t2v_moe(case) -> dict[str, Tensor]:
    p = case.params
    high = load_dit(p["ctor"], case.weights_under("high_noise_model"))
    low = load_dit(p["ctor"], case.weights_under("low_noise_model"))
    vcfg = vae_config("2.1", p["vae_ctor"], case.inputs["latents_mean"], case.inputs["latents_std"])
    spec = ModelSpec(
        name="golden-t2v-moe", dit=high.cfg, vae=vcfg, two_experts=True,
        defaults=SamplingDefaults(size=tuple(p["size"]), frames=int(p["frame_num"]), steps=int(p["sampling_steps"]),
                                  guidance=_guidance(p["guide_scale"]), shift=float(p["shift"]),
                                  sampler=p.get("sample_solver", "unipc"), boundary=float(p["boundary"]),
                                  negative_prompt=NEGATIVE),
    )
    _check_geometry(spec, p)
    pipe = _pipeline(case, spec, high, low, build_vae(vcfg, case.weights_under("vae")))
    settings = pipe.settings(PROMPT, seed=int(p.get("seed", 0)))
    rec = _Recorder(case.inputs["noise"])
    pipe.run(settings, hooks=rec.hooks)
    per_step = rec.calls
    first = per_step[0]
    uncond = first.v_uncond
    if uncond is None:
        # guidance 1.0 skips the unconditional pass; the reference still records it.
        model = high if first.expert == 0 else low
        uncond = model(first.latent, first.timestep, [case.inputs["context_null"]],
                       seq_len=settings.plan.seq_len)
    return {
        "timesteps": torch.tensor([c.t for c in per_step], dtype=torch.int64),
        "expert_is_high_noise": torch.tensor([int(c.expert == 0) for c in per_step], dtype=torch.int64),
        "latent_before_step": rec.latents(),
        "noise_pred_cond_step0": first.v_cond[0],
        "noise_pred_uncond_step0": uncond[0],
        "final_latent": rec.final,
        "video": rec.video(),
    }


def _run_ti2v(case) -> dict[str, Tensor]:
    p = case.params
    model = load_dit(p["ctor"], case.weights_under("model"))
    vcfg = vae_config("2.2", p["vae_ctor"], case.inputs["latents_mean"], case.inputs["latents_std"])
    spec = ModelSpec(
        name="golden-ti2v", dit=model.cfg, vae=vcfg,
        defaults=SamplingDefaults(size=tuple(p["t2v_size"]), frames=int(p["frame_num"]),
                                  steps=int(p["sampling_steps"]), guidance=_guidance(p["guide_scale"]),
                                  shift=float(p["shift"]), sampler=p.get("sample_solver", "unipc"),
                                  negative_prompt=NEGATIVE),
    )
    _check_geometry(spec, p)
    pipe = _pipeline(case, spec, model, None, build_vae(vcfg, case.weights_under("vae")))
    out: dict[str, Tensor] = {}

    def record(prefix: str, rec: _Recorder) -> None:
        out[f"{prefix}_timesteps"] = torch.tensor([float(c.t) for c in rec.calls], dtype=torch.float32)
        out[f"{prefix}_t_tokens_step0"] = rec.calls[0].timestep.to(torch.float32)
        out[f"{prefix}_latent_before_step"] = rec.latents()
        out[f"{prefix}_final_latent"] = rec.final
        out[f"{prefix}_video"] = rec.video()

    # (a) text-to-video
    rec = _Recorder(case.inputs["noise_t2v"])
    pipe.run(pipe.settings(PROMPT, seed=int(p.get("seed_t2v", 0))), hooks=rec.hooks)
    record("t2v", rec)

    # (b) image-to-video, output size from the image within max_area
    image = np.ascontiguousarray(case.inputs["image_uint8_hwc"].numpy())
    rec = _Recorder(case.inputs["noise_i2v"])
    settings = pipe.settings(PROMPT, image, seed=int(p.get("seed_i2v", 0)), max_area=int(p["max_area"]))
    pipe.run(settings, hooks=rec.hooks)
    record("i2v", rec)
    plan = rec.cond.plan
    out["i2v_best_output_size_wh"] = torch.tensor(plan.size, dtype=torch.int64)
    out["i2v_image_tensor"] = plan.image
    out["i2v_image_latent"] = rec.cond.first_frame
    return out


def run(case) -> dict[str, Tensor]:
    if case.kind == "pipe_t2v_moe":
        return _run_t2v_moe(case)
    if case.kind == "pipe_ti2v":
        return _run_ti2v(case)
    raise ValueError(f"golden_pipe cannot run case kind {case.kind!r}")
