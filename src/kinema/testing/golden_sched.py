"""Golden runner for the scheduler cases (kinds ``sched_unipc`` and ``sched_dpmpp``).

For every ``(N, shift)`` in ``params["tables"]`` the case records the timestep and sigma
tables; for every one in ``params["loops"]`` a full sampling loop driven by a fake model
(``eps = 0.3·x + sin(int(t)/1000)·c``) with the sample recorded after every step.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from kinema.sampling import dpmpp_schedule, sample_dpmpp, sample_unipc, unipc_schedule

_KINDS = {
    "sched_unipc": (unipc_schedule, sample_unipc),
    "sched_dpmpp": (dpmpp_schedule, sample_dpmpp),
}
_TAG = re.compile(r"_(n(\d+)_shift([0-9p]+(?:e[-+]?\d+)?))$")


def _tag(case, steps: int, shift: float) -> str:
    """Name suffix for (N, shift), e.g. ``n10_shift5p0``: taken from the case's own tensor names
    when one matches, else built the same way (``str(float)`` with the dot spelled ``p``)."""
    for name in list(case.inputs) + list(case.outputs):
        m = _TAG.search(name)
        if m and int(m.group(2)) == steps and float(m.group(3).replace("p", ".")) == shift:
            return m.group(1)
    return f"n{steps}_shift{str(float(shift)).replace('.', 'p')}"


def _fake_model(c: Tensor):
    def denoise(x: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
        # float64 Python sine, float32 tensor ops in the recorded order: 0.3·x, s·c, sum.
        s = math.sin(float(int(t)) / 1000.0)
        return 0.3 * x + s * c

    return denoise


def run(case) -> dict[str, Tensor]:
    schedule_fn, sampler = _KINDS[case.kind]
    params = case.params
    out: dict[str, Tensor] = {}
    for steps, shift in params.get("tables", []):
        steps, shift = int(steps), float(shift)
        tag = _tag(case, steps, shift)
        sch = schedule_fn(steps, shift)
        out[f"timesteps_{tag}"] = sch.timesteps
        out[f"sigmas_{tag}"] = sch.sigmas
    for steps, shift in params.get("loops", []):
        steps, shift = int(steps), float(shift)
        tag = _tag(case, steps, shift)
        sch = schedule_fn(steps, shift)
        seen: list[Tensor] = []
        sampler(_fake_model(case.inputs[f"c_{tag}"]), case.inputs[f"x0_{tag}"], sch,
                callback=lambda i, x, x0: seen.append(x.clone()))
        out[f"loop_timesteps_{tag}"] = sch.timesteps.clone()
        out[f"loop_x_after_step_{tag}"] = torch.stack(seen)
    return out
