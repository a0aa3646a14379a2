"""umT5 encoder: golden parity, full-size structure, transformers oracle, trimmed-length path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import golden_files
from kinema.config import T5Config
from kinema.errors import CheckpointError
from kinema.models.t5 import TextEncoder, T5Encoder, relative_position_bucket
from kinema.testing.golden import run_case
from kinema.train.tiny_tokenizer import make_tiny_tokenizer
from kinema.tokenizer import UMT5Tokenizer

TINY = T5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, text_len=64)


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every parameter, with norm weights around 1 (all paths contribute)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            out[name] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif "pos_embedding" in name:
            out[name] = 0.5 * torch.randn(p.shape, generator=g)
        elif "token_embedding" in name:
            out[name] = torch.randn(p.shape, generator=g)
        else:
            out[name] = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    return out


def tiny_model(cfg: T5Config = TINY, seed: int = 0) -> T5Encoder:
    with torch.device("meta"):
        shell = T5Encoder(cfg)
    return T5Encoder.from_state_dict(random_state(shell, seed), cfg)


@pytest.mark.parametrize("path", golden_files("t5*.safetensors"), ids=lambda p: p.stem)
def test_golden(path: Path):
    result = run_case(path)
    assert result.get("error") is None, result.get("error")
    assert result["ok"], result["outputs"]


def test_full_size_structure_matches_official(keys_dir):
    manifest = json.loads((keys_dir / "official_t5_umt5_xxl_encoder.json").read_text())["keys"]
    with torch.device("meta"):
        model = T5Encoder(T5Config())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: v[0] for k, v in manifest.items()}
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


def test_relative_position_buckets():
    rel = torch.tensor([0, 1, -1, 7, -7, 8, -8, 20, 127, -128, 200, -10_000])
    # bidirectional, 32 buckets, max distance 128: keys after the query use buckets 16..31
    expected = [0, 17, 1, 23, 7, 24, 8, 26, 31, 15, 31, 15]
    assert relative_position_bucket(rel, 32, 128).tolist() == expected


def _hf_umt5(cfg: T5Config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_dist,
        dropout_rate=0.0, layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )
    return transformers.UMT5EncoderModel(hf_cfg).eval()


def _official_to_transformers(keys_dir: Path, official_keys) -> dict[str, str]:
    """The reference name map (written for 24 layers), applied to any layer index."""
    table = json.loads((keys_dir / "transformers_umt5_xxl_encoder.json").read_text())["official_to_transformers"]
    out = {}
    for key in official_keys:
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            out[key] = table[key]
        else:
            out[key] = table[f"blocks.0.{m.group(2)}"].replace("block.0.", f"block.{m.group(1)}.", 1)
    return out


def test_transformers_oracle(keys_dir):
    torch.manual_seed(0)
    ours = tiny_model(seed=1)
    hf = _hf_umt5(TINY)
    names = _official_to_transformers(keys_dir, ours.state_dict())
    hf_state = {names[k]: v for k, v in ours.state_dict().items()}
    hf_state["encoder.embed_tokens.weight"] = hf_state["shared.weight"]
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not missing and not unexpected

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, TINY.vocab, (3, 40), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate((40, 23, 5)):
        mask[b, :n] = 1
        ids[b, n - 1] = 1
        ids[b, n:] = 0
    with torch.no_grad():
        got = ours(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate((40, 23, 5)):
        assert (got[b, :n] - ref[b, :n]).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())

    # A transformers (diffusers text_encoder/) state dict, renamed back, loads into ours strictly.
    from kinema.keymaps import t5_state_to_official

    back = T5Encoder.from_state_dict(t5_state_to_official(hf.state_dict()), TINY)
    with torch.no_grad():
        assert torch.equal(back(ids, mask), got)


def test_trimmed_length_equals_padded_run(tmp_path):
    tok = UMT5Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "tok"))
    model = tiny_model(seed=2)
    encoder = TextEncoder(tok, model)
    prompts = ["a red fox runs across a snowy field", "two cats", "word " * 200, "two dogs", ""]
    feats = encoder.encode(prompts)

    ids, mask = tok(prompts, max_length=TINY.text_len)
    with torch.no_grad():
        padded = model(ids, mask)
    lengths = mask.sum(1).tolist()
    assert lengths[2] == TINY.text_len  # the long prompt is truncated to text_len incl. EOS
    assert [f.shape for f in feats] == [(n, TINY.dim) for n in lengths]
    for b, n in enumerate(lengths):
        torch.testing.assert_close(feats[b], padded[b, :n], atol=1e-5, rtol=1e-5)


def test_bf16_weights_run_and_track_float32():
    model = tiny_model(seed=4)
    ids = torch.tensor([[5, 9, 44, 120, 1, 0, 0], [7, 8, 9, 10, 11, 12, 1]])
    mask = (torch.arange(7) < torch.tensor([[5], [7]])).long()
    with torch.no_grad():
        ref = model(ids, mask)
        half = T5Encoder.from_state_dict(model.state_dict(), TINY, dtype=torch.bfloat16)
        out = half(ids, mask)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_text_encoder_device_dtype_move(tmp_path):
    tok = UMT5Tokenizer.from_dir(make_tiny_tokenizer(tmp_path / "tok"))
    encoder = TextEncoder(tok, tiny_model()).to(dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16 and encoder.device.type == "cpu"
    (feat,) = encoder.encode(["a small boat"])
    assert feat.dtype == torch.bfloat16 and feat.shape[1] == TINY.dim


def test_wrong_weights_raise_checkpoint_error():
    state = tiny_model().state_dict()
    state.pop("norm.weight")
    with pytest.raises(CheckpointError):
        T5Encoder.from_state_dict(state, TINY)
    bad = tiny_model().state_dict()
    bad["blocks.0.attn.q.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError):
        T5Encoder.from_state_dict(bad, TINY)
