"""Named sampling presets: a published recipe's sampler, steps, guidance, shift and timesteps.

`lightning-4step` is the recipe of the step-distilled Wan2.2 models (the Wan2.2-Lightning and
lightx2v 4-step LoRAs, and full distilled checkpoints in either layout):

- Wan2.2-Lightning (`wan/configs/wan_{t2v,i2v}_A14B.py`, `wan_ti2v_5B.py`: ``sample_steps = 4``,
  ``sample_shift = 5.0``, ``sample_guide_scale = 1.0`` (both experts); `generate.py`:
  ``--sample_solver`` default ``euler``; `wan/utils/fm_solvers_euler.py`: timesteps
  ``linspace(1000, 0, N+1)`` float32, shifted, Euler steps ``x + (σ_next − σ)·v``).
- lightx2v (`configs/wan22/wan_moe_t2v_distill_lora.json`, `wan_moe_i2v_distill.json`:
  ``denoising_step_list = [1000, 750, 500, 250]``, ``sample_shift = 5.0``, ``enable_cfg =
  false``, ``boundary_step_index = 2``).

So σ = 1, 0.9375, 0.8333, 0.625 (then 0), model timesteps 1000, 937.5, 833.33, 625, no
classifier-free guidance. On the A14B models the expert boundary (t >= 875 for T2V, 900 for
I2V) gives the first two steps to the high-noise expert and the last two to the low-noise one:
lightx2v's ``boundary_step_index = 2``, the 2+2 split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError
from .sampling import SAMPLERS, Schedule, timesteps_schedule


@dataclass(frozen=True)
class Preset:
    """A sampling recipe. `timesteps` are the training timesteps the recipe steps through,
    before the shift (the schedule is `sampling.timesteps_schedule(timesteps, shift)`)."""

    name: str
    help: str
    sampler: str
    steps: int
    guidance: float  # one scale for every expert; 1.0 = no unconditional pass
    shift: float
    timesteps: tuple[float, ...]

    def schedule(self) -> Schedule:
        return timesteps_schedule(self.timesteps, self.shift)

    def settings(self) -> dict[str, object]:
        """The request options the preset fills in (options the user sets win)."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance, "shift": self.shift}

    def record(self) -> dict[str, object]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="lightning-4step",
            help="4-step distilled sampling (Wan2.2-Lightning / lightx2v LoRAs or checkpoints): "
                 "Euler, shift 5, no CFG",
            sampler="lightning", steps=4, guidance=1.0, shift=5.0, timesteps=(1000.0, 750.0, 500.0, 250.0),
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; InputError listing the known ones otherwise."""
    try:
        preset = PRESETS[str(name).lower()]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
    if preset.sampler not in SAMPLERS:  # a registry mismatch is a bug, not a user error
        raise RuntimeError(f"preset {preset.name} names the unknown sampler {preset.sampler!r}")
    return preset


__all__ = ["PRESETS", "Preset", "get_preset"]
