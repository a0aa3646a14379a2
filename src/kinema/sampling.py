"""Flow-matching samplers (UniPC, DPM-Solver++, Euler, DDPM) as pure functions.

Conventions (spec §5.1): ``x_σ = (1 − σ)·x0 + σ·ε``; the model predicts the velocity
``v = ε − x0``; the x0-prediction is ``m = x − σ·v``; log-SNR ``λ(σ) = log(1 − σ) − log σ``.

Each sampler keeps its multistep history in local variables, so a run is a plain function of
(denoiser, initial latent, schedule), plus an explicit ``torch.Generator`` for the stochastic one
(DDPM, `STOCHASTIC_SAMPLERS`). The deterministic ones reproduce the official Wan2.2 schedulers:
per-step scalars (σ ratios, λ, expm1, the UniC 2×2 solve, ...) are computed one by one on 0-d
CPU float32 tensors exactly as the official step functions do, and only then applied to the
latent as Python floats (which works for a latent on any device). A float64 latent switches the
scalar arithmetic to float64 as well (used by tests that check identities in exact arithmetic).

Loop shape shared by all samplers, for step ``i`` of ``N``::

    v = denoise(x_i, t_i, σ_i)            # t_i: int64 model timestep, σ_i: float32 sigma
    x_{i+1} = <solver update>
    x_{i+1} = post_step(i, x_{i+1})       # e.g. TI2V image path: overwrite latent frame 0
    callback(i, x_{i+1}, m_i)

The caller applies its own pre-loop overwrite (TI2V: frame 0 set before the first step).
For MoE models the denoiser picks the expert from ``t``; the solver history is simply kept
across the switch (spec §2.11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor


Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
PostStep = Callable[[int, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], object]

NUM_TRAIN_TIMESTEPS = 1000
# The official UniPC grid starts at the first entry of its float32 training table, the float32
# value of 0.999 (as a Python float), and ends at 0.
UNIPC_SIGMA_MAX = 0.9990000128746033


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule: ``N`` model timesteps and ``N + 1`` solver sigmas (last = 0)."""

    sigmas: Tensor  # float32 [N+1], CPU, descending, sigmas[-1] == 0
    # [N], CPU: int64(1000·σ) truncated from the float64 sigmas (the official grids), or float32
    # 1000·σ unrounded (the distilled models' grid, `lightning_schedule`)
    timesteps: Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


# ----------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: Tensor | float, shift: float) -> Tensor | float:
    """The timestep shift ``S_s(σ) = s·σ / (1 + (s − 1)·σ)``, in the dtype of ``sigmas``."""
    s = float(shift)
    # Same operation order as the official (float64 numpy) code, so truncation agrees.
    return s * sigmas / (1 + (s - 1) * sigmas)


def _check(steps: int, shift: float) -> tuple[int, float]:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"sampling steps must be an integer >= 1, got {steps!r}")
    shift = float(shift)
    if not (shift > 0 and shift < float("inf")):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return int(steps), shift


def _schedule_from(sigmas64: Tensor) -> Schedule:
    """float64 sigmas [N] -> Schedule (truncated int timesteps, float32 sigmas with a final 0)."""
    timesteps = (sigmas64 * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation toward zero
    sigmas = torch.cat([sigmas64, sigmas64.new_zeros(1)]).to(torch.float32)
    return Schedule(sigmas=sigmas, timesteps=timesteps)


def _grid(start: float, steps: int) -> Tensor:
    # numpy's linspace (start + i·step, last element exactly 0) is the official grid; torch's
    # linspace rounds differently in the last bit, which can flip a truncated timestep.
    return torch.from_numpy(np.linspace(start, 0.0, steps + 1)[:steps].copy())


def unipc_schedule(steps: int, shift: float) -> Schedule:
    """Official UniPC grid: ``S_s(linspace(float32(0.999), 0, N+1)[:N])``."""
    steps, shift = _check(steps, shift)
    return _schedule_from(shift_sigmas(_grid(UNIPC_SIGMA_MAX, steps), shift))


def dpmpp_schedule(steps: int, shift: float) -> Schedule:
    """Official ``get_sampling_sigmas`` grid for DPM++: ``S_s(linspace(1, 0, N+1)[:N])``.

    The scheduler then re-applies its own shift of 1, which is the exact identity.
    """
    steps, shift = _check(steps, shift)
    return _schedule_from(shift_sigmas(_grid(1.0, steps), shift))


def euler_schedule(steps: int, shift: float) -> Schedule:
    """Euler uses the UniPC grid."""
    return unipc_schedule(steps, shift)


def timesteps_schedule(base_timesteps, shift: float) -> Schedule:
    """The grid of the step-distilled Wan models from their published training timesteps
    (lightx2v's ``denoising_step_list``, e.g. 1000, 750, 500, 250): ``σ_i = S_s(t_i / 1000)``,
    a final σ of 0, and the model timestep ``1000·σ_i`` as float32, not truncated (the
    distilled models were trained at 937.5, 833.33, ...). float32 arithmetic, as both the
    Wan2.2-Lightning and the lightx2v schedulers compute it."""
    base = torch.as_tensor(list(base_timesteps), dtype=torch.float32)
    if base.numel() < 1 or not bool((base[:-1] > base[1:]).all()) or float(base[0]) > NUM_TRAIN_TIMESTEPS \
            or float(base[-1]) <= 0:
        raise ValueError(f"timesteps must descend within (0, {NUM_TRAIN_TIMESTEPS}], got {list(base_timesteps)}")
    _, shift = _check(base.numel(), shift)
    sigmas = shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift)  # float32 throughout
    return Schedule(sigmas=torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps=sigmas * NUM_TRAIN_TIMESTEPS)


def lightning_schedule(steps: int, shift: float) -> Schedule:
    """Wan2.2-Lightning's Euler grid for `steps` steps: the training timesteps
    ``linspace(1000, 0, N+1)[:N]`` (float32) through `timesteps_schedule`."""
    steps, shift = _check(steps, shift)
    base = np.linspace(NUM_TRAIN_TIMESTEPS, 0, steps + 1, dtype=np.float32)[:steps]
    return timesteps_schedule(base.tolist(), shift)


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Scalars:
    """Per-index σ, α = 1 − σ and λ = log α − log σ as 0-d CPU tensors.

    Computed element by element (not vectorized) because vectorized and scalar log kernels may
    differ in the last bit, and the official code works on 0-d tensors.
    """

    def __init__(self, schedule: Schedule, dtype: torch.dtype):
        if schedule.sigmas.numel() != schedule.timesteps.numel() + 1:
            raise ValueError("schedule needs len(sigmas) == len(timesteps) + 1")
        if schedule.steps < 1:
            raise ValueError("a schedule needs at least one step")
        sig = schedule.sigmas.detach().to("cpu", torch.float32).to(dtype)
        self.sigma = [sig[j] for j in range(sig.numel())]
        self.alpha = [1 - s for s in self.sigma]
        self.lam = [torch.log(a) - torch.log(s) for a, s in zip(self.alpha, self.sigma)]


def _f(t: Tensor) -> float:
    """A 0-d scalar as a Python float: exact, and it broadcasts onto a latent on any device."""
    return t.item()


def _model_args(schedule: Schedule, i: int) -> tuple[Tensor, Tensor]:
    return schedule.timesteps[i].cpu(), schedule.sigmas[i].detach().cpu().to(torch.float32)


def _finish(i: int, x_next: Tensor, m: Tensor, post_step: Optional[PostStep],
            callback: Optional[Callback]) -> Tensor:
    if post_step is not None:
        x_next = post_step(i, x_next)
    if callback is not None:
        callback(i, x_next, m)
    return x_next


# ----------------------------------------------------------------------------- UniPC


def _unipc_predictor(x: Tensor, m: Tensor, m_prev: Optional[Tensor], i: int, order: int,
                     sc: _Scalars) -> Tensor:
    """UniP-bh2 from σ_i to σ_{i+1} (order 1 or 2; ρ = 0.5 hard-wired for order 2)."""
    h = sc.lam[i + 1] - sc.lam[i]
    hh = -h
    phi = torch.expm1(hh)  # also B(h) for bh2
    alpha_t = sc.alpha[i + 1]
    x_next = _f(sc.sigma[i + 1] / sc.sigma[i]) * x - _f(alpha_t * phi) * m
    if order == 2:
        r1 = (sc.lam[i - 1] - sc.lam[i]) / h
        d1 = (m_prev - m) / _f(r1)
        x_next = x_next - _f(alpha_t * phi) * (0.5 * d1)
    return x_next


def _unipc_corrector(last: Tensor, m: Tensor, m1: Tensor, m2: Optional[Tensor], i: int,
                     order: int, sc: _Scalars) -> Tensor:
    """UniC-bh2: rebuild x_i from the previous corrected sample ``last`` (at σ_{i−1}).

    ``m`` = m_i (this step), ``m1`` = m_{i−1}, ``m2`` = m_{i−2}; ``order`` is the order of the
    previous predictor. The predicted x_i only enters through ``m``.
    """
    h = sc.lam[i] - sc.lam[i - 1]
    hh = -h
    phi = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2
    alpha_t = sc.alpha[i]
    x_corr = _f(sc.sigma[i] / sc.sigma[i - 1]) * last - _f(alpha_t * phi) * m1
    d_t = m - m1
    if order == 1:
        res = 0.5 * d_t
    else:
        r1 = (sc.lam[i - 2] - sc.lam[i - 1]) / h
        d1 = (m2 - m1) / _f(r1)
        # b_k = g_k·k!/B with g_1 = φ/hh − 1, g_2 = g_1/hh − 1/2; ρ solves [[1, 1], [r1, 1]]ρ = b
        g1 = phi / hh - 1
        g2 = g1 / hh - 0.5
        b = torch.stack([g1 * 1 / b_h, g2 * 2 / b_h])
        one = torch.ones((), dtype=r1.dtype)
        lhs = torch.stack([torch.stack([one, one]), torch.stack([r1, one])])
        rho = torch.linalg.solve(lhs, b)
        res = _f(rho[0]) * d1 + _f(rho[1]) * d_t
    return x_corr - _f(alpha_t * b_h) * res


def sample_unipc(denoise: Denoiser, x: Tensor, schedule: Schedule, *,
                 post_step: Optional[PostStep] = None,
                 callback: Optional[Callback] = None) -> Tensor:
    """Official UniPC (bh2, x0-prediction, order 1 → 2 … 2 → 1, UniC corrector from step 1).

    Step order (spec §5.2), as a stateful scheduler fed with ``post_step``'s output would do:
    m_i comes from the sample the model saw (overwritten by ``post_step``), while the corrector
    rebuilds x_i from the previous *corrected* sample, which ``post_step`` never touched.
    The final step (σ_N = 0) returns the last x0-prediction.
    """
    sc = _Scalars(schedule, _compute_dtype(x))
    n = schedule.steps
    sample = x.to(_compute_dtype(x))
    last = None  # corrected sample of the previous step (the scheduler's last_sample)
    m1 = m2 = None  # x0-predictions of steps i−1 and i−2
    prev_order = 0
    for i in range(n):
        t, sigma = _model_args(schedule, i)
        v = denoise(sample, t, sigma).to(sample.dtype)
        m = sample - _f(sc.sigma[i]) * v
        if i > 0:
            sample = _unipc_corrector(last, m, m1, m2, i, prev_order, sc)
        # lower_order_final and warm-up: min(solver_order, steps left, steps done + 1)
        order = min(2, n - i, i + 1)
        last = sample
        x_next = _unipc_predictor(sample, m, m1, i, order, sc)
        m1, m2 = m, m1
        prev_order = order
        sample = _finish(i, x_next, m, post_step, callback)
    return sample.to(x.dtype)


# ----------------------------------------------------------------------------- DPM-Solver++


def sample_dpmpp(denoise: Denoiser, x: Tensor, schedule: Schedule, *,
                 post_step: Optional[PostStep] = None,
                 callback: Optional[Callback] = None, order: int = 2) -> Tensor:
    """Official DPM-Solver++ (2M, midpoint, x0-prediction).

    First order at the first and the last step (final σ = 0), second order in between; at
    σ_0 = 1 the log-SNR is −∞ and IEEE inf arithmetic gives the right limits (no clamping).
    ``order=1`` forces first order everywhere (a test hook; the official solver uses 2).
    """
    if order not in (1, 2):
        raise ValueError(f"DPM++ order must be 1 or 2, got {order}")
    sc = _Scalars(schedule, _compute_dtype(x))
    n = schedule.steps
    sample = x.to(_compute_dtype(x))
    m1 = None
    for i in range(n):
        t, sigma = _model_args(schedule, i)
        v = denoise(sample, t, sigma).to(sample.dtype)
        m = sample - _f(sc.sigma[i]) * v
        h = sc.lam[i + 1] - sc.lam[i]
        coef = sc.alpha[i + 1] * (torch.exp(-h) - 1.0)
        x_next = _f(sc.sigma[i + 1] / sc.sigma[i]) * sample - _f(coef) * m
        if order == 2 and 0 < i < n - 1:
            r0 = (sc.lam[i] - sc.lam[i - 1]) / h
            d1 = _f(1.0 / r0) * (m - m1)  # r0 = inf on step 1 from σ_0 = 1: D1 = 0
            x_next = x_next - _f(0.5 * coef) * d1
        m1 = m
        sample = _finish(i, x_next, m, post_step, callback)
    return sample.to(x.dtype)


# ----------------------------------------------------------------------------- Euler


def sample_euler(denoise: Denoiser, x: Tensor, schedule: Schedule, *,
                 post_step: Optional[PostStep] = None,
                 callback: Optional[Callback] = None) -> Tensor:
    """Plain Euler on the flow ODE: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i``."""
    sc = _Scalars(schedule, _compute_dtype(x))
    sample = x.to(_compute_dtype(x))
    for i in range(schedule.steps):
        t, sigma = _model_args(schedule, i)
        v = denoise(sample, t, sigma).to(sample.dtype)
        m = sample - _f(sc.sigma[i]) * v
        x_next = sample + _f(sc.sigma[i + 1] - sc.sigma[i]) * v
        sample = _finish(i, x_next, m, post_step, callback)
    return sample.to(x.dtype)


# ----------------------------------------------------------------------------- DDPM (ancestral)


def sample_ddpm(denoise: Denoiser, x: Tensor, schedule: Schedule, *, generator: torch.Generator,
                eta: float = 1.0, post_step: Optional[PostStep] = None,
                callback: Optional[Callback] = None) -> Tensor:
    """Ancestral sampling: each step draws ``x_s`` from the forward process's posterior
    ``q(x_s | x_t, x0 = m)`` around the model's x0-prediction (DDIM's update with ``eta``;
    ``eta = 1`` is DDPM, ``eta = 0`` the deterministic DDIM/Euler path).

    With ``α = 1 − σ`` and ``ε̂ = (x_t − α_t·m) / σ_t``::

        x_s = α_s·m + sqrt(σ_s² − σ_η²)·ε̂ + σ_η·z,   σ_η = eta·σ_s·sqrt(1 − (α_t·σ_s / (α_s·σ_t))²)

    Why it exists: an under-trained denoiser's x0-prediction is a blurred average, and the
    deterministic ODE carries that blur to the end; fresh noise each step lets the model redraw
    the detail (the built-in model's squares keep more of their corners on training prompts,
    not on held-out ones: benchmarks/builtin_eval.md, session 17).
    ``z`` is float32 noise drawn on the CPU from ``generator`` (so a seed gives the same video on
    any device) and moved to the latent's device. No official counterpart: the per-step scalars
    are plain float64 Python arithmetic on the schedule's sigmas.
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    sig = schedule.sigmas.detach().cpu().to(torch.float32).tolist()
    sample = x.to(_compute_dtype(x))
    for i in range(schedule.steps):
        t, sigma = _model_args(schedule, i)
        v = denoise(sample, t, sigma).to(sample.dtype)
        s_t, s_s = sig[i], sig[i + 1]
        m = sample - s_t * v
        if s_s == 0.0:
            x_next = m  # the last step lands on the x0-prediction
        else:
            eps = (sample - (1.0 - s_t) * m) / s_t
            r = ((1.0 - s_t) * s_s) / ((1.0 - s_s) * s_t)  # α_t σ_s / (α_s σ_t) <= 1
            s_eta = eta * s_s * math.sqrt(max(0.0, 1.0 - r * r))
            x_next = (1.0 - s_s) * m + math.sqrt(max(0.0, s_s * s_s - s_eta * s_eta)) * eps
            if s_eta > 0.0:
                z = torch.randn(tuple(sample.shape), generator=generator, dtype=torch.float32)
                x_next = x_next + s_eta * z.to(device=sample.device, dtype=sample.dtype)
        sample = _finish(i, x_next, m, post_step, callback)
    return sample.to(x.dtype)


SAMPLERS: dict[str, tuple[Callable[[int, float], Schedule], Callable[..., Tensor]]] = {
    "unipc": (unipc_schedule, sample_unipc),
    "dpm++": (dpmpp_schedule, sample_dpmpp),
    "euler": (euler_schedule, sample_euler),
    "ddpm": (unipc_schedule, sample_ddpm),  # the UniPC grid
    # Euler on the step-distilled models' grid (Wan2.2-Lightning / lightx2v 4-step recipes)
    "lightning": (lightning_schedule, sample_euler),
}
# Samplers that draw noise while they run: they take a `generator=` keyword.
STOCHASTIC_SAMPLERS = frozenset({"ddpm"})
