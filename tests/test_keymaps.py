"""Key renaming rules against the full-size reference manifests (every key, both directions)."""

from __future__ import annotations

import json

import pytest

from kinema import keymaps as km

DIT_MANIFESTS = ["ti2v_5B", "t2v_A14B", "i2v_A14B"]


def _load(keys_dir, name):
    return json.loads((keys_dir / name).read_text())


@pytest.mark.parametrize("variant", DIT_MANIFESTS)
def test_dit_map_matches_reference(keys_dir, variant):
    ref = _load(keys_dir, f"diffusers_transformer_{variant}.json")
    mapping = ref["official_to_diffusers"]
    official = _load(keys_dir, f"official_wanmodel_{variant if variant == 'ti2v_5B' else variant + '_expert'}.json")["keys"]
    assert set(mapping) == set(official)  # complete over the official keys
    for o, d in mapping.items():
        assert km.dit_to_diffusers(o) == d
        assert km.dit_to_official(d) == o
    # bijective onto the diffusers key set
    assert sorted(mapping.values()) == sorted(ref["keys"])
    assert len(set(mapping.values())) == len(mapping)


def test_dit_norm_swap_and_prefix():
    assert km.dit_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert km.dit_to_official("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert km.dit_to_diffusers("head.modulation") == "scale_shift_table"
    assert km.dit_to_diffusers("blocks.0.modulation") == "blocks.0.scale_shift_table"
    assert km.dit_to_diffusers("model.diffusion_model.head.head.weight") == "proj_out.weight"
    assert km.dit_to_official("model.diffusion_model.blocks.1.ffn.0.bias") == "blocks.1.ffn.0.bias"
    state = {"model.diffusion_model.blocks.0.norm3.bias": 1, "model.diffusion_model.head.modulation": 2}
    assert km.dit_state_to_official(state) == {"blocks.0.norm3.bias": 1, "head.modulation": 2}
    with pytest.raises(KeyError):
        km.dit_to_official("blocks.0.self_attn.q.weight")  # official name fed to the reverse map
    with pytest.raises(KeyError):
        km.dit_to_diffusers("foo.weight")


@pytest.mark.parametrize("version,tag", [("2.1", "wan2_1"), ("2.2", "wan2_2")])
def test_vae_map_matches_reference(keys_dir, version, tag):
    official = _load(keys_dir, f"official_vae_{tag}.json")["keys"]
    diffusers = _load(keys_dir, f"diffusers_vae_{tag}.json")["keys"]
    mapped = {k: km.vae_to_diffusers(k, version) for k in official}
    assert sorted(mapped.values()) == sorted(diffusers)  # complete and one-to-one
    for o, d in mapped.items():
        assert official[o][0] == diffusers[d][0], (o, d)  # same tensor shape
        assert km.vae_to_official(d, version) == o
    # The versions differ: a key of one layout is rejected by the other version's rules.
    other = "2.1" if version == "2.2" else "2.2"
    nested = [k for k in official if k.startswith(("encoder.downsamples.", "decoder.upsamples."))]
    for k in nested:
        with pytest.raises(KeyError):
            km.vae_to_diffusers(k, other)


def test_vae_spot_checks():
    assert km.vae_to_diffusers("conv1.weight", "2.1") == "quant_conv.weight"
    assert km.vae_to_diffusers("decoder.upsamples.7.time_conv.bias", "2.1") == "decoder.up_blocks.1.upsamplers.0.time_conv.bias"
    assert km.vae_to_diffusers("decoder.upsamples.9.residual.3.gamma", "2.1") == "decoder.up_blocks.2.resnets.1.norm2.gamma"
    assert km.vae_to_diffusers("encoder.downsamples.1.downsamples.2.resample.1.weight", "2.2") == "encoder.down_blocks.1.downsampler.resample.1.weight"
    assert km.vae_to_diffusers("decoder.middle.1.to_qkv.weight", "2.2") == "decoder.mid_block.attentions.0.to_qkv.weight"


def test_t5_map_matches_reference(keys_dir):
    ref = _load(keys_dir, "transformers_umt5_xxl_encoder.json")
    mapping = ref["official_to_transformers"]
    official = _load(keys_dir, "official_t5_umt5_xxl_encoder.json")["keys"]
    assert set(mapping) == set(official)
    for o, t in mapping.items():
        assert km.t5_to_transformers(o) == t
        assert km.t5_to_official(t) == o
    assert len(set(mapping.values())) == len(mapping)
    extra = set(ref["keys"]) - set(mapping.values())
    assert extra == {km.T5_TIED_KEY}
    assert km.t5_to_official(km.T5_TIED_KEY) == "token_embedding.weight"


def test_t5_tied_embedding_either_key():
    only_tied = {km.T5_TIED_KEY: "E", "encoder.final_layer_norm.weight": "N"}
    assert km.t5_state_to_official(only_tied) == {"token_embedding.weight": "E", "norm.weight": "N"}
    both = {"shared.weight": "S", km.T5_TIED_KEY: "E"}
    assert km.t5_state_to_official(both) == {"token_embedding.weight": "S"}
    assert km.t5_state_to_transformers({"token_embedding.weight": 1}, tied_copy=True) == {
        "shared.weight": 1, km.T5_TIED_KEY: 1}


def test_whole_dict_keeps_unknown_keys():
    out = km.dit_state_to_official({"proj_out.weight": 1, "mystery.weight": 2})
    assert out == {"head.head.weight": 1, "mystery.weight": 2}
