"""The `lightning-4step` preset and the distilled models' schedule, checked against the numbers
of the published recipes (Wan2.2-Lightning configs and Euler scheduler; lightx2v's
wan_moe_*_distill*.json: denoising_step_list [1000, 750, 500, 250], sample_shift 5.0,
enable_cfg false, boundary_step_index 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kinema.errors import InputError
from kinema.pipeline import Experts
from kinema.presets import PRESETS, get_preset
from kinema.sampling import SAMPLERS, lightning_schedule, sample_euler, timesteps_schedule


def test_lightning_4step_numbers():
    s = get_preset("lightning-4step").schedule()
    # S_5(σ) = 5σ / (1 + 4σ) at σ = 1, 0.75, 0.5, 0.25: 1, 15/16, 5/6, 5/8
    assert s.sigmas.dtype == torch.float32 and s.timesteps.dtype == torch.float32
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0], abs=1e-7)
    assert s.timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-4)
    assert float(s.timesteps[2]) != int(s.timesteps[2])  # not truncated: the model sees 833.33


def test_matches_the_wan22_lightning_euler_scheduler_arithmetic():
    # fm_solvers_euler.py: np.linspace(1000, 0, N+1, float32) / 1000, shifted in float32, * 1000
    t = torch.from_numpy(np.linspace(1000, 0, 5, dtype=np.float32)) / 1000
    sig = 5.0 * t / (1 + (5.0 - 1) * t)
    s = lightning_schedule(4, 5.0)
    assert torch.equal(s.sigmas, sig)
    assert torch.equal(s.timesteps, (sig * 1000)[:-1])


def test_matches_the_lightx2v_step_distill_scheduler_arithmetic():
    # step_distill/scheduler.py: linspace(1, 0, 1001)[:-1], shifted, picked at 1000 - step
    grid = torch.linspace(1.0, 0.0, 1001)[:-1]
    grid = 5.0 * grid / (1 + 4.0 * grid)
    picked = grid[[1000 - t for t in (1000, 750, 500, 250)]]
    s = get_preset("lightning-4step").schedule()
    assert torch.allclose(s.sigmas[:-1], picked, atol=1e-6, rtol=0)
    assert torch.allclose(s.timesteps, picked * 1000, atol=1e-3, rtol=0)


def test_preset_fields_and_registry():
    p = get_preset("Lightning-4step")
    assert p.settings() == {"sampler": "lightning", "steps": 4, "guidance": 1.0, "shift": 5.0}
    assert p.timesteps == (1000.0, 750.0, 500.0, 250.0)
    # `--sampler lightning --steps 4 --shift 5` is the same grid as the preset
    same = SAMPLERS["lightning"][0](4, 5.0)
    assert torch.equal(same.sigmas, p.schedule().sigmas) and torch.equal(same.timesteps, p.schedule().timesteps)
    assert SAMPLERS["lightning"][1] is sample_euler
    assert p.record()["name"] == "lightning-4step"
    with pytest.raises(InputError, match="unknown preset 'turbo'; choose from lightning-4step"):
        get_preset("turbo")
    assert list(PRESETS) == ["lightning-4step"]


@pytest.mark.parametrize("boundary", [0.875, 0.9])  # T2V-A14B, I2V-A14B
def test_two_plus_two_expert_split(boundary):
    experts = Experts([torch.nn.Identity(), torch.nn.Identity()], 1.0, boundary, torch.device("cpu"))
    ts = get_preset("lightning-4step").schedule().timesteps
    assert [experts.pick(int(t)) for t in ts] == [0, 0, 1, 1]  # lightx2v boundary_step_index = 2


def test_euler_over_the_schedule_is_the_published_update():
    s = get_preset("lightning-4step").schedule()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=gen)
    w = torch.randn(4, 4, generator=gen) * 0.2
    seen = []

    def denoise(latent, t, sigma):
        seen.append(float(t))
        return torch.einsum("oc,bcfhw->bofhw", w, latent) + float(sigma)

    out = sample_euler(denoise, x, s)
    ref = x.clone()
    sig = s.sigmas.tolist()
    for i in range(4):  # x + (σ_next − σ)·v, the last step landing on x − σ·v
        v = torch.einsum("oc,bcfhw->bofhw", w, ref) + sig[i]
        ref = ref + (sig[i + 1] - sig[i]) * v
    assert seen == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-4)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_exact_velocity_recovers_x0(steps):
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 2, 3, 5, generator=gen), torch.randn(1, 4, 2, 3, 5, generator=gen)
    s = lightning_schedule(steps, 5.0)
    x = (1 - float(s.sigmas[0])) * x0 + float(s.sigmas[0]) * eps  # σ_0 = 1: pure noise

    def exact(x, t, sigma):
        assert t.dtype == torch.float32 and abs(float(t) - 1000 * float(sigma)) < 1e-3
        return (x - x0) / sigma.item()

    assert torch.allclose(sample_euler(exact, x, s), x0, atol=1e-5, rtol=0)


def test_bad_timesteps():  # internal data (a preset's grid), so ValueError as every schedule check
    for bad in ([], [250, 500], [1200, 500], [1000, 0]):
        with pytest.raises(ValueError, match="timesteps must descend"):
            timesteps_schedule(bad, 5.0)
    with pytest.raises(ValueError, match="steps"):
        lightning_schedule(0, 5.0)


def test_preset_end_to_end_on_a_tiny_two_expert_model(tmp_path):
    import kinema
    from kinema.pipeline import Hooks
    from kinema.testing.fixtures import make_tiny_model

    pipe = kinema.load(make_tiny_model(tmp_path / "moe", kind="t2v-moe"), device="cpu")
    calls = []
    p = get_preset("lightning-4step")
    s = pipe.settings("a red circle", seed=3, frames=5, preset="lightning-4step")
    assert s == pipe.settings("a red circle", seed=3, frames=5, preset=p.name, **p.settings())
    video = pipe.run(s, hooks=Hooks(on_model_call=calls.append))
    assert [c.expert for c in calls] == [0, 0, 1, 1]
    assert [c.v_uncond for c in calls] == [None] * 4  # guidance 1: no unconditional pass
    assert [c.t for c in calls] == [1000, 937, 833, 625]
    assert [round(float(c.timestep.reshape(-1)[0]), 2) for c in calls] == [1000.0, 937.5, 833.33, 625.0]
    settings = video.metadata["settings"]
    assert (settings["preset"], settings["sampler"], settings["steps"]) == ("lightning-4step", "lightning", 4)
