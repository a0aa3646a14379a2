"""LoRA files in every shared format: parsing, merging, side branches, switching, bad files,
and diffusers' `load_lora_weights` as an oracle where it reads the format."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kinema import keymaps
from kinema.config import DiTConfig
from kinema.errors import InputError, LoraError
from kinema.lora import LoraManager, LoraSpec, LoraWarning, parse_lora_arg
from kinema.models.dit import WanModel

CFG = DiTConfig(model_type="t2v", text_len=16, in_dim=4, dim=64, ffn_dim=96, freq_dim=32,
                text_dim=24, out_dim=4, num_heads=2, num_layers=2)
RANK = 4

# Linear modules a LoRA usually covers, and a few outside the blocks (time MLP, head, text MLP).
BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
OTHER_LINEARS = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_projection.1", "head.head"]


def tiny(cfg: DiTConfig = CFG, seed: int = 0, dtype: torch.dtype = torch.float32) -> WanModel:
    gen = torch.Generator().manual_seed(seed)
    model = WanModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 and "modulation" not in name else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            if "modulation" in name:
                p.mul_(0.1)
    return model.to(dtype)


def inputs(cfg: DiTConfig = CFG, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=gen)
    ctx = [torch.randn(5, cfg.text_dim, generator=gen)]
    return x, torch.tensor([700.0]), ctx


def factors(model: WanModel, modules, seed: int = 3, rank: int = RANK):
    """{module: (down [r, in...], up [out, r...])} random, big enough to change outputs."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = model.get_parameter(m + ".weight")
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.3
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=gen) * 0.3
        out[m] = (down, up)
    return out


def by_hand(model: WanModel, fac, strength: float, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """W + strength * scale * up @ down, scale = alpha / rank (1 without alpha)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for m, (down, up) in fac.items():
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        w = state[m + ".weight"]
        prod = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        state[m + ".weight"] = w + strength * scale * prod
    return state


def out_of(model: WanModel, cfg: DiTConfig = CFG) -> torch.Tensor:
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        return model(x, t, ctx)


def with_state(model: WanModel, state) -> WanModel:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


def snapshot(model: WanModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_bits(model: WanModel, snap) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


def write(tmp_path: Path, name: str, tensors, metadata=None) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def diffusers_module(m: str) -> str:
    return keymaps.dit_to_diffusers(m + ".weight").removesuffix(".weight")


# ---------------------------------------------------------------------------------------------
# every format, merged == by hand


def comfy(fac, alpha):  # ComfyUI / lightx2v
    out = {}
    for m, (d, u) in fac.items():
        out[f"diffusion_model.{m}.lora_down.weight"] = d
        out[f"diffusion_model.{m}.lora_up.weight"] = u
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    return out


def peft(prefix):
    def build(fac, alpha):
        out = {}
        for m, (d, u) in fac.items():
            out[f"{prefix}{m}.lora_A.weight"] = d
            out[f"{prefix}{m}.lora_B.weight"] = u
        return out
    return build


def peft_adapter_name(fac, alpha):  # a raw PEFT state dict: the adapter name inside the key
    return {f"base_model.model.{m}.lora_{ab}.default.weight": t
            for m, (d, u) in fac.items() for ab, t in (("A", d), ("B", u))}


def kohya(fac, alpha):  # musubi-tuner / kohya
    out = {}
    for m, (d, u) in fac.items():
        k = "lora_unet_" + m.replace(".", "_")
        out[f"{k}.lora_down.weight"] = d
        out[f"{k}.lora_up.weight"] = u
        out[f"{k}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_diffusers_names(fac, alpha):
    out = {}
    for m, (d, u) in fac.items():
        k = "lora_unet_" + diffusers_module(m).replace(".", "_")
        out[f"{k}.lora_down.weight"] = d
        out[f"{k}.lora_up.weight"] = u
        out[f"{k}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers_peft(fac, alpha):  # what diffusers' save_lora_weights writes for Wan
    return {f"transformer.{diffusers_module(m)}.lora_{ab}.weight": t
            for m, (d, u) in fac.items() for ab, t in (("A", d), ("B", u))}


FORMATS = {
    # name: (builder, alpha stored in the file, scale the format implies)
    "comfyui": (comfy, 2.0, True),
    "peft": (peft(""), None, False),
    "peft-diffusion_model": (peft("diffusion_model."), None, False),
    "peft-transformer": (peft("transformer."), None, False),
    "peft-base_model": (peft("base_model.model."), None, False),
    "peft-adapter-name": (peft_adapter_name, None, False),
    "kohya": (kohya, 8.0, True),
    "kohya-diffusers-names": (kohya_diffusers_names, 2.0, True),
    "diffusers": (diffusers_peft, None, False),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_merges_as_by_hand(fmt, tmp_path):
    build, alpha, uses_alpha = FORMATS[fmt]
    model = tiny()
    modules = BLOCK_LINEARS + OTHER_LINEARS + (["patch_embedding"] if fmt == "comfyui" else [])
    fac = factors(model, modules)
    path = write(tmp_path, f"{fmt}.safetensors", build(fac, alpha))
    expected = with_state(model, by_hand(model, fac, 0.8, alpha if uses_alpha else None))

    report = LoraManager([model]).apply([LoraSpec(path, 0.8)])
    assert report.loras[0].matched == len(modules) and not report.loras[0].unmatched
    for k, v in expected.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6, rtol=0), k
    assert (out_of(model) - out_of(expected)).abs().max() < 1e-5
    assert (out_of(model) - out_of(tiny())).abs().max() > 1e-2  # the LoRA does change the output


def test_peft_metadata_alpha_and_patterns(tmp_path):
    model = tiny()
    fac = factors(model, BLOCK_LINEARS)
    meta = {"lora_adapter_metadata": json.dumps({
        "r": RANK, "lora_alpha": 8, "alpha_pattern": {"blocks.1.ffn.net.2": 2}, "rank_pattern": {}})}
    path = write(tmp_path, "meta.safetensors", diffusers_peft(fac, None), meta)
    LoraManager([model]).apply([path])
    hand = by_hand(tiny(), {m: f for m, f in fac.items() if m != "blocks.1.ffn.2"}, 1.0, alpha=8)
    hand2 = by_hand(tiny(), {"blocks.1.ffn.2": fac["blocks.1.ffn.2"]}, 1.0, alpha=2)
    hand["blocks.1.ffn.2.weight"] = hand2["blocks.1.ffn.2.weight"]
    for k, v in hand.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_full_deltas_diff_diff_b_diff_m(tmp_path):
    model = tiny()
    gen = torch.Generator().manual_seed(9)
    params = dict(model.named_parameters())
    targets = {  # file key -> parameter
        "diffusion_model.blocks.0.self_attn.q.diff": "blocks.0.self_attn.q.weight",
        "diffusion_model.blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "diffusion_model.blocks.1.self_attn.norm_q.diff": "blocks.1.self_attn.norm_q.weight",
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "diffusion_model.blocks.0.diff_m": "blocks.0.modulation",
        "diffusion_model.blocks.1.diff_m": "blocks.1.modulation",
        "diffusion_model.head.diff_m": "head.modulation",
        "diffusion_model.head.head.diff_b": "head.head.bias",
        "diffusion_model.time_projection.1.diff": "time_projection.1.weight",
        "diffusion_model.patch_embedding.diff_b": "patch_embedding.bias",
    }
    tensors = {k: 0.1 * torch.randn(params[p].shape, generator=gen) for k, p in targets.items()}
    path = write(tmp_path, "diff.safetensors", tensors)
    before = snapshot(model)
    report = LoraManager([model]).apply([LoraSpec(path, 0.5)])
    assert report.loras[0].format == "diff" and report.loras[0].matched == len(targets)
    for k, p in targets.items():
        assert torch.allclose(params[p], before[p] + 0.5 * tensors[k], atol=1e-7), p


def test_kohya_full_deltas(tmp_path):
    model = tiny()
    before = snapshot(model)
    tensors = {"lora_unet_blocks_1_norm3.diff_b": torch.full((CFG.dim,), 0.5),
               "lora_unet_blocks_0.diff_m": torch.full((1, 6, CFG.dim), 0.25),
               "lora_unet_blocks_1_modulation.diff": torch.full((1, 6, CFG.dim), 0.125)}
    LoraManager([model]).apply([write(tmp_path, "k.safetensors", tensors)])
    assert torch.equal(model.blocks[1].norm3.bias, before["blocks.1.norm3.bias"] + 0.5)
    assert torch.equal(model.blocks[0].modulation, before["blocks.0.modulation"] + 0.25)
    assert torch.equal(model.blocks[1].modulation, before["blocks.1.modulation"] + 0.125)


def test_conv_lora_on_patch_embedding_and_diffusers_bias(tmp_path):
    model = tiny()
    fac = factors(model, ["patch_embedding", "blocks.0.ffn.0"])
    bias = 0.1 * torch.randn(CFG.ffn_dim)
    tensors = diffusers_peft(fac, None)
    tensors["transformer.blocks.0.ffn.net.0.proj.lora_B.bias"] = bias  # diffusers' lora_bias
    tensors["transformer.blocks.1.ffn.net.2.lora_B.lightx2v_t1.bias"] = bias[:CFG.dim].clone()  # with an adapter name
    path = write(tmp_path, "conv.safetensors", tensors)
    before = snapshot(model)
    LoraManager([model]).apply([LoraSpec(path, 2.0)])
    hand = by_hand(tiny(), fac, 2.0)
    assert torch.allclose(model.patch_embedding.weight, hand["patch_embedding.weight"], atol=1e-6)
    assert torch.allclose(model.blocks[0].ffn[0].bias, before["blocks.0.ffn.0.bias"] + 2.0 * bias, atol=1e-7)
    assert torch.allclose(model.blocks[1].ffn[2].bias, before["blocks.1.ffn.2.bias"] + 2.0 * bias[:CFG.dim], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# strength, several LoRAs, switching back and forth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_restores_bit_exactly(dtype, tmp_path):
    model = tiny(dtype=dtype)
    original = snapshot(model)
    a = write(tmp_path, "a.safetensors", comfy(factors(model, BLOCK_LINEARS, seed=1), 4.0))
    b = write(tmp_path, "b.safetensors", kohya(factors(model, BLOCK_LINEARS[:5] + OTHER_LINEARS, seed=2), 4.0))
    diff = write(tmp_path, "d.safetensors", {"diffusion_model.blocks.0.diff_m": torch.ones(1, 6, CFG.dim)})
    mgr = LoraManager([model])
    mgr.apply([LoraSpec(a, 0.7)])
    with_a = snapshot(model)
    assert mgr.report.originals_bytes == sum(original[m + ".weight"].numel() for m in BLOCK_LINEARS) * model.blocks[
        0].ffn[0].weight.element_size()
    for _ in range(2):
        mgr.apply([LoraSpec(b, 1.0), LoraSpec(diff, 1.0)])
        assert not torch.equal(model.blocks[0].modulation, original["blocks.0.modulation"])
        mgr.apply([LoraSpec(a, 0.7)])
        assert_same_bits(model, with_a)
    assert mgr.apply([LoraSpec(a, 0.7)]) is mgr.report  # the same set again: nothing to do
    mgr.apply([])
    assert_same_bits(model, original)
    assert mgr.originals_bytes() == 0 and mgr.records() == []


def test_two_loras_on_one_weight_add_up(tmp_path):
    model = tiny()
    fa, fb = factors(model, BLOCK_LINEARS, seed=1), factors(model, BLOCK_LINEARS, seed=2)
    a = write(tmp_path, "a.safetensors", comfy(fa, RANK))
    b = write(tmp_path, "b.safetensors", peft("")(fb, None))
    LoraManager([model]).apply([LoraSpec(a, 0.5), LoraSpec(b, -1.5)])
    hand = with_state(tiny(), by_hand(tiny(), fa, 0.5))
    hand = with_state(hand, by_hand(hand, fb, -1.5))
    assert (out_of(model) - out_of(hand)).abs().max() < 1e-5


def test_strength_zero_is_the_base_model(tmp_path):
    model = tiny()
    path = write(tmp_path, "a.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    LoraManager([model]).apply([LoraSpec(path, 0.0)])
    assert (out_of(model) - out_of(tiny())).abs().max() == 0


def test_not_restorable_keeps_no_copies(tmp_path):
    model = tiny()
    path = write(tmp_path, "a.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    mgr = LoraManager([model], restorable=False)
    mgr.apply([path])
    assert mgr.originals_bytes() == 0
    mgr.apply([path])  # the same set is fine
    with pytest.raises(RuntimeError, match="restorable=False"):
        mgr.apply([])


# ---------------------------------------------------------------------------------------------
# two experts


def test_per_expert_targets_and_strengths(tmp_path):
    high, low = tiny(seed=0), tiny(seed=1)
    h0, l0 = snapshot(high), snapshot(low)
    fac = factors(high, BLOCK_LINEARS)
    path = write(tmp_path, "x.safetensors", comfy(fac, RANK))
    mgr = LoraManager([high, low])

    mgr.apply([LoraSpec(path, 1.0, target="high")])
    assert_same_bits(low, l0)
    assert torch.allclose(high.blocks[0].self_attn.q.weight, by_hand(tiny(seed=0), fac, 1.0)["blocks.0.self_attn.q.weight"])

    mgr.apply([parse_lora_arg(f"{path}:0.25", target="low")])
    assert_same_bits(high, h0)
    assert torch.allclose(low.blocks[1].ffn[2].weight, by_hand(tiny(seed=1), fac, 0.25)["blocks.1.ffn.2.weight"])

    report = mgr.apply([parse_lora_arg(f"{path}:1.0,0.5")])  # FILE:HIGH,LOW
    assert report.loras[0].strengths == (1.0, 0.5)
    assert torch.allclose(high.blocks[0].ffn[0].weight, by_hand(tiny(seed=0), fac, 1.0)["blocks.0.ffn.0.weight"])
    assert torch.allclose(low.blocks[0].ffn[0].weight, by_hand(tiny(seed=1), fac, 0.5)["blocks.0.ffn.0.weight"])
    assert report.records()[0]["strength"] == {"high": 1.0, "low": 0.5}
    mgr.apply([])
    assert_same_bits(high, h0)
    assert_same_bits(low, l0)


def test_per_expert_options_need_two_experts(tmp_path):
    model = tiny()
    path = write(tmp_path, "x.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    mgr = LoraManager([model])
    for spec in (LoraSpec(path, (1.0, 0.5)), LoraSpec(path, 1.0, target="high")):
        with pytest.raises(InputError, match="two-expert"):
            mgr.apply([spec])
    with pytest.raises(InputError, match="target"):
        LoraManager([model, tiny()]).apply([LoraSpec(path, 1.0, target="middle")])


# ---------------------------------------------------------------------------------------------
# side branches (unmerged): the path for quantized layers


def test_side_branch_on_a_plain_linear():
    from kinema.lora.apply import _SideBranch

    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    down, up = torch.randn(3, 8, generator=gen), torch.randn(6, 3, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    merged = torch.nn.functional.linear(x, layer.weight + 0.5 * 2.0 * up @ down, layer.bias)
    handle = layer.register_forward_hook(_SideBranch([(up * (0.5 * 2.0), down)]))
    assert torch.allclose(layer(x), merged, atol=1e-5)
    handle.remove()
    assert not torch.allclose(layer(x), merged, atol=1e-3)


def test_side_mode_equals_merge_and_leaves_weights(tmp_path):
    model = tiny()
    original = snapshot(model)
    fac = factors(model, BLOCK_LINEARS + OTHER_LINEARS)
    path = write(tmp_path, "a.safetensors", comfy(fac, 2.0))
    expected = with_state(model, by_hand(model, fac, 0.6, alpha=2.0))
    mgr = LoraManager([model])
    report = mgr.apply([LoraSpec(path, 0.6)], mode="side")
    applied = report.loras[0]
    assert set(applied.side[0]) == {m + ".weight" for m in BLOCK_LINEARS + ["text_embedding.0", "text_embedding.2"]}
    # the float32 time MLP and head run F.linear on their weights: merged even in side mode
    assert set(applied.merged[0]) == {m + ".weight" for m in OTHER_LINEARS if not m.startswith("text")}
    assert (out_of(model) - out_of(expected)).abs().max() < 1e-5
    for k in (m + ".weight" for m in BLOCK_LINEARS):
        assert torch.equal(model.state_dict()[k], original[k])
    mgr.apply([])
    assert_same_bits(model, original)
    assert (out_of(model) - out_of(tiny())).abs().max() == 0  # hooks gone


class FakeQuantLinear(torch.nn.Module):
    """A Linear whose weight is an int8 buffer with a scale (what a quantized layer looks like)."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        w = layer.weight.detach()
        scale = w.abs().amax() / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        # the DiT reads `.weight.dtype` for its input cast: a float buffer, not a Parameter
        self.register_buffer("weight", self.qweight.float() * scale)
        self.bias = layer.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.qweight.float() * self.scale, self.bias)


def test_quantized_layers_get_a_side_branch(tmp_path):
    model = tiny()
    model.blocks[0].self_attn.q = FakeQuantLinear(model.blocks[0].self_attn.q)
    reference = copy.deepcopy(model)
    fac = factors(tiny(), ["blocks.0.self_attn.q", "blocks.0.ffn.0"])
    path = write(tmp_path, "a.safetensors", comfy(fac, RANK))
    mgr = LoraManager([model])
    applied = mgr.apply([path]).loras[0]
    assert applied.side[0] == ("blocks.0.self_attn.q.weight",) and applied.merged[0] == ("blocks.0.ffn.0.weight",)
    # by hand on the dequantized model
    hand = copy.deepcopy(reference)
    q = hand.blocks[0].self_attn.q
    plain = torch.nn.Linear(q.in_features, q.out_features)
    d, u = fac["blocks.0.self_attn.q"]
    with torch.no_grad():
        plain.weight.copy_(q.qweight.float() * q.scale + u @ d)
        plain.bias.copy_(q.bias)
        d, u = fac["blocks.0.ffn.0"]
        hand.blocks[0].ffn[0].weight.add_(u @ d)
    hand.blocks[0].self_attn.q = plain
    assert (out_of(model) - out_of(hand)).abs().max() < 1e-5
    mgr.apply([])
    assert (out_of(model) - out_of(reference)).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# T2V LoRAs on the image model, and keys with no place


def test_t2v_lora_on_i2v_model(tmp_path):
    i2v_cfg = DiTConfig(**{**CFG.__dict__, "model_type": "i2v", "in_dim": 10})
    model = tiny(i2v_cfg)
    t2v_patch = tiny().patch_embedding.weight.shape  # 4 input channels, the model has 10
    gen = torch.Generator().manual_seed(4)
    tensors = comfy(factors(model, BLOCK_LINEARS), RANK)
    tensors["diffusion_model.patch_embedding.diff"] = 0.1 * torch.randn(t2v_patch, generator=gen)
    path = write(tmp_path, "t2v.safetensors", tensors)
    before = model.patch_embedding.weight.detach().clone()
    LoraManager([model]).apply([path])
    delta = model.patch_embedding.weight.detach() - before
    assert torch.allclose(delta[:, :4], tensors["diffusion_model.patch_embedding.diff"], atol=1e-7)
    assert torch.equal(delta[:, 4:], torch.zeros_like(delta[:, 4:]))  # image channels untouched


def test_unmatched_keys_warn_with_a_count(tmp_path):
    model = tiny()
    tensors = comfy(factors(model, BLOCK_LINEARS), RANK)
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(RANK, CFG.dim)
    tensors["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(CFG.dim, RANK)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 8)
    path = write(tmp_path, "extra.safetensors", tensors)
    with pytest.warns(LoraWarning, match=r"3 of \d+ keys"):
        report = LoraManager([model]).apply([path])
    assert len(report.loras[0].unmatched) == 3 and report.records()[0]["unmatched"] == 3


# ---------------------------------------------------------------------------------------------
# bad files


def test_bad_files(tmp_path):
    model = tiny()
    mgr = LoraManager([model])
    good = write(tmp_path, "good.safetensors", kohya(factors(model, BLOCK_LINEARS, seed=8), RANK))
    mgr.apply([good])
    applied = snapshot(model)  # a failing apply leaves this set in place
    pt = tmp_path / "lora.safetensors"
    torch.save({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64)}, pt)
    with pytest.raises(LoraError, match="not a safetensors file"):
        mgr.apply([pt])
    with pytest.raises(LoraError, match="does not exist"):
        mgr.apply([tmp_path / "missing.safetensors"])
    nothing = write(tmp_path, "sdxl.safetensors", {"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(2, 3)})
    with pytest.raises(LoraError, match="nothing in LoRA sdxl.safetensors matches"), warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraWarning)
        mgr.apply([nothing])
    fac = factors(model, BLOCK_LINEARS)
    tensors = comfy(fac, RANK)
    tensors["diffusion_model.blocks.1.ffn.2.lora_up.weight"] = torch.zeros(CFG.dim + 1, RANK)
    wrong = write(tmp_path, "wrong.safetensors", tensors)
    with pytest.raises(LoraError, match=r"blocks\.1\.ffn\.2\.lora_down\.weight .* do not fit blocks\.1\.ffn\.2\.weight") as e:
        mgr.apply([wrong])
    assert "\n" not in str(e.value)
    diff = write(tmp_path, "diff.safetensors", {"diffusion_model.blocks.0.diff_m": torch.zeros(6, CFG.dim)})
    with pytest.raises(LoraError, match=r"blocks\.0\.diff_m has shape \(6, 64\); the model's blocks\.0\.modulation"):
        mgr.apply([diff])
    dora = write(tmp_path, "dora.safetensors", {**comfy(fac, RANK), "diffusion_model.blocks.0.ffn.0.dora_scale": torch.ones(1, 64)})
    with pytest.raises(LoraError, match="DoRA"):
        mgr.apply([dora])
    assert_same_bits(model, applied)  # nothing was half applied, the good set still is
    assert mgr.records()[0]["file"] == "good.safetensors"


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == LoraSpec("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.5") == LoraSpec("a.safetensors", 0.5)
    assert parse_lora_arg("dir/a.safetensors:1,0.25") == LoraSpec("dir/a.safetensors", (1.0, 0.25))
    assert parse_lora_arg(r"C:\loras\a.safetensors") == LoraSpec(r"C:\loras\a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:-1", target="low") == LoraSpec("a.safetensors", -1.0, "low")
    with pytest.raises(InputError, match="HIGH,LOW"):
        parse_lora_arg("a.safetensors:1,2,3")


def test_resolve_loras_checks_without_reading(tmp_path):
    from kinema.lora import resolve_loras

    model = tiny()
    a = write(tmp_path, "a.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    specs = resolve_loras([f"{a}:0.5", (a, (1.0, 0.25))], lora_high=[str(a)], lora_low=[f"{a}:2"], experts=2)
    assert specs == (LoraSpec(str(a), 0.5), LoraSpec(a, (1.0, 0.25)), LoraSpec(str(a), 1.0, "high"),
                     LoraSpec(str(a), 2.0, "low"))
    assert resolve_loras(None, experts=1) == () and resolve_loras(str(a), experts=1) == (LoraSpec(str(a), 1.0),)
    with pytest.raises(InputError, match="two-expert"):
        resolve_loras(lora_high=[str(a)], experts=1)
    (tmp_path / "x.ckpt").write_bytes(b"PK\x03\x04 not a safetensors file")
    with pytest.raises(LoraError, match="x.ckpt is not a safetensors file"):
        resolve_loras([tmp_path / "x.ckpt"], experts=1)


def test_record_for_the_sidecar(tmp_path):
    model = tiny()
    path = write(tmp_path, "style.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    rec = LoraManager([model]).apply([LoraSpec(path, 0.9)]).records()
    assert rec == [{"file": "style.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "strength": 0.9, "target": "both", "format": "comfyui", "mode": "merge",
                    "matched": len(BLOCK_LINEARS), "unmatched": 0}]
    json.dumps(rec)


# ---------------------------------------------------------------------------------------------
# the built-in model


def test_builtin_model_merged_equals_by_hand(tmp_path):
    from safetensors.torch import load_file

    from kinema.loading import infer_dit_config, inspect_folder
    from kinema.pipeline import BUILTIN_DIR

    file = BUILTIN_DIR / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        pytest.skip("the built-in model is not installed")
    cfg = infer_dit_config(inspect_folder(BUILTIN_DIR).components["transformer"])
    model = WanModel(cfg).eval()
    model.load_state_dict(load_file(str(file)))
    fac = factors(model, [f"blocks.{i}.{m}" for i in range(cfg.num_layers) for m in ("self_attn.q", "ffn.2")], rank=8)
    path = write(tmp_path, "b.safetensors", comfy(fac, 4.0))
    expected = with_state(model, by_hand(model, fac, 1.0, alpha=4.0))
    LoraManager([model]).apply([path])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=gen)
    ctx = [torch.randn(7, cfg.text_dim, generator=gen)]
    with torch.no_grad():
        got, want = model(x, torch.tensor([500.0]), ctx), expected(x, torch.tensor([500.0]), ctx)
    assert (got - want).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# diffusers' load_lora_weights as the oracle (test-only)


def _diffusers_model(model: WanModel):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
        in_channels=CFG.in_dim, out_channels=CFG.out_dim, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
        ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()
    ref.load_state_dict(keymaps.dit_state_to_diffusers(model.state_dict()), strict=True)
    return ref


def _diffusers_fused(ref, path: Path, strength: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(diffusers' output with the LoRA loaded at `strength`, its fused weights in official names)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    class Holder(WanLoraLoaderMixin):
        hf_device_map = None
        components: dict = {}

        def __init__(self, transformer):
            self.transformer = transformer

    holder = Holder(ref)
    holder.load_lora_weights(str(path), adapter_name="x")
    ref.set_adapters(["x"], weights=[strength])
    x, t, ctx = inputs()
    padded = torch.zeros(1, CFG.text_len, CFG.text_dim)  # diffusers takes the zero-padded context
    padded[0, : ctx[0].shape[0]] = ctx[0]
    with torch.no_grad():
        out = ref(x, t, padded, return_dict=False)[0]
    ref.set_adapters(["x"], weights=[1.0])
    ref.fuse_lora(lora_scale=strength)
    ref.unload_lora()
    return out, keymaps.dit_state_to_official(ref.state_dict())


def comfy_with_biases(fac, alpha):
    out = comfy(fac, alpha)
    gen = torch.Generator().manual_seed(5)
    for m, (d, u) in fac.items():
        out[f"diffusion_model.{m}.diff_b"] = 0.05 * torch.randn(u.shape[0], generator=gen)
    return out


@pytest.mark.parametrize("fmt", ["comfyui+diff_b", "kohya", "diffusers"])
def test_matches_diffusers_load_lora_weights(fmt, tmp_path):
    build, alpha = {"comfyui+diff_b": (comfy_with_biases, 2.0), "kohya": (kohya, 8.0),
                    "diffusers": (diffusers_peft, None)}[fmt]
    model = tiny()
    # musubi files cover every block Linear (diffusers' converter expects all of them)
    fac = factors(model, BLOCK_LINEARS)
    path = write(tmp_path, f"{fmt}.safetensors", build(fac, alpha))
    ref = _diffusers_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_out, want = _diffusers_fused(ref, path, 0.7)
    LoraManager([model]).apply([LoraSpec(path, 0.7)])
    got = model.state_dict()
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), k
    # the unfused adapter's output too (diffusers' float32 sinusoid costs ~1e-5, as in test_dit)
    out = out_of(model)
    assert (out - want_out).abs().max() < 1e-4 * max(1.0, want_out.abs().max().item())
    assert (out - out_of(tiny())).abs().max() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_computed_on_the_gpu_for_a_cpu_model(tmp_path):
    model, reference = tiny(dtype=torch.bfloat16), tiny(dtype=torch.bfloat16)
    original = snapshot(model)
    path = write(tmp_path, "a.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    mgr = LoraManager([model], compute_device="cuda")
    mgr.apply([path])
    LoraManager([reference]).apply([path])
    assert next(model.parameters()).device.type == "cpu"
    for k, v in reference.state_dict().items():  # same bf16 rounding of nearly the same float32 sum
        assert torch.allclose(model.state_dict()[k].float(), v.float(), atol=1e-2, rtol=1e-2), k
    mgr.apply([])
    assert_same_bits(model, original)


def test_records_reach_the_sidecar_and_the_manifest(tmp_path, config):
    import numpy as np

    from kinema.video import Video, sidecar_path
    from kinema.provenance import credentials as cr

    model = tiny()
    path = write(tmp_path, "style.safetensors", comfy(factors(model, BLOCK_LINEARS), RANK))
    records = LoraManager([model, tiny()]).apply([LoraSpec(path, (1.0, 0.5))]).records()
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    out = Video(frames=frames, fps=8.0, metadata={"model": {"name": "tiny"}, "loras": records}).save(tmp_path / "v.mp4")
    assert json.loads(sidecar_path(out).read_text())["loras"] == records
    assert cr.read_credentials(out)["generation"]["loras"] == records


def distill_like(model: WanModel, seed: int) -> dict[str, torch.Tensor]:
    """What the lightx2v Wan2.2 distill LoRAs hold: rank-r pairs with alpha on every block
    Linear, full deltas for biases (diff_b), norms (diff) and modulation (diff_m), the head,
    plus the Wan2.1 image-projection keys the Wan2.2 models do not have."""
    gen = torch.Generator().manual_seed(seed)
    out = comfy(factors(model, BLOCK_LINEARS, seed=seed), RANK)
    for name, p in model.named_parameters():
        base = name.rsplit(".", 1)[0]
        if name.endswith(".bias"):
            out[f"diffusion_model.{base}.diff_b"] = 0.02 * torch.randn(p.shape, generator=gen)
        elif "norm" in name:
            out[f"diffusion_model.{base}.diff"] = 0.02 * torch.randn(p.shape, generator=gen)
        elif name.endswith("modulation"):
            out[f"diffusion_model.{base}.diff_m"] = 0.02 * torch.randn(p.shape, generator=gen)
    out["diffusion_model.head.head.diff"] = 0.02 * torch.randn(model.head.head.weight.shape, generator=gen)
    for i in range(CFG.num_layers):
        out[f"diffusion_model.blocks.{i}.cross_attn.k_img.lora_down.weight"] = torch.zeros(RANK, CFG.dim)
        out[f"diffusion_model.blocks.{i}.cross_attn.k_img.lora_up.weight"] = torch.zeros(CFG.dim, RANK)
        out[f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff"] = torch.zeros(CFG.dim)
    return out


def test_distill_loras_per_expert_on_a_pipeline_with_the_preset(tmp_path):
    import kinema
    from kinema.presets import get_preset
    from kinema.testing.fixtures import make_tiny_model

    pipe = kinema.load(make_tiny_model(tmp_path / "moe", kind="t2v-moe"), device="cpu")
    high = write(tmp_path, "high_noise_model.safetensors", distill_like(pipe.transformer, 1))
    low = write(tmp_path, "low_noise_model.safetensors", distill_like(pipe.transformer_2, 2))
    settings = dict(seed=5, frames=5, **get_preset("lightning-4step").settings())
    base = pipe.generate("a red circle", **settings).frames
    mgr = LoraManager([pipe.transformer, pipe.transformer_2])
    with pytest.warns(LoraWarning, match=r"\d+ of \d+ keys"):
        report = mgr.apply([LoraSpec(high, target="high"), LoraSpec(low, target="low")])
    for applied, k in zip(report.loras, (0, 1)):
        assert len(applied.unmatched) == 3 * CFG.num_layers and not applied.merged[1 - k]
        assert len(applied.merged[k]) > len(BLOCK_LINEARS)
    with_loras = pipe.generate("a red circle", **settings).frames
    assert (with_loras.astype(int) - base.astype(int)).any()
    mgr.apply([])
    assert (pipe.generate("a red circle", **settings).frames == base).all()


def test_a_lora_saved_by_diffusers_itself(tmp_path):
    """A PEFT adapter (alpha 8 over rank 4, one module at alpha 2) trained on diffusers' model
    and written by diffusers' own save_lora_weights (keys + lora_adapter_metadata)."""
    model = tiny()
    ref = _diffusers_model(model)
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=8, alpha_pattern={"blocks.1.attn2.to_v": 2},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])
    ref.add_adapter(config, adapter_name="default")
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    WanLoraLoaderMixin.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                         transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    x, t, ctx = inputs()
    padded = torch.zeros(1, CFG.text_len, CFG.text_dim)
    padded[0, : ctx[0].shape[0]] = ctx[0]
    with torch.no_grad():
        want = ref(x, t, padded, return_dict=False)[0]
    report = LoraManager([model]).apply([path])
    assert report.loras[0].matched == len(BLOCK_LINEARS) and report.loras[0].format == "peft (diffusers names)"
    got = out_of(model)
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
    assert (got - out_of(tiny())).abs().max() > 1e-2
