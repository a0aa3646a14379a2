"""Loading tiny model folders in both layouts, sharded files, error cases, diffusers oracle."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from kinema import keymaps
from kinema.errors import CheckpointError, ModelFolderError
from kinema.loading import LoadedModel, inspect_folder, load_model, load_pth
from kinema.testing.fixtures import make_tiny_model, tiny_configs


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for kind in ("ti2v", "t2v-moe"):
        for layout in ("official", "diffusers"):
            out[(kind, layout)] = make_tiny_model(root / f"{kind}-{layout}", kind, layout, seed=1)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_modules(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _dit_inputs(cfg, frames=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, frames, h, w, generator=g)
    y = torch.randn(1, cfg.in_dim - cfg.out_dim, frames, h, w, generator=g) if cfg.in_dim != cfg.out_dim else None
    ctx = [torch.randn(7, cfg.text_dim, generator=g)]
    t = torch.tensor([700.0])
    return x, t, ctx, y


@pytest.mark.parametrize("kind", ["ti2v", "t2v-moe"])
def test_both_layouts_load_equal(folders, kind):
    off = load_model(folders[(kind, "official")])
    dif = load_model(folders[(kind, "diffusers")])
    assert isinstance(off, LoadedModel)
    assert off.layout == "official" and dif.layout == "diffusers"
    assert off.spec.dit == dif.spec.dit and off.spec.vae == dif.spec.vae and off.spec.t5 == dif.spec.t5
    dit_cfg, vae_cfg, t5_cfg, two = tiny_configs(kind)
    assert off.spec.dit == dit_cfg  # text_dim 64 inferred from shapes (not in the official config.json)
    assert off.spec.vae.version == vae_cfg.version and off.spec.vae.z_dim == vae_cfg.z_dim
    assert off.spec.t5 == t5_cfg
    assert off.spec.two_experts is two and (off.transformer_2 is not None) is two
    for name in ("transformer", "transformer_2", "vae"):
        if getattr(off, name) is not None:
            _assert_same_modules(getattr(off, name), getattr(dif, name))
    _assert_same_modules(off.text_encoder.model, dif.text_encoder.model)
    # equal outputs, and they are finite and non-trivial
    x, t, ctx, y = _dit_inputs(off.spec.dit)
    with torch.no_grad():
        a = off.transformer(x, t, ctx, y=y)
        b = dif.transformer(x, t, ctx, y=y)
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.std() > 1e-3
    feats = off.text_encoder.encode(["a red fox runs across a snowy field"])
    feats2 = dif.text_encoder.encode(["a red fox runs across a snowy field"])
    assert torch.equal(feats[0], feats2[0]) and feats[0].shape[1] == off.spec.t5.dim
    assert torch.isfinite(feats[0]).all() and feats[0].std() > 1e-3


def test_spec_defaults_from_kinema_json_and_preset(folders):
    info = inspect_folder(folders[("t2v-moe", "official")])
    assert info.preset == "t2v-A14B" and info.spec.name == "tiny-t2v-moe"
    d = info.spec.defaults
    assert d.size == (64, 64) and d.frames == 9 and d.steps == 4
    assert d.boundary == 0.875 and d.guidance == (3.0, 4.0) and d.shift == 12.0  # from the preset
    info2 = inspect_folder(folders[("ti2v", "diffusers")])
    assert info2.preset == "ti2v-5B" and info2.spec.dit.model_type == "ti2v" and info2.spec.vae.version == "2.2"


def test_boundary_from_model_index(tmp_path, folders):
    folder = _copy(folders[("t2v-moe", "diffusers")], tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = 0.8
    (folder / "model_index.json").write_text(json.dumps(index))
    assert inspect_folder(folder).spec.defaults.boundary == 0.8


def test_param_counts_match_modules(folders):
    info = inspect_folder(folders[("t2v-moe", "diffusers")])
    m = load_model(folders[("t2v-moe", "diffusers")])
    assert info.components["transformer"].params == sum(p.numel() for p in m.transformer.parameters())
    assert info.components["vae"].params == sum(p.numel() for p in m.vae.parameters())
    assert info.components["text_encoder"].params == sum(p.numel() for p in m.text_encoder.model.parameters())


def test_components_subset_and_dtype(folders):
    m = load_model(folders[("ti2v", "official")], components=["vae"])
    assert m.transformer is None and m.text_encoder is None and m.vae is not None
    m = load_model(folders[("ti2v", "official")], dtype=torch.bfloat16, components=["transformer", "text_encoder"])
    dtypes = {p.dtype for p in m.transformer.parameters()}
    assert torch.bfloat16 in dtypes
    assert m.transformer.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert m.text_encoder.model.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        load_model(folders[("ti2v", "official")], components=["unet"])


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_sharded(tmp_path, folders, layout):
    sharded = make_tiny_model(tmp_path / "sharded", "t2v-moe", layout, seed=1, shards=3)
    sub = "high_noise_model" if layout == "official" else "transformer"
    assert (sharded / sub / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((sharded / sub).glob("*.safetensors"))) == 3
    a = load_model(sharded, components=["transformer", "transformer_2"])
    b = load_model(folders[("t2v-moe", layout)], components=["transformer", "transformer_2"])
    _assert_same_modules(a.transformer, b.transformer)
    _assert_same_modules(a.transformer_2, b.transformer_2)
    # an index naming a shard that is gone
    victim = sorted((sharded / sub).glob("*-00002-of-00003.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ModelFolderError, match="missing shard .*00002-of-00003"):
        inspect_folder(sharded)


# ---------------------------------------------------------------------------------------
# error cases


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        inspect_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no Wan model found in .*empty.*config.json.*model_index.json"):
        inspect_folder(tmp_path / "empty")


@pytest.mark.parametrize("layout,remove,pattern", [
    ("official", "Wan2.2_VAE.pth", "missing VAE"),
    ("official", "models_t5_umt5-xxl-enc-bf16.pth", "missing text encoder.*models_t5_umt5-xxl-enc-bf16.pth"),
    ("official", "diffusion_pytorch_model.safetensors", "missing transformer weights.*diffusion_pytorch_model"),
    ("diffusers", "vae", "missing vae folder"),
    ("diffusers", "text_encoder/model.safetensors", "missing text_encoder weights"),
])
def test_missing_component(tmp_path, folders, layout, remove, pattern):
    folder = _copy(folders[("ti2v", layout)], tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelFolderError, match=pattern):
        inspect_folder(folder)


def test_missing_low_noise_expert(tmp_path, folders):
    folder = _copy(folders[("t2v-moe", "official")], tmp_path)
    shutil.rmtree(folder / "low_noise_model")
    with pytest.raises(ModelFolderError, match="low_noise_model"):
        inspect_folder(folder)


def test_missing_tokenizer(tmp_path, folders):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    shutil.rmtree(folder / "google")
    with pytest.raises(ModelFolderError, match="missing tokenizer"):
        load_model(folder, components=["text_encoder"])


def test_truncated_safetensors(tmp_path, folders):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="truncated safetensors file .*diffusion_pytorch_model.safetensors"):
        inspect_folder(folder)
    file.write_bytes(b"\x05\x00")
    with pytest.raises(ModelFolderError, match="diffusion_pytorch_model.safetensors"):
        inspect_folder(folder)
    # a header that is not JSON
    file.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ModelFolderError, match="corrupt .*diffusion_pytorch_model.safetensors"):
        inspect_folder(folder)


@pytest.mark.parametrize("name", ["Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
def test_truncated_pth(tmp_path, folders, name):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=f"cannot read checkpoint .*{name}"):
        inspect_folder(folder)


def _rewrite_pth(file: Path, edit) -> None:
    state = torch.load(file, weights_only=True)
    edit(state)
    torch.save(state, file)


def test_renamed_key_in_pth(tmp_path, folders):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    _rewrite_pth(folder / "Wan2.2_VAE.pth",
                 lambda s: s.__setitem__("decoder.bogus.weight", s.pop("decoder.head.2.bias")))
    with pytest.raises(CheckpointError, match=r"Wan2.2_VAE.pth is missing keys: 'decoder.head.2.bias'"):
        load_model(folder, components=["vae"])


def test_unexpected_key_in_safetensors(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    folder = _copy(folders[("t2v-moe", "diffusers")], tmp_path)
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["blocks.0.extra.weight"] = torch.zeros(2)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected keys: 'blocks.0.extra.weight'"):
        load_model(folder, components=["transformer"])


def test_shape_mismatch(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    folder = _copy(folders[("ti2v", "official")], tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["blocks.1.self_attn.q.weight"] = torch.zeros(256, 128)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: key 'blocks.1.self_attn.q.weight' "
                                              r"has shape \[256, 128\], expected \[256, 256\]"):
        load_model(folder, components=["transformer"])


def test_config_contradicting_shapes(tmp_path, folders):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dim"] = 3072
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json says dim = 3072 .* dim = 256"):
        inspect_folder(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pth_is_loaded_weights_only(tmp_path, folders, capsys):
    folder = _copy(folders[("ti2v", "official")], tmp_path)
    state = torch.load(folder / "Wan2.2_VAE.pth", weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, folder / "Wan2.2_VAE.pth")
    with pytest.raises(ModelFolderError, match=r"Wan2.2_VAE.pth.*refused"):
        inspect_folder(folder)
    assert "pwned" not in capsys.readouterr().out
    # a raw pickle (no torch zip) with a code-running __reduce__ is refused too
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(ModelFolderError, match="raw.pth"):
        load_pth(raw)
    assert "pwned" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# diffusers / transformers as oracles


def test_diffusers_loads_our_diffusers_layout_and_matches(folders):
    diffusers = pytest.importorskip("diffusers")
    folder = folders[("t2v-moe", "diffusers")]
    ours = load_model(folder, components=["transformer", "vae"])
    ref = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer").eval()
    x, t, ctx, y = _dit_inputs(ours.spec.dit)
    padded = torch.zeros(1, 512, ours.spec.dit.text_dim)
    padded[0, : ctx[0].shape[0]] = ctx[0]
    with torch.no_grad():
        mine = ours.transformer(x, t, ctx)
        theirs = ref(x, t, padded, return_dict=False)[0]
    assert (mine - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())

    vae_ref = diffusers.AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        z = ours.vae.encode(video)
        mu = vae_ref.encode(video).latent_dist.mean
        mean = torch.tensor(ours.spec.vae.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(ours.spec.vae.latents_std).view(1, -1, 1, 1, 1)
        assert torch.allclose(z * std + mean, mu, atol=1e-4, rtol=1e-4)
        dec = ours.vae.decode(z)
        dec_ref = vae_ref.decode(mu, return_dict=False)[0].clamp(-1, 1)
    assert dec.shape == dec_ref.shape
    assert (dec - dec_ref).abs().max() < 1e-4


def test_transformers_loads_our_text_encoder_and_matches(folders):
    transformers = pytest.importorskip("transformers")
    folder = folders[("ti2v", "diffusers")]
    ours = load_model(folder, components=["text_encoder"]).text_encoder
    ref = transformers.UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    ids, mask = ours.tokenizer(["two cats sleep near the quiet river"], max_length=16)
    with torch.no_grad():
        mine = ours.model(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    n = int(mask.sum())
    assert torch.allclose(mine[:, :n], theirs[:, :n], atol=1e-4, rtol=1e-4)


def test_diffusers_saved_folder_loads_like_official(tmp_path, folders):
    """Build diffusers/transformers models, save_pretrained, load with kinema: same as official."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    src = folders[("ti2v", "official")]
    off = load_model(src)
    dst = tmp_path / "saved"
    dit_cfg = off.spec.dit
    tr = diffusers.WanTransformer3DModel(
        patch_size=dit_cfg.patch_size, num_attention_heads=dit_cfg.num_heads, attention_head_dim=dit_cfg.head_dim,
        in_channels=dit_cfg.in_dim, out_channels=dit_cfg.out_dim, text_dim=dit_cfg.text_dim,
        freq_dim=dit_cfg.freq_dim, ffn_dim=dit_cfg.ffn_dim, num_layers=dit_cfg.num_layers)
    tr.load_state_dict(keymaps.dit_state_to_diffusers(_state(off.transformer)), strict=True)
    tr.save_pretrained(dst / "transformer")
    v = off.spec.vae
    vae = diffusers.AutoencoderKLWan(base_dim=v.dim, decoder_base_dim=v.dec_dim, z_dim=v.z_dim, is_residual=True,
                                     in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                     latents_mean=list(v.latents_mean), latents_std=list(v.latents_std))
    vae.load_state_dict(keymaps.vae_state_to_diffusers(_state(off.vae), "2.2"), strict=True)
    vae.save_pretrained(dst / "vae")
    t5 = off.spec.t5
    te = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=t5.vocab, d_model=t5.dim, d_kv=t5.dim_attn // t5.num_heads, d_ff=t5.dim_ffn,
        num_layers=t5.num_layers, num_heads=t5.num_heads, relative_attention_num_buckets=t5.num_buckets,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    te.load_state_dict(keymaps.t5_state_to_transformers(_state(off.text_encoder.model), tied_copy=True), strict=False)
    te.save_pretrained(dst / "text_encoder")
    shutil.copytree(src / "google" / "umt5-xxl", dst / "tokenizer")
    (dst / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    mine = load_model(dst)
    assert mine.layout == "diffusers" and mine.spec.dit == off.spec.dit
    _assert_same_modules(mine.transformer, off.transformer)
    _assert_same_modules(mine.vae, off.vae)
    _assert_same_modules(mine.text_encoder.model, off.text_encoder.model)


@pytest.mark.parametrize("kind", ["t2v-moe", "ti2v"])
def test_diffusers_pipeline_loads_tiny_folder(folders, kind):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.WanPipeline.from_pretrained(folders[(kind, "diffusers")])
    assert (pipe.transformer_2 is not None) is (kind == "t2v-moe")
    assert pipe.config.boundary_ratio == (0.875 if kind == "t2v-moe" else None)


def test_i2v_kind_layouts(tmp_path):
    off = make_tiny_model(tmp_path / "o", "i2v-moe", "official", seed=2)
    dif = make_tiny_model(tmp_path / "d", "i2v-moe", "diffusers", seed=2)
    a = load_model(off, components=["transformer_2"])
    b = load_model(dif, components=["transformer_2"])
    assert a.spec.dit.model_type == "i2v" and a.spec.dit.in_dim == 36 and a.spec.defaults.boundary == 0.9
    assert a.transformer is None and a.transformer_2 is not None
    _assert_same_modules(a.transformer_2, b.transformer_2)


def test_in_place_edits_do_not_touch_the_files(folders):
    folder = folders[("ti2v", "official")]
    a = load_model(folder, components=["transformer", "vae"])
    before = a.transformer.blocks[0].self_attn.q.weight.clone()
    a.transformer.blocks[0].self_attn.q.weight.data.mul_(2)  # memory-mapped tensors are private copies
    a.vae.conv2.weight.data.add_(1)
    b = load_model(folder, components=["transformer"])
    assert torch.equal(b.transformer.blocks[0].self_attn.q.weight, before)


def test_kinema_json_overrides(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "ti2v", "official",
                             defaults={"size": [96, 64], "frames": 5, "guidance": 3.5, "sampler": "euler"})
    spec = inspect_folder(folder).spec
    assert spec.defaults.size == (96, 64) and spec.defaults.frames == 5
    assert spec.defaults.guidance == 3.5 and spec.defaults.sampler == "euler"
    assert spec.defaults.shift == 5.0  # untouched fields come from the closest preset
    (folder / "kinema.json").write_text(json.dumps({"defaults": {"colour": 1}}))
    with pytest.raises(ModelFolderError, match="kinema.json: unknown default 'colour'"):
        inspect_folder(folder)
    (folder / "kinema.json").write_text(json.dumps({"defaults": {"size": "big"}}))
    with pytest.raises(ModelFolderError, match="kinema.json: bad value for 'size'"):
        inspect_folder(folder)
    (folder / "kinema.json").write_text(json.dumps({"defaults": {"image_first": "yes"}}))
    with pytest.raises(ModelFolderError, match="kinema.json: bad value for 'image_first'"):
        inspect_folder(folder)
    (folder / "kinema.json").write_text(json.dumps({"defaults": {"image_first": True}}))
    assert inspect_folder(folder).spec.defaults.image_first is True
    for bad in (0, 1.5, "2", True):
        (folder / "kinema.json").write_text(json.dumps({"defaults": {"image_first_scale": bad}}))
        with pytest.raises(ModelFolderError, match="bad value for 'image_first_scale'"):
            inspect_folder(folder)
    (folder / "kinema.json").write_text(json.dumps({"defaults": {"image_first_scale": 2}}))
    assert inspect_folder(folder).spec.defaults.image_first_scale == 2
