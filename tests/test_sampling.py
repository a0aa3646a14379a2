"""Flow-matching samplers: golden parity, official timestep tables, solver identities and the
TI2V post-step (frame-0 overwrite) semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import golden_files
from kinema.sampling import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    Schedule,
    dpmpp_schedule,
    euler_schedule,
    sample_ddpm,
    sample_dpmpp,
    sample_euler,
    sample_unipc,
    shift_sigmas,
    unipc_schedule,
)
from kinema.testing.golden import run_case

# ----------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("path", golden_files("sched_*.safetensors"), ids=lambda p: p.stem)
def test_golden_parity(path):
    result = run_case(path)
    assert "error" not in result, result.get("error")
    bad = {k: v for k, v in result["outputs"].items() if not v["ok"]}
    assert result["ok"] and not bad, bad


# ----------------------------------------------------------------------------- schedules

# Spec §5.5: UniPC timesteps as the DiT receives them.
T2V_A14B = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947,
            941, 936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717,
            678, 631, 571, 492, 386, 235]
I2V_A14B = [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882,
            870, 859, 846, 833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514,
            468, 416, 356, 288, 208, 113]
TI2V_5B = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913,
           906, 898, 890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701,
           681, 660, 636, 611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92]


@pytest.mark.parametrize("steps,shift,expected,boundary,n_high", [
    (40, 12.0, T2V_A14B, 875, 26),
    (40, 5.0, I2V_A14B, 900, 15),
    (50, 5.0, TI2V_5B, None, None),
])
def test_default_timestep_tables(steps, shift, expected, boundary, n_high):
    sch = unipc_schedule(steps, shift)
    assert sch.steps == steps
    assert sch.timesteps.dtype == torch.int64 and sch.sigmas.dtype == torch.float32
    assert sch.timesteps.tolist() == expected
    assert sch.sigmas.shape == (steps + 1,) and sch.sigmas[-1].item() == 0.0
    if boundary is not None:
        assert int((sch.timesteps >= boundary).sum()) == n_high


def test_t2v_sigma_endpoints_and_grid_start():
    sch = unipc_schedule(40, 12.0)
    assert sch.sigmas[0].item() == pytest.approx(0.99991661, abs=1e-8)
    assert sch.sigmas[39].item() == pytest.approx(0.23510954, abs=1e-8)
    # UniPC starts from float32(0.999); DPM++ from exactly 1.0 (first timestep 1000).
    assert unipc_schedule(10, 1.0).sigmas[0].item() == float(np.float32(0.999))
    dpm = dpmpp_schedule(10, 5.0)
    assert dpm.sigmas[0].item() == 1.0 and dpm.timesteps[0].item() == 1000
    assert torch.equal(euler_schedule(10, 5.0).sigmas, unipc_schedule(10, 5.0).sigmas)


def test_shift_sigmas():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    out = shift_sigmas(s, 3.0)
    assert torch.allclose(out, 3 * s / (1 + 2 * s))
    assert out[0] == 0 and out[-1] == 1
    assert torch.equal(shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("fn", [unipc_schedule, dpmpp_schedule, euler_schedule])
def test_bad_schedule_input(fn):
    for steps in (0, -3):
        with pytest.raises(ValueError):
            fn(steps, 5.0)
    for shift in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            fn(10, shift)
    assert fn(1, 5.0).steps == 1


def test_samplers_registry():
    assert set(SAMPLERS) == {"unipc", "dpm++", "euler", "ddpm", "lightning"}
    assert SAMPLERS["unipc"] == (unipc_schedule, sample_unipc)
    assert SAMPLERS["dpm++"] == (dpmpp_schedule, sample_dpmpp)
    assert SAMPLERS["euler"][1] is sample_euler
    assert SAMPLERS["ddpm"][1] is sample_ddpm
    assert STOCHASTIC_SAMPLERS == {"ddpm"}


def _extra(name, seed=0):
    """The generator keyword a stochastic sampler needs."""
    return {"generator": torch.Generator().manual_seed(seed)} if name in STOCHASTIC_SAMPLERS else {}


# ----------------------------------------------------------------------------- solver identities


def _x0_and_noise(shape=(1, 4, 2, 3, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_euler_equals_first_order_dpmpp_float64():
    x, c = _x0_and_noise(dtype=torch.float64)

    def linear_field(x, t, sigma):
        return 0.7 * x - 0.2 * c + 0.001 * float(t) * c

    for sch in (unipc_schedule(12, 5.0), dpmpp_schedule(12, 5.0)):
        ex, dx = [], []
        out_e = sample_euler(linear_field, x, sch, callback=lambda i, s, m: ex.append(s))
        out_d = sample_dpmpp(linear_field, x, sch, order=1, callback=lambda i, s, m: dx.append(s))
        assert out_e.dtype == torch.float64
        for a, b in zip(ex, dx):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert torch.allclose(out_e, out_d, rtol=0, atol=1e-12)
        # The second-order solver is a genuinely different method.
        out_2 = sample_dpmpp(linear_field, x, sch)
        assert (out_2 - out_e).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler", "ddpm"])
@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 3.0), (8, 12.0)])
def test_exact_velocity_recovers_x0(name, steps, shift):
    x0, eps = _x0_and_noise(seed=1)
    schedule_fn, sampler = SAMPLERS[name]
    sch = schedule_fn(steps, shift)
    s0 = sch.sigmas[0].item()
    x = (1 - s0) * x0 + s0 * eps

    def exact(x, t, sigma):  # v = ε − x0 for the sample on the straight path to x0
        assert t.dtype == torch.int64 and sigma.dtype == torch.float32
        return (x - x0) / sigma.item()

    preds = []
    out = sampler(exact, x, sch, callback=lambda i, s, m: preds.append(m), **_extra(name))
    assert len(preds) == steps
    assert torch.allclose(out, x0, atol=1e-5, rtol=0)
    for m in preds:
        assert torch.allclose(m, x0, atol=1e-5, rtol=0)


def test_final_step_returns_last_x0_prediction_and_dtype():
    x, c = _x0_and_noise(seed=2)
    field = lambda x, t, sigma: 0.3 * x + math.sin(int(t) / 1000) * c  # noqa: E731
    for name, (schedule_fn, sampler) in SAMPLERS.items():
        seen = []
        out = sampler(field, x.to(torch.bfloat16), schedule_fn(5, 5.0),
                      callback=lambda i, s, m: seen.append((s, m)), **_extra(name))
        assert out.dtype == torch.bfloat16, name
        last_x, last_m = seen[-1]
        assert torch.equal(last_x, last_m), name  # σ_N = 0: the sample is the x0-prediction
        assert torch.equal(out, last_x.to(torch.bfloat16)), name


def test_ddpm_eta_zero_is_euler_and_draws_nothing():
    x, c = _x0_and_noise(dtype=torch.float64)
    field = lambda x, t, sigma: 0.7 * x - 0.2 * c + 0.001 * float(t) * c  # noqa: E731
    sch = unipc_schedule(9, 5.0)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state().clone()
    out = sample_ddpm(field, x, sch, generator=gen, eta=0.0)
    assert out.dtype == torch.float64
    assert torch.allclose(out, sample_euler(field, x, sch), rtol=0, atol=1e-12)
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError):
        sample_ddpm(field, x, sch, generator=gen, eta=1.5)


def test_ddpm_noise_comes_from_the_generator():
    x, c = _x0_and_noise(seed=6)
    field = lambda x, t, sigma: 0.3 * x + math.sin(int(t) / 1000) * c  # noqa: E731
    sch = unipc_schedule(6, 5.0)
    run = lambda seed, eta=1.0: sample_ddpm(field, x, sch, eta=eta,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed))
    a = run(1)
    assert torch.equal(a, run(1))
    assert (a - run(2)).abs().max() > 1e-3
    # less fresh noise, closer to the deterministic path
    euler = sample_euler(field, x, sch)
    assert (run(1, 0.3) - euler).abs().mean() < (a - euler).abs().mean()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddpm_samples_gaussian_data_with_the_right_spread(eta):
    """Data x0 ~ N(mu, tau^2) has a closed-form denoiser E[x0 | x_s]; ancestral sampling with it
    must give samples of that mean and spread (fine steps: at coarse ones DDPM loses some spread).
    A wrong noise scale (sigma_eta = eta*sigma_s, or fresh noise added on top of sigma_s*eps-hat
    instead of mixed with it) moves the spread by more than the tolerance."""
    mu, tau = 1.5, 0.4

    def exact(x, t, sigma):
        s = float(sigma)
        a = 1.0 - s
        m = mu + a * tau**2 / (a * a * tau**2 + s * s) * (x - a * mu)
        return (x - m) / s

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, generator=g, dtype=torch.float64)
    out = sample_ddpm(exact, x, unipc_schedule(1000, 3.0), generator=g, eta=eta)
    # (measured: 0.395-0.397 here; sigma_eta without its r factor gives 0.28 / 0.38)
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() - tau) < 0.01


# ----------------------------------------------------------------------------- post_step semantics


class _RefUniPC:
    """A stateful UniPC scheduler written from spec §5.2 (model_outputs, last_sample,
    this_order, lower_order_nums), used to check the pure function's post_step semantics.
    ``overwrite_last_sample`` deliberately breaks it (stores the passed sample instead of the
    corrected one) to show the comparison can tell the difference."""

    def __init__(self, schedule: Schedule, overwrite_last_sample: bool = False):
        self.sigmas = schedule.sigmas.clone()
        self.timesteps = schedule.timesteps.clone()
        self.bad = overwrite_last_sample
        self.model_outputs = [None, None]
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = 0
        self.index = 0

    def _al(self, j):
        s = self.sigmas[j]
        a = 1 - s
        return s, a, torch.log(a) - torch.log(s)

    def _coeffs(self, hh, order):
        phi = torch.expm1(hh)
        g, fact, b = phi / hh - 1, 1, []
        for k in range(1, order + 1):
            b.append(g * fact / phi)
            fact *= k + 1
            g = g / hh - 1 / fact
        return phi, torch.stack(b)

    def step(self, v, sample):
        i = self.index
        s_i, a_i, l_i = self._al(i)
        m = sample - s_i * v
        if i > 0 and self.last_sample is not None:
            s_p, a_p, l_p = self._al(i - 1)
            h = l_i - l_p
            phi, b = self._coeffs(-h, self.this_order)
            m1 = self.model_outputs[-1]
            x = s_i / s_p * self.last_sample - a_i * phi * m1
            if self.this_order == 1:
                x = x - a_i * phi * (0.5 * (m - m1))
            else:
                _, _, l_pp = self._al(i - 2)
                r = (l_pp - l_p) / h
                d = (self.model_outputs[-2] - m1) / r
                one = torch.ones(())
                rho = torch.linalg.solve(torch.stack([torch.stack([one, one]), torch.stack([r, one])]), b)
                x = x - a_i * phi * (rho[0] * d + rho[1] * (m - m1))
            corrected = x
        else:
            corrected = sample
        self.model_outputs = [self.model_outputs[1], m]
        order = min(2, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample if self.bad else corrected
        s_n, a_n, l_n = self._al(i + 1)
        h = l_n - l_i
        phi = torch.expm1(-h)
        out = s_n / s_i * corrected - a_n * phi * m
        if self.this_order == 2:
            _, _, l_p = self._al(i - 1)
            r = (l_p - l_i) / h
            out = out - a_n * phi * (0.5 * ((self.model_outputs[0] - m) / r))
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self.index += 1
        return out


def _ti2v_setup(seed=3, shape=(1, 6, 3, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    c = torch.randn(shape, generator=g)
    z = torch.randn(shape[:2] + (1,) + shape[3:], generator=g)  # clean image latent (1 frame)
    mask = torch.ones(shape)
    mask[:, :, 0] = 0

    def overwrite(latent):  # latent ← (1 − mask)·z + mask·latent
        return (1.0 - mask) * z + mask * latent

    def model(x, t):  # nonlinear and mixing frames, so frame 0 feeds into every output
        return 0.3 * x + math.sin(int(t) / 1000) * c + 0.2 * torch.tanh(x.mean(dim=2, keepdim=True))

    return overwrite(x), overwrite, model


def _ref_loop(schedule, x, overwrite, model, **kw):
    ref = _RefUniPC(schedule, **kw)
    xs = []
    for t in schedule.timesteps:
        x = overwrite(ref.step(model(x, t), x))
        xs.append(x)
    return xs


@pytest.mark.parametrize("steps,shift", [(7, 5.0), (4, 12.0), (2, 3.0)])
def test_unipc_post_step_matches_stateful_reference(steps, shift):
    x, overwrite, model = _ti2v_setup()
    sch = unipc_schedule(steps, shift)
    got, calls = [], []
    out = sample_unipc(lambda x, t, sigma: model(x, t), x, sch,
                       post_step=lambda i, s: (calls.append(i), overwrite(s))[1],
                       callback=lambda i, s, m: got.append(s))
    assert calls == list(range(steps))
    ref = _ref_loop(sch, x, overwrite, model)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert torch.equal(out, got[-1])
    assert torch.equal(out[:, :, :1], overwrite(out)[:, :, :1])  # final result overwritten too
    if steps > 3:  # with <= 3 steps the corrected sample that differs is never used
        wrong = _ref_loop(sch, x, overwrite, model, overwrite_last_sample=True)
        assert max((w - a).abs().max().item() for w, a in zip(wrong, got)) > 1e-4


def _diffusers_loop(cls, schedule, x, overwrite, model):
    sch = cls(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
              flow_shift=1.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    sch.set_timesteps(schedule.steps)
    # Substitute the official grid (diffusers builds a different one, spec §5.6).
    sch.sigmas, sch.timesteps = schedule.sigmas.clone(), schedule.timesteps.clone()
    xs = []
    for t in schedule.timesteps:
        x = overwrite(sch.step(model(x, t), t, x, return_dict=False)[0])
        xs.append(x)
    return xs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_post_step_matches_diffusers_scheduler(name):
    diffusers = pytest.importorskip("diffusers")
    cls = {"unipc": diffusers.UniPCMultistepScheduler,
           "dpm++": diffusers.DPMSolverMultistepScheduler}[name]
    x, overwrite, model = _ti2v_setup(seed=4)
    schedule_fn, sampler = SAMPLERS[name]
    sch = schedule_fn(6, 5.0)
    got = []
    sampler(lambda x, t, sigma: model(x, t), x, sch, post_step=lambda i, s: overwrite(s),
            callback=lambda i, s, m: got.append(s))
    ref = _diffusers_loop(cls, sch, x, overwrite, model)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler", "ddpm"])
def test_latent_on_gpu_matches_cpu(name):
    x, c = _x0_and_noise(seed=5)
    schedule_fn, sampler = SAMPLERS[name]
    sch = schedule_fn(6, 5.0)

    def field(x, t, sigma):
        return 0.3 * x + math.sin(int(t) / 1000) * c.to(x.device)

    cpu = sampler(field, x, sch, **_extra(name))
    gpu = sampler(field, x.cuda(), sch, **_extra(name))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=0)
